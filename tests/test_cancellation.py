"""End-to-end tests of messages into and out of running workflows: signals (with
signal-with-start and de-duplication), queries, ``workflow.wait_condition``,
cancellation (of workflows and of their activities, with every cancellation type),
termination, run timeouts, and ``workflow.patched`` / ``workflow.deprecate_patch``.

Every test runs a real server on an ephemeral port over SQLite and over PostgreSQL
(conftest's ``server``), real workers and real clients in the test's event loop, and
uses its own task queue and workflow ids (uuids). Nothing synchronizes with a sleep:
tests await results or poll a condition with ``eventually`` (bounded). Activities
run in the worker, not in the test's frame, so they record what happened to them in
module-level dicts keyed by a per-test uuid.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

import pytest
from helpers import assert_gap_free, events_of, eventually, has_event, new_id, of_type

from tideflow.api.v1.common_pb2 import RetryState as PbRetryState
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.server import TideflowServer
from tideflow.worker_sdk import (
    Client,
    Replayer,
    Worker,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowHistory,
    activity,
    workflow,
)
from tideflow.worker_sdk import exceptions as exc
from tideflow.worker_sdk.exceptions import (
    CancelledError,
    NonDeterminismError,
    RPCError,
    TerminatedError,
    WorkflowFailureError,
    WorkflowQueryFailedError,
)
from tideflow.worker_sdk.workflow import ActivityCancellationType

ET = EventType
_TIMEOUT = timedelta(seconds=30)
# Heartbeats reach the server at most every 0.8 x this (the worker's throttle), so a
# cancellation request is seen within ~1.6 s; long enough not to time out on a busy
# machine.
_HEARTBEAT_TIMEOUT = timedelta(seconds=2)

# --------------------------------------------------------------------------- helpers


def names(events: Sequence[HistoryEvent]) -> list[str]:
    """Event types without the EVENT_TYPE_ prefix, for readable assertion messages."""
    return [ET.Name(e.event_type).removeprefix("EVENT_TYPE_") for e in events]


def index_of(events: Sequence[HistoryEvent], event_type: int, nth: int = 0) -> int:
    """Position of the ``nth`` event of ``event_type``."""
    positions = [i for i, e in enumerate(events) if e.event_type == event_type]
    assert len(positions) > nth, f"no {ET.Name(event_type)} #{nth} in {names(events)}"
    return positions[nth]


def is_idle(handle: WorkflowHandle) -> Callable[[], Awaitable[bool]]:
    """The run waits in workflow code: its last workflow task completed, none is
    scheduled (nothing arrived since)."""

    async def check() -> bool:
        events = await events_of(handle)
        return events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED

    return check


async def expect_closed(handle: WorkflowHandle, status: WorkflowExecutionStatus) -> None:
    description = await handle.describe()
    assert description.status == status
    assert description.close_time is not None
    assert description.raw.pending_activities == []
    events = await events_of(handle)
    assert description.history_length == len(events)
    assert_gap_free(events)


def signals_in(client: Client, events: Sequence[HistoryEvent]) -> list[tuple[str, list[Any]]]:
    """(signal name, decoded arguments) of each WorkflowExecutionSignaled, in order."""
    result = []
    for event in of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED):
        attrs = event.workflow_execution_signaled_event_attributes
        args = client.data_converter.from_payloads(attrs.input) if attrs.HasField("input") else []
        result.append((attrs.signal_name, args))
    return result


# ------------------------------------------------------ activities (run in the worker)

# What activities observed, keyed by a per-test uuid.
OBSERVED: dict[str, list[str]] = defaultdict(list)
CLEANED: dict[str, list[str]] = defaultdict(list)
# Keys whose long-running activity may finish normally.
RELEASED: set[str] = set()
# Keys whose gated workflow may get past its first workflow task.
OPEN_GATES: set[str] = set()


@activity.defn
async def shout(text: str) -> str:
    return text.upper()


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


@activity.defn
async def old_step(x: str) -> str:
    return f"old:{x}"


@activity.defn
async def new_step(x: str) -> str:
    return f"new:{x}"


# ------------------------------------------------------------------------- workflows


@workflow.defn
class Inbox:
    """Collects ``add`` signals until ``close``; ``add_shouted`` is an async handler
    that runs an activity. With a ``gate_key`` its workflow task fails (a bug that is
    "fixed" by opening the gate), so its first workflow task does not complete."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.closed = False
        self.in_flight = 0
        self.phase = "constructed"
        self.seen_at_start: list[str] = []

    @workflow.run
    async def run(self, gate_key: str = "") -> dict[str, list[str]]:
        self.phase = "started"
        self.seen_at_start = list(self.items)
        if gate_key and gate_key not in OPEN_GATES:
            raise RuntimeError("gate closed: this workflow task fails until it opens")
        self.phase = "waiting"
        await workflow.wait_condition(lambda: self.closed and self.in_flight == 0)
        return {"items": self.items, "seen_at_start": self.seen_at_start}

    @workflow.signal
    def add(self, item: str) -> None:
        self.items.append(item)

    @workflow.signal
    async def add_shouted(self, item: str) -> None:
        self.in_flight += 1
        try:
            shouted: str = await workflow.execute_activity(
                shout, item, start_to_close_timeout=_TIMEOUT
            )
            self.items.append(shouted)
        finally:
            self.in_flight -= 1

    @workflow.signal(name="close")
    def close_inbox(self) -> None:
        self.closed = True

    @workflow.query
    def snapshot(self) -> dict[str, Any]:
        return {"phase": self.phase, "items": list(self.items)}

    @workflow.query
    def count(self) -> int:
        return len(self.items)

    @workflow.query
    def item_at(self, index: int) -> str:
        return self.items[index]


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
                clean_up, key, start_to_close_timeout=_TIMEOUT
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
            await workflow.execute_activity(clean_up, key, start_to_close_timeout=_TIMEOUT)
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
            await workflow.execute_activity(clean_up, key, start_to_close_timeout=_TIMEOUT)
            raise
        return "unreachable"


