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
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

import grpc
import pytest
from helpers import ET, Processes, ServerProcess, assert_gap_free, eventually
from helpers_cluster import (
    CONDITION_TIMEOUT_S,
    StartNode,
    node_starter,
    wait_split,
    workflow_ids,
)

from tideflow.api.v1 import common_pb2, service_pb2, service_pb2_grpc
from tideflow.history import HistoryStore, shard_of
from tideflow.worker_sdk import Client, Worker, activity, workflow
from tideflow.worker_sdk import exceptions as exc
from tideflow.worker_sdk._failover import FailoverService

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

QUEUE = "cluster-routing"


@activity.defn
async def joined(items: list[str]) -> str:
    return ",".join(items)


@workflow.defn
class Inbox:
    """Collects signalled items until ``close``; returns them joined by an activity."""

    def __init__(self) -> None:
        self._items: list[str] = []
        self._closed = False

    @workflow.signal
    def add(self, item: str) -> None:
        self._items.append(item)

    @workflow.signal
    def close(self) -> None:
        self._closed = True

    @workflow.query
    def items(self) -> list[str]:
        return list(self._items)

    @workflow.run
    async def run(self) -> str:
        await workflow.wait_condition(lambda: self._closed)
        return str(
            await workflow.execute_activity(
                joined, self._items, start_to_close_timeout=timedelta(seconds=10)
            )
        )


@pytest.fixture
def store_url(pg_url: str) -> str:
    """PostgreSQL only: several processes on one database."""
    return pg_url


@pytest.fixture
def nodes(procs: Processes, pg_url: str) -> StartNode:
    return node_starter(procs, pg_url)


@contextlib.asynccontextmanager
async def workers(*addresses: str, **connect: Any) -> AsyncIterator[list[Client]]:
    """A client and an Inbox worker per address (``connect``: Client.connect's
    options); a worker of a dead node is abandoned after a short wait."""
    clients = [await Client.connect(a, **connect) for a in addresses]
    running = [Worker(c, task_queue=QUEUE, workflows=[Inbox], activities=[joined]) for c in clients]
    for w in running:
        w.start()
    try:
        yield clients
    finally:
        for w in running:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.shutdown(), 5)
        for c in clients:
            await c.close()


async def start_inbox(client: Client, workflow_id: str) -> None:
    await client.start_workflow(Inbox.run, id=workflow_id, task_queue=QUEUE)


def signalled_items(events: Sequence[Any], client: Client) -> list[str]:
    """The item of every ``add`` signal in history, in order."""
    items = []
    for event in events:
        if event.event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            attrs = event.workflow_execution_signaled_event_attributes
            if attrs.signal_name == "add":
                items.append(client.data_converter.from_payloads(attrs.input, [str])[0])
    return items


def audit_lines(node: ServerProcess, rpc: str, workflow_id: str, outcome: str = "") -> list[str]:
    """The audit lines every process of node ``node`` wrote for ``rpc`` (on
    ``workflow_id``, with ``outcome``, when given)."""
    lines = []
    for path in sorted(node.proc.err.parent.glob(f"{node.name}-*.err")):
        for line in path.read_text(errors="replace").splitlines():
            if f"tideflow.audit: rpc={rpc} " not in line:
                continue
            if workflow_id and f"workflow_id={workflow_id} " not in line:
                continue
            if outcome and f"outcome={outcome} " not in line:
                continue
            lines.append(line)
    return lines


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
    (served,) = audit_lines(c, "StartWorkflow", inbox)[:1]
    assert "outcome=OK" in served and "forwarded_by=node-a" in served
    assert len(audit_lines(c, "SignalWorkflow", inbox)) == 3
    assert audit_lines(a, "SignalWorkflow", inbox) == []
    assert audit_lines(a, "StartWorkflow", inbox) == []


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
