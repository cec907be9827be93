"""Local activities (Temporal's ``workflow.execute_local_activity``): activities that
run in the worker, inside the workflow task that asked for them.

Two halves, one record. Workflow code calls ``execute_local_activity``; the run's
``LocalActivities`` table (inside the deterministic loop) adds a ``LocalActivityRequest``
to ``pending`` and hands the code a ``LocalActivityHandle``. No command goes to the
server. The workflow worker (``_workflow_worker``) runs the pending requests with a
``LocalActivitySession`` (real tasks of the worker's own loop, a thread pool for sync
functions), retrying each attempt here per its retry policy, and feeds every outcome
back as a ``LocalActivity`` marker (``RecordMarker``), one at a time, each followed by
the code running until it blocks again; all of it goes out in the same workflow task
completion. A backoff longer than ``local_retry_threshold`` ends the worker's part: the
marker records the failure and the backoff, the table starts a durable timer, and the
next attempt runs as a new request once it fires (attempt number carried on).

Replay feeds the markers of each replayed task in history order through the same
``LocalActivities.apply_marker``: the function does not run again, and a marker whose
activity the code did not ask for (another type, or nothing pending under its sequence
number) is a ``NonDeterminismError``. Because live and replay both feed one marker and
then run the code until blocked, the commands come out in the order history recorded.

Local activities need the activity registered on the same ``Worker`` (as in Temporal):
a workflow-only worker fails the workflow task with a message naming the type, and the
task is retried (on a worker that has it, or after a fix). While they run longer than
80 % of the workflow task timeout the worker completes the task with what it has and
asks for a new one at once (``force_create_new_workflow_task``): the task's heartbeat.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from tideflow.api.v1 import common_pb2
from tideflow.api.v1.command_pb2 import Command, CommandType, RecordMarkerCommandAttributes
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent

from . import activity as activity_mod
from . import exceptions as exc
from ._poller import WorkerContext
from .common import RetryPolicy
from .converter import DataConverter
from .workflow import Info, StartLocalActivityInput

LOCAL_ACTIVITY_MARKER = "LocalActivity"
# The share of the workflow task timeout after which a task still running local
# activities is completed and a new one taken (Temporal's 80 %).
HEARTBEAT_FRACTION = 0.8
_DEFAULT_TASK_TIMEOUT_S = 10.0
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


def heartbeat_after_s(events: Sequence[HistoryEvent]) -> float:
    """How long a task may run local activities before its heartbeat: 80 % of the
    timeout its WorkflowTaskScheduled event gives."""
    for event in reversed(events):
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
            timeout = event.workflow_task_scheduled_event_attributes.start_to_close_timeout
            seconds = timeout.ToMicroseconds() / _US
            return HEARTBEAT_FRACTION * (seconds or _DEFAULT_TASK_TIMEOUT_S)
    return HEARTBEAT_FRACTION * _DEFAULT_TASK_TIMEOUT_S


# ---------------------------------------------------------------- the worker's half


@dataclass(frozen=True, slots=True)
class LocalActivityConfig:
    """The activities a worker runs locally (its registered ones), the thread pool for
    sync ones, and the worker's client and task queue."""

    activities: Mapping[str, activity_mod.ActivityDefinition]
    executor: concurrent.futures.Executor | None
    context: WorkerContext


@dataclass(frozen=True, slots=True)
class _Retry:
    delay_s: float  # < 0: no retry
    state: exc.RetryState


