"""Signals into running workflows: sync and async handlers in order, signal-with-start,
de-duplication by request id, signals to closed runs, a storm from ten clients, and
``workflow.wait_condition`` (with a timeout, a durable timer).

Real server on an ephemeral port over SQLite and over PostgreSQL (conftest's
``server`` / ``client``), real workers, uuid task queues and ids; nothing waits on a
sleep.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest
from helpers import ET, assert_gap_free, events_of, eventually, has_event, new_id, of_type
from helpers_messages import Inbox, expect_closed, index_of, is_idle, names, shout

from tideflow.api.v1.history_pb2 import HistoryEvent
from tideflow.server import TideflowServer
from tideflow.worker_sdk import (
    Client,
    Replayer,
    Worker,
    WorkflowExecutionStatus,
    workflow,
)
from tideflow.worker_sdk.exceptions import (
    RPCError,
)


def signals_in(client: Client, events: Sequence[HistoryEvent]) -> list[tuple[str, list[Any]]]:
    """(signal name, decoded arguments) of each WorkflowExecutionSignaled, in order."""
    result = []
    for event in of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED):
        attrs = event.workflow_execution_signaled_event_attributes
        args = client.data_converter.from_payloads(attrs.input) if attrs.HasField("input") else []
        result.append((attrs.signal_name, args))
    return result


@workflow.defn
class Tally:
    """Records every (client, seq) signal; finishes once it has ``expected`` of them."""

    def __init__(self) -> None:
        self.received: list[list[int]] = []

    @workflow.run
    async def run(self, expected: int) -> list[list[int]]:
        await workflow.wait_condition(lambda: len(self.received) >= expected)
        return self.received

    @workflow.signal
    def record(self, client_index: int, seq: int) -> None:
        self.received.append([client_index, seq])


@workflow.defn
class Gate:
    def __init__(self) -> None:
        self.opened = False

    @workflow.run
    async def run(self, timeout_s: float) -> str:
        try:
            await workflow.wait_condition(lambda: self.opened, timeout=timedelta(seconds=timeout_s))
        except TimeoutError:  # asyncio.TimeoutError
            return "timed out"
        return "opened"

    @workflow.signal
    def open(self) -> None:
        self.opened = True


async def test_signals_reach_sync_and_async_handlers_in_order(client: Client) -> None:
    tq = new_id("tq")
    async with Worker(client, task_queue=tq, workflows=[Inbox], activities=[shout]):
        handle = await client.start_workflow(Inbox.run, id=new_id("inbox"), task_queue=tq)
        # The signals reach a run that is waiting: its first workflow task has completed
        # (else "a" would be in that task's history, delivered before the run began,
        # and seen at start; test_signal_with_start covers that order).
        await eventually(is_idle(handle), "the first workflow task to complete")
        await handle.signal(Inbox.add, "a")
        await handle.signal(Inbox.add_shouted, "b")  # async handler: runs an activity

        # The async handler's activity must finish before "c", or the order would race.
        async def shouted() -> bool:
            return bool(await handle.query(Inbox.item_at, -1) == "B")

        await eventually(shouted, what="B appended")
        assert await handle.query(Inbox.snapshot) == {"phase": "waiting", "items": ["a", "B"]}
        # A handle by id alone (no run id) and a signal by name reach the same run.
        by_id = client.get_workflow_handle(handle.id)
        await by_id.signal("add", "c")
        await by_id.signal(Inbox.close_inbox)
        assert await handle.result() == {"items": ["a", "B", "c"], "seen_at_start": []}

    await expect_closed(handle, WorkflowExecutionStatus.COMPLETED)
    events = await events_of(handle)
    assert signals_in(client, events) == [
        ("add", ["a"]),
        ("add_shouted", ["b"]),
        ("add", ["c"]),
        ("close", []),
    ]
    for signaled in of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED):
        attrs = signaled.workflow_execution_signaled_event_attributes
        assert attrs.identity == client.identity
        assert attrs.request_id
    # The async handler's activity was scheduled after its signal and completed
    # before the "c" signal was recorded.
    [scheduled] = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)
    assert scheduled.activity_task_scheduled_event_attributes.activity_type.name == "shout"
    assert (
        index_of(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED, 1)
        < events.index(scheduled)
        < index_of(events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)
        < index_of(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED, 2)
    )
    assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED


async def test_signal_with_start(client: Client) -> None:
    tq = new_id("tq")
    wid = new_id("sws")
    request_id = str(uuid.uuid4())
    async with Worker(client, task_queue=tq, workflows=[Inbox], activities=[shout]):
        first = await client.start_workflow(
            Inbox.run,
            id=wid,
            task_queue=tq,
            start_signal=Inbox.add,
            start_signal_args=["first"],
            request_id=request_id,
        )
        # A retried call (same request id) returns the same run and signals nothing.
        retried = await client.start_workflow(
            Inbox.run,
            id=wid,
            task_queue=tq,
            start_signal=Inbox.add,
            start_signal_args=["first"],
            request_id=request_id,
        )
        assert retried.run_id == first.run_id
        await eventually(is_idle(first), what="first workflow task completed")
        # The id is running: signal-with-start only signals it.
        second = await client.start_workflow(
            Inbox.run, id=wid, task_queue=tq, start_signal=Inbox.add, start_signal_args=["second"]
        )
        assert second.run_id == first.run_id
        await first.signal(Inbox.close_inbox)
        # The start signal was handled before the body started.
        assert await first.result() == {"items": ["first", "second"], "seen_at_start": ["first"]}

        # The id is closed now: signal-with-start starts a new run with the signal.
        third = await client.start_workflow(
            Inbox.run, id=wid, task_queue=tq, start_signal=Inbox.add, start_signal_args=["third"]
        )
        assert third.run_id != first.run_id
        await third.signal(Inbox.close_inbox)
        assert await third.result() == {"items": ["third"], "seen_at_start": ["third"]}

    events = await events_of(first)
    assert names(events[:3]) == [
        "WORKFLOW_EXECUTION_STARTED",
        "WORKFLOW_EXECUTION_SIGNALED",
        "WORKFLOW_TASK_SCHEDULED",
    ]
    assert signals_in(client, events) == [
        ("add", ["first"]),
        ("add", ["second"]),
        ("close", []),
    ]
    started = events[0].workflow_execution_started_event_attributes
    assert events[1].workflow_execution_signaled_event_attributes.request_id == request_id
    assert started.request_id == request_id
    third_events = await events_of(third)
    assert signals_in(client, third_events) == [("add", ["third"]), ("close", [])]
    assert (await first.describe()).run_id == first.run_id
    assert (await client.get_workflow_handle(wid).describe()).run_id == third.run_id


async def test_signal_request_id_deduplicates_retries(client: Client) -> None:
    tq = new_id("tq")
    async with Worker(client, task_queue=tq, workflows=[Inbox], activities=[shout]):
        handle = await client.start_workflow(Inbox.run, id=new_id("dedup"), task_queue=tq)
        await handle.signal(Inbox.add, "once", request_id="retry-1")
        await handle.signal(Inbox.add, "once", request_id="retry-1")
        # Concurrent retries of one request are applied once too.
        await asyncio.gather(
            *(handle.signal(Inbox.add, "again", request_id="retry-2") for _ in range(5))
        )
        # Without a request id every call is a new signal (each gets its own id).
        await handle.signal(Inbox.add, "twice")
        await handle.signal(Inbox.add, "twice")
        await handle.signal(Inbox.close_inbox)
        result = await handle.result()
    assert result["items"] == ["once", "again", "twice", "twice"]

    events = await events_of(handle)
    signaled = of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)
    request_ids = [e.workflow_execution_signaled_event_attributes.request_id for e in signaled]
    assert len(request_ids) == 5
    assert request_ids[:2] == ["retry-1", "retry-2"]
    assert len(set(request_ids)) == 5


async def test_signal_cancel_terminate_of_closed_workflow_fail_precondition(
    client: Client,
) -> None:
    tq = new_id("tq")
    wid = new_id("closed")
    async with Worker(client, task_queue=tq, workflows=[Inbox], activities=[shout]):
        handle = await client.start_workflow(Inbox.run, id=wid, task_queue=tq)
        await handle.signal(Inbox.close_inbox)
        await handle.result()
        before = await events_of(handle)

        with pytest.raises(RPCError) as signal_error:
            await handle.signal(Inbox.add, "too late")
        with pytest.raises(RPCError) as cancel_error:
            await handle.cancel()
        with pytest.raises(RPCError) as terminate_error:
            await handle.terminate("too late")
        for error in (signal_error.value, cancel_error.value, terminate_error.value):
            assert type(error) is RPCError  # not a query failure, not "not found"
            assert error.status == "FAILED_PRECONDITION"
            assert "already closed" in error.message
            assert wid in error.message and str(handle.run_id) in error.message
        # The same through a handle without a run id (the id's current, closed run).
        with pytest.raises(RPCError) as by_id_error:
            await client.get_workflow_handle(wid).signal("add", "too late")
        assert by_id_error.value.status == "FAILED_PRECONDITION"

    assert await events_of(handle) == before
    await expect_closed(handle, WorkflowExecutionStatus.COMPLETED)


async def test_signal_storm_from_ten_clients(server: TideflowServer, client: Client) -> None:
    clients_n, per_client = 10, 100
    total = clients_n * per_client
    tq = new_id("tq")
    wid = new_id("storm")
    senders = [await Client.connect(server.address) for _ in range(clients_n)]
    try:
        async with Worker(client, task_queue=tq, workflows=[Tally]):
            handle = await client.start_workflow(Tally.run, total, id=wid, task_queue=tq)

            async def send_all(index: int, sender: Client) -> None:
                target = sender.get_workflow_handle(wid)
                for seq in range(per_client):
                    await target.signal(Tally.record, args=[index, seq])

            await asyncio.gather(*(send_all(i, s) for i, s in enumerate(senders)))
            received = await handle.result()
    finally:
        for sender in senders:
            await sender.close()

    pairs = [tuple(p) for p in received]
    assert len(pairs) == total
    assert set(pairs) == {(i, seq) for i in range(clients_n) for seq in range(per_client)}
    for i in range(clients_n):
        assert [seq for c, seq in pairs if c == i] == list(range(per_client)), f"client {i}"

    events = await events_of(handle)
    assert_gap_free(events)
    signaled = signals_in(client, events)
    assert len(signaled) == total
    # The workflow saw the signals in the one total order history recorded.
    assert [tuple(args) for _, args in signaled] == pairs
    assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
    await expect_closed(handle, WorkflowExecutionStatus.COMPLETED)


async def test_wait_condition_with_timeout_is_a_durable_timer(client: Client) -> None:
    tq = new_id("tq")
    async with Worker(client, task_queue=tq, workflows=[Gate]):
        opened = await client.start_workflow(Gate.run, 3600.0, id=new_id("gate"), task_queue=tq)
        await eventually(has_event(opened, ET.EVENT_TYPE_TIMER_STARTED), what="timer started")
        await opened.signal(Gate.open)
        assert await opened.result() == "opened"

        timed_out = await client.start_workflow(Gate.run, 0.5, id=new_id("gate"), task_queue=tq)
        assert await timed_out.result() == "timed out"

    # Condition met: the timeout's timer was cancelled.
    events = await events_of(opened)
    assert names(events) == [
        "WORKFLOW_EXECUTION_STARTED",
        "WORKFLOW_TASK_SCHEDULED",
        "WORKFLOW_TASK_STARTED",
        "WORKFLOW_TASK_COMPLETED",
        "TIMER_STARTED",
        "WORKFLOW_EXECUTION_SIGNALED",
        "WORKFLOW_TASK_SCHEDULED",
        "WORKFLOW_TASK_STARTED",
        "WORKFLOW_TASK_COMPLETED",
        "TIMER_CANCELED",
        "WORKFLOW_EXECUTION_COMPLETED",
    ]
    started = of_type(events, ET.EVENT_TYPE_TIMER_STARTED)[0].timer_started_event_attributes
    assert started.start_to_fire_timeout.ToTimedelta() == timedelta(hours=1)

    # Condition never met: the durable timer fired and the workflow saw TimeoutError.
    events = await events_of(timed_out)
    assert names(events) == [
        "WORKFLOW_EXECUTION_STARTED",
        "WORKFLOW_TASK_SCHEDULED",
        "WORKFLOW_TASK_STARTED",
        "WORKFLOW_TASK_COMPLETED",
        "TIMER_STARTED",
        "TIMER_FIRED",
        "WORKFLOW_TASK_SCHEDULED",
        "WORKFLOW_TASK_STARTED",
        "WORKFLOW_TASK_COMPLETED",
        "WORKFLOW_EXECUTION_COMPLETED",
    ]
    started = of_type(events, ET.EVENT_TYPE_TIMER_STARTED)[0].timer_started_event_attributes
    assert started.start_to_fire_timeout.ToTimedelta() == timedelta(seconds=0.5)
    # Both histories replay deterministically.
    replayer = Replayer(workflows=[Gate])
    for handle in (opened, timed_out):
        await replayer.replay(await handle.fetch_history())
