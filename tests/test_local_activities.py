"""Local activities (``workflow.execute_local_activity``) end to end, on both stores.

They run in the worker inside the workflow task and are recorded as ``LocalActivity``
markers: no activity events, retries in the worker with the attempt in the marker, long
backoffs as durable timers, replay from the marker without running the function again,
cancellation, the workflow task's heartbeat while they outlast the task timeout, and a
worker that does not have the activity. What the activities did is kept in module-level
dicts keyed by a per-test uuid (they run in the test's process, in its in-test worker).
Nothing waits on a sleep: activities wait on events the test sets once history shows
what it waits for. The multi-process SIGKILL test is in test_local_activities_crash.py.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from helpers import ET, assert_well_formed, bounded, events_of, eventually, new_id, of_type
from raw_workflow import RawWorkflows, complete_workflow

from tideflow.api.v1 import service_pb2
from tideflow.api.v1.history_pb2 import HistoryEvent
from tideflow.worker_sdk import (
    Client,
    Replayer,
    RetryPolicy,
    Worker,
    WorkflowExecutionStatus,
    activity,
    workflow,
)
from tideflow.worker_sdk.converter import default_converter
from tideflow.worker_sdk.exceptions import (
    ActivityError,
    ApplicationError,
    NonDeterminismError,
    NotFoundError,
    RetryState,
    TimeoutError,
    TimeoutType,
    WorkflowFailureError,
)

_CALLS: dict[str, list[int]] = defaultdict(list)  # key -> attempt numbers seen
_INFOS: dict[str, list[activity.Info]] = defaultdict(list)
_GATES: dict[str, asyncio.Event] = {}
_CANCELLED: dict[str, bool] = {}
_STEP = timedelta(seconds=10)
# Short, so tests see heartbeats (every 80 %: 1.6 s) soon; the 0.4 s left before the
# task would time out is the margin a loaded machine has to deliver each heartbeat.
_HEARTBEAT_TASK_TIMEOUT = timedelta(seconds=2)


@dataclass
class Order:
    item: str
    count: int


@activity.defn
async def price(order: Order, each: int) -> dict[str, Any]:
    _CALLS[order.item].append(activity.info().attempt)
    _INFOS[order.item].append(activity.info())
    return {"item": order.item, "total": order.count * each}


@activity.defn
def shout(key: str) -> str:
    """A sync local activity: runs in the worker's thread pool."""
    _CALLS[key].append(activity.info().attempt)
    return key.upper()


@activity.defn
async def flaky(key: str, failures: int) -> int:
    """Fails its first ``failures`` attempts, then returns the attempt."""
    attempt = activity.info().attempt
    _CALLS[key].append(attempt)
    if attempt <= failures:
        raise ApplicationError(f"attempt {attempt} failed", type="Flaky")
    return attempt


@activity.defn
async def refuse(key: str) -> None:
    _CALLS[key].append(activity.info().attempt)
    raise ApplicationError("never", type="Refused")


@activity.defn
async def gated(key: str) -> str:
    """Waits until the test opens the gate (or until cancelled)."""
    _CALLS[key].append(activity.info().attempt)
    try:
        await _GATES[key].wait()
    except asyncio.CancelledError:
        _CANCELLED[key] = True
        raise
    return f"{key}:opened"


@workflow.defn
class PriceOrders:
    @workflow.run
    async def run(self, key: str) -> list[Any]:
        first = await workflow.execute_local_activity(
            price, args=[Order(f"{key}-a", 2), 5], start_to_close_timeout=_STEP
        )
        both = await asyncio.gather(
            workflow.execute_local_activity(
                price, args=[Order(f"{key}-b", 3), 7], start_to_close_timeout=_STEP
            ),
            workflow.execute_local_activity(shout, f"{key}-c", schedule_to_close_timeout=_STEP),
        )
        return [first, *both]


