"""Ending running workflows from outside: cancellation (of workflows and of their
activities, with every cancellation type, also of heartbeating sync and async
activities), termination, and run timeouts.

Every test runs a real server on an ephemeral port over SQLite and over PostgreSQL
(conftest's ``client``), real workers and clients in the test's event loop, and its
own task queue and workflow ids (uuids). Nothing synchronizes with a sleep: tests
await results or poll a condition with ``eventually`` (bounded). Activities run in
the worker, not in the test's frame, so they record what happened to them in
module-level dicts keyed by a per-test uuid (helpers_messages.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

import pytest
from helpers import ET, events_of, eventually, has_event, new_id, of_type
from helpers_messages import TIMEOUT, Inbox, expect_closed, index_of, is_idle, names, shout

from tideflow.api.v1.common_pb2 import RetryState as PbRetryState
from tideflow.api.v1.history_pb2 import HistoryEvent
from tideflow.worker_sdk import (
    Client,
    Worker,
    WorkflowExecutionStatus,
    WorkflowHandle,
    activity,
    workflow,
)
from tideflow.worker_sdk import exceptions as exc
from tideflow.worker_sdk.exceptions import (
    CancelledError,
    TerminatedError,
    WorkflowFailureError,
)
from tideflow.worker_sdk.workflow import ActivityCancellationType

# Heartbeats reach the server at most every 0.8 x this (the worker's throttle), so a
# cancellation request is seen within ~1.6 s; long enough not to time out on a busy
# machine.
_HEARTBEAT_TIMEOUT = timedelta(seconds=2)


# What activities observed, keyed by a per-test uuid.
OBSERVED: dict[str, list[str]] = defaultdict(list)


CLEANED: dict[str, list[str]] = defaultdict(list)


# Keys whose long-running activity may finish normally.
RELEASED: set[str] = set()


@activity.defn
async def clean_up(key: str) -> str:
    CLEANED[key].append("cleaned")
    return f"cleaned {key}"


@activity.defn
async def heartbeat_until_cancelled(key: str) -> str:
    """Heartbeats until the server cancels it (the worker then cancels this coroutine)
    or the test releases it."""
    OBSERVED[key].append("started")
    beats = 0
    try:
        while key not in RELEASED:
            activity.heartbeat(beats)
            beats += 1
            await asyncio.sleep(0.02)
    except asyncio.CancelledError:
        OBSERVED[key].append("cancelled")
        raise
    OBSERVED[key].append("released")
    return "finished"


@activity.defn
def sync_heartbeat_until_cancelled(key: str) -> str:
    """The same for a sync activity (worker thread): it polls ``is_cancelled()``."""
    OBSERVED[key].append("started")
    deadline = time.monotonic() + 60  # never outlive a broken test by much
    beats = 0
    while not activity.is_cancelled():
        if key in RELEASED or time.monotonic() > deadline:
            OBSERVED[key].append("released")
            return "finished"
        activity.heartbeat(beats)
        beats += 1
        time.sleep(0.02)
    OBSERVED[key].append("saw is_cancelled")
    raise CancelledError("stopped at the server's request")


@workflow.defn
class Sleeper:
    """Sleeps for an hour; on cancellation it cleans up and re-raises, or (with
    ``give_up_quietly``) returns a value instead."""

    @workflow.run
    async def run(self, key: str, give_up_quietly: bool) -> str:
        try:
            await workflow.sleep(timedelta(hours=1))
        except asyncio.CancelledError:
            done: str = await workflow.execute_activity(
                clean_up, key, start_to_close_timeout=TIMEOUT
            )
            if give_up_quietly:
                return f"cancelled, {done}"
            raise
        return "slept"


@workflow.defn
class CancellableWork:
    """Runs a heartbeating activity; on cancellation cleans up, optionally waits for
    ``allow_close`` (so the test can look at the run in between), and re-raises."""

    def __init__(self) -> None:
        self.phase = "working"
        self.may_close = False

    @workflow.run
    async def run(self, key: str, cancellation_type: int, sync_activity: bool, hold: bool) -> str:
        work = sync_heartbeat_until_cancelled if sync_activity else heartbeat_until_cancelled
        try:
            result: str = await workflow.execute_activity(
                work,
                key,
                start_to_close_timeout=timedelta(seconds=60),
                heartbeat_timeout=_HEARTBEAT_TIMEOUT,
                cancellation_type=ActivityCancellationType(cancellation_type),
            )
            return result
        except asyncio.CancelledError:
            self.phase = "cleaning up"
            await workflow.execute_activity(clean_up, key, start_to_close_timeout=TIMEOUT)
            if hold:
                self.phase = "holding"
                await workflow.wait_condition(lambda: self.may_close)
            raise

    @workflow.signal
    def allow_close(self) -> None:
        self.may_close = True

    @workflow.query
    def current_phase(self) -> str:
        return self.phase


@workflow.defn
class Stubborn:
    """Waits forever; if it ever saw a cancellation it would run a cleanup activity."""

    @workflow.run
    async def run(self, key: str) -> str:
        try:
            await workflow.wait_condition(lambda: False)
        except asyncio.CancelledError:
            await workflow.execute_activity(clean_up, key, start_to_close_timeout=TIMEOUT)
            raise
        return "unreachable"


async def test_cancel_runs_cleanup_then_closes_canceled(client: Client) -> None:
    tq = new_id("tq")
    key = new_id("cleanup")
    async with Worker(client, task_queue=tq, workflows=[Sleeper], activities=[clean_up]):
        handle = await client.start_workflow(
            Sleeper.run, args=[key, False], id=new_id("sleeper"), task_queue=tq
        )
        await eventually(has_event(handle, ET.EVENT_TYPE_TIMER_STARTED), what="sleeping")
        await handle.cancel("user asked")
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
    assert isinstance(failed.value.cause, CancelledError)
    assert CLEANED[key] == ["cleaned"]
    await expect_closed(handle, WorkflowExecutionStatus.CANCELED)

    events = await events_of(handle)
    [requested] = of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED)
    attrs = requested.workflow_execution_cancel_requested_event_attributes
    assert attrs.cause == "user asked"
    assert attrs.identity == client.identity
    order = [
        index_of(events, ET.EVENT_TYPE_TIMER_STARTED),
        events.index(requested),
        index_of(events, ET.EVENT_TYPE_TIMER_CANCELED),  # the sleep was interrupted
        index_of(events, ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED),
        index_of(events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED),
        len(events) - 1,
    ]
    assert order == sorted(order), names(events)
    assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED
    assert not of_type(events, ET.EVENT_TYPE_TIMER_FIRED)


async def test_cancelled_workflow_may_complete_instead(client: Client) -> None:
    tq = new_id("tq")
    key = new_id("quiet")
    async with Worker(client, task_queue=tq, workflows=[Sleeper], activities=[clean_up]):
        handle = await client.start_workflow(
            Sleeper.run, args=[key, True], id=new_id("sleeper"), task_queue=tq
        )
        await eventually(has_event(handle, ET.EVENT_TYPE_TIMER_STARTED), what="sleeping")
        await handle.cancel()
        assert await handle.result() == f"cancelled, cleaned {key}"
    await expect_closed(handle, WorkflowExecutionStatus.COMPLETED)
    events = await events_of(handle)
    assert len(of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED)) == 1
    assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
    assert not of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED)


def _work_and_cleanup(events: Sequence[HistoryEvent]) -> tuple[int, int]:
    """Scheduled event ids of the heartbeating activity and of the cleanup activity."""
    ids = {
        e.activity_task_scheduled_event_attributes.activity_type.name: e.event_id
        for e in of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)
    }
    work = ids.get("heartbeat_until_cancelled") or ids["sync_heartbeat_until_cancelled"]
    return work, ids["clean_up"]


@pytest.mark.parametrize("sync_activity", [False, True], ids=["async_activity", "sync_activity"])
async def test_cancel_during_heartbeating_activity(client: Client, sync_activity: bool) -> None:
    """The activity learns of the cancellation through its heartbeats (an async one as
    asyncio.CancelledError, a sync one through ``activity.is_cancelled()``); with
    WAIT_CANCELLATION_COMPLETED the workflow moves on only once the worker reported
    the activity cancelled; its cleanup activity runs; the run closes CANCELED."""
    tq = new_id("tq")
    key = new_id("heartbeats")
    work_fn = sync_heartbeat_until_cancelled if sync_activity else heartbeat_until_cancelled
    async with Worker(
        client, task_queue=tq, workflows=[CancellableWork], activities=[work_fn, clean_up]
    ):
        handle = await client.start_workflow(
            CancellableWork.run,
            args=[key, ActivityCancellationType.WAIT_CANCELLATION_COMPLETED, sync_activity, False],
            id=new_id("cancel-activity"),
            task_queue=tq,
        )
        await eventually(lambda: OBSERVED[key], what="activity started")

        async def heartbeat_recorded() -> bool:
            pending = (await handle.describe()).raw.pending_activities
            return bool(pending) and pending[0].HasField("last_heartbeat_time")

        await eventually(heartbeat_recorded, what="a heartbeat reached the server")
        await handle.cancel()
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
    assert isinstance(failed.value.cause, CancelledError)
    seen = "saw is_cancelled" if sync_activity else "cancelled"
    assert OBSERVED[key] == ["started", seen]
    assert CLEANED[key] == ["cleaned"]
    await expect_closed(handle, WorkflowExecutionStatus.CANCELED)

    events = await events_of(handle)
    work_id, cleanup_id = _work_and_cleanup(events)
    [requested] = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED)
    [canceled] = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_CANCELED)
    assert requested.activity_task_cancel_requested_event_attributes.scheduled_event_id == work_id
    canceled_attrs = canceled.activity_task_canceled_event_attributes
    assert canceled_attrs.scheduled_event_id == work_id
    assert canceled_attrs.identity == client.identity  # the worker reported it
    # The worker reported the cancellation with the last heartbeat's details.
    [last_beat] = client.data_converter.from_payloads(canceled_attrs.details)
    assert isinstance(last_beat, int) and last_beat >= 0
    order = [
        work_id,
        index_of(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED) + 1,
        requested.event_id,
        canceled.event_id,
        cleanup_id,  # WAIT_CANCELLATION_COMPLETED: cleanup only after the confirmation
        events[-1].event_id,
    ]
    assert order == sorted(order), names(events)
    assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED
    completed = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)
    assert [e.activity_task_completed_event_attributes.scheduled_event_id for e in completed] == [
        cleanup_id
    ]


@pytest.mark.parametrize(
    "cancellation_type",
    [
        ActivityCancellationType.TRY_CANCEL,
        ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        ActivityCancellationType.ABANDON,
    ],
    ids=lambda t: t.name.lower(),
)
async def test_activity_cancellation_types(
    client: Client, cancellation_type: ActivityCancellationType
) -> None:
    """The workflow is cancelled while it awaits a heartbeating activity; it cleans up
    and then holds (so the test can look at the run) until allowed to close.

    TRY_CANCEL: the cancel request and the cleanup go out in one workflow task; the
    activity's cancellation is confirmed later. WAIT_CANCELLATION_COMPLETED: cleanup
    starts only after the confirmation. ABANDON: the activity is never asked to stop;
    it runs on and its result is recorded and ignored."""
    tq = new_id("tq")
    key = new_id(f"ctype-{cancellation_type.name}")
    async with Worker(
        client,
        task_queue=tq,
        workflows=[CancellableWork],
        activities=[heartbeat_until_cancelled, clean_up],
    ):
        handle = await client.start_workflow(
            CancellableWork.run,
            args=[key, cancellation_type, False, True],
            id=new_id("ctype"),
            task_queue=tq,
        )
        await eventually(lambda: OBSERVED[key], what="activity started")
        await handle.cancel()

        async def holding() -> bool:
            return bool(CLEANED[key]) and await handle.query(CancellableWork.current_phase) == (
                "holding"
            )

        await eventually(holding, what="workflow cleaned up and holding")
        await eventually(is_idle(handle), what="holding task completed")
        events = await events_of(handle)
        work_id, cleanup_id = _work_and_cleanup(events)
        requested = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED)
        canceled = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_CANCELED)

        if cancellation_type == ActivityCancellationType.TRY_CANCEL:
            # Request and cleanup in the same workflow task's commands, back to back.
            assert [e.event_id for e in requested] == [cleanup_id - 1], names(events)
            # The server still cancels the activity; the worker confirms it.
            await eventually(has_event(handle, ET.EVENT_TYPE_ACTIVITY_TASK_CANCELED))
            await eventually(lambda: "cancelled" in OBSERVED[key], what="activity cancelled")
            assert OBSERVED[key] == ["started", "cancelled"]
        elif cancellation_type == ActivityCancellationType.WAIT_CANCELLATION_COMPLETED:
            assert len(requested) == len(canceled) == 1
            assert requested[0].event_id < canceled[0].event_id < cleanup_id, names(events)
            assert OBSERVED[key] == ["started", "cancelled"]
        else:
            # ABANDON: never asked to stop; it keeps heartbeating while the workflow
            # already cleaned up.
            assert not requested and not canceled, names(events)
            assert OBSERVED[key] == ["started"]
            RELEASED.add(key)
            await eventually(
                _activity_completed(handle, work_id), what="abandoned activity finished"
            )
            assert OBSERVED[key] == ["started", "released"]

        await handle.signal(CancellableWork.allow_close)
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
    assert isinstance(failed.value.cause, CancelledError)
    await expect_closed(handle, WorkflowExecutionStatus.CANCELED)
    events = await events_of(handle)
    assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED
    if cancellation_type != ActivityCancellationType.ABANDON:
        [canceled_event] = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_CANCELED)
        assert canceled_event.activity_task_canceled_event_attributes.scheduled_event_id == work_id


def _activity_completed(handle: WorkflowHandle, scheduled_id: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return any(
            e.activity_task_completed_event_attributes.scheduled_event_id == scheduled_id
            for e in of_type(await events_of(handle), ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)
        )

    return check


async def test_terminate_closes_at_once_without_running_workflow_code(client: Client) -> None:
    tq = new_id("tq")
    key = new_id("terminate")
    async with Worker(
        client, task_queue=tq, workflows=[Stubborn, Inbox], activities=[clean_up, shout]
    ):
        handle = await client.start_workflow(
            Stubborn.run, key, id=new_id("stubborn"), task_queue=tq
        )
        await eventually(is_idle(handle), what="workflow waiting")
        await handle.terminate("maintenance")
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
        assert isinstance(failed.value.cause, TerminatedError)
        assert "maintenance" in str(failed.value.cause)
        terminated = await events_of(handle)

        # Give the worker something else to do on the same queue and wait for it: had
        # the termination reached the workflow code, it would have happened by now.
        other = await client.start_workflow(
            Inbox.run, id=new_id("after"), task_queue=tq, start_signal=Inbox.close_inbox
        )
        await other.result()

    assert await events_of(handle) == terminated
    assert key not in CLEANED
    await expect_closed(handle, WorkflowExecutionStatus.TERMINATED)
    assert names(terminated) == [
        "WORKFLOW_EXECUTION_STARTED",
        "WORKFLOW_TASK_SCHEDULED",
        "WORKFLOW_TASK_STARTED",
        "WORKFLOW_TASK_COMPLETED",
        "WORKFLOW_EXECUTION_TERMINATED",
    ]
    attrs = terminated[-1].workflow_execution_terminated_event_attributes
    assert attrs.reason == "maintenance"
    assert attrs.identity == client.identity


async def test_run_timeout_closes_timed_out(client: Client) -> None:
    tq = new_id("tq")
    key = new_id("timeout")
    async with Worker(client, task_queue=tq, workflows=[Stubborn], activities=[clean_up]):
        handle = await client.start_workflow(
            Stubborn.run,
            key,
            id=new_id("stubborn"),
            task_queue=tq,
            run_timeout=timedelta(seconds=1),
        )
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
    assert isinstance(failed.value.cause, exc.TimeoutError)
    await expect_closed(handle, WorkflowExecutionStatus.TIMED_OUT)
    events = await events_of(handle)
    started = events[0].workflow_execution_started_event_attributes
    assert started.workflow_run_timeout.ToTimedelta() == timedelta(seconds=1)
    assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT
    timed_out = events[-1].workflow_execution_timed_out_event_attributes
    assert timed_out.retry_state == PbRetryState.RETRY_STATE_TIMEOUT
    # Timing out is not a cancellation: no workflow code ran for it.
    assert not of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED), names(events)
    assert key not in CLEANED
