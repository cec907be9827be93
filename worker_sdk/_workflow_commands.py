"""What workflow code hands to its run's event loop, and how replay checks it.

The handles that workflow code holds (activities, durable timers, children, other
runs), the commands waiting for history to record them, and the rules by which a
recorded event matches the command that produced it (``mismatch``). The loop itself
is ``_workflow_instance.WorkflowInstanceImpl``; the handles reach it only through the
callbacks and the ``ExternalRequests`` protocol below, so this module does not
import it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from google.protobuf.duration_pb2 import Duration

from tideflow.api.v1 import command_pb2, history_pb2
from tideflow.api.v1.command_pb2 import Command
from tideflow.api.v1.common_pb2 import Payloads
from tideflow.api.v1.history_pb2 import HistoryEvent

from ._workflow_inputs import ActivityCancellationType, StartActivityInput
from .placement import ExecutedAt, apply_placement
from .workflow import HandlerRef

# The generated modules' enum constants: plain module attributes, where
# ``EventType.EVENT_TYPE_X`` runs the enum wrapper's ``__getattr__`` on every use (dozens
# of times per workflow task).
ET = history_pb2
CT = command_pb2

# Marker recorded by workflow.patched / deprecate_patch.
PATCH_MARKER = "tideflow_patch"


class ExternalRequests(Protocol):
    """What child and external handles ask of the run's loop."""

    def create_future(self) -> asyncio.Future[Any]: ...

    def signal_external(
        self,
        workflow_id: str,
        run_id: str,
        signal: HandlerRef,
        args: list[Any],
        *,
        child_only: bool = False,
    ) -> asyncio.Future[None]: ...

    def cancel_external(
        self, workflow_id: str, run_id: str, *, child_only: bool = False
    ) -> asyncio.Future[None]: ...


@dataclass(slots=True, eq=False)
class PendingCommand:
    command: Command
    # Called with the matching history event when history records the command.
    on_recorded: Callable[[HistoryEvent], None] | None = None
    dropped: bool = False


def schedule_activity_command(
    request: StartActivityInput, activity_id: str, task_queue: str, payloads: Payloads
) -> Command:
    """The command of ``workflow.start_activity``."""
    command = Command(command_type=CT.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK)
    a = command.schedule_activity_task_command_attributes
    a.activity_id = activity_id
    a.activity_type.name = request.activity_type
    a.task_queue.name = task_queue
    a.input.CopyFrom(payloads)
    for field, value in (
        ("schedule_to_close_timeout", request.schedule_to_close_timeout),
        ("schedule_to_start_timeout", request.schedule_to_start_timeout),
        ("start_to_close_timeout", request.start_to_close_timeout),
        ("heartbeat_timeout", request.heartbeat_timeout),
    ):
        if value is not None:
            getattr(a, field).CopyFrom(_duration(value))
    if request.retry_policy is not None:
        a.retry_policy.CopyFrom(request.retry_policy.to_proto())
    apply_placement(a, request.placement, request.requirements)
    return command


@functools.lru_cache(maxsize=256)
def _duration(value: timedelta) -> Duration:
    """``value`` as a Duration to copy from (never to change): workflows use a few
    timeouts over and over, and protobuf's ``FromTimedelta`` is pure Python."""
    duration = Duration()
    duration.FromTimedelta(value)
    return duration