@workflow.defn
class Retrying:
    @workflow.run
    async def run(self, key: str, failures: int, policy: dict[str, Any]) -> Any:
        retry = RetryPolicy(
            initial_interval=timedelta(milliseconds=policy["initial_ms"]),
            backoff_coefficient=policy.get("coefficient", 1.0),
            maximum_attempts=policy.get("max_attempts", 0),
            non_retryable_error_types=policy.get("non_retryable", ()),
        )
        threshold = timedelta(milliseconds=policy.get("threshold_ms", 60_000))
        try:
            return await workflow.execute_local_activity(
                refuse if failures < 0 else flaky,
                args=[key] if failures < 0 else [key, failures],
                start_to_close_timeout=_STEP,
                retry_policy=retry,
                local_retry_threshold=threshold,
            )
        except ActivityError as error:
            cause = error.cause
            assert isinstance(cause, ApplicationError)
            return {"retry_state": int(error.retry_state or 0), "cause": cause.type}


def _markers(events: list[HistoryEvent]) -> list[dict[str, Any]]:
    """The data of every LocalActivity marker, with its result or failure type."""
    out = []
    for event in of_type(events, ET.EVENT_TYPE_MARKER_RECORDED):
        attrs = event.marker_recorded_event_attributes
        if attrs.marker_name != "LocalActivity":
            continue
        data = dict(default_converter.from_payloads(attrs.details["data"])[0])
        if "result" in attrs.details:
            data["result"] = default_converter.from_payloads(attrs.details["result"])[0]
        if attrs.HasField("failure"):
            data["failure"] = attrs.failure.application_failure_info.type
        out.append(data)
    return out


def _no_activity_tasks(events: list[HistoryEvent]) -> None:
    assert not of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)


async def test_results_args_and_markers(client: Client, queue: str) -> None:
    key = new_id("orders")
    async with Worker(client, task_queue=queue, workflows=[PriceOrders], activities=[price, shout]):
        handle = await client.start_workflow(PriceOrders.run, key, id=key, task_queue=queue)
        result = await bounded(handle.result())
    assert result == [
        {"item": f"{key}-a", "total": 10},
        {"item": f"{key}-b", "total": 21},
        f"{key}-C".upper(),
    ]
    assert _CALLS[f"{key}-a"] == _CALLS[f"{key}-b"] == _CALLS[f"{key}-c"] == [1]
    info = _INFOS[f"{key}-a"][0]
    assert info.is_local and info.workflow_id == key and info.activity_type == "price"
    events = await events_of(handle)
    assert_well_formed(events)
    _no_activity_tasks(events)
    markers = _markers(events)
    assert [(m["activity_type"], m["attempt"]) for m in markers[:1]] == [("price", 1)]
    assert sorted(m["activity_type"] for m in markers[1:]) == ["price", "shout"]
    assert markers[0]["result"] == {"item": f"{key}-a", "total": 10}
    # One workflow task ran all three: the first and the gathered pair.
    assert len(of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)) == 1


async def test_retries_in_the_worker_record_the_attempt(client: Client, queue: str) -> None:
    key = new_id("flaky")
    async with Worker(client, task_queue=queue, workflows=[Retrying], activities=[flaky]):
        handle = await client.start_workflow(
            Retrying.run, args=[key, 2, {"initial_ms": 10}], id=key, task_queue=queue
        )
        assert await bounded(handle.result()) == 3
    assert _CALLS[key] == [1, 2, 3]
    events = await events_of(handle)
    _no_activity_tasks(events)
    assert not of_type(events, ET.EVENT_TYPE_TIMER_STARTED)  # short backoffs stay local
    (marker,) = _markers(events)
    assert (marker["attempt"], marker["result"]) == (3, 3)


@pytest.mark.parametrize(
    ("policy", "retry_state", "attempts"),
    [
        ({"initial_ms": 5, "max_attempts": 3}, RetryState.MAXIMUM_ATTEMPTS_REACHED, [1, 2, 3]),
        ({"initial_ms": 5, "non_retryable": ["Refused"]}, RetryState.NON_RETRYABLE_FAILURE, [1]),
    ],
    ids=["maximum-attempts", "non-retryable"],
)
async def test_final_failure_raises_activity_error(
    client: Client,
    queue: str,
    policy: dict[str, Any],
    retry_state: RetryState,
    attempts: list[int],
) -> None:
    key = new_id("refuse")
    async with Worker(client, task_queue=queue, workflows=[Retrying], activities=[refuse]):
        handle = await client.start_workflow(
            Retrying.run, args=[key, -1, policy], id=key, task_queue=queue
        )
        result = await bounded(handle.result())
    assert result == {"retry_state": int(retry_state), "cause": "Refused"}
    assert _CALLS[key] == attempts
    (marker,) = _markers(await events_of(handle))
    assert marker["attempt"] == attempts[-1]
    assert marker["failure"] == "Refused"
    assert marker["retry_state"] == int(retry_state)
    assert "backoff_us" not in marker


