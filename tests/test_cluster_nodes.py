"""Several ``tideflow server start`` processes on one PostgreSQL database: shards,
leases, the range-id fence (forwarding between nodes: tests/test_cluster_routing.py;
matching across nodes: tests/test_cluster_matching.py).

- Two nodes split the 16 shards and each serves the workflows of its own; SIGTERM
  hands a node's shards over (released rows, taken by the other node).
- Zombie: the owner is SIGSTOPped past its lease, the other node takes its shards over
  and writes; SIGCONT: the old owner's writes are refused (renewal or fence), it drops
  the shards, and rejoins (the shards are balanced again).
- SIGKILL: the other node serves the dead node's shards within the lease and its
  in-flight workflows complete.
- Three nodes started at once on an empty database of 4 shards all join (the schema
  is created once, whoever wins the race) and each holds shards (2, 1, 1).
- ``--shards`` conflicting with the database's count is refused (exit 2, one line).

The process tests run at READ COMMITTED and at SERIALIZABLE (``?isolation_level=
serializable``, the CockroachDB code path).

Leases are 2 s here. Waits poll conditions against generous deadlines.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import PG_SERIALIZABLE, serializable_url
from helpers import Processes, ServerProcess
from helpers_cluster import (
    check_history,
    lease_trace,
    result,
    split,
    start,
    start_node,
    start_sleeping,
    wait,
    wait_for_steals,
    workers,
    workflow_ids,
)

from tideflow.history import HistoryStore

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.serializable]

QUEUE = "cluster-nodes"
LEASE_S = 2.0
SHARDS = 16


@pytest.fixture
def nodes(procs: Processes, store_url: str) -> Callable[..., Awaitable[ServerProcess]]:
    """Starts ``tideflow server start`` nodes on this test's database (named by their
    node id, with more flags if given, listening); ``procs`` kills and reaps them, a
    SIGSTOPped one too."""

    async def start_one(node_id: str, *flags: str) -> ServerProcess:
        return await start_node(procs, store_url, node_id, LEASE_S, *flags)

    return start_one


@pytest.fixture(params=["postgres", PG_SERIALIZABLE])
def store_url(request: pytest.FixtureRequest, pg_url: str) -> str:
    """PostgreSQL only: several processes on one database, at READ COMMITTED and at
    SERIALIZABLE (the CockroachDB code path: the fence is a plain read, conflicts are
    run again). The ``store`` fixture on it is the test's own (unfenced) view of the
    cluster's database."""
    return serializable_url(pg_url) if request.param == PG_SERIALIZABLE else pg_url


async def _two_nodes(
    nodes: Callable[[str], Awaitable[ServerProcess]], store: HistoryStore
) -> tuple[ServerProcess, ServerProcess, dict[int, str]]:
    """node-a and node-b, once they split the shards (the owners)."""
    a = await nodes("node-a")
    b = await nodes("node-b")
    owners = await wait(lambda: split(store, "node-a", "node-b"), "a balanced split")
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


def _ids(owners: dict[int, str], node: str, count: int, tag: str) -> list[str]:
    return workflow_ids(owners, node, count, tag, SHARDS)


# -------------------------------------------------------------------------- tests


async def test_two_nodes_split_the_shards_and_serve_their_own(
    nodes: Callable[[str], Awaitable[ServerProcess]], store: HistoryStore, trace_dir: Path
) -> None:
    a, b, owners = await _two_nodes(nodes, store)
    async with workers(a, b) as clients:
        jobs = [
            (node, wid) for node in ("node-a", "node-b") for wid in _ids(owners, node, 3, "split")
        ]
        for n, (node, workflow_id) in enumerate(jobs):
            await start(clients[node], workflow_id, n, 0.2)
        for n, (node, workflow_id) in enumerate(jobs):
            assert await result(clients[node], workflow_id) == f"{n}:{n * 4}"
            await check_history(clients[node], workflow_id)

    # SIGTERM: node-a releases its shards and node-b takes them all.
    a.proc.popen.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(a.proc.popen.wait, 30) == 0
    released = [
        r
        for r in await store.read_shards()
        if r.shard_id in owners and owners[r.shard_id] == "node-a"
    ]
    assert all(r.owner in ("", "node-b") for r in released), released
    await wait(lambda: split(store, "node-b"), "node-b to hold every shard")
    assert {e["action"] for e in lease_trace(trace_dir, a.name)} >= {
        "AcquireShard",
        "RenewLease",
        "ReleaseShard",
        "AppendEvent",
    }


