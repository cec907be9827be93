"""Matching across the nodes of a cluster (issue 11; docs/cluster.md): three
``tideflow server start`` processes on one PostgreSQL database, workers that poll one
node only.

- A worker polling node A gets the workflow tasks (sticky ones included), activity
  tasks and queries of runs owned by B and C, through the node that serves the task
  queue; DescribeTaskQueue through A shows it polling.
- A backlog held by the queue's node M survives SIGKILL of M: tasks queued with no
  worker, M killed, a worker polling another node gets every task exactly once.
- The queue's node stops (SIGTERM) while workers poll through another node under
  load: every run completes and no activity runs twice.

Every call goes to the one node the client connected to: the task-queue RPCs reach the
queue's node and the calls on a run its owner through the nodes (forwarding).
Leases are 2 s. Waits poll conditions against generous deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

import pytest
from helpers import ET, Processes, ServerProcess, assert_gap_free, eventually, new_id
from helpers_cluster import queue_served_by

from tideflow.api.v1 import common_pb2, service_pb2
from tideflow.history import HistoryStore, now_micros, shard_of
from tideflow.worker_sdk import (
    Client,
    RetryPolicy,
    Worker,
    WorkerInterceptor,
    activity,
    workflow,
)
from tideflow.worker_sdk.interceptor import WorkflowTaskHandler

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

LEASE_S = 2.0
CONDITION_TIMEOUT_S = 60.0
NODES = ("node-a", "node-b", "node-c")
FAST_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=100))
# Activity executions per workflow id, in this process (the in-test workers').
EXECUTIONS: Counter[str] = Counter()


@activity.defn
async def triple(workflow_id: str, n: int) -> int:
    EXECUTIONS[workflow_id] += 1
    return n * 3


@workflow.defn
class TripleThenWait:
    """Runs ``triple``, then waits for a ``go`` signal (a second, sticky workflow task)
    and returns the tripled input; ``phase`` answers queries meanwhile."""

    def __init__(self) -> None:
        self.phase = "started"
        self.go = False

    @workflow.run
    async def run(self, n: int, wait: bool) -> int:
        tripled: int = await workflow.execute_activity(
            triple,
            args=[workflow.info().workflow_id, n],
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=FAST_RETRY,
        )
        self.phase = f"tripled:{tripled}"
        if wait:
            await workflow.wait_condition(lambda: self.go)
        return tripled

    @workflow.signal
    def proceed(self) -> None:
        self.go = True

    @workflow.query
    def current(self) -> str:
        return self.phase


class FirstEvents(WorkerInterceptor):
    """The first event id of each workflow task (not query) the worker received, by
    run: above 1 for a sticky task (it carries only the events since the last one)."""

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] = {}

    def intercept_workflow_task(self, next: WorkflowTaskHandler) -> WorkflowTaskHandler:
        async def record(task: service_pb2.PollWorkflowTaskResponse) -> None:
            if task.history.events and not task.HasField("query"):
                run = self.seen.setdefault(task.workflow_execution.run_id, [])
                run.append(task.history.events[0].event_id)
            await next(task)

        return record


# --------------------------------------------------------------------- the cluster


@contextlib.asynccontextmanager
async def _client(poll_at: ServerProcess, nodes: Sequence[ServerProcess]) -> AsyncIterator[Client]:
    # ``nodes``: the cluster the client's node forwards to (kept in the signature so
    # each test names the nodes it relies on).
    assert poll_at in nodes
    client = await Client.connect(poll_at.address)
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def _worker(client: Client, queue: str, **options: Any) -> AsyncIterator[Worker]:
    worker = Worker(
        client, task_queue=queue, workflows=[TripleThenWait], activities=[triple], **options
    )
    worker.start()
    try:
        yield worker
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(worker.shutdown(), 10)


@pytest.fixture
def store_url(pg_url: str) -> str:
    """PostgreSQL only: several processes on one database."""
    return pg_url


@pytest.fixture
async def cluster(procs: Processes, pg_url: str, store: HistoryStore) -> dict[str, ServerProcess]:
    """node-a, node-b and node-c, once each holds its share of the 16 shards."""
    nodes = {}
    for node_id in NODES:
        flags = ("--node-id", node_id, "--lease-seconds", str(LEASE_S), "--auth", "off")
        node = ServerProcess(procs, pg_url, name=node_id, command="start", flags=flags)
        await node.start()
        nodes[node_id] = node
    await eventually(lambda: _balanced(store, NODES), "a balanced split", timeout=60)
    return nodes


async def _owners(store: HistoryStore) -> dict[int, str]:
    now = now_micros()
    return {r.shard_id: r.owner for r in await store.read_shards() if not r.free_at(now)}


async def _balanced(store: HistoryStore, names: Sequence[str]) -> dict[int, str] | None:
    owners = await _owners(store)
    count = Counter(owners.values())
    share = -(-store.shard_count // len(names))
    if len(owners) == store.shard_count and all(0 < count[n] <= share for n in names):
        return owners
    return None


def _ids_owned_by(owners: dict[int, str], node: str, count: int) -> list[str]:
    ids: list[str] = []
    while len(ids) < count:
        workflow_id = new_id("run")
        if owners[shard_of("default", workflow_id, 16)] == node:
            ids.append(workflow_id)
    return ids


async def _check_delivered_once(client: Client, workflow_id: str) -> None:
    """The activity ran once; every workflow task was started once and completed."""
    assert EXECUTIONS[workflow_id] == 1, (workflow_id, EXECUTIONS[workflow_id])
    events = (await client.get_workflow_handle(workflow_id).fetch_history()).events
    assert_gap_free(events)
    types = Counter(e.event_type for e in events)
    assert (
        types[ET.EVENT_TYPE_WORKFLOW_TASK_STARTED] == types[ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED]
    )
    assert types[ET.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT] == 0
    assert types[ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED] == 1


# -------------------------------------------------------------------------- tests


async def test_a_worker_polling_one_node_gets_the_tasks_and_queries_of_runs_on_the_others(
    cluster: dict[str, ServerProcess], store: HistoryStore
) -> None:
    owners = await _owners(store)
    a, nodes = cluster["node-a"], list(cluster.values())
    # The queue's node is B: a poll at A is forwarded to B, which records the tasks of
    # C's runs started on C.
    queue = queue_served_by(owners, "node-b", "spread")
    ids = _ids_owned_by(owners, "node-b", 3) + _ids_owned_by(owners, "node-c", 3)
    first_events = FirstEvents()
    async with _client(a, nodes) as client, _worker(client, queue, interceptors=[first_events]):
        handles = [
            await client.start_workflow(
                TripleThenWait.run, args=[n, True], id=workflow_id, task_queue=queue
            )
            for n, workflow_id in enumerate(ids)
        ]
        for n, handle in enumerate(handles):
            await eventually(
                functools.partial(_answers, handle, f"tripled:{3 * n}"),
                "the query answered",
                timeout=60,
            )
        described = await client.service.DescribeTaskQueue(
            service_pb2.DescribeTaskQueueRequest(
                namespace="default", task_queue=common_pb2.TaskQueue(name=queue)
            )
        )
        assert [p.identity for p in described.pollers] == [client.identity]
        assert described.pollers[0].polling
        for handle in handles:
            await handle.signal(TripleThenWait.proceed)
        results = [await asyncio.wait_for(h.result(), CONDITION_TIMEOUT_S) for h in handles]
    assert results == [3 * n for n in range(len(ids))]
    for handle in handles:
        async with _client(a, nodes) as client:
            await _check_delivered_once(client, handle.id)
        # The tasks after the first went to the worker's sticky queue (hashed to a node
        # of its own) and were delivered through A all the same.
        first, *later = first_events.seen[handle.run_id or ""]
        assert first == 1
        assert later
        assert all(event_id > 1 for event_id in later), first_events.seen


async def _answers(handle: Any, phase: str) -> bool:
    return bool(await handle.query(TripleThenWait.current) == phase)


async def test_a_backlog_survives_the_death_of_the_node_that_held_it(
    cluster: dict[str, ServerProcess], store: HistoryStore, procs: Processes
) -> None:
    owners = await _owners(store)
    m = cluster["node-c"]
    a = cluster["node-a"]
    queue = queue_served_by(owners, "node-c", "backlog")
    ids = [new_id("backlog") for _ in range(12)]  # runs on every node's shards
    async with _client(a, list(cluster.values())) as client:
        for n, workflow_id in enumerate(ids):
            await client.start_workflow(
                TripleThenWait.run, args=[n, False], id=workflow_id, task_queue=queue
            )

        async def queued() -> bool:
            described = await client.service.DescribeTaskQueue(
                service_pb2.DescribeTaskQueueRequest(
                    namespace="default", task_queue=common_pb2.TaskQueue(name=queue)
                )
            )
            return bool(described.backlog_count_hint == len(ids))

        await eventually(queued, "every first workflow task queued on node-c", timeout=60)
        await m.kill()
        survivors = [cluster["node-a"], cluster["node-b"]]
        async with _client(a, survivors) as survivor_client, _worker(survivor_client, queue):
            for workflow_id in ids:
                handle = survivor_client.get_workflow_handle(workflow_id)
                await asyncio.wait_for(handle.result(), CONDITION_TIMEOUT_S)
            for workflow_id in ids:
                await _check_delivered_once(survivor_client, workflow_id)


async def test_polls_through_another_node_survive_the_queue_node_stopping(
    cluster: dict[str, ServerProcess], store: HistoryStore
) -> None:
    owners = await _owners(store)
    m, a = cluster["node-b"], cluster["node-a"]
    queue = queue_served_by(owners, "node-b", "moving")
    survivors = [cluster["node-a"], cluster["node-c"]]
    async with _client(a, list(cluster.values())) as client, _worker(client, queue):
        ids = []
        for round_ in range(3):
            for n in range(8):
                workflow_id = new_id(f"moving-{round_}")
                await client.start_workflow(
                    TripleThenWait.run, args=[n, False], id=workflow_id, task_queue=queue
                )
                ids.append(workflow_id)
            if round_ == 1:
                m.proc.popen.send_signal(signal.SIGTERM)
                await eventually(
                    lambda: m.proc.popen.poll() is not None, "node-b to stop", timeout=60
                )
                await eventually(
                    lambda: _balanced(store, ["node-a", "node-c"]), "node-b's shards taken"
                )
        for workflow_id in ids:
            await asyncio.wait_for(
                client.get_workflow_handle(workflow_id).result(), CONDITION_TIMEOUT_S
            )
    async with _client(a, survivors) as client:
        for workflow_id in ids:
            assert EXECUTIONS[workflow_id] == 1, (workflow_id, EXECUTIONS[workflow_id])
            events = (await client.get_workflow_handle(workflow_id).fetch_history()).events
            assert_gap_free(events)
            assert Counter(e.event_type for e in events)[ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED] == 1
