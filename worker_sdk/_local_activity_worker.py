"""The worker's half of local activities (``_local_activities`` has the workflow's).

A ``LocalActivitySession`` runs the local activities one run's workflow task waits for:
a task of the worker's own loop per pending request (sync functions in the worker's
thread pool), each retrying its attempts here per the retry policy (short backoffs as
plain sleeps) until one succeeds, the policy gives up, or the next backoff is longer
than the local retry threshold. Each ends with the ``LocalActivity`` marker that records
its outcome, which the workflow worker feeds back to the run. Every attempt is bounded
by its start-to-close timeout and what is left of schedule-to-close.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from tideflow.api.v1 import common_pb2
from tideflow.api.v1.command_pb2 import RecordMarkerCommandAttributes
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent

from . import activity as activity_mod
from . import exceptions as exc
from ._local_activities import LOCAL_ACTIVITY_MARKER, LocalActivityRequest
from ._poller import WorkerContext
from .common import RetryPolicy
from .workflow import Info

# The share of the workflow task timeout after which a task still running local
# activities is completed and a new one taken (Temporal's 80 %).
HEARTBEAT_FRACTION = 0.8
_DEFAULT_TASK_TIMEOUT_S = 10.0
_US = 1_000_000


def heartbeat_after_s(events: Sequence[HistoryEvent]) -> float:
    """How long a task may run local activities before its heartbeat: 80 % of the
    timeout its WorkflowTaskScheduled event gives."""
    for event in reversed(events):
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
            timeout = event.workflow_task_scheduled_event_attributes.start_to_close_timeout
            seconds = timeout.ToMicroseconds() / _US
            return HEARTBEAT_FRACTION * (seconds or _DEFAULT_TASK_TIMEOUT_S)
    return HEARTBEAT_FRACTION * _DEFAULT_TASK_TIMEOUT_S


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
        converter = self._config.context.client.data_converter
        definition = self._config.activities[request.activity_type]
        attempt = request.attempt
        try:
            args = converter.from_payloads(request.input, definition.arg_types)
        except Exception as error:  # no attempt can decode them either
            retry = _Retry(-1, exc.RetryState.NON_RETRYABLE_FAILURE)
            return self._marker(request, attempt, error=error, retry=retry)
        deadline = (
            request.original_schedule_us / _US + request.schedule_to_close_s
            if request.schedule_to_close_s
            else 0.0
        )
        while True:
            try:
                result = await self._attempt(definition, args, request, attempt, deadline)
                # A result the converter cannot encode fails the attempt, as a failed
                # completion report of an ordinary activity would.
                payloads = converter.to_payloads([result])
            except Exception as error:
                retry = next_retry(request.retry_policy, attempt, error, time.time(), deadline)
                if 0 <= retry.delay_s <= request.local_retry_threshold_s:
                    await asyncio.sleep(retry.delay_s)
                    attempt += 1
                    continue
                return self._marker(request, attempt, error=error, retry=retry)
            return self._marker(request, attempt, result=payloads)

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
        scope: asyncio.Timeout | None = None
        try:
            # The attempt runs in this task (an async function) or the thread pool; the
            # scope tells its own timeout from a TimeoutError the function raised.
            async with asyncio.timeout(bound) as scope:
                try:
                    if definition.is_async:
                        return await definition.fn(*args)
                    ctx = contextvars.copy_context()
                    loop = asyncio.get_running_loop()
                    return await loop.run_in_executor(
                        self._config.executor, lambda: ctx.run(definition.fn, *args)
                    )
                except asyncio.CancelledError:
                    context.cancelled.set()  # a sync function may look at is_cancelled()
                    raise
        except TimeoutError:
            if scope is None or not scope.expired():
                raise
            raise exc.TimeoutError("local activity timed out", type=kind) from None
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
        result: common_pb2.Payloads | None = None,
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
        if result is not None:
            marker.details["result"].CopyFrom(result)
        else:
            assert error is not None and retry is not None
            marker.failure.CopyFrom(converter.to_failure(error))
            data["retry_state"] = int(retry.state)
            if retry.delay_s > 0:
                data["backoff_us"] = max(1, int(retry.delay_s * _US))
        marker.details["data"].CopyFrom(converter.to_payloads([data]))
        return marker


def _ignore(details: tuple[Any, ...]) -> None:
    """Heartbeats of a local activity go nowhere: it has no activity task."""
