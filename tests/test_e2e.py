"""End-to-end tests: a real server on an ephemeral port over SQLite and over PostgreSQL
(conftest's ``server`` fixture), real workers and a real client, all in the test's
event loop.

Every test uses its own server and database (function-scoped fixture), task queue and
workflow ids (uuids). Nothing waits with a sleep for synchronization: tests await
results or poll a condition with ``eventually`` (bounded). Activities record what
happened to them in module-level dicts keyed by a per-test uuid, because they run in
the worker, not in the test's frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from helpers import (
    assert_gap_free,
    bounded,
    events_of,
    eventually,
    has_event,
    new_id,
    of_type,
    running_server,
)
from raw_workflow import RawWorkflows, cancel_timer

from tideflow.api.v1 import service_pb2, state_pb2
from tideflow.api.v1.common_pb2 import TimeoutType as PbTimeoutType
from tideflow.api.v1.history_pb2 import EventType, WorkflowTaskFailedCause
from tideflow.history import RunKey
from tideflow.server import ServerConfig, TideflowServer
from tideflow.worker_sdk import (
    Client,
    Replayer,
    RetryPolicy,
    Worker,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowHistory,
    activity,
    workflow,
)
from tideflow.worker_sdk.exceptions import (
    ActivityError,
    ApplicationError,
    InvalidArgumentError,
    NonDeterminismError,
    NotFoundError,
    RetryState,
    RPCError,
    TerminatedError,
    TimeoutError,
    TimeoutType,
    WorkflowAlreadyStartedError,
    WorkflowFailureError,
)

ET = EventType

# --------------------------------------------------------------------------- helpers

# What activities saw, keyed by the test's uuid.
_ATTEMPTS: dict[str, list[int]] = defaultdict(list)
# Per test: (attempt, server time the attempt was scheduled at, server time it started).
_ATTEMPT_TIMES: dict[str, list[tuple[int, datetime, datetime]]] = defaultdict(list)
_BARRIERS: dict[str, tuple[set[int], asyncio.Event]] = {}
_HEARTBEAT_DETAILS: dict[str, list[tuple[int, list[Any]]]] = defaultdict(list)
_TOKENS: dict[str, bytes] = {}
_GATES: dict[str, tuple[asyncio.Event, asyncio.Event]] = {}

_TIMEOUT = timedelta(seconds=30)
_FAST_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=50), maximum_attempts=5)


# -------------------------------------------------------------------- activities


@activity.defn
async def compose_greeting(name: str) -> str:
    return f"Hello, {name} (attempt {activity.info().attempt})"


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


@activity.defn(name="nd_a")
async def step_a(x: str) -> str:
    return f"a({x})"


@activity.defn(name="nd_b")
async def step_b(x: str) -> str:
    return f"b({x})"


# --------------------------------------------------------------------- workflows


@workflow.defn
class HelloWorkflow:
    @workflow.run
    async def run(self, name: str) -> str:
        await workflow.sleep(timedelta(milliseconds=100))
        greeting: str = await workflow.execute_activity(
            compose_greeting,
            name,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(maximum_attempts=3),
        )
        return greeting


@workflow.defn
class ParallelWorkflow:
    @workflow.run
    async def run(self, key: str) -> dict[str, Any]:
        gathered = await asyncio.gather(
            *(
                workflow.execute_activity(meet, args=[key, i], start_to_close_timeout=_TIMEOUT)
                for i in range(3)
            )
        )
        first = workflow.start_activity(double, 21, start_to_close_timeout=_TIMEOUT)
        second = workflow.start_activity(double, 50, start_to_close_timeout=_TIMEOUT)
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
            start_to_close_timeout=_TIMEOUT,
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
                start_to_close_timeout=_TIMEOUT,
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
class FailingWorkflow:
    @workflow.run
    async def run(self, kind: str) -> str:
        await workflow.sleep(0.01)
        if kind == "application":
            raise ApplicationError("workflow gave up", "some detail", type="GaveUp")
        raise RuntimeError("bug in workflow code")


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
                    start_to_close_timeout=_TIMEOUT,
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
        first = await workflow.execute_activity(record_token, key, start_to_close_timeout=_TIMEOUT)
        second = await workflow.execute_activity(
            wait_for_release, key, start_to_close_timeout=_TIMEOUT
        )
        return [first, second]


@workflow.defn(name="NdWorkflow")
class NdOriginal:
    @workflow.run
    async def run(self, x: str, pause_s: float) -> str:
        a = await workflow.execute_activity(step_a, x, start_to_close_timeout=_TIMEOUT)
        await workflow.sleep(pause_s)
        b = await workflow.execute_activity(step_b, x, start_to_close_timeout=_TIMEOUT)
        return f"{a}+{b}"


@workflow.defn(name="NdWorkflow")
class NdChanged:
    """The same workflow type with its activities swapped: not replay-compatible."""

    @workflow.run
    async def run(self, x: str, pause_s: float) -> str:
        b = await workflow.execute_activity(step_b, x, start_to_close_timeout=_TIMEOUT)
        await workflow.sleep(pause_s)
        a = await workflow.execute_activity(step_a, x, start_to_close_timeout=_TIMEOUT)
        return f"{b}+{a}"


# ------------------------------------------------------------------------- tests


async def test_hello_workflow_end_to_end(client: Client) -> None:
    tq = new_id("tq")
    wid = new_id("hello")
    before = datetime.now(UTC)
    async with Worker(
        client, task_queue=tq, workflows=[HelloWorkflow], activities=[compose_greeting]
    ):
        handle = await client.start_workflow(HelloWorkflow.run, "World", id=wid, task_queue=tq)
        assert handle.run_id
        assert await bounded(handle.result()) == "Hello, World (attempt 1)"
        # A handle obtained by id alone finds the same (closed) run.
        assert await bounded(client.get_workflow_handle(wid).result()) == "Hello, World (attempt 1)"
        assert (
            await bounded(
                client.execute_workflow(
                    HelloWorkflow.run, "tideflow", id=new_id("hello"), task_queue=tq
                )
            )
            == "Hello, tideflow (attempt 1)"
        )
    after = datetime.now(UTC)

    desc = await handle.describe()
    history = await handle.fetch_history()
    events = history.events
    assert desc.status == WorkflowExecutionStatus.COMPLETED
    assert desc.id == wid
    assert desc.run_id == handle.run_id
    assert desc.workflow_type == "HelloWorkflow"
    assert desc.task_queue == tq
    assert desc.close_time is not None
    assert before - timedelta(seconds=1) <= desc.start_time <= desc.close_time
    assert desc.close_time <= after + timedelta(seconds=1)
    assert desc.history_length == len(events)
    assert_gap_free(events)
    assert history.run_id == handle.run_id

    types = [e.event_type for e in events]
    assert types[0] == ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED
    assert types[-1] == ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
    for expected in (
        ET.EVENT_TYPE_TIMER_STARTED,
        ET.EVENT_TYPE_TIMER_FIRED,
        ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
        ET.EVENT_TYPE_ACTIVITY_TASK_STARTED,
        ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
    ):
        assert types.count(expected) == 1, ET.Name(expected)
    # The timer fired before the activity was scheduled: the code's order is kept.
    assert types.index(ET.EVENT_TYPE_TIMER_FIRED) < types.index(
        ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    )


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


async def test_workflow_failure_and_workflow_task_failure(client: Client) -> None:
    tq = new_id("tq")
    async with Worker(client, task_queue=tq, workflows=[FailingWorkflow]):
        failed = await client.start_workflow(
            FailingWorkflow.run, "application", id=new_id("fails"), task_queue=tq
        )
        with pytest.raises(WorkflowFailureError) as info:
            await bounded(failed.result())
        cause = info.value.cause
        assert isinstance(cause, ApplicationError)
        assert cause.message == "workflow gave up"
        assert cause.type == "GaveUp"
        assert list(cause.details) == ["some detail"]
        desc = await failed.describe()
        assert desc.status == WorkflowExecutionStatus.FAILED
        assert desc.close_time is not None
        events = await events_of(failed)
        assert_gap_free(events)
        assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED

        # A plain exception is a bug: only the workflow task fails (and is retried).
        buggy = await client.start_workflow(
            FailingWorkflow.run, "bug", id=new_id("buggy"), task_queue=tq
        )
        await eventually(has_event(buggy, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED))
        events = await events_of(buggy)
        (task_failed,) = of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED)
        attrs = task_failed.workflow_task_failed_event_attributes
        assert "bug in workflow code" in attrs.failure.message
        assert attrs.failure.application_failure_info.type == "RuntimeError"
        assert (
            attrs.cause
            == WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_WORKFLOW_WORKER_UNHANDLED_FAILURE
        )
        assert not of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED)
        desc = await buggy.describe()
        assert desc.status == WorkflowExecutionStatus.RUNNING
        assert desc.close_time is None

        await buggy.terminate("giving up on the bug")
        desc = await buggy.describe()
        assert desc.status == WorkflowExecutionStatus.TERMINATED
        with pytest.raises(WorkflowFailureError) as info:
            await bounded(buggy.result())
        assert isinstance(info.value.cause, TerminatedError)
        assert "giving up on the bug" in str(info.value.cause)
        events = await events_of(buggy)
        assert_gap_free(events)
        assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED
        assert desc.history_length == len(events)
        # Terminating twice is refused; the run stays as it was.
        with pytest.raises(RPCError) as rpc:
            await buggy.terminate("again")
        assert rpc.value.status == "FAILED_PRECONDITION"
        assert len(await events_of(buggy)) == len(events)


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
        (started,) = of_type(await events_of(s2c), ET.EVENT_TYPE_ACTIVITY_TASK_STARTED)
        attrs = started.activity_task_started_event_attributes
        assert attrs.attempt == 2
        assert (
            attrs.last_failure.timeout_failure_info.timeout_type
            == PbTimeoutType.TIMEOUT_TYPE_START_TO_CLOSE
        )

        # Heartbeat: attempt 1 heartbeats once, then hangs; attempt 2 gets its details.
        key = new_id("hb")
        hb = await client.start_workflow(
            TimeoutWorkflow.run, args=[key, "heartbeat"], id=new_id("hb"), task_queue=tq
        )
        result = await bounded(hb.result())
        assert result == {"result": f"resumed from ['progress-{key}'] on attempt 2"}
        assert _HEARTBEAT_DETAILS.pop(key) == [(1, []), (2, [f"progress-{key}"])]
        (started,) = of_type(await events_of(hb), ET.EVENT_TYPE_ACTIVITY_TASK_STARTED)
        attrs = started.activity_task_started_event_attributes
        assert attrs.attempt == 2
        assert (
            attrs.last_failure.timeout_failure_info.timeout_type
            == PbTimeoutType.TIMEOUT_TYPE_HEARTBEAT
        )

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


async def test_non_determinism_blocks_run_until_fixed_code(client: Client) -> None:
    tq = new_id("tq")
    activities = [step_a, step_b]
    handle: WorkflowHandle

    # Worker A (original code) runs activity "a" and starts the 2 s durable timer.
    # A caches the run, so the server sends the run's next workflow task to A's sticky
    # queue; with A gone it moves back to the normal queue at the latest after this
    # timeout (5 s by default), so keep it short.
    worker_a = Worker(
        client,
        task_queue=tq,
        workflows=[NdOriginal],
        activities=activities,
        sticky_queue_schedule_to_start_timeout=timedelta(milliseconds=500),
    )
    worker_a.start()
    try:
        # A worker that shuts down may take a workflow task with it (a poll cancelled
        # just as its task was handed over: as in Temporal, only the workflow task
        # timeout gets it back). B is shut down while the run's workflow task is being
        # retried, so keep that timeout short: such a loss then costs 2 s, not 10 s.
        handle = await client.start_workflow(
            NdOriginal.run,
            args=["x", 2.0],
            id=new_id("nd"),
            task_queue=tq,
            task_timeout=timedelta(seconds=2),
        )
        await eventually(has_event(handle, ET.EVENT_TYPE_TIMER_STARTED))
    finally:
        await worker_a.shutdown()  # its cached instance goes with it
    events = await events_of(handle)
    assert not of_type(events, ET.EVENT_TYPE_TIMER_FIRED)
    assert len(of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)) == 1

    # Worker B has incompatible code under the same type name: replay must fail.
    worker_b = Worker(client, task_queue=tq, workflows=[NdChanged], activities=activities)
    worker_b.start()
    try:
        await eventually(has_event(handle, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED))
    finally:
        await worker_b.shutdown()
    events = await events_of(handle)
    (task_failed,) = of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED)
    attrs = task_failed.workflow_task_failed_event_attributes
    assert attrs.cause == WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_NON_DETERMINISTIC_ERROR
    assert attrs.failure.application_failure_info.type == "NonDeterminismError"
    assert "'nd_b'" in attrs.failure.message and "'nd_a'" in attrs.failure.message
    assert of_type(events, ET.EVENT_TYPE_TIMER_FIRED)
    # Nothing the changed code wanted was recorded, and the run is not failed.
    assert len(of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)) == 1
    assert not of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED)
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING

    # Worker C runs the original code again: it replays and completes the run.
    async with Worker(client, task_queue=tq, workflows=[NdOriginal], activities=activities):
        assert await bounded(handle.result()) == "a(x)+b(x)"
    events = await events_of(handle)
    assert_gap_free(events)
    assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED
    scheduled = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)
    assert [e.activity_task_scheduled_event_attributes.activity_type.name for e in scheduled] == [
        "nd_a",
        "nd_b",
    ]


async def test_replayer(client: Client) -> None:
    tq = new_id("tq")
    async with Worker(client, task_queue=tq, workflows=[NdOriginal], activities=[step_a, step_b]):
        handle = await client.start_workflow(
            NdOriginal.run, args=["y", 0.05], id=new_id("replay"), task_queue=tq
        )
        assert await bounded(handle.result()) == "a(y)+b(y)"
    history = await handle.fetch_history()

    replayer = Replayer(workflows=[NdOriginal])
    result = replayer.replay(history)
    assert result.events_replayed == len(history.events)
    assert result.workflow_id == handle.id
    assert (await replayer.replay(history)).events_replayed == len(history.events)

    text = history.to_json()
    restored = WorkflowHistory.from_json(text)
    assert restored.workflow_id == handle.id
    assert list(restored.events) == list(history.events)
    assert replayer.replay(restored).events_replayed == len(history.events)
    assert replayer.replay(text).events_replayed == len(history.events)

    changed = Replayer(workflows=[NdChanged])
    with pytest.raises(NonDeterminismError, match="nd_b"):
        changed.replay(history)
    with pytest.raises(NonDeterminismError):
        await changed.replay(text)


async def test_bad_inputs_leave_store_intact(store_url: str) -> None:
    async with running_server(store_url, ServerConfig(max_payload_bytes=1024)) as srv:
        client = await Client.connect(srv.address)
        try:
            tq = new_id("tq")
            # Started first; its worker comes only after all the bad requests.
            early = await client.start_workflow(
                HelloWorkflow.run, "early", id=new_id("early"), task_queue=tq
            )

            nope = await Client.connect(srv.address, namespace="nope")
            try:
                with pytest.raises(NotFoundError) as not_found:
                    await nope.start_workflow(
                        HelloWorkflow.run, "x", id=new_id("nope"), task_queue=tq
                    )
            finally:
                await nope.close()
            assert not_found.value.status == "NOT_FOUND"
            assert "nope" in not_found.value.message

            with pytest.raises(InvalidArgumentError) as invalid:
                await client.start_workflow(HelloWorkflow.run, "x", id="", task_queue=tq)
            assert invalid.value.status == "INVALID_ARGUMENT"
            assert "workflow_id" in invalid.value.message

            # Duplicate id: refused while running; the same request id is idempotent.
            dup_id = new_id("dup")
            request_id = str(uuid.uuid4())
            dup = await client.start_workflow(
                HelloWorkflow.run, "dup", id=dup_id, task_queue=tq, request_id=request_id
            )
            again = await client.start_workflow(
                HelloWorkflow.run, "dup", id=dup_id, task_queue=tq, request_id=request_id
            )
            assert again.run_id == dup.run_id
            with pytest.raises(WorkflowAlreadyStartedError) as already:
                await client.start_workflow(HelloWorkflow.run, "dup", id=dup_id, task_queue=tq)
            assert already.value.status == "ALREADY_EXISTS"
            assert dup.run_id is not None
            assert dup.run_id in already.value.message

            # Task tokens: garbage, a token of the wrong kind, and one for no such run.
            def completed(token: bytes) -> service_pb2.RespondActivityTaskCompletedRequest:
                return service_pb2.RespondActivityTaskCompletedRequest(
                    task_token=token, identity="test"
                )

            for token in (
                b"",
                b"not a token",
                state_pb2.TaskToken(
                    namespace="default", workflow_id="w", run_id="r", is_activity=False
                ).SerializeToString(),
            ):
                with pytest.raises(InvalidArgumentError) as invalid:
                    await client.call(client.service.RespondActivityTaskCompleted, completed(token))
                assert invalid.value.status == "INVALID_ARGUMENT"
                assert "task token" in invalid.value.message
            unknown = state_pb2.TaskToken(
                namespace="default",
                workflow_id=early.id,
                run_id=str(uuid.uuid4()),
                scheduled_event_id=5,
                attempt=1,
                is_activity=True,
            ).SerializeToString()
            # Tokens are signed (server/_task_tokens.py): one built by a client is refused
            # before the run is looked up (tests/test_security_tokens.py signs such tokens
            # with the server's key and checks the NOT_FOUND of unknown runs).
            with pytest.raises(InvalidArgumentError) as forged:
                await client.call(client.service.RespondActivityTaskCompleted, completed(unknown))
            assert forged.value.status == "INVALID_ARGUMENT"
            # A real run, but no such activity.
            no_activity = state_pb2.TaskToken(
                namespace="default",
                workflow_id=early.id,
                run_id=early.run_id,
                scheduled_event_id=999,
                attempt=1,
                is_activity=True,
            ).SerializeToString()
            with pytest.raises(InvalidArgumentError):
                await client.call(
                    client.service.RespondActivityTaskCompleted, completed(no_activity)
                )

            # A payload over the configured limit is refused and nothing is written.
            big_id = new_id("big")
            with pytest.raises(InvalidArgumentError) as too_big:
                await client.start_workflow(HelloWorkflow.run, "x" * 5000, id=big_id, task_queue=tq)
            assert too_big.value.status == "INVALID_ARGUMENT"
            assert "1024" in too_big.value.message
            with pytest.raises(NotFoundError):
                await client.get_workflow_handle(big_id).describe()

            # The store is intact: the earlier runs complete with gap-free histories.
            async with Worker(
                client, task_queue=tq, workflows=[HelloWorkflow], activities=[compose_greeting]
            ):
                assert await bounded(early.result()) == "Hello, early (attempt 1)"
                assert await bounded(dup.result()) == "Hello, dup (attempt 1)"
            for handle in (early, dup):
                events = await events_of(handle)
                assert_gap_free(events)
                assert of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED)[0].event_id == 1
                assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
                assert (await handle.describe()).history_length == len(events)
            # The id is free once the run closed.
            third = await client.start_workflow(HelloWorkflow.run, "x", id=dup_id, task_queue=tq)
            assert third.run_id != dup.run_id
            await third.terminate("done testing")
        finally:
            await client.close()


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


@pytest.mark.parametrize("kind", ["workflow", "activity", "workflow-after-commit"])
async def test_poll_cancelled_while_recording_start_keeps_the_task(
    server: TideflowServer, client: Client, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A worker shutting down cancels its long polls. If a poll is cancelled while the
    server records its task as started, the task must be dispatched again, not lost
    (regression: it stayed in the store but nothing dispatched it until a restart).

    The store's ``apply`` is gated so the cancellation lands inside that window, before
    the commit, or (``workflow-after-commit``) after it: then the task did start, the
    given-back copy is stale and dropped, and the workflow task timeout recovers."""
    identity = new_id("doomed-poller")
    after_commit = kind == "workflow-after-commit"
    entered, cancelled, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
    original_apply = server.store.apply

    async def gated_apply(transition: Any) -> None:
        doomed = identity.encode() in transition.state and not release.is_set()
        if after_commit:
            await original_apply(transition)
        if doomed:
            entered.set()
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
        if not after_commit:
            await original_apply(transition)

    monkeypatch.setattr(server.store, "apply", gated_apply)
    tq = new_id("tq")
    workflow_worker: Worker | None = None
    poll: asyncio.Future[Any]
    try:
        if kind == "activity":
            # Only workflows here, so the activity goes through matching (not eager).
            workflow_worker = Worker(client, task_queue=tq, workflows=[HelloWorkflow])
            workflow_worker.start()
        handle = await client.start_workflow(
            HelloWorkflow.run,
            "again",
            id=new_id("doomed"),
            task_queue=tq,
            task_timeout=timedelta(seconds=1),
        )
        if kind == "activity":
            await eventually(has_event(handle, ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED))
            activity_poll = service_pb2.PollActivityTaskRequest(
                namespace="default", identity=identity
            )
            activity_poll.task_queue.name = tq
            poll = asyncio.ensure_future(client.service.PollActivityTask(activity_poll, timeout=30))
        else:
            workflow_poll = service_pb2.PollWorkflowTaskRequest(
                namespace="default", identity=identity
            )
            workflow_poll.task_queue.name = tq
            poll = asyncio.ensure_future(client.service.PollWorkflowTask(workflow_poll, timeout=30))
        await asyncio.wait_for(entered.wait(), timeout=10)
        poll.cancel()  # the poller goes away while its task is being recorded
        await asyncio.wait_for(cancelled.wait(), timeout=10)
        release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await poll

        async with Worker(
            client,
            task_queue=tq,
            workflows=[] if kind == "activity" else [HelloWorkflow],
            activities=[compose_greeting],
        ):
            # Bounded: a lost task never completes. After a commit, the 1 s workflow
            # task timeout recovers it (not a timer-queue refill, 15 s later).
            assert await bounded(handle.result(), timeout=10) == ("Hello, again (attempt 1)")
    finally:
        if workflow_worker is not None:
            await workflow_worker.shutdown()

    events = await events_of(handle)
    assert_gap_free(events)
    wft_started = of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_STARTED)
    doomed_starts = [
        e for e in wft_started if e.workflow_task_started_event_attributes.identity == identity
    ]
    (activity_started,) = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_STARTED)
    assert activity_started.activity_task_started_event_attributes.identity != identity
    assert activity_started.activity_task_started_event_attributes.attempt == 1
    if after_commit:
        # It did start (once: the given-back copy was dropped) and then timed out.
        assert len(doomed_starts) == 1
        assert len(of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT)) == 1
    else:
        assert not doomed_starts
        assert not of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT)


