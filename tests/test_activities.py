"""Activities end to end: parallel activities and ``start_activity`` handles, retries
with backoff (which write no events), non-retryable failures and exhausted attempts,
every activity timeout, and a stale activity response that the server rejects.

A real server on an ephemeral port over SQLite and over PostgreSQL (conftest's
``client``), real workers, uuid task queues and ids; nothing waits on a sleep.
Activities record what happened to them in module-level dicts keyed by a per-test
uuid, because they run in the worker, not in the test's frame.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

import pytest
from helpers import (
    ET,
    assert_gap_free,
    bounded,
    events_of,
    new_id,
    of_type,
)
from helpers_e2e import TIMEOUT

from tideflow.api.v1 import common_pb2, service_pb2
from tideflow.api.v1.common_pb2 import TimeoutType as PbTimeoutType
from tideflow.server import _retry
from tideflow.worker_sdk import (
    Client,
    RetryPolicy,
    Worker,
    WorkflowExecutionStatus,
    WorkflowHandle,
    activity,
    workflow,
)
from tideflow.worker_sdk.exceptions import (
    ActivityError,
    ApplicationError,
    NotFoundError,
    RetryState,
    TimeoutError,
    TimeoutType,
    WorkflowFailureError,
)

# What activities saw, keyed by the test's uuid.
_ATTEMPTS: dict[str, list[int]] = defaultdict(list)


# Per test: (attempt, server time the attempt was scheduled at, server time it started).
_ATTEMPT_TIMES: dict[str, list[tuple[int, datetime, datetime]]] = defaultdict(list)


_BARRIERS: dict[str, tuple[set[int], asyncio.Event]] = {}


_HEARTBEAT_DETAILS: dict[str, list[tuple[int, list[Any]]]] = defaultdict(list)


_TOKENS: dict[str, bytes] = {}


_GATES: dict[str, tuple[asyncio.Event, asyncio.Event]] = {}


_FAST_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=50), maximum_attempts=5)


@activity.defn
async def meet(key: str, index: int) -> int:
    """Returns only once all three ``meet`` activities of ``key`` are running: if the
    workflow ran them one after another, the first would never return."""
    arrived, everyone = _BARRIERS.setdefault(key, (set(), asyncio.Event()))
    arrived.add(index)
    if len(arrived) == 3:
        everyone.set()
    await everyone.wait()
    return index * 10


@activity.defn
async def double(value: int) -> int:
    return value * 2


@activity.defn
async def flaky(key: str) -> str:
    info = activity.info()
    attempt = info.attempt
    _ATTEMPTS[key].append(attempt)
    _ATTEMPT_TIMES[key].append((attempt, info.current_attempt_scheduled_time, info.started_time))
    if attempt < 3:
        raise RuntimeError(f"flaky failure on attempt {attempt}")
    return f"ok on attempt {attempt}"


@activity.defn
async def failing(key: str, mode: str) -> str:
    attempt = activity.info().attempt
    _ATTEMPTS[key].append(attempt)
    if mode == "non_retryable":
        raise ApplicationError("bad", non_retryable=True)
    if mode == "value_error":
        raise ValueError("bad value")
    raise ApplicationError(f"always fails (attempt {attempt})", type="Boom")


@activity.defn
async def hangs_on_first_attempt(key: str) -> str:
    attempt = activity.info().attempt
    _ATTEMPTS[key].append(attempt)
    if attempt == 1:
        await asyncio.Event().wait()  # never set: only the start-to-close timeout ends this
    return f"done on attempt {attempt}"


@activity.defn
async def heartbeats_then_hangs(key: str) -> str:
    info = activity.info()
    _HEARTBEAT_DETAILS[key].append((info.attempt, list(info.heartbeat_details)))
    if info.attempt == 1:
        activity.heartbeat(f"progress-{key}")
        await asyncio.Event().wait()  # never set: only the heartbeat timeout ends this
    return f"resumed from {info.heartbeat_details} on attempt {info.attempt}"


@activity.defn
async def record_token(key: str) -> str:
    _TOKENS[key] = activity.info().task_token
    return "first done"


@activity.defn
async def wait_for_release(key: str) -> str:
    started, release = _GATES[key]
    started.set()
    await release.wait()
    return "second done"


@workflow.defn
class ParallelWorkflow:
    @workflow.run
    async def run(self, key: str) -> dict[str, Any]:
        gathered = await asyncio.gather(
            *(
                workflow.execute_activity(meet, args=[key, i], start_to_close_timeout=TIMEOUT)
                for i in range(3)
            )
        )
        first = workflow.start_activity(double, 21, start_to_close_timeout=TIMEOUT)
        second = workflow.start_activity(double, 50, start_to_close_timeout=TIMEOUT)
        done_before = first.done()
        later = await second
        earlier = await first
        return {
            "gathered": list(gathered),
            "handles": [earlier, later],
            "done_before": done_before,
            "done_after": first.done(),
        }


@workflow.defn
class RetryWorkflow:
    @workflow.run
    async def run(self, key: str) -> str:
        result: str = await workflow.execute_activity(
            flaky,
            key,
            start_to_close_timeout=TIMEOUT,
            retry_policy=RetryPolicy(
                initial_interval=timedelta(milliseconds=200),
                backoff_coefficient=2,
                maximum_attempts=5,
            ),
        )
        return result


_FAILING_POLICIES = {
    "non_retryable": _FAST_RETRY,
    "value_error": RetryPolicy(
        initial_interval=timedelta(milliseconds=50),
        maximum_attempts=5,
        non_retryable_error_types=["ValueError"],
    ),
    "max": RetryPolicy(initial_interval=timedelta(milliseconds=50), maximum_attempts=2),
}


@workflow.defn
class FailingActivityWorkflow:
    """Catches the activity's final failure and reports what it saw; ``reraise``
    lets it fail the workflow instead."""

    @workflow.run
    async def run(self, key: str, mode: str, reraise: bool) -> dict[str, Any]:
        try:
            await workflow.execute_activity(
                failing,
                args=[key, mode],
                start_to_close_timeout=TIMEOUT,
                retry_policy=_FAILING_POLICIES[mode],
            )
        except ActivityError as error:
            if reraise:
                raise
            cause = error.cause
            return {
                "retry_state": RetryState(error.retry_state or 0).name,
                "cause_class": type(cause).__name__,
                "cause_message": getattr(cause, "message", None),
                "cause_type": getattr(cause, "type", None),
                "non_retryable": getattr(cause, "non_retryable", None),
            }
        return {"retry_state": "NONE"}


@workflow.defn
class TimeoutWorkflow:
    @workflow.run
    async def run(self, key: str, mode: str) -> dict[str, Any]:
        try:
            if mode == "start_to_close":
                result = await workflow.execute_activity(
                    hangs_on_first_attempt,
                    key,
                    start_to_close_timeout=timedelta(milliseconds=500),
                    retry_policy=_FAST_RETRY,
                )
            else:
                result = await workflow.execute_activity(
                    heartbeats_then_hangs,
                    key,
                    start_to_close_timeout=TIMEOUT,
                    heartbeat_timeout=timedelta(milliseconds=500),
                    retry_policy=_FAST_RETRY
                    if mode == "heartbeat"
                    else RetryPolicy(maximum_attempts=1),
                )
        except ActivityError as error:
            cause = error.cause
            assert isinstance(cause, TimeoutError)
            return {
                "error": "ActivityError",
                "retry_state": RetryState(error.retry_state or 0).name,
                "timeout_type": TimeoutType(cause.type or 0).name,
                "last_heartbeat_details": list(cause.last_heartbeat_details),
            }
        return {"result": result}


@workflow.defn
class TwoActivitiesWorkflow:
    @workflow.run
    async def run(self, key: str) -> list[str]:
        first = await workflow.execute_activity(record_token, key, start_to_close_timeout=TIMEOUT)
        second = await workflow.execute_activity(
            wait_for_release, key, start_to_close_timeout=TIMEOUT
        )
        return [first, second]


async def test_parallel_activities_and_start_activity_handles(client: Client) -> None:
    tq = new_id("tq")
    key = new_id("parallel")
    async with Worker(
        client, task_queue=tq, workflows=[ParallelWorkflow], activities=[meet, double]
    ):
        # Completing at all proves the three ``meet`` activities ran at the same time.
        result = await bounded(
            client.execute_workflow(ParallelWorkflow.run, key, id=new_id("parallel"), task_queue=tq)
        )

    assert result == {
        "gathered": [0, 10, 20],
        "handles": [42, 100],
        "done_before": False,
        "done_after": True,
    }
    assert _BARRIERS.pop(key)[0] == {0, 1, 2}


async def test_activity_retries_with_backoff_write_no_events(client: Client) -> None:
    tq = new_id("tq")
    key = new_id("retry")
    async with Worker(client, task_queue=tq, workflows=[RetryWorkflow], activities=[flaky]):
        handle = await client.start_workflow(
            RetryWorkflow.run, key, id=new_id("retry"), task_queue=tq
        )
        assert await bounded(handle.result()) == "ok on attempt 3"

    assert _ATTEMPTS.pop(key) == [1, 2, 3]
    # Backoff: 200 ms before attempt 2, 400 ms before attempt 3 (initial 200 ms x 2^n).
    # Both times come from the server's clock: an attempt failed after it started, and
    # the next one was scheduled at least the backoff after that failure.
    times = _ATTEMPT_TIMES.pop(key)
    assert [attempt for attempt, _, _ in times] == [1, 2, 3]
    for (_, _, failed_started), (_, scheduled, _), backoff_ms in zip(
        times, times[1:], (200, 400), strict=False
    ):
        assert scheduled - failed_started >= timedelta(milliseconds=backoff_ms), times

    events = await events_of(handle)
    assert_gap_free(events)
    assert len(of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)) == 1
    (started,) = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_STARTED)
    assert len(of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)) == 1
    assert not of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_FAILED)
    assert started.activity_task_started_event_attributes.attempt == 3
    # The failure of the previous attempt travels with the started event.
    last_failure = started.activity_task_started_event_attributes.last_failure
    assert "flaky failure on attempt 2" in last_failure.message


async def test_non_retryable_failures_and_exhausted_attempts(client: Client) -> None:
    tq = new_id("tq")
    async with Worker(
        client, task_queue=tq, workflows=[FailingActivityWorkflow], activities=[failing]
    ):

        async def run(mode: str, reraise: bool = False) -> tuple[Any, list[int]]:
            key = new_id(mode)
            handle = await client.start_workflow(
                FailingActivityWorkflow.run,
                args=[key, mode, reraise],
                id=new_id("failing"),
                task_queue=tq,
            )
            try:
                outcome: Any = await bounded(handle.result())
            except WorkflowFailureError as error:
                outcome = error
            return outcome, _ATTEMPTS.pop(key)

        outcome, attempts = await run("non_retryable")
        assert attempts == [1]
        assert outcome == {
            "retry_state": "NON_RETRYABLE_FAILURE",
            "cause_class": "ApplicationError",
            "cause_message": "bad",
            "cause_type": "ApplicationError",
            "non_retryable": True,
        }

        outcome, attempts = await run("value_error")
        assert attempts == [1]
        assert outcome == {
            "retry_state": "NON_RETRYABLE_FAILURE",
            "cause_class": "ApplicationError",
            "cause_message": "bad value",
            "cause_type": "ValueError",
            "non_retryable": False,
        }

        outcome, attempts = await run("max")
        assert attempts == [1, 2]
        assert outcome == {
            "retry_state": "MAXIMUM_ATTEMPTS_REACHED",
            "cause_class": "ApplicationError",
            "cause_message": "always fails (attempt 2)",
            "cause_type": "Boom",
            "non_retryable": False,
        }

        # Not caught: the whole chain reaches the client.
        outcome, attempts = await run("max", reraise=True)
        assert attempts == [1, 2]
        assert isinstance(outcome, WorkflowFailureError)
        activity_error = outcome.cause
        assert isinstance(activity_error, ActivityError)
        assert activity_error.retry_state == RetryState.MAXIMUM_ATTEMPTS_REACHED
        assert isinstance(activity_error.cause, ApplicationError)
        assert activity_error.cause.message == "always fails (attempt 2)"
        assert activity_error.cause.type == "Boom"


async def assert_second_attempt_after(handle: WorkflowHandle, timeout_type: int) -> None:
    """The run's one ActivityTaskStarted is attempt 2, whose last failure is a timeout
    of ``timeout_type`` (attempt 1's)."""
    (started,) = of_type(await events_of(handle), ET.EVENT_TYPE_ACTIVITY_TASK_STARTED)
    attrs = started.activity_task_started_event_attributes
    assert attrs.attempt == 2
    assert attrs.last_failure.timeout_failure_info.timeout_type == timeout_type


async def test_activity_timeouts(client: Client) -> None:
    tq = new_id("tq")
    async with Worker(
        client,
        task_queue=tq,
        workflows=[TimeoutWorkflow],
        activities=[hangs_on_first_attempt, heartbeats_then_hangs],
    ):
        # Start-to-close: attempt 1 hangs, times out after 0.5 s, attempt 2 completes.
        key = new_id("s2c")
        s2c = await client.start_workflow(
            TimeoutWorkflow.run, args=[key, "start_to_close"], id=new_id("s2c"), task_queue=tq
        )
        assert await bounded(s2c.result()) == {"result": "done on attempt 2"}
        assert _ATTEMPTS.pop(key) == [1, 2]
        await assert_second_attempt_after(s2c, PbTimeoutType.TIMEOUT_TYPE_START_TO_CLOSE)

        # Heartbeat: attempt 1 heartbeats once, then hangs; attempt 2 gets its details.
        key = new_id("hb")
        hb = await client.start_workflow(
            TimeoutWorkflow.run, args=[key, "heartbeat"], id=new_id("hb"), task_queue=tq
        )
        result = await bounded(hb.result())
        assert result == {"result": f"resumed from ['progress-{key}'] on attempt 2"}
        assert _HEARTBEAT_DETAILS.pop(key) == [(1, []), (2, [f"progress-{key}"])]
        await assert_second_attempt_after(hb, PbTimeoutType.TIMEOUT_TYPE_HEARTBEAT)

        # Heartbeat timeout with no retries left: the workflow sees it.
        key = new_id("hb1")
        hb1 = await client.start_workflow(
            TimeoutWorkflow.run, args=[key, "heartbeat_once"], id=new_id("hb1"), task_queue=tq
        )
        assert await bounded(hb1.result()) == {
            "error": "ActivityError",
            "retry_state": "MAXIMUM_ATTEMPTS_REACHED",
            "timeout_type": "HEARTBEAT",
            "last_heartbeat_details": [f"progress-{key}"],
        }
        assert _HEARTBEAT_DETAILS.pop(key) == [(1, [])]
        events = await events_of(hb1)
        assert_gap_free(events)
        (timed_out,) = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT)
        failure = timed_out.activity_task_timed_out_event_attributes.failure
        assert failure.timeout_failure_info.timeout_type == PbTimeoutType.TIMEOUT_TYPE_HEARTBEAT


