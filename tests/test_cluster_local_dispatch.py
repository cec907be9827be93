"""Local dispatch across the nodes of one cluster (issue 13; docs/cluster.md, "Local
dispatch"): two ``tideflow server start`` processes on one SQLite file.

- A task committed by its run's node goes to a worker's poll parked on that node for
  the queue, although another node serves the queue: no ``AddTasks`` to the queue's
  node, no ``RecordTaskStarted`` back (both nodes' RPC counters say so), and the node's
  ``tideflow_task_dispatch{match="local"}`` counts each such task.
- The queue's backlog on its own node is not starved while the worker's polls take
  turns in the other node's local partition: runs of both nodes complete, each
  activity once.
- The node whose polls take local tasks is SIGKILLed while its runs sleep: the other
  node takes its shards over and every run completes exactly once.

Leases are 2 s. Waits poll conditions against generous deadlines; counters, not
timings, show where the tasks went.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.request
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import Processes, ServerProcess, eventually, free_port
from helpers_cluster import (
    FAST_RETRY,
    Pause,
    check_history,
    double,
    queue_served_by,
    result,
    sleeping,
    split,
    start_node,
    wait,
    wait_for_steals,
    workflow_ids,
)

from tideflow.history import HistoryStore
from tideflow.worker_sdk import Client, Worker, workflow

LEASE_S = 2.0
# Runs of B's that may be needed before the polls park there (_polls_parked_on).
_WARM_UPS = 4
_SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})? (\S+)$")


@workflow.defn
class Doubled:
    """One activity: ``2n``."""

    @workflow.run
    async def run(self, n: int) -> int:
        doubled: int = await workflow.execute_activity(
            double, n, start_to_close_timeout=timedelta(seconds=10), retry_policy=FAST_RETRY
        )
        return doubled


class _Node:
    """A node process with its /metrics port."""

    def __init__(self, process: ServerProcess, metrics_port: int) -> None:
        self.process = process
        self.metrics_port = metrics_port

    async def sample(self, name: str, **labels: str) -> float:
        """The sum of the samples of metric ``name`` whose labels include ``labels``."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"

        def scrape() -> str:
            with urllib.request.urlopen(url, timeout=10) as answer:
                return str(answer.read().decode())

        total = 0.0
        for line in (await asyncio.to_thread(scrape)).splitlines():
            match = _SAMPLE.match(line)
            if match is None or match.group(1) != name:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(match.group(3))
        return total


async def _cluster(
    procs: Processes, tmp_path: Path, local_poll_s: float
) -> tuple[dict[str, _Node], dict[int, str], HistoryStore]:
    url = f"sqlite:///{tmp_path / 'cluster.db'}"
    nodes = {}
    for name in ("node-a", "node-b"):
        port = free_port()
        flags = ("--metrics-port", str(port), "--local-poll-seconds", str(local_poll_s))
        nodes[name] = _Node(await start_node(procs, url, name, LEASE_S, *flags), port)
    store = await HistoryStore.open(url)
    owners = await wait(lambda: split(store, "node-a", "node-b"), "a balanced split")
    return nodes, owners, store


@contextlib.asynccontextmanager
async def _worker(target: str, queue: str) -> AsyncIterator[Worker]:
    """A worker polling ``target`` with every task through matching: no sticky queue
    (no cache), no eager activities."""
    client = await Client.connect(target)
    worker = Worker(
        client,
        task_queue=queue,
        workflows=[Doubled, Pause],
        activities=[double],
        max_cached_workflows=0,
        disable_eager_activity_execution=True,
    )
    worker.start()
    try:
        yield worker
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(worker.shutdown(), 5)
        await client.close()


async def _crossings(a: _Node, b: _Node) -> float:
    """Calls between the nodes a task crosses for: AddTasks served by the queue's node
    (A), RecordTaskStarted served by the runs' node (B)."""
    added = await a.sample("tideflow_rpc_requests_total", method="AddTasks")
    started = await b.sample("tideflow_rpc_requests_total", method="RecordTaskStarted")
    return added + started


async def test_a_task_committed_by_its_runs_node_goes_to_a_poll_parked_there(
    procs: Processes, tmp_path: Path
) -> None:
    # Local turns of 30 s: the polls stay parked on B for the whole test once there.
    nodes, owners, store = await _cluster(procs, tmp_path, 30.0)
    a, b = nodes["node-a"], nodes["node-b"]
    try:
        queue = queue_served_by(owners, "node-a", "local")
        ids = workflow_ids(owners, "node-b", 5 + _WARM_UPS, "local")
        ids, warm_ups = ids[:5], ids[5:]
        starter = await Client.connect(b.process.address)
        async with _worker(b.process.address, queue):
            await _polls_parked_on(b, starter, queue, warm_ups)
            crossed = await _crossings(a, b)
            local = await b.sample("tideflow_task_dispatch_total", match="local")
            for n, workflow_id in enumerate(ids[1:], start=1):
                handle = await starter.start_workflow(
                    Doubled.run, args=[n], id=workflow_id, task_queue=queue
                )
                assert await asyncio.wait_for(handle.result(), 40) == 2 * n
            # Each run's first workflow task and its activity (and the workflow task
            # after it, unless the activity's completion took it eagerly) were handed
            # out on B; none crossed to A and back.
            assert await b.sample("tideflow_task_dispatch_total", match="local") - local >= 8
            assert await _crossings(a, b) == crossed
        await starter.close()
    finally:
        await store.close()