async def test_a_long_backoff_becomes_a_durable_timer(client: Client, queue: str) -> None:
    """Backoffs: 10 ms (local), then 100 ms and 1 s, above the 50 ms threshold: each
    ends the worker's part with a marker, a timer, and the next attempt after it."""
    key = new_id("backoff")
    policy = {"initial_ms": 10, "coefficient": 10.0, "threshold_ms": 50}
    async with Worker(client, task_queue=queue, workflows=[Retrying], activities=[flaky]):
        handle = await client.start_workflow(
            Retrying.run, args=[key, 3, policy], id=key, task_queue=queue
        )
        assert await bounded(handle.result()) == 4
    assert _CALLS[key] == [1, 2, 3, 4]
    events = await events_of(handle)
    assert_well_formed(events)
    _no_activity_tasks(events)
    markers = _markers(events)
    assert [(m["attempt"], m.get("backoff_us")) for m in markers] == [
        (2, 100_000),
        (3, 1_000_000),
        (4, None),
    ]
    assert [m.get("failure") for m in markers] == ["Flaky", "Flaky", None]
    started = of_type(events, ET.EVENT_TYPE_TIMER_STARTED)
    assert [
        e.timer_started_event_attributes.start_to_fire_timeout.ToMilliseconds() for e in started
    ] == [100, 1000]
    assert len(of_type(events, ET.EVENT_TYPE_TIMER_FIRED)) == 2
    # Marker, then its timer, in the same workflow task; the next attempt after it fired.
    kinds = [
        e.event_type
        for e in events
        if e.event_type
        in (ET.EVENT_TYPE_MARKER_RECORDED, ET.EVENT_TYPE_TIMER_STARTED, ET.EVENT_TYPE_TIMER_FIRED)
    ]
    assert kinds == [
        ET.EVENT_TYPE_MARKER_RECORDED,
        ET.EVENT_TYPE_TIMER_STARTED,
        ET.EVENT_TYPE_TIMER_FIRED,
        ET.EVENT_TYPE_MARKER_RECORDED,
        ET.EVENT_TYPE_TIMER_STARTED,
        ET.EVENT_TYPE_TIMER_FIRED,
        ET.EVENT_TYPE_MARKER_RECORDED,
    ]


@workflow.defn
class Gated:
    @workflow.run
    async def run(self, key: str) -> str:
        result: str = await workflow.execute_local_activity(
            gated, key, start_to_close_timeout=timedelta(minutes=5)
        )
        return result


@workflow.defn
class StopOnSignal:
    """Awaits a local activity in a task of its own and cancels that task on ``stop``."""

    def __init__(self) -> None:
        self.stop = False

    @workflow.signal
    def stop_it(self) -> None:
        self.stop = True

    @workflow.run
    async def run(self, key: str) -> str:
        running = asyncio.create_task(
            workflow.execute_local_activity(gated, key, start_to_close_timeout=timedelta(minutes=5))
        )
        await workflow.wait_condition(lambda: self.stop or running.done())
        running.cancel()
        try:
            return await running
        except asyncio.CancelledError:
            return "stopped"


def _task_completions(events: list[HistoryEvent]) -> int:
    return len(of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED))