async def test_cancel_of_a_timer_that_fired_during_the_task_wins(
    server: TideflowServer, client: Client
) -> None:
    """A timer fires while a workflow task runs, and that task's commands cancel it (the
    workflow has not seen the fire). As in Temporal the cancel is accepted: history gets
    TIMER_CANCELED and the buffered TIMER_FIRED is dropped, instead of failing the task.
    Driven over raw gRPC so the fire lands inside the task deterministically."""
    raw = RawWorkflows(client, new_id("tq"))
    wid = new_id("fired-cancel")

    async def state(run_id: str) -> state_pb2.MutableState:
        record = await server.store.get_execution(
            RunKey(namespace=client.namespace, workflow_id=wid, run_id=run_id)
        )
        assert record is not None
        return state_pb2.MutableState.FromString(record.state)

    async def fire_buffered(run_id: str) -> None:
        async def check() -> bool:
            ms = await state(run_id)
            assert ms.workflow_task.started_event_id, "the second task is not running"
            return "t1" not in ms.pending_timers and any(
                e.event_type == ET.EVENT_TYPE_TIMER_FIRED for e in ms.buffered_events
            )

        await eventually(check)

    run_id = await raw.cancel_timer_that_fired_during_the_task(wid, fire_buffered)
    events = await events_of(client.get_workflow_handle(wid, run_id=run_id))
    assert_gap_free(events)
    assert [e.event_type for e in events[-3:]] == [
        ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
        ET.EVENT_TYPE_TIMER_CANCELED,
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
    ]
    (timer_started,) = of_type(events, ET.EVENT_TYPE_TIMER_STARTED)
    canceled = events[-2].timer_canceled_event_attributes
    assert canceled.timer_id == "t1"
    assert canceled.started_event_id == timer_started.event_id
    assert not of_type(events, ET.EVENT_TYPE_TIMER_FIRED)
    assert not of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED)
    assert not (await state(run_id)).buffered_events

    # Cancelling a timer that is neither pending nor fired unseen still fails the task.
    wid2 = new_id("bad-cancel")
    await raw.start(wid2)
    with pytest.raises(InvalidArgumentError, match="no pending timer 't1'"):
        await raw.complete((await raw.poll()).task_token, cancel_timer("t1"))
    events2 = await events_of(client.get_workflow_handle(wid2))
    (failed,) = of_type(events2, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED)
    assert "no pending timer 't1'" in failed.workflow_task_failed_event_attributes.failure.message