# Three versions of one workflow type: before a change, with the change behind
# ``patched``, and after the old path was retired with ``deprecate_patch``.
PATCH_ID = "use-new-step"


@workflow.defn(name="Pricing")
class PricingV1:
    def __init__(self) -> None:
        self.confirmed = False

    @workflow.run
    async def run(self, x: str) -> str:
        price: str = await workflow.execute_activity(old_step, x, start_to_close_timeout=_TIMEOUT)
        await workflow.wait_condition(lambda: self.confirmed)
        return price

    @workflow.signal
    def confirm(self) -> None:
        self.confirmed = True


@workflow.defn(name="Pricing")
class PricingV2:
    def __init__(self) -> None:
        self.confirmed = False

    @workflow.run
    async def run(self, x: str) -> str:
        step = new_step if workflow.patched(PATCH_ID) else old_step
        price: str = await workflow.execute_activity(step, x, start_to_close_timeout=_TIMEOUT)
        await workflow.wait_condition(lambda: self.confirmed)
        return price

    @workflow.signal
    def confirm(self) -> None:
        self.confirmed = True


@workflow.defn(name="Pricing")
class PricingV3:
    def __init__(self) -> None:
        self.confirmed = False

    @workflow.run
    async def run(self, x: str) -> str:
        workflow.deprecate_patch(PATCH_ID)
        price: str = await workflow.execute_activity(new_step, x, start_to_close_timeout=_TIMEOUT)
        await workflow.wait_condition(lambda: self.confirmed)
        return price

    @workflow.signal
    def confirm(self) -> None:
        self.confirmed = True


# --------------------------------------------------------------------------- signals


async def test_signals_reach_sync_and_async_handlers_in_order(client: Client) -> None:
    tq = new_id("tq")
    async with Worker(client, task_queue=tq, workflows=[Inbox], activities=[shout]):
        handle = await client.start_workflow(Inbox.run, id=new_id("inbox"), task_queue=tq)
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


# --------------------------------------------------------------------------- queries


async def test_queries_on_running_and_closed_workflow_write_no_history(client: Client) -> None:
    tq = new_id("tq")
    async with Worker(client, task_queue=tq, workflows=[Inbox], activities=[shout]):
        handle = await client.start_workflow(Inbox.run, id=new_id("query"), task_queue=tq)
        await handle.signal(Inbox.add, "a")
        await handle.signal(Inbox.add, "b")
        await eventually(is_idle(handle), what="signals processed")
        before = await events_of(handle)
        length_before = (await handle.describe()).history_length

        assert await handle.query(Inbox.snapshot) == {"phase": "waiting", "items": ["a", "b"]}
        assert await handle.query(Inbox.count) == 2
        assert await handle.query(Inbox.item_at, 1) == "b"
        assert await handle.query("item_at", -2) == "a"  # by name, with an argument
        assert await asyncio.gather(*(handle.query(Inbox.count) for _ in range(10))) == [2] * 10

        # Queries wrote nothing: not an event, not a workflow task.
        assert await events_of(handle) == before
        assert (await handle.describe()).history_length == length_before == len(before)
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING

        await handle.signal(Inbox.close_inbox)
        assert (await handle.result())["items"] == ["a", "b"]

        closed = await events_of(handle)
        # A closed run still answers, from its final state.
        assert await handle.query(Inbox.snapshot) == {"phase": "waiting", "items": ["a", "b"]}
        assert await handle.query(Inbox.item_at, 0) == "a"
        assert await events_of(handle) == closed
    await expect_closed(handle, WorkflowExecutionStatus.COMPLETED)


