"""Routing between the nodes of a cluster (issue 11): a node forwards a run's calls to
the owner of the run's shard (server/_routing.py), and a client connected to several
nodes fails over between them (worker_sdk/_failover.py).

- Forwarding: a client connected to node-a only drives runs of node-c's shards
  (start, signal, query, describe, history, cancel, terminate, result); the owner's
  typed errors reach the client unchanged; the owner writes the audit line
  (``forwarded_by=node-a``), node-a none; a forwarded call to a node that does not own
  the shard is refused UNAVAILABLE, never forwarded again.
- Routing race: shards move under load (SIGTERM of an owner, a node rejoining, a
  SIGKILL) while a client signals and starts through one node: every signal is in
  history exactly once, and the client never sees an error.
- Failover: ``Client.connect("a,b")``: after node-a is SIGKILLed, the client's calls
  and a worker's polls go on through node-b.

Real ``tideflow server start`` processes on one PostgreSQL database, 2 s leases;
workers run in this process, one per node (each node hands its own shards' tasks to
its own pollers).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import pytest
from helpers import ET, Processes, ServerProcess, assert_gap_free, eventually
from helpers_cluster import CONDITION_TIMEOUT_S, workflow_ids
from helpers_cluster_routing import (
    QUEUE,
    Inbox,
    Parent,
    StartNode,
    audit_lines,
    node_starter,
    start_inbox,
    wait_split,
    workers,
)

from tideflow.api.v1 import common_pb2, service_pb2, service_pb2_grpc
from tideflow.history import HistoryStore, shard_of
from tideflow.worker_sdk import Client
from tideflow.worker_sdk import exceptions as exc
from tideflow.worker_sdk._failover import FailoverService

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture
def store_url(pg_url: str) -> str:
    """PostgreSQL only: several processes on one database."""
    return pg_url


@pytest.fixture
def nodes(procs: Processes, pg_url: str) -> StartNode:
    return node_starter(procs, pg_url)


def signalled_items(events: Sequence[Any], client: Client) -> list[str]:
    """The item of every ``add`` signal in history, in order."""
    items = []
    for event in events:
        if event.event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            attrs = event.workflow_execution_signaled_event_attributes
            if attrs.signal_name == "add":
                items.append(client.data_converter.from_payloads(attrs.input, [str])[0])
    return items


# -------------------------------------------------------------------- forwarding


async def test_a_client_of_one_node_drives_runs_of_another_nodes_shards(
    nodes: StartNode, store: HistoryStore
) -> None:
    a = await nodes("node-a")
    c = await nodes("node-c")
    owners = await wait_split(store, "node-a", "node-c")
    inbox, doomed, ended = workflow_ids(owners, "node-c", 3, "forwarded")
    async with workers(c.address), await Client.connect(a.address) as client:
        await start_inbox(client, inbox)
        handle = client.get_workflow_handle(inbox)
        await handle.signal(Inbox.add, "x")
        await handle.signal(Inbox.add, "y")
        await eventually(
            lambda: _query_is(handle, ["x", "y"]), "the query through node-a", timeout=30
        )
        assert (await handle.describe()).status.name == "RUNNING"
        # The owner's typed errors reach the client unchanged.
        with pytest.raises(exc.WorkflowAlreadyStartedError) as taken:
            await start_inbox(client, inbox)
        assert taken.value.run_id == (await handle.describe()).run_id
        (missing,) = workflow_ids(owners, "node-c", 1, "never-started")
        with pytest.raises(exc.NotFoundError):
            await client.get_workflow_handle(missing).describe()
        await handle.signal(Inbox.close)
        assert await asyncio.wait_for(handle.result(), CONDITION_TIMEOUT_S) == "x,y"
        events = (await handle.fetch_history()).events
        assert_gap_free(events)
        assert signalled_items(events, client) == ["x", "y"]

        # Cancel and terminate through node-a.
        await start_inbox(client, doomed)
        await client.get_workflow_handle(doomed).cancel()
        with pytest.raises(exc.WorkflowFailureError) as cancelled:
            await asyncio.wait_for(client.get_workflow_handle(doomed).result(), CONDITION_TIMEOUT_S)
        assert isinstance(cancelled.value.cause, exc.CancelledError)
        await start_inbox(client, ended)
        await client.get_workflow_handle(ended).terminate("enough")
        assert (await client.get_workflow_handle(ended).describe()).status.name == "TERMINATED"

    # The owner wrote the audit lines of the forwarded calls, naming the forwarder;
    # the forwarding node wrote none.
    # (Outcome OK: a call refused while a shard moves is retried, and audited each time.)
    (served,) = audit_lines(c, "StartWorkflow", inbox, "OK")
    assert "forwarded_by=node-a" in served
    assert len(audit_lines(c, "SignalWorkflow", inbox, "OK")) == 3
    assert audit_lines(a, "SignalWorkflow", inbox, "OK") == []
    assert audit_lines(a, "StartWorkflow", inbox, "OK") == []


async def _query_is(handle: Any, expected: list[str]) -> bool:
    items: list[str] = await handle.query(Inbox.items)
    return items == expected


async def test_a_forwarded_call_to_a_node_without_the_shard_is_refused(
    nodes: StartNode, store: HistoryStore
) -> None:
    a = await nodes("node-a")
    await nodes("node-c")
    owners = await wait_split(store, "node-a", "node-c")
    (foreign,) = workflow_ids(owners, "node-c", 1, "not-again")
    shard = shard_of("default", foreign, 16)
    async with grpc.aio.insecure_channel(a.address) as channel:
        stub = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.StartWorkflow(
                service_pb2.StartWorkflowRequest(
                    namespace="default",
                    workflow_id=foreign,
                    workflow_type=common_pb2.WorkflowType(name="Inbox"),
                    task_queue=common_pb2.TaskQueue(name=QUEUE),
                    request_id=str(uuid.uuid4()),
                ),
                timeout=10,
                metadata=(("x-tideflow-forwarded", "node-b"),),
            )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"shard {shard}" in str(refused.value.details())
    assert "node node-c at" in str(refused.value.details())


async def test_transfers_act_on_runs_of_another_nodes_shards(
    nodes: StartNode, store: HistoryStore
) -> None:
    a = await nodes("node-a")
    c = await nodes("node-c")
    owners = await wait_split(store, "node-a", "node-c")
    (parent_id,) = workflow_ids(owners, "node-a", 1, "parent")
    child_id, doomed_id, cancelled_id = workflow_ids(owners, "node-c", 3, "child")
    async with workers(a.address, c.address), await Client.connect(a.address) as client:
        await start_inbox(client, cancelled_id)
        parent = await client.start_workflow(
            Parent.run, args=[child_id, doomed_id, cancelled_id], id=parent_id, task_queue=QUEUE
        )
        assert await asyncio.wait_for(parent.result(), CONDITION_TIMEOUT_S) == "from-parent"
        with pytest.raises(exc.WorkflowFailureError) as cancelled:
            await asyncio.wait_for(
                client.get_workflow_handle(cancelled_id).result(), CONDITION_TIMEOUT_S
            )
        assert isinstance(cancelled.value.cause, exc.CancelledError)
        doomed = client.get_workflow_handle(doomed_id)
        await eventually(
            lambda: _status_is(doomed, "TERMINATED"), "the parent-close policy", timeout=30
        )
        events = (await parent.fetch_history()).events
        assert_gap_free(events)
        types = [e.event_type for e in events]
        for expected, count in [
            (ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED, 2),
            (ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED, 1),
            (ET.EVENT_TYPE_EXTERNAL_WORKFLOW_EXECUTION_SIGNALED, 2),
            (ET.EVENT_TYPE_EXTERNAL_WORKFLOW_EXECUTION_CANCEL_REQUESTED, 1),
        ]:
            assert types.count(expected) == count, ET.Name(expected)
        child_events = (await client.get_workflow_handle(child_id).fetch_history()).events
        started = child_events[0].workflow_execution_started_event_attributes
        assert started.parent_workflow_execution.workflow_id == parent_id


async def _status_is(handle: Any, status: str) -> bool:
    return bool((await handle.describe()).status.name == status)


# ------------------------------------------------------------------ routing race

_RUNS = 8
# Pace of each run's signaller: load on every shard without flooding two cores.
_SIGNAL_PACE_S = 0.05


async def test_shards_move_under_load_and_no_signal_is_lost_or_doubled(
    nodes: StartNode, store: HistoryStore
) -> None:
    """Moves, each while every run gets signals through node-a (and half of the runs
    start during the first): node-b SIGTERMed (its shards handed over), node-b back
    (shards move again), node-c SIGKILLed (its shards move once its lease lapses),
    node-c back. The client never sees an error, and every signal is in its run's
    history exactly once, in the order sent."""
    a, b, c = [await nodes(f"node-{n}") for n in "abc"]
    await wait_split(store, "node-a", "node-b", "node-c")
    ids = [f"race-{uuid.uuid4().hex[:8]}-{i}" for i in range(_RUNS)]
    sent: dict[str, list[str]] = {i: [] for i in ids}
    counter = itertools.count()
    async with workers(a.address, b.address, c.address), await Client.connect(a.address) as x:

        async def under_load(
            move: Callable[[], Awaitable[Any]], signalled: Sequence[str], starting: Sequence[str]
        ) -> None:
            moved = asyncio.Event()

            async def signaller(workflow_id: str) -> None:
                # Sequential per run (the order is checked), until the move is over.
                while not moved.is_set() or not sent[workflow_id]:
                    item = f"s{next(counter)}"
                    await x.get_workflow_handle(workflow_id).signal(Inbox.add, item)
                    sent[workflow_id].append(item)
                    await asyncio.sleep(_SIGNAL_PACE_S)

            async def mover() -> None:
                try:
                    await move()
                finally:
                    moved.set()

            await asyncio.gather(
                mover(),
                *(signaller(i) for i in signalled),
                *(start_inbox(x, i) for i in starting),
            )

        async def restart_and_rebalance(node: ServerProcess) -> None:
            await node.start()
            await wait_split(store, "node-a", "node-b", "node-c")

        async def terminate_b() -> None:
            assert await b.terminate() == 0
            await wait_split(store, "node-a", "node-c")

        async def kill_c() -> None:
            await c.kill()
            await wait_split(store, "node-a", "node-b")

        half = _RUNS // 2
        await asyncio.gather(*(start_inbox(x, i) for i in ids[:half]))
        await under_load(terminate_b, ids[:half], ids[half:])
        await under_load(lambda: restart_and_rebalance(b), ids, ())
        await under_load(kill_c, ids, ())
        await under_load(lambda: restart_and_rebalance(c), ids, ())
        for workflow_id in ids:
            await x.get_workflow_handle(workflow_id).signal(Inbox.close)
        for workflow_id in ids:
            handle = x.get_workflow_handle(workflow_id)
            result = await asyncio.wait_for(handle.result(), CONDITION_TIMEOUT_S)
            assert result == ",".join(sent[workflow_id]), workflow_id
            events = (await handle.fetch_history()).events
            assert_gap_free(events)
            assert signalled_items(events, x) == sent[workflow_id]
    # Nor did any node answer a client's signal or start with a routing-race error.
    for node in (a, b, c):
        for rpc in ("SignalWorkflow", "StartWorkflow"):
            for outcome in ("NOT_FOUND", "FAILED_PRECONDITION"):
                assert not audit_lines(node, rpc, "", outcome), (node.name, rpc, outcome)
    print(f"routing race: {sum(map(len, sent.values()))} signals over {_RUNS} runs")


# ---------------------------------------------------------------------- failover


async def test_a_client_of_several_nodes_fails_over_when_its_node_dies(
    nodes: StartNode, store: HistoryStore
) -> None:
    a = await nodes("node-a")
    b = await nodes("node-b")
    owners = await wait_split(store, "node-a", "node-b")
    both = f"{a.address},{b.address}"
    async with workers(both) as (worker_client,), await Client.connect(both) as client:
        assert isinstance(client.service, FailoverService)
        assert client.service.current_address == a.address
        # Before: node-a answers, and the worker polls node-a (its shards' tasks).
        (before,) = workflow_ids(owners, "node-a", 1, "before")
        await _run_to_the_end(client, before, "one")
        await a.kill()
        await wait_split(store, "node-b")
        # After: the client's next calls, and the worker's polls, go to node-b.
        after = f"after-{uuid.uuid4().hex[:8]}"
        await _run_to_the_end(client, after, "two")
        assert client.service.current_address == b.address
        assert isinstance(worker_client.service, FailoverService)
        assert worker_client.service.current_address == b.address


async def _run_to_the_end(client: Client, workflow_id: str, item: str) -> None:
    await start_inbox(client, workflow_id)
    handle = client.get_workflow_handle(workflow_id)
    await handle.signal(Inbox.add, item)
    await handle.signal(Inbox.close)
    assert await asyncio.wait_for(handle.result(), CONDITION_TIMEOUT_S) == item


def test_the_failover_address_list_is_checked() -> None:
    from tideflow.worker_sdk._failover import split_targets

    assert split_targets("h1:1, h2:2") == ["h1:1", "h2:2"]
    assert split_targets("h1:1") == ["h1:1"]
    with pytest.raises(ValueError, match="empty address"):
        split_targets("h1:1,,h2:2")
