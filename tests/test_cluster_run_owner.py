"""Completions go to the run's owner (issue 13; docs/cluster.md, "Completions go to
the run's owner"): two ``tideflow server start`` processes on one SQLite file, a
worker connected to both with node A first (its current address).

- Every task handed out names the node that owns its run (``run_owner``), and the
  worker sends the task's completion and heartbeats there: runs of node B complete
  with no completion or heartbeat served by A (A's RPC counters stay at zero, B's
  count them), although every poll of the worker goes to A.
- A SIGKILLed owner: B's runs hold their activities (heartbeats reached B) when B is
  killed; the completions named B fail there, go to A, which takes B's shards over,
  and every run completes exactly once.
- An owner's address matches the client's whichever way it is spelled.

Leases are 2 s. The activities wait on an event the test sets, not on time; the
nodes' counters, not timings, show where the calls went.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

from helpers import ET, Processes, assert_gap_free, eventually, free_port
from helpers_cluster import FAST_RETRY, double, split, start_node, wait, workflow_ids
from test_cluster_local_dispatch import _Node

from tideflow.history import HistoryStore
from tideflow.worker_sdk import Client, Worker, activity, workflow
from tideflow.worker_sdk._failover import FailoverService, normalise_address

LEASE_S = 2.0
RUNS = 4
QUEUE = "run-owner"
# The calls a worker makes about a task it was handed (to the run's owner).
_TASK_CALLS = (
    "RespondWorkflowTaskCompleted",
    "RespondActivityTaskCompleted",
    "RespondActivityTaskFailed",
    "RespondTasksCompleted",
    "RecordActivityHeartbeat",
)
# Set by each test: the held activities return once it is set.
_release: asyncio.Event | None = None


@activity.defn
async def held(n: int) -> int:
    """Heartbeats (to its run's owner), then waits for the test's release."""
    activity.heartbeat(n)
    assert _release is not None
    await _release.wait()
    return n + 1


@workflow.defn
class Held:
    """A held activity, then ``double``: ``2 (n + 1)``."""

    @workflow.run
    async def run(self, n: int) -> int:
        first: int = await workflow.execute_activity(
            held, n, start_to_close_timeout=timedelta(seconds=60), retry_policy=FAST_RETRY
        )
        doubled: int = await workflow.execute_activity(
            double, first, start_to_close_timeout=timedelta(seconds=10), retry_policy=FAST_RETRY
        )
        return doubled


async def _cluster(procs: Processes, tmp_path: Path) -> tuple[_Node, _Node, HistoryStore]:
    url = f"sqlite:///{tmp_path / 'cluster.db'}"
    nodes = []
    for name in ("node-a", "node-b"):
        port = free_port()
        process = await start_node(procs, url, name, LEASE_S, "--metrics-port", str(port))
        nodes.append(_Node(process, port))
    store = await HistoryStore.open(url)
    return nodes[0], nodes[1], store


@contextlib.asynccontextmanager
async def _worker(a: _Node, b: _Node) -> AsyncIterator[Client]:
    """A worker (defaults: eager tasks, batched completions) connected to A, then B."""
    client = await Client.connect(f"{a.process.address},{b.process.address}")
    worker = Worker(client, task_queue=QUEUE, workflows=[Held], activities=[held, double])
    worker.start()
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(worker.shutdown(), 5)
        await client.close()


async def _task_calls(node: _Node) -> float:
    total = 0.0
    for method in _TASK_CALLS:
        total += await node.sample("tideflow_rpc_requests_total", method=method)
    return total


async def _start_held(starter: Client, ids: list[str], b: _Node) -> None:
    """Start the runs and wait until each one's held activity heartbeated (to B)."""
    for n, workflow_id in enumerate(ids):
        await starter.start_workflow(Held.run, args=[n], id=workflow_id, task_queue=QUEUE)

    async def all_heartbeated() -> bool:
        method = "RecordActivityHeartbeat"
        return await b.sample("tideflow_rpc_requests_total", method=method) >= len(ids)

    await eventually(all_heartbeated, timeout=40)


async def _check(client: Client, ids: list[str]) -> None:
    """Each run's result, and a history with each activity completed once."""
    for n, workflow_id in enumerate(ids):
        handle = client.get_workflow_handle(workflow_id)
        assert await asyncio.wait_for(handle.result(), 40) == 2 * (n + 1)
        events = (await handle.fetch_history()).events
        assert_gap_free(events)
        types = Counter(e.event_type for e in events)
        assert types[ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED] == 2
        assert types[ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED] == 1


@contextlib.asynccontextmanager
async def _b_runs_holding(
    procs: Processes, tmp_path: Path, prefix: str, *, starter_at_b: bool
) -> AsyncIterator[tuple[_Node, _Node, HistoryStore, list[str], Client]]:
    """Two nodes split the shards; RUNS runs of node B started (through B or A) and
    holding their activities, heartbeats sent, with the worker (connected "A,B")
    running: the nodes, the store, the runs' ids and the starter's client."""
    global _release
    _release = asyncio.Event()
    a, b, store = await _cluster(procs, tmp_path)
    try:
        owners = await wait(lambda: split(store, "node-a", "node-b"), "a balanced split")
        ids = workflow_ids(owners, "node-b", RUNS, prefix)
        starter = await Client.connect((b if starter_at_b else a).process.address)
        async with _worker(a, b):
            await _start_held(starter, ids, b)
            yield a, b, store, ids, starter
        await starter.close()
    finally:
        await store.close()


async def test_completions_and_heartbeats_go_to_the_node_that_owns_the_run(
    procs: Processes, tmp_path: Path
) -> None:
    async with _b_runs_holding(procs, tmp_path, "owned-by-b", starter_at_b=True) as held_runs:
        a, b, _, ids, starter = held_runs
        assert _release is not None
        _release.set()
        await _check(starter, ids)
    # The worker polled A only (its current address), yet A served no call about a
    # task: B named itself in each task, and the worker called B.
    assert await a.sample("tideflow_rpc_requests_total", method="PollWorkflowTask") > 0
    assert await _task_calls(a) == 0
    assert await _task_calls(b) >= 3 * RUNS  # heartbeats, activities, workflow tasks


async def test_a_sigkilled_owners_completions_fall_back_to_the_survivor(
    procs: Processes, tmp_path: Path
) -> None:
    async with _b_runs_holding(procs, tmp_path, "doomed", starter_at_b=False) as held_runs:
        a, b, store, ids, starter = held_runs
        before = await _task_calls(a)
        await b.process.kill()
        # The held activities' completions are named B: B refuses the connection,
        # and they go to A, which serves them once it holds B's shards.
        assert _release is not None
        _release.set()
        await wait(lambda: split(store, "node-a"), "node-a to take over")
        await _check(starter, ids)
        assert await _task_calls(a) > before


def test_an_owner_is_one_of_the_addresses_however_it_is_spelled() -> None:
    assert normalise_address("LOCALHOST:7233") == normalise_address("127.0.0.1:7233")
    assert normalise_address("[::1]:7233") == "127.0.0.1:7233"
    assert normalise_address(" Node-1.example:7233") == "node-1.example:7233"
    service = FailoverService(["127.0.0.1:1", "node-b:2"], [])
    assert service.owner_index("localhost:1") == 0
    assert service.owner_index("NODE-B:2") == 1
    assert service.owner_index("node-b:3") is None
    assert service.owner_index("") is None
    assert service.to("elsewhere:1") is service  # not connected to it: the current node
