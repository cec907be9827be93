"""The deterministic runtime of one workflow run.

Each run lives in its own event loop (``WorkflowInstanceImpl``, an asyncio loop that
only advances when the worker applies an activation): no wall clock, no real I/O, no
threads. ``call_later`` — and so ``asyncio.sleep`` and ``asyncio.timeout`` — becomes a
durable timer.

Processing a history: events up to each completed workflow task are applied as one
activation (resolutions of activities, timers, ...), the code runs until every
coroutine is blocked, and the commands it emitted must match, in order and kind, the
command events that history recorded after that task. The last, still open
workflow task produces the commands sent back to the server. A mismatch raises
``NonDeterminismError``.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from tideflow.api.events import COMMAND_EVENTS, attributes_of, event_type_name
from tideflow.api.search_attributes import SearchAttributeValue, encode_search_attributes
from tideflow.api.v1 import common_pb2
from tideflow.api.v1.command_pb2 import Command, CommandType, RecordMarkerCommandAttributes
from tideflow.api.v1.history_pb2 import HistoryEvent

from . import exceptions as exc
from ._local_activities import LocalActivities, LocalActivityHandle, markers_of_task
from ._workflow_commands import (
    CHILD_EVENTS,
    CT,
    ET,
    EXTERNAL_OUTCOMES,
    NOTHING_TO_APPLY,
    PATCH_MARKER,
    ActivityHandle,
    ChildHandle,
    DurableTimerHandle,
    ExternalHandle,
    PendingCommand,
    mismatch,
    schedule_activity_command,
    set_result_unless_done,
)
from ._workflow_inputs import (
    ActivityCancellationType,
    StartActivityInput,
    StartChildWorkflowInput,
    StartLocalActivityInput,
)
from ._workflow_loop import DeterministicLoop
from .converter import DataConverter
from .placement import executed_at_of
from .workflow import (
    HandlerRef,
    Info,
    WorkflowDefinition,
    _Runtime,
    handler_name,
)

log = logging.getLogger("tideflow.worker")


def current_instance() -> WorkflowInstanceImpl:
    loop = asyncio.events._get_running_loop()
    if isinstance(loop, WorkflowInstanceImpl):
        return loop
    raise RuntimeError("not in a workflow: this works only inside @workflow.defn code")


def current_instance_or_none() -> WorkflowInstanceImpl | None:
    loop = asyncio.events._get_running_loop()
    return loop if isinstance(loop, WorkflowInstanceImpl) else None


class WorkflowInstanceImpl(DeterministicLoop, _Runtime):
    """One workflow run's deterministic event loop and the state replay builds.

    It implements ``workflow._Runtime``, the contract the ``workflow`` module's
    functions call (the ``workflow_*`` methods): being the running loop of workflow
    code is how they find it.

    The loop itself (ready queue, history time, tasks) is ``DeterministicLoop``; this
    class decides what its ``call_later`` is: a durable timer (``_timer``).
    """

    def __init__(
        self,
        definition: WorkflowDefinition,
        *,
        namespace: str,
        workflow_id: str,
        run_id: str,
        task_queue: str,
        converter: DataConverter,
    ) -> None:
        super().__init__(workflow_id)
        self._definition = definition
        self._converter = converter
        self._namespace = namespace
        self._run_id = run_id
        self._task_queue = task_queue
        # Seeded once the seed is known (WorkflowExecutionStarted): seeding is not free.
        self._random: random.Random | None = None
        self.info: Info | None = None  # set by WorkflowExecutionStarted
        self._seq = 0
        self._commands: list[PendingCommand] = []  # emitted in the current activation
        self._unmatched: collections.deque[PendingCommand] = collections.deque()
        self._resolutions: list[HistoryEvent] = []
        self._activities_by_event: dict[int, ActivityHandle] = {}
        self._timers: dict[str, DurableTimerHandle] = {}
        self._timers_by_event: dict[int, DurableTimerHandle] = {}
        self._start_args: list[Any] | None = None
        self._main: asyncio.Task[Any] | None = None
        self._completed = False
        self._object: Any = None  # the workflow class instance
        self._conditions: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._cancel_requested = False
        self._handler_tasks: list[asyncio.Task[Any]] = []
        self._handler_error: BaseException | None = None
        # Patch ids with a marker in history (seen so far, or in the task replayed next).
        self._patches_in_history: set[str] = set()
        self._patch_results: dict[str, bool] = {}
        self._children: dict[int, ChildHandle] = {}  # by initiated event id
        self._external: dict[int, asyncio.Future[None]] = {}  # by initiated event id
        self.next_event_id = 1  # next history event this instance expects
        self.last_started_event_id = 0  # started id of the last activation it ran
        self._replaying = False
        # Code re-runs what already happened outside of history replay too: the
        # throwaway catch-up before a query, and teardown. Its log lines are not new.
        self._rerunning = False
        self._answering_query = False
        self.local_activities = LocalActivities(self, self, converter)

    # -------------------------------------------------------- the runtime contract

    def workflow_info(self) -> Info:
        if self.info is None:
            raise RuntimeError("the run has not started: no WorkflowExecutionStarted yet")
        return self.info

    def workflow_now(self) -> datetime:
        return datetime.fromtimestamp(self._time_us / 1_000_000, tz=UTC)

    def workflow_random(self) -> random.Random:
        if self._random is None:
            self._random = random.Random(0)
        return self._random

    def workflow_is_cancel_requested(self) -> bool:
        return self._cancel_requested

    def workflow_is_replaying(self) -> bool:
        # A query handler runs once per query: its lines are new, even mid-replay.
        return not self._answering_query and (self._replaying or self._rerunning)

    # ------------------------------------------------------------- commands

    def _timer(
        self,
        delay: float,
        callback: Callable[..., Any],
        args: Sequence[Any],
        context: contextvars.Context | None,
    ) -> asyncio.TimerHandle:
        """``call_later`` of workflow code: a durable timer (a StartTimer command)."""
        if delay <= 0:
            # Nothing durable to wait for: run it on the next turn of the loop.
            handle = DurableTimerHandle(
                self, self.time(), callback, args, context, "", self._cancel_timer
            )
            self._ready.append(handle)
            return handle
        timer_id = self._next_seq()
        handle = DurableTimerHandle(
            self, self.time() + delay, callback, args, context, timer_id, self._cancel_timer
        )
        command = Command(command_type=CT.COMMAND_TYPE_START_TIMER)
        attrs = command.start_timer_command_attributes
        attrs.timer_id = timer_id
        attrs.start_to_fire_timeout.FromMicroseconds(max(1000, int(delay * 1_000_000)))

        def recorded(event: HistoryEvent) -> None:
            handle.started_event_id = event.event_id
            self._timers_by_event[event.event_id] = handle

        handle._pending = self._emit(command, recorded)
        self._timers[timer_id] = handle
        return handle

    def _next_seq(self) -> str:
        self._seq += 1
        return str(self._seq)

    # The LocalActivityHost contract (_local_activities.py).
    def next_seq(self) -> str:
        return self._next_seq()

    def workflow_time_us(self) -> int:
        return self._time_us

    def emit_command(self, command: Command) -> None:
        self._emit(command)

    def workflow_start_local_activity(
        self, request: StartLocalActivityInput
    ) -> LocalActivityHandle:
        return self.local_activities.start(request)

    def resolve_local_activity(self, marker: RecordMarkerCommandAttributes) -> list[Command]:
        """A local activity's outcome (live): record its marker and run the code until
        it blocks. The commands stay in the open task until ``take_commands``."""
        self._apply_local_marker(marker)
        return []

    def take_commands(self) -> list[Command]:
        """All commands of the open workflow task (sent with its completion)."""
        return self._take_commands()

    def _apply_local_marker(self, marker: RecordMarkerCommandAttributes) -> None:
        previous = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(self)
        try:
            self.local_activities.apply_marker(marker)
            self._run_code()
        finally:
            asyncio.events._set_running_loop(previous)
        self._after_run()

    def _emit(
        self, command: Command, on_recorded: Callable[[HistoryEvent], None] | None = None
    ) -> PendingCommand:
        pending = PendingCommand(command, on_recorded)
        self._commands.append(pending)
        return pending

    def workflow_sleep(self, seconds: float) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self.create_future()
        if seconds <= 0:
            fut.set_result(None)
            return fut
        handle = self.call_later(seconds, set_result_unless_done, fut)
        fut.add_done_callback(lambda f: handle.cancel() if f.cancelled() else None)
        return fut

    def workflow_start_activity(self, request: StartActivityInput) -> ActivityHandle:
        seq = self._next_seq()
        handle = ActivityHandle(
            self, request.activity_id or seq, request.cancellation_type, self._cancel_activity
        )
        handle.result_type = request.result_type
        command = schedule_activity_command(
            request,
            handle.activity_id,
            request.task_queue or self._task_queue,
            self._converter.to_payloads(request.args),
        )

        def recorded(event: HistoryEvent) -> None:
            handle.scheduled_event_id = event.event_id
            self._activities_by_event[event.event_id] = handle

        handle._pending = self._emit(command, recorded)
        return handle

    def _cancel_activity(self, handle: ActivityHandle) -> None:
        if handle.cancellation_type == ActivityCancellationType.ABANDON:
            return
        pending = handle._pending
        if (
            handle.scheduled_event_id == 0
            and pending is not None
            and not pending.dropped
            and pending in self._commands
        ):
            # Never sent to the server: just drop the command.
            pending.dropped = True
            self._commands.remove(pending)
            return
        if handle.scheduled_event_id:
            command = Command(command_type=CT.COMMAND_TYPE_REQUEST_CANCEL_ACTIVITY_TASK)
            command.request_cancel_activity_task_command_attributes.scheduled_event_id = (
                handle.scheduled_event_id
            )
            self._emit(command)

    def workflow_start_child_workflow(
        self, request: StartChildWorkflowInput
    ) -> asyncio.Future[ChildHandle]:
        handle = ChildHandle(self, request.workflow_id, request.workflow_type)
        handle.result_type = request.result_type
        command = Command(command_type=CT.COMMAND_TYPE_START_CHILD_WORKFLOW_EXECUTION)
        a = command.start_child_workflow_execution_command_attributes
        a.namespace = self._namespace
        a.workflow_id = request.workflow_id
        a.workflow_type.name = request.workflow_type
        a.task_queue.name = request.task_queue or self._task_queue
        a.input.CopyFrom(self._converter.to_payloads(request.args))
        a.parent_close_policy = int(request.parent_close_policy)  # type: ignore[assignment]
        a.home_cluster = request.home or ""
        for field, value in (
            ("workflow_execution_timeout", request.execution_timeout),
            ("workflow_run_timeout", request.run_timeout),
            ("workflow_task_timeout", request.task_timeout),
        ):
            if value is not None:
                getattr(a, field).FromTimedelta(value)

        def recorded(event: HistoryEvent) -> None:
            handle.initiated_event_id = event.event_id
            self._children[event.event_id] = handle

        self._emit(command, recorded)
        return handle.started

    def workflow_external_handle(self, workflow_id: str, run_id: str | None) -> ExternalHandle:
        return ExternalHandle(self, workflow_id, run_id)

    def signal_external(
        self,
        workflow_id: str,
        run_id: str,
        signal: HandlerRef,
        args: list[Any],
        *,
        child_only: bool = False,
    ) -> asyncio.Future[None]:
        done: asyncio.Future[None] = self.create_future()
        command = Command(command_type=CT.COMMAND_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION)
        a = command.signal_external_workflow_execution_command_attributes
        a.namespace = self._namespace
        a.execution.workflow_id = workflow_id
        a.execution.run_id = run_id
        a.signal_name = handler_name(signal, "__tideflow_signal__")
        a.input.CopyFrom(self._converter.to_payloads(args))
        a.child_workflow_only = child_only
        self._emit(command, lambda event: self._external.__setitem__(event.event_id, done))
        return done

    def cancel_external(
        self, workflow_id: str, run_id: str, *, child_only: bool = False
    ) -> asyncio.Future[None]:
        done: asyncio.Future[None] = self.create_future()
        command = Command(command_type=CT.COMMAND_TYPE_REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION)
        a = command.request_cancel_external_workflow_execution_command_attributes
        a.namespace = self._namespace
        a.workflow_id = workflow_id
        a.run_id = run_id
        a.child_workflow_only = child_only
        self._emit(command, lambda event: self._external.__setitem__(event.event_id, done))
        return done

    def workflow_wait_condition(
        self, fn: Callable[[], bool], timeout: float | None
    ) -> Awaitable[None]:
        fut: asyncio.Future[None] = self.create_future()
        self._conditions.append((fn, fut))
        if timeout is None:
            return fut
        return asyncio.wait_for(fut, timeout)

    def _check_conditions(self) -> bool:
        """Resolve the waits whose condition holds now; True if any was resolved."""
        if not self._conditions:
            return False
        resolved = False
        for fn, fut in list(self._conditions):
            if fut.done():
                self._conditions.remove((fn, fut))
            elif fn():
                fut.set_result(None)
                self._conditions.remove((fn, fut))
                resolved = True
        return resolved

    def workflow_patched(self, patch_id: str, *, deprecated: bool) -> bool:
        result = self._patch_results.get(patch_id)
        if result is None:
            # Replaying a task recorded before the patch existed: the old path, unless
            # history has the patch's marker. Live code always takes the new path.
            result = (not self._replaying) or patch_id in self._patches_in_history
            self._patch_results[patch_id] = result
            if result:
                command = Command(command_type=CT.COMMAND_TYPE_RECORD_MARKER)
                marker = command.record_marker_command_attributes
                marker.marker_name = PATCH_MARKER
                marker.details["patch_id"].CopyFrom(self._converter.to_payloads([patch_id]))
                marker.details["deprecated"].CopyFrom(self._converter.to_payloads([deprecated]))
                self._emit(command)
        return result

    def query(self, name: str, args: common_pb2.Payloads | None) -> Any:
        """Answer a query from the current (replayed) state."""
        handler = self._definition.queries.get(name)
        if handler is None:
            known = sorted(self._definition.queries)
            raise KeyError(f"workflow has no query {name!r} (known queries: {known})")
        if self._object is None:
            self._object = self._definition.cls()
        previous = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(self)
        self._answering_query = True
        try:
            values = self._converter.from_payloads(args, handler.arg_types)
            return handler.fn(self._object, *values)
        finally:
            self._answering_query = False
            asyncio.events._set_running_loop(previous)

    def catch_up_for_query(self) -> None:
        """Before answering a query: apply what history recorded after the last
        completed workflow task (signals, activity results, a cancellation request) and
        run the code until it blocks, as the next workflow task will; the commands it
        emits are dropped. Without this, a query answered while that task is pending
        (queries are dispatched ahead of workflow tasks) would not see a signal whose
        SignalWorkflow call had already returned. A task that would fail does not fail
        the query: it is answered from the state the code reached."""
        if self.info is None or self._completed:
            return
        if not self._resolutions and self._main is not None:
            return  # nothing recorded since the last completed task
        started = HistoryEvent(event_id=self.next_event_id)
        started.event_time.FromMicroseconds(
            max([self._time_us, *(e.event_time.ToMicroseconds() for e in self._resolutions)])
        )
        self._replaying = False  # the code runs as the next (live) workflow task would
        # ... but that task will run it again for real: what it logs here is not new.
        self._rerunning = True
        try:
            self._activate(started)
        except Exception:
            log.debug("workflow %s: query catch-up stopped", self._workflow_id, exc_info=True)
        finally:
            self._commands.clear()
            self._rerunning = False

    def _cancel_timer(self, handle: DurableTimerHandle) -> None:
        if not handle.timer_id or handle.timer_id not in self._timers:
            return
        del self._timers[handle.timer_id]
        pending = handle._pending
        if pending is not None and pending in self._commands:
            pending.dropped = True
            self._commands.remove(pending)
            return
        command = Command(command_type=CT.COMMAND_TYPE_CANCEL_TIMER)
        command.cancel_timer_command_attributes.timer_id = handle.timer_id
        if handle.started_event_id:
            self._timers_by_event.pop(handle.started_event_id, None)
        self._emit(command)

    # -------------------------------------------------------------- history

    def process(
        self, events: Sequence[HistoryEvent], *, replay_only: bool = False
    ) -> list[Command] | None:
        """Apply history events (continuing at ``next_event_id``).

        Returns the commands of the open workflow task at the end of ``events``, or
        None if ``events`` ends without one (a closed or fully replayed history); []
        while local activities are pending (then ``take_commands``).
        """
        events = [e for e in events if e.event_id >= self.next_event_id]
        for index, event in enumerate(events):
            self.next_event_id = event.event_id + 1
            et = event.event_type
            if et == ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
                self._on_started(event)
            elif et == ET.EVENT_TYPE_WORKFLOW_TASK_STARTED:
                following = events[index + 1] if index + 1 < len(events) else None
                if following is None:
                    if replay_only:
                        self._check_all_matched(event)
                        return None
                    self._replaying = False
                    self._activate(event)
                    # With local activities pending, the task's commands wait for their
                    # outcomes (take_commands), as replay takes them at the task's end.
                    return [] if self.local_activities.pending else self._take_commands()
                if following.event_type == ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
                    self._replaying = True
                    self._note_patches(events, index + 2)
                    self._activate(event)
                    # Its local activities' outcomes, fed as live ones were.
                    for marker in markers_of_task(events, index + 2):
                        self._apply_local_marker(marker)
                    self._unmatched.extend(self._take_pending())
                # A task that failed or timed out produced nothing: its events are
                # applied by the next task that completes.
            elif et in COMMAND_EVENTS:
                self._match(event)
            elif et in NOTHING_TO_APPLY:
                continue
            else:
                self._resolutions.append(event)
        if replay_only and self._completed:
            self._check_all_matched(None)
        return None

    def _note_patches(self, events: Sequence[HistoryEvent], start: int) -> None:
        """Patch markers the task being replayed recorded (so ``patched`` agrees)."""
        for event in events[start:]:
            if event.event_type == ET.EVENT_TYPE_WORKFLOW_TASK_STARTED:
                return
            if event.event_type == ET.EVENT_TYPE_MARKER_RECORDED:
                patch_id = self._patch_id(event)
                if patch_id is not None:
                    self._patches_in_history.add(patch_id)

    def _patch_id(self, event: HistoryEvent) -> str | None:
        attrs = event.marker_recorded_event_attributes
        if attrs.marker_name != PATCH_MARKER or "patch_id" not in attrs.details:
            return None
        values = self._converter.from_payloads(attrs.details["patch_id"])
        return str(values[0]) if values else None

    def _check_all_matched(self, at: HistoryEvent | None) -> None:
        leftover = [p for p in self._unmatched if not p.dropped]
        if leftover:
            where = f"before event {at.event_id}" if at is not None else "at the end of history"
            raise exc.NonDeterminismError(
                f"workflow code emitted {CommandType.Name(leftover[0].command.command_type)} "
                f"that history does not have {where}"
            )

    def _on_started(self, event: HistoryEvent) -> None:
        a = event.workflow_execution_started_event_attributes
        self._random = random.Random(a.random_seed)
        self._time_us = event.event_time.ToMicroseconds()
        self.info = Info(
            namespace=self._namespace,
            workflow_id=self._workflow_id,
            run_id=self._run_id,
            workflow_type=a.workflow_type.name,
            task_queue=a.task_queue.name,
            attempt=a.attempt or 1,
            start_time=event.event_time.ToDatetime(tzinfo=UTC),
        )
        self._start_args = self._converter.from_payloads(
            a.input if a.HasField("input") else None, self._definition.arg_types
        )
        previous = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(self)
        try:
            self._object = self._definition.cls()
        finally:
            asyncio.events._set_running_loop(previous)

    def _take_pending(self) -> list[PendingCommand]:
        pending = [p for p in self._commands if not p.dropped]
        self._commands = []
        return pending

    def _take_commands(self) -> list[Command]:
        pending = self._take_pending()
        # Once the server records them they come back as events to match.
        self._unmatched.extend(pending)
        return [p.command for p in pending]

    def _match(self, event: HistoryEvent) -> None:
        while self._unmatched and self._unmatched[0].dropped:
            self._unmatched.popleft()
        if event.event_type == ET.EVENT_TYPE_MARKER_RECORDED:
            patch_id = self._patch_id(event)
            if patch_id is not None:
                self._patches_in_history.add(patch_id)
                head = self._unmatched[0].command if self._unmatched else None
                if head is None or mismatch(head, event) is not None:
                    # Code that no longer asks about this patch (deprecated and then
                    # removed) replays fine: the marker is not a command it owes.
                    return
        if not self._unmatched:
            raise exc.NonDeterminismError(
                f"history has {event_type_name(event.event_type)} (event {event.event_id}) "
                "but the workflow code emitted no command for it"
            )
        pending = self._unmatched.popleft()
        command = pending.command
        problem = mismatch(command, event)
        if problem:
            raise exc.NonDeterminismError(
                f"event {event.event_id} is {event_type_name(event.event_type)} but the workflow "
                f"code emitted {CommandType.Name(command.command_type)}: {problem}"
            )
        if pending.on_recorded is not None:
            pending.on_recorded(event)

    # ------------------------------------------------------------ activation

    def _activate(self, started: HistoryEvent) -> None:
        self.last_started_event_id = started.event_id
        stamp = started.event_time
        # Timestamp.ToMicroseconds, without protobuf's pure-Python layer around it.
        self._time_us = max(self._time_us, stamp.seconds * 1_000_000 + stamp.nanos // 1000)
        # Any command still unmatched here was never recorded: the code changed.
        self._check_all_matched(started)
        self._unmatched.clear()
        previous = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(self)
        try:
            # History order: signals, results and cancellation land before the code
            # runs; on the first task, signal handlers run before the body starts.
            for event in self._resolutions:
                self._resolve(event)
            self._resolutions = []
            if self._main is None:
                coro = self._definition.run_fn(self._object, *(self._start_args or []))
                self._main = self.create_task(coro, name=f"workflow {self._workflow_id}")
                if self._cancel_requested:
                    self._main.cancel()
            self._run_code()
        finally:
            asyncio.events._set_running_loop(previous)
        self._after_run()

    def _run_code(self) -> None:
        self._run_until_blocked()
        while self._check_conditions():
            self._run_until_blocked()

    def _after_run(self) -> None:
        # Long-running workflows create many short tasks (gather, handlers): keep only
        # the live ones, which teardown must cancel.
        self._tasks = [t for t in self._tasks if not t.done()]
        self._raise_handler_errors()
        if self._main is not None and self._main.done() and not self._completed:
            self._complete(self._main)

    def _continue_as_new_command(self, request: exc.ContinueAsNewError) -> Command:
        command = Command(command_type=CT.COMMAND_TYPE_CONTINUE_AS_NEW_WORKFLOW_EXECUTION)
        a = command.continue_as_new_workflow_execution_command_attributes
        a.workflow_type.name = request.workflow or self._definition.name
        a.task_queue.name = request.task_queue or self._task_queue
        a.input.CopyFrom(self._converter.to_payloads(request.input_args))
        if request.run_timeout is not None:
            a.workflow_run_timeout.FromTimedelta(request.run_timeout)
        if request.task_timeout is not None:
            a.workflow_task_timeout.FromTimedelta(request.task_timeout)
        return command

    def _raise_handler_errors(self) -> None:
        """A signal handler that raised: a FailureError fails the workflow like the
        body would; anything else fails the workflow task (retried after a fix)."""
        for task in self._handler_tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                self._handler_error = self._handler_error or task.exception()
        self._handler_tasks = [t for t in self._handler_tasks if not t.done()]
        error = self._handler_error
        if error is None or self._completed:
            return
        if isinstance(error, exc.FailureError):
            self._handler_error = None
            self._fail_with(error)
            return
        raise error

    def _fail_with(self, error: exc.FailureError) -> None:
        command = Command(command_type=CT.COMMAND_TYPE_FAIL_WORKFLOW_EXECUTION)
        command.fail_workflow_execution_command_attributes.failure.CopyFrom(
            self._converter.to_failure(error)
        )
        self._completed = True
        self._emit(command)

    def _complete(self, main: asyncio.Task[Any]) -> None:
        if main.cancelled():
            if not self._cancel_requested:
                raise RuntimeError("workflow body was cancelled without a cancellation request")
            # The workflow let the cancellation through: it closes as CANCELED.
            self._completed = True
            command = Command(command_type=CT.COMMAND_TYPE_CANCEL_WORKFLOW_EXECUTION)
            command.cancel_workflow_execution_command_attributes.SetInParent()
            self._emit(command)
            return
        error = main.exception()
        if isinstance(error, exc.ContinueAsNewError):
            self._completed = True
            self._emit(self._continue_as_new_command(error))
            return
        if error is None:
            command = Command(command_type=CT.COMMAND_TYPE_COMPLETE_WORKFLOW_EXECUTION)
            command.complete_workflow_execution_command_attributes.result.CopyFrom(
                self._converter.to_payloads([main.result()])
            )
        elif isinstance(error, exc.FailureError):
            command = Command(command_type=CT.COMMAND_TYPE_FAIL_WORKFLOW_EXECUTION)
            command.fail_workflow_execution_command_attributes.failure.CopyFrom(
                self._converter.to_failure(error)
            )
        else:
            # Not a FailureError: a bug. Fail the workflow task (it is retried) and keep
            # the run open so fixed code can resume it.
            raise error
        self._completed = True
        self._emit(command)

    def _resolve(self, event: HistoryEvent) -> None:
        et = event.event_type
        if et == ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            a = event.activity_task_completed_event_attributes
            handle = self._activities_by_event.pop(a.scheduled_event_id, None)
            if handle is not None and not handle.done():
                handle.executed_at = executed_at_of(a)
                values = self._converter.from_payloads(
                    a.result if a.HasField("result") else None, [handle.result_type]
                )
                handle.set_result(values[0] if values else None)
        elif et in (
            ET.EVENT_TYPE_ACTIVITY_TASK_FAILED,
            ET.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT,
            ET.EVENT_TYPE_ACTIVITY_TASK_CANCELED,
        ):
            self._fail_activity(event)
        elif et == ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            self._deliver_signal(event)
        elif et == ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED:
            self._cancel_requested = True
            if self._main is not None and not self._main.done():
                self._main.cancel()
        elif et in CHILD_EVENTS:
            self._resolve_child(event)
        elif et in EXTERNAL_OUTCOMES:
            attrs = attributes_of(event)
            done = self._external.pop(attrs.initiated_event_id, None)
            if done is not None and not done.done():
                if et in (
                    ET.EVENT_TYPE_EXTERNAL_WORKFLOW_EXECUTION_SIGNALED,
                    ET.EVENT_TYPE_EXTERNAL_WORKFLOW_EXECUTION_CANCEL_REQUESTED,
                ):
                    done.set_result(None)
                else:
                    done.set_exception(
                        exc.ApplicationError(attrs.cause, type="ExternalWorkflowExecutionNotFound")
                    )
        elif et == ET.EVENT_TYPE_TIMER_FIRED:
            a2 = event.timer_fired_event_attributes
            timer = self._timers_by_event.pop(a2.started_event_id, None)
            if timer is not None:
                self._timers.pop(timer.timer_id, None)
                if not timer.cancelled():
                    self._ready.append(timer)
        else:
            log.debug("workflow %s: ignoring %s", self._workflow_id, event_type_name(et))

    def _resolve_child(self, event: HistoryEvent) -> None:
        et = event.event_type
        attrs = attributes_of(event)
        handle = self._children.get(attrs.initiated_event_id)
        if handle is None:
            return
        if et == ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED:
            handle.first_execution_run_id = attrs.workflow_execution.run_id
            if not handle.started.done():
                handle.started.set_result(handle)
            return
        del self._children[attrs.initiated_event_id]
        if et == ET.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_FAILED:
            error = self._child_error(handle, "child workflow could not start")
            error.__cause__ = exc.ApplicationError(attrs.cause, type="WorkflowAlreadyStartedError")
            if not handle.started.done():
                handle.started.set_exception(error)
            return
        if handle.result.done():
            return
        if et == ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED:
            values = self._converter.from_payloads(
                attrs.result if attrs.HasField("result") else None, [handle.result_type]
            )
            handle.result.set_result(values[0] if values else None)
            return
        cause: BaseException
        if et == ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_FAILED:
            cause = self._converter.from_failure(attrs.failure)
        elif et == ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_CANCELED:
            cause = exc.CancelledError("child workflow cancelled")
        elif et == ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TIMED_OUT:
            cause = exc.TimeoutError("child workflow timed out", type=None)
        else:
            cause = exc.TerminatedError("child workflow terminated")
        error = self._child_error(handle, "child workflow did not complete")
        error.__cause__ = cause
        handle.result.set_exception(error)

    def _child_error(self, handle: ChildHandle, message: str) -> exc.ChildWorkflowError:
        return exc.ChildWorkflowError(
            message,
            namespace=self._namespace,
            workflow_id=handle.id,
            run_id=handle.first_execution_run_id,
            workflow_type=handle.workflow_type,
            initiated_event_id=handle.initiated_event_id,
            started_event_id=0,
            retry_state=None,
        )

    def _deliver_signal(self, event: HistoryEvent) -> None:
        attrs = event.workflow_execution_signaled_event_attributes
        handler = self._definition.signals.get(attrs.signal_name)
        if handler is None:
            log.warning(
                "workflow %s (%s) has no handler for signal %r; dropped",
                self._workflow_id,
                self._definition.name,
                attrs.signal_name,
            )
            return
        args = self._converter.from_payloads(
            attrs.input if attrs.HasField("input") else None, handler.arg_types
        )
        if handler.is_async:
            self._handler_tasks.append(self.create_task(handler.fn(self._object, *args)))
            return
        try:
            handler.fn(self._object, *args)
        except Exception as error:
            self._handler_error = self._handler_error or error

    def _fail_activity(self, event: HistoryEvent) -> None:
        et = event.event_type
        if et == ET.EVENT_TYPE_ACTIVITY_TASK_FAILED:
            a = event.activity_task_failed_event_attributes
            cause: BaseException = self._converter.from_failure(a.failure)
            retry_state = a.retry_state
            started_id = a.started_event_id
            message = "activity failed"
        elif et == ET.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT:
            a3 = event.activity_task_timed_out_event_attributes
            cause = self._converter.from_failure(a3.failure)
            retry_state = a3.retry_state
            started_id = a3.started_event_id
            message = "activity timed out"
        else:
            a4 = event.activity_task_canceled_event_attributes
            cause = exc.CancelledError("activity cancelled")
            retry_state = common_pb2.RETRY_STATE_CANCEL_REQUESTED
            started_id = a4.started_event_id
            message = "activity cancelled"
        scheduled_id = event.activity_task_failed_event_attributes.scheduled_event_id
        if et == ET.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT:
            scheduled_id = event.activity_task_timed_out_event_attributes.scheduled_event_id
        elif et == ET.EVENT_TYPE_ACTIVITY_TASK_CANCELED:
            scheduled_id = event.activity_task_canceled_event_attributes.scheduled_event_id
        handle = self._activities_by_event.pop(scheduled_id, None)
        if handle is None or handle.done():
            return
        if et == ET.EVENT_TYPE_ACTIVITY_TASK_CANCELED and handle.cancel_requested:
            # Cancellation we asked for: the awaiting code sees asyncio.CancelledError.
            asyncio.Future.cancel(handle)
            return
        error = exc.ActivityError(
            message,
            scheduled_event_id=scheduled_id,
            started_event_id=started_id,
            identity="",
            activity_type="",
            activity_id=handle.activity_id,
            retry_state=exc.RetryState(retry_state),
        )
        error.__cause__ = cause
        handle.set_exception(error)

    def workflow_upsert_search_attributes(
        self, values: Mapping[str, SearchAttributeValue | None]
    ) -> None:
        """Emit UpsertWorkflowSearchAttributes (visibility; None removes a name)."""
        command = Command(command_type=CT.COMMAND_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES)
        command.upsert_workflow_search_attributes_command_attributes.search_attributes.CopyFrom(
            encode_search_attributes(values)
        )
        self._emit(command)

    # -------------------------------------------------------------- teardown

    def dispose(self) -> None:
        """Tear the instance down (eviction): cancel its coroutines, drop commands."""
        # The cancelled code runs its cleanup here, and again in whichever instance
        # replays the run next: only that one is real.
        self._rerunning = True
        for task in self._tasks:
            if not task.done():
                task.cancel()
        try:
            self._run_until_blocked()
        except BaseException:
            log.debug("workflow %s: error while disposing", self._workflow_id, exc_info=True)
        for task in self._tasks:
            if task.done() and not task.cancelled():
                task.exception()  # mark retrieved: the instance is going away
        self._tasks.clear()
        self._commands.clear()