async def test_query_sees_every_signal_accepted_before_it(client: Client) -> None:
    """Read-your-writes: once ``signal()`` returned, a query reflects the signal, even
    though the workflow task that handles it may not have completed yet (queries are
    dispatched ahead of workflow tasks)."""
    tq = new_id("tq")
    async with Worker(client, task_queue=tq, workflows=[Inbox], activities=[shout]):
        handle = await client.start_workflow(Inbox.run, id=new_id("ryw"), task_queue=tq)
        # Some signals land while the previous one's workflow task runs (the server
        # buffers them until it completes); the query must see those too.
        for n in range(1, 51):
            await handle.signal(Inbox.add, f"item-{n}")
            assert await handle.query(Inbox.count) == n
        await handle.signal(Inbox.close_inbox)
        assert len((await handle.result())["items"]) == 50


async def test_query_before_first_workflow_task_completed(client: Client) -> None:
    tq = new_id("tq")
    key = new_id("gate")
    async with Worker(client, task_queue=tq, workflows=[Inbox], activities=[shout]):
        handle = await client.start_workflow(
            Inbox.run,
            key,
            id=new_id("early-query"),
            task_queue=tq,
            start_signal=Inbox.add,
            start_signal_args=["early"],
        )
        # The first workflow task fails (gate closed) and is retried; none completes.
        await eventually(has_event(handle, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED), what="task failed")
        await handle.signal(Inbox.add, "late")

        async def late_signal_settled() -> bool:
            # Retries of the failing task write no events. The late signal is recorded
            # right away, or (if it came while an attempt ran) when that attempt failed,
            # followed by one recorded attempt that fails too. Either way history then
            # stays as it is until something new arrives.
            events = await events_of(handle)
            signaled = of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)
            last = events[-1].event_type
            return len(signaled) == 2 and last in (
                ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
                ET.EVENT_TYPE_WORKFLOW_TASK_FAILED,
            )

        await eventually(late_signal_settled, what="late signal recorded")
        before = await events_of(handle)
        assert not of_type(before, ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED), names(before)

        # The query sees the start signal and the later one, and the body as far as it
        # got; the workflow task still fails, and the query changed nothing.
        assert await handle.query(Inbox.snapshot) == {
            "phase": "started",
            "items": ["early", "late"],
        }
        assert await handle.query(Inbox.count) == 2
        after = await events_of(handle)
        assert after == before
        assert not of_type(after, ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)

        OPEN_GATES.add(key)  # the "fix" is deployed: the retried task completes
        await handle.signal(Inbox.close_inbox)
        assert await handle.result() == {
            "items": ["early", "late"],
            "seen_at_start": ["early", "late"],
        }
    await expect_closed(handle, WorkflowExecutionStatus.COMPLETED)


async def test_query_that_raises_returns_the_error(client: Client) -> None:
    tq = new_id("tq")
    async with Worker(client, task_queue=tq, workflows=[Inbox], activities=[shout]):
        handle = await client.start_workflow(Inbox.run, id=new_id("bad-query"), task_queue=tq)
        await handle.signal(Inbox.add, "only")
        await eventually(is_idle(handle), what="signal processed")
        before = await events_of(handle)

        with pytest.raises(WorkflowQueryFailedError) as raised:
            await handle.query(Inbox.item_at, 99)
        assert raised.value.status == "FAILED_PRECONDITION"
        assert "IndexError" in raised.value.message
        assert "list index out of range" in raised.value.message

        with pytest.raises(WorkflowQueryFailedError) as unknown:
            await handle.query("no_such_query")
        assert "no_such_query" in unknown.value.message
        assert "snapshot" in unknown.value.message  # the known queries are listed

        # A failed query neither failed a workflow task nor changed the run.
        assert await events_of(handle) == before
        assert await handle.query(Inbox.item_at, 0) == "only"
        await handle.signal(Inbox.close_inbox)
        assert (await handle.result())["items"] == ["only"]
    events = await events_of(handle)
    assert not of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED)


