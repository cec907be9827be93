"""Local activities (Temporal's ``workflow.execute_local_activity``): activities that
run in the worker, inside the workflow task that asked for them.

Two halves, one record. Workflow code calls ``execute_local_activity``; the run's
``LocalActivities`` table (inside the deterministic loop) adds a ``LocalActivityRequest``
to ``pending`` and hands the code a ``LocalActivityHandle``. No command goes to the
server. The workflow worker (``_workflow_worker``) runs the pending requests with a
``LocalActivitySession`` (``_local_activity_worker``: real tasks of the worker's own
loop, a thread pool for sync functions), retrying attempts per the retry policy, and
feeds every outcome
back as a ``LocalActivity`` marker (``RecordMarker``), one at a time, each followed by
the code running until it blocks again; all of it goes out in the same workflow task
completion. A backoff longer than ``local_retry_threshold`` ends the worker's part: the
marker records the failure and the backoff, the table starts a durable timer, and the
next attempt runs as a new request once it fires (attempt number carried on).

Replay feeds the markers of each replayed task in history order through the same
``LocalActivities.apply_marker``: the function does not run again, and a marker whose
activity the code did not ask for (another type, or nothing pending under its sequence
number) is a ``NonDeterminismError``. Because live and replay both feed one marker and
then run the code until blocked, and both take the task's commands only at its end (a
heartbeat ends a task too), the commands come out in the order history recorded, even
where code drops a command after an outcome (the timer of a timeout it no longer needs).

Local activities need the activity registered on the same ``Worker`` (as in Temporal):
a workflow-only worker fails the workflow task with a message naming the type, and the
task is retried (on a worker that has it, or after a fix). While they run longer than
80 % of the workflow task timeout the worker completes the task with what it has and
asks for a new one at once (``force_create_new_workflow_task``): the task's heartbeat.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Protocol

from tideflow.api.v1 import common_pb2
from tideflow.api.v1.command_pb2 import Command, CommandType, RecordMarkerCommandAttributes
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent

from . import exceptions as exc
from ._workflow_inputs import StartLocalActivityInput
from .common import RetryPolicy
from .converter import DataConverter

LOCAL_ACTIVITY_MARKER = "LocalActivity"
_US = 1_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalActivityRequest:
    """One local activity the code waits for, as the worker runs it."""

    seq: str  # the run's command sequence number: the marker's key
    activity_id: str
    activity_type: str
    input: common_pb2.Payloads
    attempt: int
    original_schedule_us: int  # workflow time of the first attempt's scheduling
    start_to_close_s: float | None
    schedule_to_close_s: float | None
    retry_policy: RetryPolicy | None
    local_retry_threshold_s: float


class LocalActivityHandle(asyncio.Future[Any]):
    """The future workflow code awaits; cancelling it drops the request."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, seq: str, on_cancel: Callable[[str], None]
    ) -> None:
        super().__init__(loop=loop)
        self.seq = seq
        self.result_type: Any = None
        self._on_cancel = on_cancel

    def cancel(self, msg: Any | None = None) -> bool:
        if self.done():
            return False
        self._on_cancel(self.seq)
        return super().cancel(msg)


class LocalActivityHost(Protocol):
    """What the table needs from the run's deterministic loop."""

    def next_seq(self) -> str: ...

    def workflow_time_us(self) -> int: ...

    def emit_command(self, command: Command) -> None: ...

    def call_later(
        self, delay: float, callback: Callable[..., Any], *args: Any
    ) -> asyncio.TimerHandle: ...