async def test_stale_activity_response_is_rejected(client: Client) -> None:
    tq = new_id("tq")
    key = new_id("stale")
    started, release = asyncio.Event(), asyncio.Event()
    _GATES[key] = (started, release)
    try:
        async with Worker(
            client,
            task_queue=tq,
            workflows=[TwoActivitiesWorkflow],
            activities=[record_token, wait_for_release],
        ):
            handle = await client.start_workflow(
                TwoActivitiesWorkflow.run, key, id=new_id("stale"), task_queue=tq
            )
            # The first activity completed, the second is running: history is quiet.
            await asyncio.wait_for(started.wait(), timeout=10)
            before = await events_of(handle)
            assert len(of_type(before, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)) == 1
            token = _TOKENS.pop(key)

            with pytest.raises(NotFoundError) as not_found:
                await client.call(
                    client.service.RespondActivityTaskCompleted,
                    service_pb2.RespondActivityTaskCompletedRequest(
                        task_token=token, identity="duplicate"
                    ),
                )
            assert not_found.value.status == "NOT_FOUND"
            failed = service_pb2.RespondActivityTaskFailedRequest(
                task_token=token, identity="duplicate"
            )
            failed.failure.message = "late failure"
            with pytest.raises(NotFoundError):
                await client.call(client.service.RespondActivityTaskFailed, failed)
            with pytest.raises(NotFoundError):
                await client.call(
                    client.service.RecordActivityHeartbeat,
                    service_pb2.RecordActivityHeartbeatRequest(task_token=token),
                )
            assert await events_of(handle) == before
            desc = await handle.describe()
            assert desc.status == WorkflowExecutionStatus.RUNNING
            assert desc.history_length == len(before)

            release.set()
            assert await bounded(handle.result()) == ["first done", "second done"]
    finally:
        _GATES.pop(key, None)
    events = await events_of(handle)
    assert_gap_free(events)
    completed = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)
    assert len(completed) == 2
    # Nothing the duplicate responses carried made it into history.
    assert all(
        e.activity_task_completed_event_attributes.identity != "duplicate" for e in completed
    )
    assert not of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_FAILED)


def test_a_failures_next_retry_delay_replaces_the_backoff() -> None:
    """An ApplicationFailureInfo's next_retry_delay (Temporal's) is the wait before the
    next attempt instead of the policy's backoff, capped by maximum_interval; attempts
    and the schedule-to-close deadline still bound it."""
    policy = common_pb2.RetryPolicy(maximum_attempts=3)
    policy.initial_interval.FromSeconds(3600)
    policy.maximum_interval.FromSeconds(7200)

    def delay_us(next_retry_delay_ms: int, attempt: int = 1, deadline_us: int = 0) -> int:
        failure = common_pb2.Failure(application_failure_info=common_pb2.ApplicationFailureInfo())
        failure.application_failure_info.next_retry_delay.FromMilliseconds(next_retry_delay_ms)
        decision = _retry.next_retry(
            policy, attempt=attempt, failure=failure, now_us=0, deadline_us=deadline_us
        )
        return decision.delay_us

    assert delay_us(50) == 50_000
    assert delay_us(3 * 3600 * 1000) == 7200 * 1_000_000
    assert delay_us(0) == 7200 * 1_000_000  # as Temporal: no delay means the maximum
    assert delay_us(50, attempt=3) == -1
    assert delay_us(50, deadline_us=10_000) == -1
