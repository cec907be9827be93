"""Several ``tideflow server start`` nodes on one PostgreSQL database, for the cluster
suites (test_cluster_nodes.py, test_tla_lease_traces.py, test_cluster_describe.py).

Nodes are real processes (``ServerProcess``, killed and reaped by ``procs``); a client
and a worker per node run the ``Pause`` workflow (an activity, a durable sleep, another
activity), whose result ``f"{n}:{4n}"`` checks that nothing ran twice or was lost.
Waits poll conditions against generous deadlines (no sleeps synchronize anything).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from helpers import ET, Processes, ServerProcess, assert_gap_free, eventually

from tideflow.history import (
    HistoryStore,
    ShardRecord,
    TaskKind,
    now_micros,
    queue_shard_of,
    shard_of,
)
from tideflow.worker_sdk import Client, RetryPolicy, Worker, activity, workflow

QUEUE = "cluster-nodes"
SHARDS = 16
CONDITION_TIMEOUT_S = 40.0
FAST_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=100))


@activity.defn
async def double(n: int) -> int:
    return n * 2


@workflow.defn
class Pause:
    @workflow.run
    async def run(self, n: int, pause_s: float) -> str:
        doubled: int = await workflow.execute_activity(
            double, n, start_to_close_timeout=timedelta(seconds=10), retry_policy=FAST_RETRY
        )
        await workflow.sleep(timedelta(seconds=pause_s))
        again: int = await workflow.execute_activity(
            double, doubled, start_to_close_timeout=timedelta(seconds=10), retry_policy=FAST_RETRY
        )
        return f"{n}:{again}"


async def start_node(
    procs: Processes, pg_url: str, node_id: str, lease_s: float, *flags: str
) -> ServerProcess:
    """``tideflow server start --node-id node_id`` on ``pg_url``, listening. These
    nodes test shards, not credentials (``start`` turns auth on by default)."""
    argv = ("--node-id", node_id, "--lease-seconds", str(lease_s), "--auth", "off", *flags)
    node = ServerProcess(procs, pg_url, name=node_id, command="start", flags=argv)
    await node.start()
    return node


def lease_trace(trace_dir: Path, node_id: str) -> list[dict[str, Any]]:
    """What node ``node_id`` traced of its leases (TIDEFLOW_TRACE_DIR, ``trace_dir``)."""
    path = trace_dir / "shards" / f"{node_id}.ndjson"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def wait(check: Callable[[], Any], what: str) -> Any:
    return await eventually(check, what, timeout=CONDITION_TIMEOUT_S)


async def owners(store: HistoryStore) -> dict[int, str]:
    """shard -> owner of every live lease."""
    now = now_micros()
    rows: list[ShardRecord] = await store.read_shards()
    return {r.shard_id: r.owner for r in rows if not r.free_at(now)}


async def split(store: HistoryStore, *names: str) -> dict[int, str] | None:
    """The owners once every shard is held by one of ``names``, each holding its
    balanced share (ceil(shards / len(names)) at most); else None."""
    found = await owners(store)
    count = Counter(found.values())
    share = -(-store.shard_count // len(names))
    if len(found) != store.shard_count or not set(count) <= set(names):
        return None
    if all(0 < count[n] <= share for n in names):
        return found
    return None


def queue_served_by(owners: dict[int, str], node: str, tag: str, shard_count: int = SHARDS) -> str:
    """A task queue name (``tag-<i>``) whose workflow and activity queues are both
    served by ``node`` in ``owners``."""
    for i in range(100_000):
        name = f"{tag}-{i}"
        kinds = (TaskKind.WORKFLOW, TaskKind.ACTIVITY)
        if all(owners[queue_shard_of("default", name, int(k), shard_count)] == node for k in kinds):
            return name
    raise AssertionError(f"no queue on {node}")


def workflow_ids(
    owned: dict[int, str],
    node: str | Sequence[str],
    count: int,
    tag: str,
    shard_count: int = SHARDS,
) -> list[str]:
    """``count`` workflow ids (``tag-<i>``) of namespace default whose shards ``node``
    (or one of several nodes) owns in ``owned``."""
    wanted = {node} if isinstance(node, str) else set(node)
    ids = []
    for i in range(100_000):
        workflow_id = f"{tag}-{i}"
        if owned.get(shard_of("default", workflow_id, shard_count)) in wanted:
            ids.append(workflow_id)
            if len(ids) == count:
                return ids
    raise AssertionError(f"no workflow ids on {node}")


@contextlib.asynccontextmanager
async def workers(
    *nodes: ServerProcess, more_workflows: Sequence[type] = ()
) -> AsyncIterator[dict[str, Client]]:
    """A client and a worker per node (``Pause`` and ``more_workflows``); the workers
    stop at the end (a dead node's worker is abandoned after a short wait)."""
    clients = {n.name: await Client.connect(n.address) for n in nodes}
    # A worker gets tasks of every node's runs through its own node (task queues are
    # served across nodes), and its reports reach the run's owner (forwarding).
    polling = [await Client.connect(n.address) for n in nodes]
    running = [
        Worker(c, task_queue=QUEUE, workflows=[Pause, *more_workflows], activities=[double])
        for c in polling
    ]
    for w in running:
        w.start()
    try:
        yield clients
    finally:
        for w in running:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.shutdown(), 5)
        for client in polling:
            await client.close()


