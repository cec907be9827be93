"""Several ``tideflow server start`` processes on one PostgreSQL database (issue 11:
shards, leases, the range-id fence). Each client here talks to the node that owns its
workflow's shard, and a worker polls each node; forwarding between nodes is tested in
tests/test_cluster_routing.py.

- Two nodes split the 16 shards and each serves the workflows of its own; SIGTERM
  hands a node's shards over (released rows, taken by the other node).
- Zombie: the owner is SIGSTOPped past its lease, the other node takes its shards over
  and writes; SIGCONT: the old owner's writes are refused (renewal or fence), it drops
  the shards, and rejoins (the shards are balanced again).
- SIGKILL: the other node serves the dead node's shards within the lease and its
  in-flight workflows complete.
- ``--shards`` conflicting with the database's count is refused (exit 2, one line).

Leases are 2 s here. Waits poll conditions against generous deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import ET, Processes, ServerProcess, assert_gap_free, eventually
from helpers_cluster import split, workflow_ids

from tideflow.history import HistoryStore
from tideflow.worker_sdk import Client, RetryPolicy, Worker, activity, workflow

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

QUEUE = "cluster-nodes"
LEASE_S = 2.0
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


# --------------------------------------------------------------------- processes


@pytest.fixture
def nodes(procs: Processes, pg_url: str) -> Callable[[str], Awaitable[ServerProcess]]:
    """Starts ``tideflow server start`` nodes on this test's database (named by their
    node id, listening); ``procs`` kills and reaps them, a SIGSTOPped one too."""

    async def start(node_id: str) -> ServerProcess:
        # These nodes test shards, not credentials (`start` turns auth on by default).
        flags = ("--node-id", node_id, "--lease-seconds", str(LEASE_S), "--auth", "off")
        node = ServerProcess(procs, pg_url, name=node_id, command="start", flags=flags)
        await node.start()
        return node

    return start


@pytest.fixture
def store_url(pg_url: str) -> str:
    """PostgreSQL only: several processes on one database. The ``store`` fixture on it
    is the test's own (unfenced) view of the cluster's database."""
    return pg_url


def _lease_trace(trace_dir: Path, node_id: str) -> list[dict[str, Any]]:
    """What node ``node_id`` traced of its leases (TIDEFLOW_TRACE_DIR, ``trace_dir``)."""
    path = trace_dir / "shards" / f"{node_id}.ndjson"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def _wait(check: Callable[[], Any], what: str) -> Any:
    return await eventually(check, what, timeout=CONDITION_TIMEOUT_S)


async def _two_nodes(
    nodes: Callable[[str], Awaitable[ServerProcess]], store: HistoryStore
) -> tuple[ServerProcess, ServerProcess, dict[int, str]]:
    """node-a and node-b, once they split the shards (the owners)."""
    a = await nodes("node-a")
    b = await nodes("node-b")
    owners = await _wait(lambda: split(store, "node-a", "node-b"), "a balanced split")
    return a, b, owners


def _start_node_cli(url: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """``tideflow server start`` on ``url`` with ``flags``, expected to refuse them."""
    argv = [sys.executable, "-m", "tideflow.server._cli", "server", "start", "--db-url", url]
    return subprocess.run(
        [*argv, "--port", "0", *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )


@contextlib.asynccontextmanager
async def _workers(*nodes: ServerProcess) -> AsyncIterator[dict[str, Client]]:
    """A client and a worker per node; the workers stop at the end (a dead node's
    worker is abandoned after a short wait)."""
    clients = {n.name: await Client.connect(n.address) for n in nodes}
    workers = [
        Worker(c, task_queue=QUEUE, workflows=[Pause], activities=[double])
        for c in clients.values()
    ]
    for w in workers:
        w.start()
    try:
        yield clients
    finally:
        for w in workers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.shutdown(), 5)


async def _start(client: Client, workflow_id: str, n: int, pause_s: float) -> None:
    await client.start_workflow(Pause.run, args=[n, pause_s], id=workflow_id, task_queue=QUEUE)


async def _result(client: Client, workflow_id: str) -> Any:
    return await asyncio.wait_for(
        client.get_workflow_handle(workflow_id).result(), CONDITION_TIMEOUT_S
    )


async def _check_history(client: Client, workflow_id: str) -> None:
    """Gap-free, one timer fired once, closed once."""
    events = (await client.get_workflow_handle(workflow_id).fetch_history()).events
    assert_gap_free(events)
    types = Counter(e.event_type for e in events)
    assert types[ET.EVENT_TYPE_TIMER_STARTED] == 1
    assert types[ET.EVENT_TYPE_TIMER_FIRED] == 1
    assert types[ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED] == 2
    assert types[ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED] == 1


async def _start_sleeping(
    client: Client, owners: dict[int, str], count: int, tag: str, pause_s: float
) -> list[str]:
    """Start ``count`` runs on node-a's shards (run n returns f"{n}:{4n}") and wait
    until each sleeps (its timer started)."""
    ids = workflow_ids(owners, "node-a", count, tag)
    for n, workflow_id in enumerate(ids):
        await _start(client, workflow_id, n, pause_s)
    await _wait(lambda: _sleeping(client, ids), "timers")
    return ids


async def _sleeping(client: Client, workflow_ids: Sequence[str]) -> bool:
    for workflow_id in workflow_ids:
        history = await client.get_workflow_handle(workflow_id).fetch_history()
        if not any(e.event_type == ET.EVENT_TYPE_TIMER_STARTED for e in history.events):
            return False
    return True


# -------------------------------------------------------------------------- tests


async def test_two_nodes_split_the_shards_and_serve_their_own(
    nodes: Callable[[str], Awaitable[ServerProcess]], store: HistoryStore, trace_dir: Path
) -> None:
    a, b, owners = await _two_nodes(nodes, store)
    async with _workers(a, b) as clients:
        jobs = [
            (node, wid)
            for node in ("node-a", "node-b")
            for wid in workflow_ids(owners, node, 3, "split")
        ]
        for n, (node, workflow_id) in enumerate(jobs):
            await _start(clients[node], workflow_id, n, 0.2)
        for n, (node, workflow_id) in enumerate(jobs):
            assert await _result(clients[node], workflow_id) == f"{n}:{n * 4}"
            await _check_history(clients[node], workflow_id)

    # SIGTERM: node-a releases its shards and node-b takes them all.
    a.proc.popen.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(a.proc.popen.wait, 30) == 0
    released = [
        r
        for r in await store.read_shards()
        if r.shard_id in owners and owners[r.shard_id] == "node-a"
    ]
    assert all(r.owner in ("", "node-b") for r in released), released
    await _wait(lambda: split(store, "node-b"), "node-b to hold every shard")
    assert {e["action"] for e in _lease_trace(trace_dir, a.name)} >= {
        "AcquireShard",
        "RenewLease",
        "ReleaseShard",
        "AppendEvent",
    }


async def test_zombie_owner_cannot_write_after_takeover_and_rejoins(
    nodes: Callable[[str], Awaitable[ServerProcess]], store: HistoryStore, trace_dir: Path
) -> None:
    a, b, owners = await _two_nodes(nodes, store)
    async with _workers(a, b) as clients:
        # Sleeping on node-a's shards well past the pause: their timers are in node-a's
        # memory when it stops, and due when it comes back.
        zombie_ids = await _start_sleeping(clients["node-a"], owners, 3, "zombie", LEASE_S * 2.5)
        ranges_before = {r.shard_id: r.range_id for r in await store.read_shards()}
        os.kill(a.proc.pid, signal.SIGSTOP)
        await _wait(lambda: split(store, "node-b"), "node-b to take over")
        # node-b serves node-a's former shards and writes: a new run, and the
        # sleeping runs (their timers fire on node-b).
        (fresh,) = workflow_ids(owners, "node-a", 1, "fresh")
        await _start(clients["node-b"], fresh, 7, 0.1)
        assert await _result(clients["node-b"], fresh) == "7:28"
        for n, workflow_id in enumerate(zombie_ids):
            assert await _result(clients["node-b"], workflow_id) == f"{n}:{n * 4}"
        os.kill(a.proc.pid, signal.SIGCONT)

        # node-a learns it lost every shard it had (a refused renewal or a fenced
        # write), and rejoins: the shards are balanced again over both nodes.
        lost = {s for s, owner in owners.items() if owner == "node-a"}

        def dropped() -> bool:
            refused = {
                e["shard"]
                for e in _lease_trace(trace_dir, a.name)
                if (e["action"] == "RenewLease" and not e["ok"]) or e["action"] == "FencedWrite"
            }
            return lost <= refused

        await _wait(dropped, "node-a to find its shards lost")
        rejoined = await _wait(lambda: split(store, "node-a", "node-b"), "a new split")
        for workflow_id in [*zombie_ids, fresh]:
            await _check_history(clients["node-b"], workflow_id)
        # Every change of owner bumped the range id (the fence's token).
        after = {r.shard_id: r.range_id for r in await store.read_shards()}
        assert all(after[s] >= ranges_before[s] + 1 for s in lost)
        # And node-a serves again.
        (again,) = workflow_ids(rejoined, "node-a", 1, "again")
        await _start(clients["node-a"], again, 3, 0.1)
        assert await _result(clients["node-a"], again) == "3:12"
    fenced = [e for e in _lease_trace(trace_dir, a.name) if e["action"] == "FencedWrite"]
    print(f"zombie: {len(fenced)} writes refused by the fence")


async def test_sigkilled_node_shards_are_served_within_the_lease(
    nodes: Callable[[str], Awaitable[ServerProcess]], store: HistoryStore, trace_dir: Path
) -> None:
    a, b, owners = await _two_nodes(nodes, store)
    async with _workers(a, b) as clients:
        doomed = await _start_sleeping(clients["node-a"], owners, 4, "doomed", 1.0)
        killed = time.monotonic()
        await a.kill()
        await _wait(lambda: split(store, "node-b"), "node-b to take over")
        takeover_s = time.monotonic() - killed
        print(f"takeover after SIGKILL: {takeover_s:.2f} s (lease {LEASE_S} s)")
        # The lease lapses within LEASE_S; node-b's next pass comes within a third.
        assert takeover_s < LEASE_S * 2 + 2, takeover_s
        for n, workflow_id in enumerate(doomed):
            assert await _result(clients["node-b"], workflow_id) == f"{n}:{n * 4}"
            await _check_history(clients["node-b"], workflow_id)


async def test_a_conflicting_shard_count_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cluster.db'}"
    store = await HistoryStore.open(url)  # initialised with the default, 16
    await store.close()
    done = await asyncio.to_thread(_start_node_cli, url, "--shards", "8")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "tideflow server start: the database was initialised with 16 shards; --shards 8 "
        "conflicts with it (the shard count never changes: drop --shards, or pass --shards 16)"
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shards", "0"], "--shards 0: must be at least 1"),
        (["--lease-seconds", "0"], "--lease-seconds 0.0: must be positive"),
        (["--advertise", "nohost"], "--advertise 'nohost': expected HOST:PORT"),
        (["--advertise", "h:99999"], "--advertise 'h:99999': expected HOST:PORT"),
    ],
)
def test_bad_node_flags_are_one_line_errors(tmp_path: Path, flags: list[str], message: str) -> None:
    url = f"sqlite:///{tmp_path / 'cluster.db'}"
    done = _start_node_cli(url, *flags)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"tideflow server start: {message}"]
    assert not (tmp_path / "cluster.db").exists()  # refused before the database opens