class ActivityHandle(asyncio.Future[Any]):
    """Future of one activity; cancelling it asks the server to cancel the activity."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        activity_id: str,
        cancellation_type: ActivityCancellationType,
        on_cancel: Callable[[ActivityHandle], None],
    ) -> None:
        super().__init__(loop=loop)
        self._on_cancel = on_cancel
        self.activity_id = activity_id
        self.scheduled_event_id = 0
        self.result_type: Any = None
        self.cancellation_type = cancellation_type
        self.cancel_requested = False
        self._pending: PendingCommand | None = None
        self.executed_at: ExecutedAt | None = None

    def cancel(self, msg: Any | None = None) -> bool:
        if self.done():
            return False
        if not self.cancel_requested:
            self.cancel_requested = True
            self._on_cancel(self)
        if (
            self.cancellation_type == ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
            and self.scheduled_event_id
        ):
            # Stay pending until history says how the activity ended; the awaiting
            # task keeps its cancellation request and is cancelled then.
            return True
        return super().cancel(msg)


class DurableTimerHandle(asyncio.TimerHandle):
    """A ``call_later`` of workflow code: a durable timer (``timer_id`` empty: a call on
    the next turn of the loop, nothing durable)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        when: float,
        callback: Callable[..., Any],
        args: Sequence[Any],
        context: contextvars.Context | None,
        timer_id: str,
        on_cancel: Callable[[DurableTimerHandle], None],
    ) -> None:
        super().__init__(when, callback, args, loop, context)
        self._on_cancel = on_cancel
        self.timer_id = timer_id
        self.started_event_id = 0
        self._pending: PendingCommand | None = None

    def cancel(self) -> None:
        if not self.cancelled():
            self._on_cancel(self)
        super().cancel()


class ChildHandle:
    """A child workflow as the parent sees it; awaiting it gives the child's result."""

    def __init__(self, instance: ExternalRequests, workflow_id: str, workflow_type: str) -> None:
        self._instance = instance
        self.id = workflow_id
        self.workflow_type = workflow_type
        self.first_execution_run_id = ""
        self.initiated_event_id = 0
        self.result_type: Any = None
        self.started: asyncio.Future[ChildHandle] = instance.create_future()
        self.result: asyncio.Future[Any] = instance.create_future()

    def __await__(self) -> Generator[Any, None, Any]:
        return self.result.__await__()

    async def signal(
        self, signal: HandlerRef, arg: Any = None, *, args: Sequence[Any] = ()
    ) -> None:
        values = list(args) if args else ([] if arg is None else [arg])
        await self._instance.signal_external(
            self.id, self.first_execution_run_id, signal, values, child_only=True
        )

    async def cancel(self) -> None:
        await self._instance.cancel_external(self.id, self.first_execution_run_id, child_only=True)


class ExternalHandle:
    """Another run, as ``workflow.get_external_workflow_handle`` returns it."""

    def __init__(self, instance: ExternalRequests, workflow_id: str, run_id: str | None) -> None:
        self._instance = instance
        self.id = workflow_id
        self.run_id = run_id

    async def signal(
        self, signal: HandlerRef, arg: Any = None, *, args: Sequence[Any] = ()
    ) -> None:
        values = list(args) if args else ([] if arg is None else [arg])
        await self._instance.signal_external(self.id, self.run_id or "", signal, values)

    async def cancel(self) -> None:
        await self._instance.cancel_external(self.id, self.run_id or "")


def set_result_unless_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


EVENT_OF_COMMAND = {
    CT.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK: ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
    CT.COMMAND_TYPE_START_TIMER: ET.EVENT_TYPE_TIMER_STARTED,
    CT.COMMAND_TYPE_CANCEL_TIMER: ET.EVENT_TYPE_TIMER_CANCELED,
    CT.COMMAND_TYPE_REQUEST_CANCEL_ACTIVITY_TASK: ET.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED,
    CT.COMMAND_TYPE_COMPLETE_WORKFLOW_EXECUTION: ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
    CT.COMMAND_TYPE_FAIL_WORKFLOW_EXECUTION: ET.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
    CT.COMMAND_TYPE_RECORD_MARKER: ET.EVENT_TYPE_MARKER_RECORDED,
    CT.COMMAND_TYPE_CANCEL_WORKFLOW_EXECUTION: ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
    CT.COMMAND_TYPE_CONTINUE_AS_NEW_WORKFLOW_EXECUTION: (
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
    ),
    CT.COMMAND_TYPE_START_CHILD_WORKFLOW_EXECUTION: (
        ET.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED
    ),
    CT.COMMAND_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION: (
        ET.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED
    ),
    CT.COMMAND_TYPE_REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION: (
        ET.EVENT_TYPE_REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED
    ),
    CT.COMMAND_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES: (
        ET.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES
    ),
}
# Events that neither match a command nor resolve anything in workflow code.
NOTHING_TO_APPLY = frozenset(
    {
        ET.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
        ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
        ET.EVENT_TYPE_WORKFLOW_TASK_FAILED,
        ET.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT,
        ET.EVENT_TYPE_ACTIVITY_TASK_STARTED,
    }
)
CHILD_EVENTS = frozenset(
    {
        ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED,
        ET.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_FAILED,
        ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED,
        ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_FAILED,
        ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_CANCELED,
        ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TIMED_OUT,
        ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TERMINATED,
    }
)
EXTERNAL_OUTCOMES = frozenset(
    {
        ET.EVENT_TYPE_EXTERNAL_WORKFLOW_EXECUTION_SIGNALED,
        ET.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_FAILED,
        ET.EVENT_TYPE_EXTERNAL_WORKFLOW_EXECUTION_CANCEL_REQUESTED,
        ET.EVENT_TYPE_REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION_FAILED,
    }
)