def next_retry(
    policy: RetryPolicy | None, attempt: int, error: BaseException, now_s: float, deadline_s: float
) -> _Retry:
    """Temporal's retry policy for attempt ``attempt`` (just failed with ``error``);
    ``deadline_s`` is the schedule-to-close deadline (0: none)."""
    p = policy or RetryPolicy()
    initial = p.initial_interval.total_seconds() or 1.0
    maximum = p.maximum_interval.total_seconds() if p.maximum_interval else 100 * initial
    if isinstance(error, exc.ApplicationError):
        error_type = error.type or type(error).__name__
        non_retryable = error.non_retryable
    else:
        error_type, non_retryable = type(error).__name__, False
    if isinstance(error, exc.TimeoutError) and error.type == exc.TimeoutType.SCHEDULE_TO_CLOSE:
        return _Retry(-1, exc.RetryState.TIMEOUT)
    if non_retryable or error_type in p.non_retryable_error_types:
        return _Retry(-1, exc.RetryState.NON_RETRYABLE_FAILURE)
    if p.maximum_attempts and attempt >= p.maximum_attempts:
        return _Retry(-1, exc.RetryState.MAXIMUM_ATTEMPTS_REACHED)
    try:
        delay = initial * (p.backoff_coefficient or 2.0) ** (attempt - 1)
    except OverflowError:
        delay = math.inf
    delay = min(delay, maximum)
    if deadline_s and now_s + delay >= deadline_s:
        return _Retry(-1, exc.RetryState.TIMEOUT)
    return _Retry(delay, exc.RetryState.IN_PROGRESS)