@pytest.mark.parametrize("cache", [10, 0], ids=["sticky", "no-cache"])
async def test_heartbeat_keeps_a_long_local_activity_in_its_workflow_task(
    client: Client, queue: str, cache: int
) -> None:
    """A 2 s workflow task timeout and a local activity that runs until the test has
    seen three heartbeats (workflow tasks completed while it ran): the task never times
    out, the activity runs once, and the run completes with one marker. A worker without
    a cache (no sticky queue) keeps the run's instance while it heartbeats all the same."""
    key = new_id("long")
    _GATES[key] = asyncio.Event()
    async with Worker(
        client,
        task_queue=queue,
        workflows=[Gated],
        activities=[gated],
        max_cached_workflows=cache,
    ):
        handle = await client.start_workflow(
            Gated.run, key, id=key, task_queue=queue, task_timeout=_HEARTBEAT_TASK_TIMEOUT
        )

        async def heartbeats() -> bool:
            return _task_completions(await events_of(handle)) >= 3

        await eventually(heartbeats, "three workflow task heartbeats")
        _GATES[key].set()
        assert await bounded(handle.result()) == f"{key}:opened"
    events = await events_of(handle)
    assert_well_formed(events)
    assert _CALLS[key] == [1]
    assert _task_completions(events) >= 4
    assert not of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT)
    assert not of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED)
    (marker,) = _markers(events)
    assert (marker["attempt"], marker["result"]) == (1, f"{key}:opened")


async def test_cancelling_the_awaiting_code_cancels_the_local_activity(
    client: Client, queue: str
) -> None:
    """The signal reaches the code in the task a heartbeat opens: the code cancels the
    local activity, which stops, and nothing is recorded for it."""
    key = new_id("stop")
    _GATES[key] = asyncio.Event()
    async with Worker(client, task_queue=queue, workflows=[StopOnSignal], activities=[gated]):
        handle = await client.start_workflow(
            StopOnSignal.run, key, id=key, task_queue=queue, task_timeout=_HEARTBEAT_TASK_TIMEOUT
        )
        await eventually(lambda: _CALLS[key], "the local activity to start")
        await handle.signal(StopOnSignal.stop_it)
        assert await bounded(handle.result()) == "stopped"
    assert _CANCELLED[key] and _CALLS[key] == [1]
    events = await events_of(handle)
    assert_well_formed(events)
    assert not _markers(events)


async def test_cancelling_the_workflow_cancels_its_local_activity(
    client: Client, queue: str
) -> None:
    key = new_id("cancel")
    _GATES[key] = asyncio.Event()
    async with Worker(client, task_queue=queue, workflows=[Gated], activities=[gated]):
        handle = await client.start_workflow(
            Gated.run, key, id=key, task_queue=queue, task_timeout=_HEARTBEAT_TASK_TIMEOUT
        )
        await eventually(lambda: _CALLS[key], "the local activity to start")
        await handle.cancel()
        with pytest.raises(WorkflowFailureError):
            await bounded(handle.result())
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    assert _CANCELLED[key] and _CALLS[key] == [1]
    events = await events_of(handle)
    assert_well_formed(events)
    assert not _markers(events)


@workflow.defn
class TwoSteps:
    def __init__(self) -> None:
        self.go = False

    @workflow.signal
    def proceed(self) -> None:
        self.go = True

    @workflow.run
    async def run(self, key: str) -> list[Any]:
        first = await workflow.execute_local_activity(
            price, args=[Order(f"{key}-1", 1), 2], start_to_close_timeout=_STEP
        )
        await workflow.wait_condition(lambda: self.go)
        second = await workflow.execute_local_activity(
            price, args=[Order(f"{key}-2", 2), 2], start_to_close_timeout=_STEP
        )
        return [first["total"], second["total"], workflow.random().randint(0, 10**6)]


@pytest.mark.parametrize("how", ["no-cache", "worker-restart"])
async def test_replay_takes_the_result_from_the_marker(
    client: Client, queue: str, how: str
) -> None:
    """The second workflow task replays the first from history (no cached instance, or
    a new worker): the first local activity is not run again."""
    key = new_id("replay")
    cache = 0 if how == "no-cache" else 10
    worker = Worker(
        client,
        task_queue=queue,
        workflows=[TwoSteps],
        activities=[price],
        max_cached_workflows=cache,
    )
    async with worker:
        handle = await client.start_workflow(TwoSteps.run, key, id=key, task_queue=queue)
        await eventually(lambda: _CALLS[f"{key}-1"], "the first local activity to run")

        async def recorded() -> bool:
            return bool(_markers(await events_of(handle)))

        await eventually(recorded, "the first marker")
        if how == "no-cache":
            await handle.signal(TwoSteps.proceed)
            result = await bounded(handle.result())
    if how == "worker-restart":
        async with Worker(client, task_queue=queue, workflows=[TwoSteps], activities=[price]):
            await handle.signal(TwoSteps.proceed)
            result = await bounded(handle.result())
    assert result[:2] == [2, 4]
    assert _CALLS[f"{key}-1"] == [1] and _CALLS[f"{key}-2"] == [1]
    history = await handle.fetch_history()
    # A replay of the whole history runs nothing either, and agrees.
    await Replayer(workflows=[TwoSteps]).replay(history)
    assert _CALLS[f"{key}-1"] == [1] and _CALLS[f"{key}-2"] == [1]