# -------------------------------------------------------------------- wait_condition


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


# ---------------------------------------------------------------------- cancellation


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


# ------------------------------------------------------------ terminate and timeouts


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


# -------------------------------------------------------------------------- patching


def _patch_markers(client: Client, events: Sequence[HistoryEvent]) -> list[tuple[str, bool]]:
    markers = []
    for event in of_type(events, ET.EVENT_TYPE_MARKER_RECORDED):
        details = event.marker_recorded_event_attributes.details
        [patch_id] = client.data_converter.from_payloads(details["patch_id"])
        [deprecated] = client.data_converter.from_payloads(details["deprecated"])
        markers.append((patch_id, deprecated))
    return markers


async def _run_pricing(
    client: Client, tq: str, workflow_cls: type, x: str
) -> tuple[str, WorkflowHistory]:
    """A whole run of ``Pricing`` on a worker with ``workflow_cls``: result, history."""
    async with Worker(
        client, task_queue=tq, workflows=[workflow_cls], activities=[old_step, new_step]
    ):
        handle = await client.start_workflow("Pricing", x, id=new_id("pricing"), task_queue=tq)
        await handle.signal("confirm")
        result: str = await handle.result()
    return result, await handle.fetch_history()


async def test_patched_and_deprecate_patch(client: Client) -> None:
    tq = new_id("tq")

    # A run of the old code, still in flight when the patched code is deployed. (No
    # cache on the old worker: a cached run would stay bound to its sticky queue for
    # the sticky schedule-to-start timeout after the worker is gone.)
    async with Worker(
        client,
        task_queue=tq,
        workflows=[PricingV1],
        activities=[old_step],
        max_cached_workflows=0,
    ):
        in_flight = await client.start_workflow(
            PricingV1.run, "a", id=new_id("pricing"), task_queue=tq
        )
        await eventually(has_event(in_flight, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED))
        await eventually(is_idle(in_flight), what="old run waiting for confirm")
    async with Worker(
        client, task_queue=tq, workflows=[PricingV2], activities=[old_step, new_step]
    ):
        # The new worker replays the old run: patched() is False there, the old path.
        await in_flight.signal(PricingV2.confirm)
        assert await in_flight.result() == "old:a"
    old_events = await events_of(in_flight)
    assert _patch_markers(client, old_events) == []
    assert not of_type(old_events, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED), names(old_events)

    # A new run takes the new path and records the patch marker before it.
    result, new_history = await _run_pricing(client, tq, PricingV2, "b")
    assert result == "new:b"
    new_events = new_history.events
    assert _patch_markers(client, new_events) == [(PATCH_ID, False)]
    marker = index_of(new_events, ET.EVENT_TYPE_MARKER_RECORDED)
    assert new_events[marker - 1].event_type == ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    assert new_events[marker + 1].event_type == ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    scheduled = new_events[marker + 1].activity_task_scheduled_event_attributes
    assert scheduled.activity_type.name == "new_step"

    # Replay: the patched code replays both the old and the new history; the old code
    # cannot replay the new one.
    v1 = Replayer(workflows=[PricingV1])
    v2 = Replayer(workflows=[PricingV2])
    v3 = Replayer(workflows=[PricingV3])
    old_history = await in_flight.fetch_history()
    assert (await v1.replay(old_history)).events_replayed == len(old_events)
    assert (await v2.replay(old_history)).events_replayed == len(old_events)
    await v2.replay(new_history)
    await v2.replay(WorkflowHistory.from_json(new_history.to_json()))  # as stored in CI
    with pytest.raises(NonDeterminismError):
        await v1.replay(new_history)

    # deprecate_patch: the old path is gone. Histories with the marker replay, runs
    # from before the patch do not; new runs still record the marker.
    await v3.replay(new_history)
    with pytest.raises(NonDeterminismError):
        await v3.replay(old_history)
    result, v3_history = await _run_pricing(client, tq, PricingV3, "c")
    assert result == "new:c"
    assert _patch_markers(client, v3_history.events) == [(PATCH_ID, True)]
    await v3.replay(v3_history)
    await v2.replay(v3_history)  # the patched code agrees with a deprecated marker
