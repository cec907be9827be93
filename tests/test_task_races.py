"""Races between a task and the server: a poll cancelled while the server records its
task as started keeps the task, and cancelling a timer that fired during the
workflow task wins.

A real server on an ephemeral port over SQLite and over PostgreSQL (conftest's
``server`` / ``client``); the race is forced by gating the store or by moving the
server's clock (helpers.SteppedClock), never by timing.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

import pytest
from helpers import (
    ET,
    SteppedClock,
    assert_gap_free,
    bounded,
    events_of,
    eventually,
    has_event,
    new_id,
    of_type,
    running_server,
)
from helpers_e2e import HelloWorkflow, compose_greeting
from raw_workflow import RACED_TIMER, TIMER_RACE_CONFIG, RawWorkflows, cancel_timer

from tideflow.api.v1 import service_pb2, state_pb2
from tideflow.history import RunKey
from tideflow.server import TideflowServer
from tideflow.worker_sdk import (
    Client,
    Worker,
)
from tideflow.worker_sdk.exceptions import (
    InvalidArgumentError,
)


@pytest.mark.parametrize("kind", ["workflow", "activity", "workflow-after-commit"])
async def test_poll_cancelled_while_recording_start_keeps_the_task(
    server: TideflowServer, client: Client, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A worker shutting down cancels its long polls. If a poll is cancelled while the
    server records its task as started, the task must be dispatched again, not lost
    (regression: it stayed in the store but nothing dispatched it until a restart).

    The store's commits are gated so the cancellation lands inside that window, before
    a store writer took the commit (it is withdrawn), or (``workflow-after-commit``)
    after it landed: then the task did start, the given-back copy is stale and dropped,
    and the workflow task timeout recovers."""
    identity = new_id("doomed-poller")
    after_commit = kind == "workflow-after-commit"
    entered, cancelled, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
    original_submit, original_withdraw = server.store.submit, server.store.withdraw
    gated: dict[asyncio.Future[None], asyncio.Future[None]] = {}

    def gated_submit(transition: Any, *together: Any, bulk: bool = False) -> asyncio.Future[None]:
        if identity.encode() not in transition.state or release.is_set():
            return original_submit(transition, *together, bulk=bulk)
        outer: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def commit() -> None:
            if after_commit:
                await original_submit(transition, *together, bulk=bulk)
            entered.set()
            await release.wait()
            if not after_commit:
                await original_submit(transition, *together, bulk=bulk)
            if not outer.done():
                outer.set_result(None)

        gated[outer] = asyncio.ensure_future(commit())
        return outer

    def gated_withdraw(commit: asyncio.Future[None]) -> bool:
        job = gated.get(commit)
        if job is None:
            return original_withdraw(commit)
        cancelled.set()
        if after_commit:
            return False  # a writer had it: it landed
        job.cancel()
        commit.cancel()
        return True

    monkeypatch.setattr(server.store, "submit", gated_submit)
    monkeypatch.setattr(server.store, "withdraw", gated_withdraw)
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


async def test_cancel_of_a_timer_that_fired_during_the_task_wins(store_url: str) -> None:
    """A timer fires while a workflow task runs, and that task's commands cancel it (the
    workflow has not seen the fire). As in Temporal the cancel is accepted: history gets
    TIMER_CANCELED and the buffered TIMER_FIRED is dropped, instead of failing the task.
    Driven over raw gRPC on a server whose clock the test moves: the timer fires only
    once the task that cancels it is started, every run."""
    clock = SteppedClock()
    async with (
        running_server(store_url, TIMER_RACE_CONFIG, clock=clock) as server,
        await Client.connect(server.address) as client,
    ):
        await _cancel_of_a_timer_that_fired_during_the_task(server, client, clock)


async def _cancel_of_a_timer_that_fired_during_the_task(
    server: TideflowServer, client: Client, clock: SteppedClock
) -> None:
    raw = RawWorkflows(client, new_id("tq"))
    wid = new_id("fired-cancel")

    async def state(run_id: str) -> state_pb2.MutableState:
        record = await server.store.get_execution(
            RunKey(namespace=client.namespace, workflow_id=wid, run_id=run_id)
        )
        assert record is not None
        return state_pb2.MutableState.FromString(record.state)

    async def fire_during_the_task(run_id: str) -> None:
        assert (await state(run_id)).workflow_task.started_event_id, "the second task runs"
        clock.advance(RACED_TIMER)

        async def buffered() -> bool:
            ms = await state(run_id)
            assert ms.workflow_task.started_event_id, "the second task is still running"
            return "t1" not in ms.pending_timers and any(
                e.event_type == ET.EVENT_TYPE_TIMER_FIRED for e in ms.buffered_events
            )

        await eventually(buffered, "the timer's fire, buffered")

    run_id = await raw.cancel_timer_that_fired_during_the_task(wid, fire_during_the_task)
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