class LocalActivitySession:
    """The local activities of one run that this worker runs during its workflow
    task(s): a task of the worker's loop per pending request."""

    def __init__(self, config: LocalActivityConfig, info: Info) -> None:
        self._config = config
        self._info = info
        self._running: dict[str, asyncio.Task[RecordMarkerCommandAttributes]] = {}

    def sync(self, pending: Mapping[str, LocalActivityRequest]) -> None:
        """Start what the code asks for now, cancel what it no longer waits for.
        Raises ApplicationError for an activity type this worker does not have."""
        for seq in [s for s in self._running if s not in pending]:
            self._running.pop(seq).cancel()
        for seq, request in pending.items():
            if seq in self._running:
                continue
            if request.activity_type not in self._config.activities:
                raise exc.ApplicationError(
                    f"local activity type {request.activity_type!r} is not registered on this "
                    f"worker (registered activities: {sorted(self._config.activities)}); a "
                    "local activity runs only on a worker that has it",
                    type="NotFoundError",
                )
            self._running[seq] = asyncio.create_task(
                self._run(request), name=f"local activity {request.activity_id}"
            )

    async def next_outcome(
        self, pending: Mapping[str, LocalActivityRequest], timeout: float
    ) -> RecordMarkerCommandAttributes | None:
        """The marker of the next local activity to finish, or None after ``timeout``."""
        self.sync(pending)
        for seq, running in list(self._running.items()):
            if running.done():
                del self._running[seq]
                return running.result()
        if timeout > 0:
            await asyncio.wait(
                self._running.values(), timeout=timeout, return_when="FIRST_COMPLETED"
            )
        for seq, running in list(self._running.items()):
            if running.done():
                del self._running[seq]
                return running.result()
        return None

    async def close(self) -> None:
        """Cancel what still runs and wait for it to stop."""
        running = list(self._running.values())
        self._running.clear()
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    async def _run(self, request: LocalActivityRequest) -> RecordMarkerCommandAttributes:
        """Attempts until one succeeds, the policy gives up, or the next backoff is
        longer than the local retry threshold (then the workflow's timer takes over)."""
        config = self._config
        definition = config.activities[request.activity_type]
        args = config.context.client.data_converter.from_payloads(
            request.input, definition.arg_types
        )
        deadline = (
            request.original_schedule_us / _US + request.schedule_to_close_s
            if request.schedule_to_close_s
            else 0.0
        )
        attempt = request.attempt
        while True:
            try:
                result = await self._attempt(definition, args, request, attempt, deadline)
            except Exception as error:
                retry = next_retry(request.retry_policy, attempt, error, time.time(), deadline)
                if 0 <= retry.delay_s <= request.local_retry_threshold_s:
                    await asyncio.sleep(retry.delay_s)
                    attempt += 1
                    continue
                return self._marker(request, attempt, error=error, retry=retry)
            return self._marker(request, attempt, result=result)

    async def _attempt(
        self,
        definition: activity_mod.ActivityDefinition,
        args: list[Any],
        request: LocalActivityRequest,
        attempt: int,
        deadline: float,
    ) -> Any:
        """One attempt, bounded by start-to-close and what is left of schedule-to-close."""
        now = time.time()
        limits = [(request.start_to_close_s, exc.TimeoutType.START_TO_CLOSE)]
        if deadline:
            limits.append((deadline - now, exc.TimeoutType.SCHEDULE_TO_CLOSE))
        bound, kind = min(((s, k) for s, k in limits if s is not None), key=lambda x: x[0])
        if bound <= 0:
            raise exc.TimeoutError("local activity timed out", type=kind)
        context = activity_mod._Context(
            info=self._activity_info(request, attempt, now), heartbeat=_ignore
        )
        token = activity_mod._current.set(context)
        try:
            if definition.is_async:
                work: Any = definition.fn(*args)
            else:
                ctx = contextvars.copy_context()
                loop = asyncio.get_running_loop()
                work = loop.run_in_executor(
                    self._config.executor, lambda: ctx.run(definition.fn, *args)
                )
            try:
                return await asyncio.wait_for(work, bound)
            except TimeoutError:
                context.cancelled.set()  # a sync function may look at is_cancelled()
                raise exc.TimeoutError("local activity timed out", type=kind) from None
            except asyncio.CancelledError:
                context.cancelled.set()
                raise
        finally:
            activity_mod._current.reset(token)

    def _activity_info(
        self, request: LocalActivityRequest, attempt: int, now: float
    ) -> activity_mod.Info:
        info = self._info

        def delta(seconds: float | None) -> timedelta | None:
            return None if seconds is None else timedelta(seconds=seconds)

        started = datetime.fromtimestamp(now, tz=UTC)
        return activity_mod.Info(
            activity_id=request.activity_id,
            activity_type=request.activity_type,
            attempt=attempt,
            task_queue=self._config.context.task_queue,
            workflow_id=info.workflow_id,
            workflow_run_id=info.run_id,
            workflow_type=info.workflow_type,
            workflow_namespace=info.namespace,
            scheduled_time=datetime.fromtimestamp(request.original_schedule_us / _US, tz=UTC),
            current_attempt_scheduled_time=started,
            started_time=started,
            start_to_close_timeout=delta(request.start_to_close_s),
            schedule_to_close_timeout=delta(request.schedule_to_close_s),
            heartbeat_timeout=None,
            heartbeat_details=[],
            task_token=b"",
            is_local=True,
        )

    def _marker(
        self,
        request: LocalActivityRequest,
        attempt: int,
        *,
        result: Any = None,
        error: BaseException | None = None,
        retry: _Retry | None = None,
    ) -> RecordMarkerCommandAttributes:
        converter = self._config.context.client.data_converter
        data: dict[str, Any] = {
            "seq": request.seq,
            "activity_id": request.activity_id,
            "activity_type": request.activity_type,
            "attempt": attempt,
            "time_us": int(time.time() * _US),
            "original_schedule_us": request.original_schedule_us,
        }
        marker = RecordMarkerCommandAttributes(marker_name=LOCAL_ACTIVITY_MARKER)
        if error is None:
            marker.details["result"].CopyFrom(converter.to_payloads([result]))
        else:
            assert retry is not None
            marker.failure.CopyFrom(converter.to_failure(error))
            data["retry_state"] = int(retry.state)
            if retry.delay_s > 0:
                data["backoff_us"] = max(1, int(retry.delay_s * _US))
        marker.details["data"].CopyFrom(converter.to_payloads([data]))
        return marker


def _ignore(details: tuple[Any, ...]) -> None:
    """Heartbeats of a local activity go nowhere: it has no activity task."""