async def start(client: Client, workflow_id: str, n: int, pause_s: float) -> None:
    await client.start_workflow(Pause.run, args=[n, pause_s], id=workflow_id, task_queue=QUEUE)


async def result(client: Client, workflow_id: str) -> Any:
    return await asyncio.wait_for(
        client.get_workflow_handle(workflow_id).result(), CONDITION_TIMEOUT_S
    )


async def check_history(client: Client, workflow_id: str) -> None:
    """Gap-free, one timer fired once, closed once."""
    events = (await client.get_workflow_handle(workflow_id).fetch_history()).events
    assert_gap_free(events)
    types = Counter(e.event_type for e in events)
    assert types[ET.EVENT_TYPE_TIMER_STARTED] == 1
    assert types[ET.EVENT_TYPE_TIMER_FIRED] == 1
    assert types[ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED] == 2
    assert types[ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED] == 1


async def start_sleeping(client: Client, workflow_ids: Sequence[str], pause_s: float) -> None:
    """Start the runs (run n returns f"{n}:{4n}") and wait until each sleeps (its
    timer started)."""
    for n, workflow_id in enumerate(workflow_ids):
        await start(client, workflow_id, n, pause_s)
    await wait(lambda: sleeping(client, workflow_ids), "timers")


async def sleeping(client: Client, workflow_ids: Sequence[str]) -> bool:
    for workflow_id in workflow_ids:
        history = await client.get_workflow_handle(workflow_id).fetch_history()
        if not any(e.event_type == ET.EVENT_TYPE_TIMER_STARTED for e in history.events):
            return False
    return True


async def wait_for_steals(trace_dir: Path, thief: str, victim: str, shards: set[int]) -> None:
    """Wait until node ``thief`` traced acquiring exactly ``shards`` from ``victim``
    (a trace line follows its acquire's commit: waited for, not read at once); each was
    stolen once the lease had expired by the thief's clock, and bumped the range id
    (the fence's token) by one."""

    def stolen() -> dict[int, Any]:
        return {
            e["shard"]: e
            for e in lease_trace(trace_dir, thief)
            if e["action"] == "AcquireShard" and e["previous_owner"] == victim and e["range"]
        }

    await wait(lambda: set(stolen()) >= shards, f"{thief}'s steals in its trace")
    steals = stolen()
    assert set(steals) == shards, (sorted(steals), sorted(shards))
    for steal in steals.values():
        assert steal["stolen"] and steal["now"] > steal["expires_at"], steal
        assert steal["range"] == steal["read_range"] + 1, steal