async def test_zombie_owner_cannot_write_after_takeover_and_rejoins(
    nodes: Callable[[str], Awaitable[ServerProcess]], store: HistoryStore, trace_dir: Path
) -> None:
    a, b, owners = await _two_nodes(nodes, store)
    async with workers(a, b) as clients:
        # Sleeping on node-a's shards well past the pause: their timers are in node-a's
        # memory when it stops, and due when it comes back.
        zombie_ids = _ids(owners, "node-a", 3, "zombie")
        await start_sleeping(clients["node-a"], zombie_ids, LEASE_S * 2.5)
        ranges_before = {r.shard_id: r.range_id for r in await store.read_shards()}
        os.kill(a.proc.pid, signal.SIGSTOP)
        await wait(lambda: split(store, "node-b"), "node-b to take over")
        # node-b serves node-a's former shards and writes: a new run, and the
        # sleeping runs (their timers fire on node-b).
        (fresh,) = _ids(owners, "node-a", 1, "fresh")
        await start(clients["node-b"], fresh, 7, 0.1)
        assert await result(clients["node-b"], fresh) == "7:28"
        for n, workflow_id in enumerate(zombie_ids):
            assert await result(clients["node-b"], workflow_id) == f"{n}:{n * 4}"
        os.kill(a.proc.pid, signal.SIGCONT)

        # node-a learns it lost every shard it had (a refused renewal or a fenced
        # write), and rejoins: the shards are balanced again over both nodes.
        lost = {s for s, owner in owners.items() if owner == "node-a"}

        def dropped() -> bool:
            refused = {
                e["shard"]
                for e in lease_trace(trace_dir, a.name)
                if (e["action"] == "RenewLease" and not e["ok"]) or e["action"] == "FencedWrite"
            }
            return lost <= refused

        await wait(dropped, "node-a to find its shards lost")
        rejoined = await wait(lambda: split(store, "node-a", "node-b"), "a new split")
        for workflow_id in [*zombie_ids, fresh]:
            await check_history(clients["node-b"], workflow_id)
        # Every change of owner bumped the range id (the fence's token).
        after = {r.shard_id: r.range_id for r in await store.read_shards()}
        assert all(after[s] >= ranges_before[s] + 1 for s in lost)
        # And node-a serves again.
        (again,) = _ids(rejoined, "node-a", 1, "again")
        await start(clients["node-a"], again, 3, 0.1)
        assert await result(clients["node-a"], again) == "3:12"
    fenced = [e for e in lease_trace(trace_dir, a.name) if e["action"] == "FencedWrite"]
    print(f"zombie: {len(fenced)} writes refused by the fence")


async def test_sigkilled_node_shards_are_served_within_the_lease(
    nodes: Callable[[str], Awaitable[ServerProcess]], store: HistoryStore, trace_dir: Path
) -> None:
    a, b, owners = await _two_nodes(nodes, store)
    async with workers(a, b) as clients:
        doomed = _ids(owners, "node-a", 4, "doomed")
        await start_sleeping(clients["node-a"], doomed, 1.0)
        killed = time.monotonic()
        await a.kill()
        await wait(lambda: split(store, "node-b"), "node-b to take over")
        takeover_s = time.monotonic() - killed
        # How soon is a figure (bench/recovery.py), not a check: printed only.
        print(f"takeover after SIGKILL: {takeover_s:.2f} s (lease {LEASE_S} s)")
        # Each of node-a's shards was stolen by node-b once its lease had expired by
        # node-b's clock, and the steal bumped the range id (the fence's token).
        dead = {shard for shard, owner in owners.items() if owner == "node-a"}
        await wait_for_steals(trace_dir, b.name, "node-a", dead)
        for n, workflow_id in enumerate(doomed):
            assert await result(clients["node-b"], workflow_id) == f"{n}:{n * 4}"
            await check_history(clients["node-b"], workflow_id)


async def test_three_nodes_started_at_once_on_an_empty_database_all_join(
    procs: Processes, pg_url: str
) -> None:
    # The database is empty: the three nodes race to create the schema (at READ
    # COMMITTED only: the race is in PostgreSQL's catalog, whatever the isolation).
    # Four shards over three nodes: 2, 1 and 1 (not 2, 2 and none).
    names = ("node-a", "node-b", "node-c")
    await asyncio.gather(
        *(start_node(procs, pg_url, name, LEASE_S, "--shards", "4") for name in names)
    )
    store = await HistoryStore.open(pg_url)
    try:
        owned = await wait(lambda: split(store, *names), "the shards split over all three")
        assert sorted(Counter(owned.values()).values()) == [1, 1, 2]
    finally:
        await store.close()


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
        (["--local-poll-seconds", "-1"], "--local-poll-seconds -1.0: must be 0 (off) or positive"),
        (["--local-poll-seconds", "nan"], "--local-poll-seconds nan: must be 0 (off) or positive"),
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