class LocalActivities:
    """The local activities of one run, on the workflow's side (deterministic)."""

    def __init__(
        self, host: LocalActivityHost, loop: asyncio.AbstractEventLoop, converter: DataConverter
    ) -> None:
        self._host = host
        self._loop = loop
        self._converter = converter
        # Requests waiting for an outcome: the worker runs exactly these.
        self.pending: dict[str, LocalActivityRequest] = {}
        self._handles: dict[str, LocalActivityHandle] = {}
        self._backoffs: dict[str, asyncio.TimerHandle] = {}

    def start(self, request: StartLocalActivityInput) -> LocalActivityHandle:
        seq = self._host.next_seq()
        handle = LocalActivityHandle(self._loop, seq, self._cancel)
        handle.result_type = request.result_type

        def seconds(value: timedelta | None) -> float | None:
            return None if value is None else value.total_seconds()

        self.pending[seq] = LocalActivityRequest(
            seq=seq,
            activity_id=request.activity_id or seq,
            activity_type=request.activity_type,
            input=self._converter.to_payloads(request.args),
            attempt=1,
            original_schedule_us=self._host.workflow_time_us(),
            start_to_close_s=seconds(request.start_to_close_timeout),
            schedule_to_close_s=seconds(request.schedule_to_close_timeout),
            retry_policy=request.retry_policy,
            local_retry_threshold_s=request.local_retry_threshold.total_seconds(),
        )
        self._handles[seq] = handle
        return handle

    def _cancel(self, seq: str) -> None:
        # Stops waiting at once: a running attempt is cancelled by the worker (it is no
        # longer pending) and nothing is recorded for it; a backoff timer is cancelled.
        self.pending.pop(seq, None)
        self._handles.pop(seq, None)
        timer = self._backoffs.pop(seq, None)
        if timer is not None:
            timer.cancel()

    def apply_marker(self, marker: RecordMarkerCommandAttributes) -> None:
        """Record ``marker`` (a live outcome, or one replayed from history) and resolve
        the code's handle with it; the caller then runs the code until it blocks."""
        data = marker_data(marker, self._converter)
        seq = str(data.get("seq", ""))
        request = self.pending.get(seq)
        if request is None or request.activity_type != data.get("activity_type"):
            asked = "nothing" if request is None else f"type {request.activity_type!r}"
            raise exc.NonDeterminismError(
                f"history has a local activity of type {data.get('activity_type')!r} "
                f"(sequence number {seq}) where the workflow code asked for {asked}"
            )
        del self.pending[seq]
        command = Command(command_type=CommandType.COMMAND_TYPE_RECORD_MARKER)
        command.record_marker_command_attributes.CopyFrom(marker)
        self._host.emit_command(command)
        handle = self._handles[seq]
        if "result" in marker.details:
            del self._handles[seq]
            values = self._converter.from_payloads(marker.details["result"], [handle.result_type])
            handle.set_result(values[0] if values else None)
            return
        backoff_us = int(data.get("backoff_us", 0))
        if backoff_us > 0:
            retry = replace(request, attempt=int(data["attempt"]) + 1)
            self._backoffs[seq] = self._host.call_later(backoff_us / _US, self._retry, retry)
            return
        del self._handles[seq]
        error = exc.ActivityError(
            "local activity failed",
            scheduled_event_id=0,
            started_event_id=0,
            identity="",
            activity_type=request.activity_type,
            activity_id=request.activity_id,
            retry_state=exc.RetryState(int(data.get("retry_state", 0))),
        )
        error.__cause__ = self._converter.from_failure(marker.failure)
        handle.set_exception(error)

    def _retry(self, request: LocalActivityRequest) -> None:
        """The backoff timer fired: the next attempt is a local activity again."""
        self._backoffs.pop(request.seq, None)
        if request.seq in self._handles:
            self.pending[request.seq] = request


def marker_data(marker: RecordMarkerCommandAttributes, converter: DataConverter) -> dict[str, Any]:
    values = converter.from_payloads(marker.details["data"]) if "data" in marker.details else []
    data = values[0] if values else None
    if not isinstance(data, dict):
        raise exc.NonDeterminismError("a LocalActivity marker without its data")
    return data


def is_local_activity_marker(event: HistoryEvent) -> bool:
    return (
        event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
        and event.marker_recorded_event_attributes.marker_name == LOCAL_ACTIVITY_MARKER
    )


def markers_of_task(
    events: Sequence[HistoryEvent], start: int
) -> list[RecordMarkerCommandAttributes]:
    """The local activity markers a replayed task recorded (``events[start:]`` up to
    the next task), as the commands that recorded them."""
    out = []
    for event in events[start:]:
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
            break
        if is_local_activity_marker(event):
            a = event.marker_recorded_event_attributes
            marker = RecordMarkerCommandAttributes(marker_name=a.marker_name)
            for name, payloads in a.details.items():
                marker.details[name].CopyFrom(payloads)
            if a.HasField("failure"):
                marker.failure.CopyFrom(a.failure)
            out.append(marker)
    return out