@workflow.defn(name="PriceOrders")
class PriceOrdersChanged:
    """PriceOrders after an incompatible change: another local activity first."""

    @workflow.run
    async def run(self, key: str) -> list[Any]:
        first = await workflow.execute_local_activity(
            shout, f"{key}-x", start_to_close_timeout=_STEP
        )
        return [first]


async def test_a_marker_of_another_activity_type_is_non_determinism(
    client: Client, queue: str
) -> None:
    key = new_id("nondet")
    async with Worker(client, task_queue=queue, workflows=[PriceOrders], activities=[price, shout]):
        handle = await client.start_workflow(PriceOrders.run, key, id=key, task_queue=queue)
        await bounded(handle.result())
    history = await handle.fetch_history()
    await Replayer(workflows=[PriceOrders]).replay(history)
    with pytest.raises(NonDeterminismError, match="local activity of type 'price'"):
        await Replayer(workflows=[PriceOrdersChanged]).replay(history)
    assert f"{key}-x" not in _CALLS


async def test_a_worker_without_the_activity_fails_the_workflow_task(
    client: Client, queue: str
) -> None:
    """Local activities run only where they are registered: a workflow-only worker
    fails the task (the run stays open), and a worker that has the activity runs it."""
    key = new_id("missing")
    async with Worker(client, task_queue=queue, workflows=[Gated]):
        handle = await client.start_workflow(Gated.run, key, id=key, task_queue=queue)

        async def failed() -> list[HistoryEvent]:
            return of_type(await events_of(handle), ET.EVENT_TYPE_WORKFLOW_TASK_FAILED)

        (failure,) = (await eventually(failed, "the workflow task to fail"))[:1]
    message = failure.workflow_task_failed_event_attributes.failure.message
    assert "local activity type 'gated' is not registered on this worker" in message
    assert not _CALLS[key]
    _GATES[key] = asyncio.Event()
    _GATES[key].set()
    async with Worker(client, task_queue=queue, workflows=[Gated], activities=[gated]):
        assert await bounded(handle.result()) == f"{key}:opened"
    assert _CALLS[key] == [1]


@activity.defn
async def remote_step(value: int) -> int:
    return value + 100


@workflow.defn
class Mixed:
    """A local activity under a durable timeout, next to an ordinary activity: the
    timer the timeout started is dropped again in the same workflow task once the
    local activity's outcome is in, live and on replay alike."""

    @workflow.run
    async def run(self, key: str) -> list[Any]:
        local = asyncio.wait_for(
            workflow.execute_local_activity(
                price, args=[Order(key, 4), 3], start_to_close_timeout=_STEP
            ),
            timeout=600,
        )
        remote = workflow.execute_activity(remote_step, 1, start_to_close_timeout=_STEP)
        priced, stepped = await asyncio.gather(local, remote)
        return [priced["total"], stepped]


async def test_commands_around_a_local_activity_replay_in_order(client: Client, queue: str) -> None:
    key = new_id("mixed")
    async with Worker(
        client,
        task_queue=queue,
        workflows=[Mixed],
        activities=[price, remote_step],
        max_cached_workflows=0,  # the second task replays the first
    ):
        handle = await client.start_workflow(Mixed.run, key, id=key, task_queue=queue)
        assert await bounded(handle.result()) == [12, 101]
    assert _CALLS[key] == [1]
    history = await handle.fetch_history()
    events = list(history.events)
    assert_well_formed(events)
    assert not of_type(events, ET.EVENT_TYPE_TIMER_STARTED)
    assert len(of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)) == 1
    assert len(_markers(events)) == 1
    await Replayer(workflows=[Mixed]).replay(history)
    assert _CALLS[key] == [1]