async def _polls_parked_on(b: _Node, starter: Client, queue: str, warm_ups: list[str]) -> None:
    """Runs of B's until the worker's workflow and activity polls are parked on B.

    B commits a first task for the queue: from then on polls at B wait for B's tasks
    in its local partition (the first task crossed to A). Only for LOCAL_DEMAND_S
    after B's last task of each kind, though: under load a poll may come back from
    its turn at A after that, and forward again; the next run's tasks renew it."""
    for workflow_id in warm_ups:
        handle = await starter.start_workflow(
            Doubled.run, args=[0], id=workflow_id, task_queue=queue
        )
        assert await asyncio.wait_for(handle.result(), 40) == 0
        with contextlib.suppress(AssertionError):  # eventually's "timed out"
            await eventually(lambda: _at_least(b, "tideflow_local_polls_parked", 4), timeout=8)
            return
    raise AssertionError(f"the worker's polls never all parked on B in {len(warm_ups)} runs")


async def _at_least(node: _Node, gauge: str, value: float) -> bool:
    return await node.sample(gauge) >= value


@pytest.mark.slow
async def test_local_turns_do_not_starve_the_queue_nodes_backlog_nor_strand_tasks_on_sigkill(
    procs: Processes, tmp_path: Path, trace_dir: Path
) -> None:
    nodes, owners, store = await _cluster(procs, tmp_path, 1.0)
    a, b = nodes["node-a"], nodes["node-b"]
    try:
        # The queue is A's; the worker polls B first (A once B is gone).
        queue = queue_served_by(owners, "node-a", "turns")
        starter = {n: await Client.connect(nodes[n].process.address) for n in nodes}
        async with _worker(f"{b.process.address},{a.process.address}", queue):
            await _both_nodes_runs_complete(starter, owners, queue, b)
            await _sigkill_with_local_polls(starter["node-a"], owners, queue, b, trace_dir, store)
        for client in starter.values():
            await client.close()
    finally:
        await store.close()


async def _both_nodes_runs_complete(
    starter: dict[str, Client], owners: dict[int, str], queue: str, b: _Node
) -> None:
    """Runs of B (their tasks go to polls parked on B) and of A (their tasks wait in
    A's backlog while the polls take turns on B): all complete, each activity once."""
    warm = workflow_ids(owners, "node-b", 1, "warm")[0]
    first = await starter["node-b"].start_workflow(Doubled.run, args=[1], id=warm, task_queue=queue)
    assert await asyncio.wait_for(first.result(), 40) == 2
    runs = [(n, wid) for n in ("node-a", "node-b") for wid in workflow_ids(owners, n, 6, "mix")]
    handles = [
        await starter[node].start_workflow(Pause.run, args=[i, 0.1], id=wid, task_queue=queue)
        for i, (node, wid) in enumerate(runs)
    ]
    for i, handle in enumerate(handles):
        assert await asyncio.wait_for(handle.result(), 40) == f"{i}:{i * 4}"
        await check_history(starter["node-a"], handle.id)
    assert await b.sample("tideflow_task_dispatch_total", match="local") > 0


async def _sigkill_with_local_polls(
    client: Client,
    owners: dict[int, str],
    queue: str,
    b: _Node,
    trace_dir: Path,
    store: HistoryStore,
) -> None:
    """B's runs sleep while the worker's polls wait in B's local partitions for the
    tasks B's timers will commit; B is SIGKILLed: A takes its shards over, fires the
    timers and every run completes exactly once."""
    doomed = workflow_ids(owners, "node-b", 4, "doomed")
    for n, workflow_id in enumerate(doomed):
        await client.start_workflow(Pause.run, args=[n, 1.0], id=workflow_id, task_queue=queue)
    await wait(lambda: sleeping(client, doomed), "timers")
    await b.process.kill()
    await wait(lambda: split(store, "node-a"), "node-a to take over")
    dead = {shard for shard, owner in owners.items() if owner == "node-b"}
    await wait_for_steals(trace_dir, "node-a", "node-b", dead)
    for n, workflow_id in enumerate(doomed):
        assert await result(client, workflow_id) == f"{n}:{n * 4}"
        await check_history(client, workflow_id)