def mismatch(command: Command, event: HistoryEvent) -> str | None:
    """Why ``command`` does not produce ``event``, or None if it does."""
    ct = command.command_type
    et = event.event_type
    if EVENT_OF_COMMAND.get(ct) != et:
        return "different kinds"
    if ct == CT.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK:
        c = command.schedule_activity_task_command_attributes
        e = event.activity_task_scheduled_event_attributes
        if c.activity_type.name != e.activity_type.name:
            return f"activity type {c.activity_type.name!r} != recorded {e.activity_type.name!r}"
        if c.activity_id != e.activity_id:
            return f"activity id {c.activity_id!r} != recorded {e.activity_id!r}"
    elif ct == CT.COMMAND_TYPE_START_TIMER:
        timer_id = command.start_timer_command_attributes.timer_id
        if timer_id != event.timer_started_event_attributes.timer_id:
            return f"timer id {timer_id!r} differs"
    elif ct == CT.COMMAND_TYPE_CANCEL_TIMER:
        timer_id = command.cancel_timer_command_attributes.timer_id
        if timer_id != event.timer_canceled_event_attributes.timer_id:
            return f"timer id {timer_id!r} differs"
    elif ct == CT.COMMAND_TYPE_START_CHILD_WORKFLOW_EXECUTION:
        child = command.start_child_workflow_execution_command_attributes
        recorded = event.start_child_workflow_execution_initiated_event_attributes
        if (child.workflow_id, child.workflow_type.name) != (
            recorded.workflow_id,
            recorded.workflow_type.name,
        ):
            return f"child {child.workflow_type.name}/{child.workflow_id!r} differs"
    elif ct == CT.COMMAND_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION:
        sig = command.signal_external_workflow_execution_command_attributes
        rec = event.signal_external_workflow_execution_initiated_event_attributes
        if (sig.execution.workflow_id, sig.signal_name) != (
            rec.workflow_execution.workflow_id,
            rec.signal_name,
        ):
            return f"signal {sig.signal_name!r} to {sig.execution.workflow_id!r} differs"
    elif ct == CT.COMMAND_TYPE_REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION:
        target = command.request_cancel_external_workflow_execution_command_attributes.workflow_id
        rec_cancel = event.request_cancel_external_workflow_execution_initiated_event_attributes
        if target != rec_cancel.workflow_execution.workflow_id:
            return f"cancellation of {target!r} differs"
    elif ct == CT.COMMAND_TYPE_RECORD_MARKER:
        name = command.record_marker_command_attributes.marker_name
        if name != event.marker_recorded_event_attributes.marker_name:
            return f"marker name {name!r} differs"
    elif ct == CT.COMMAND_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
        names = sorted(
            command.upsert_workflow_search_attributes_command_attributes.search_attributes.indexed_fields
        )
        recorded_names = sorted(
            event.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
        )
        if names != recorded_names:
            return f"upserted search attributes {names} differ from recorded {recorded_names}"
    return None