@pytest.mark.parametrize("return_new", [True, False], ids=["returned", "dispatched"])
async def test_force_create_new_workflow_task(client: Client, queue: str, return_new: bool) -> None:
    """The server side of the heartbeat, over raw gRPC: a completion with
    force_create_new_workflow_task schedules the next task although nothing happened;
    with return_new_workflow_task it is started in the same transaction and returned
    with only the events after the completed task, else it is dispatched as usual."""
    raw = RawWorkflows(client, queue)
    workflow_id = new_id("forced")
    run_id = await raw.start(workflow_id)
    first = await raw.poll()
    request = service_pb2.RespondWorkflowTaskCompletedRequest(
        task_token=first.task_token,
        identity="raw",
        force_create_new_workflow_task=True,
        return_new_workflow_task=return_new,
    )
    response: service_pb2.RespondWorkflowTaskCompletedResponse = await client.call(
        client.service.RespondWorkflowTaskCompleted, request
    )
    if return_new:
        second = response.workflow_task
    else:
        assert not response.workflow_task.task_token
        second = await raw.poll()
    assert second.task_token and second.previous_started_event_id == first.started_event_id
    if return_new:
        assert [e.event_type for e in second.history.events] == [
            ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
            ET.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
            ET.EVENT_TYPE_WORKFLOW_TASK_STARTED,
        ]
    await raw.complete(second.task_token, complete_workflow())
    events = await events_of(client.get_workflow_handle(workflow_id, run_id=run_id))
    assert_well_formed(events)
    assert _task_completions(events) == 2
    # The token of the task already completed is refused: no task is applied twice.
    with pytest.raises(NotFoundError):
        await client.call(client.service.RespondWorkflowTaskCompleted, request)


async def test_worker_shutdown_abandons_a_running_local_activity(
    client: Client, queue: str
) -> None:
    """Past the grace period a stopping worker cancels its local activities and leaves
    the workflow task to time out; another worker then runs the activity again."""
    key = new_id("shutdown")
    _GATES[key] = asyncio.Event()
    worker = Worker(
        client,
        task_queue=queue,
        workflows=[Gated],
        activities=[gated],
        graceful_shutdown_timeout=timedelta(milliseconds=100),
    )
    worker.start()
    handle = await client.start_workflow(
        Gated.run, key, id=key, task_queue=queue, task_timeout=timedelta(seconds=1)
    )
    await eventually(lambda: _CALLS[key], "the local activity to start")
    await bounded(worker.shutdown())
    assert _CANCELLED[key]
    _GATES[key].set()
    async with Worker(client, task_queue=queue, workflows=[Gated], activities=[gated]):
        assert await bounded(handle.result()) == f"{key}:opened"
    assert _CALLS[key] == [1, 1]
    events = await events_of(handle)
    assert_well_formed(events)
    assert of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT)
    assert len(_markers(events)) == 1


@workflow.defn
class TimesOut:
    @workflow.run
    async def run(self, key: str) -> dict[str, Any]:
        try:
            await workflow.execute_local_activity(
                gated,
                key,
                start_to_close_timeout=timedelta(milliseconds=200),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(milliseconds=10), maximum_attempts=2
                ),
            )
        except ActivityError as error:
            cause = error.cause
            assert isinstance(cause, TimeoutError)
            return {"retry_state": int(error.retry_state or 0), "timeout": int(cause.type or 0)}
        raise AssertionError("the gate never opens")


async def test_start_to_close_bounds_each_attempt(client: Client, queue: str) -> None:
    key = new_id("timeout")
    _GATES[key] = asyncio.Event()  # never set: only the timeout ends an attempt
    async with Worker(client, task_queue=queue, workflows=[TimesOut], activities=[gated]):
        handle = await client.start_workflow(TimesOut.run, key, id=key, task_queue=queue)
        result = await bounded(handle.result())
    assert result == {
        "retry_state": int(RetryState.MAXIMUM_ATTEMPTS_REACHED),
        "timeout": int(TimeoutType.START_TO_CLOSE),
    }
    assert _CALLS[key] == [1, 2] and _CANCELLED[key]
    (marker,) = _markers(await events_of(handle))
    assert marker["attempt"] == 2
