"""Several ``tideflow server start`` processes on one PostgreSQL database (issue 11,
first increment: shards, leases, the range-id fence; no forwarding yet, so each
client talks to the node that owns its workflow's shard, and a worker polls each node).

- Two nodes split the 16 shards and each serves the workflows of its own; a request
  for another node's shard is UNAVAILABLE naming the shard and its owner's address;
  SIGTERM hands a node's shards over (released rows, taken by the other node).
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
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from tideflow.api.v1 import common_pb2, service_pb2, service_pb2_grpc
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.history import HistoryStore, ShardRecord, now_micros, shard_of
from tideflow.worker_sdk import Client, RetryPolicy, Worker, activity, workflow

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

ET = EventType
QUEUE = "cluster-nodes"
LEASE_S = 2.0
START_TIMEOUT_S = 30.0
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


@dataclass(eq=False)
class _Node:
    name: str
    popen: subprocess.Popen[bytes]
    address: str
    out: Path
    err: Path

    def tail(self, chars: int = 4000) -> str:
        return self.err.read_text(errors="replace")[-chars:] if self.err.exists() else ""


class _Nodes:
    """Starts server nodes and always kills and reaps them."""

    def __init__(self, directory: Path, db_url: str) -> None:
        self.dir = directory
        self.db_url = db_url
        self.nodes: list[_Node] = []

    async def start(self, name: str) -> _Node:
        port = _free_port()
        out, err = self.dir / f"{name}.out", self.dir / f"{name}.err"
        popen = _spawn(
            [
                sys.executable,
                "-m",
                "tideflow.server._cli",
                "server",
                "start",
                "--db-url",
                self.db_url,
                "--port",
                str(port),
                "--node-id",
                name,
                "--lease-seconds",
                str(LEASE_S),
                # these nodes test shards, not credentials (on by default in `start`)
                "--auth",
                "off",
            ],
            out,
            err,
            {**os.environ, "TIDEFLOW_TRACE_DIR": str(self.dir / "trace")},
        )
        node = _Node(name, popen, f"127.0.0.1:{port}", out, err)
        self.nodes.append(node)

        def listening() -> bool:
            if popen.poll() is not None:
                raise AssertionError(f"{name} exited with {popen.returncode}:\n{node.tail()}")
            return "tideflow server listening on" in out.read_text(errors="replace")

        await _wait_until(listening, START_TIMEOUT_S, f"{name} to listen")
        return node

    def lease_trace(self, node: _Node) -> list[dict[str, Any]]:
        path = self.dir / "trace" / "shards" / f"{node.name}.ndjson"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def cleanup(self) -> None:
        for node in self.nodes:
            if node.popen.poll() is None:
                node.popen.kill()  # also ends a SIGSTOPped node
            node.popen.wait(timeout=10)
            print(f"----- {node.name} (exit {node.popen.returncode}) stderr tail -----")
            print(node.tail())


@pytest.fixture
def nodes(tmp_path: Path, pg_url: str) -> Iterator[_Nodes]:
    started = _Nodes(tmp_path, pg_url)
    try:
        yield started
    finally:
        started.cleanup()


@pytest.fixture
async def observer(pg_url: str) -> AsyncIterator[HistoryStore]:
    """The test's own (unfenced) view of the cluster's database."""
    store = await HistoryStore.open(pg_url)
    try:
        yield store
    finally:
        await store.close()


def _spawn(argv: list[str], out: Path, err: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with out.open("wb") as out_f, err.open("wb") as err_f:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f, env=env)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def _wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


async def _owners(store: HistoryStore) -> dict[int, str]:
    """shard -> owner of every live lease."""
    now = now_micros()
    rows: list[ShardRecord] = await store.read_shards()
    return {r.shard_id: r.owner for r in rows if not r.free_at(now)}


async def _split(store: HistoryStore, *names: str) -> dict[int, str] | None:
    """The owners once every shard is held by one of ``names``, each holding its
    balanced share (ceil(16 / len(names)) at most); else None."""
    owners = await _owners(store)
    count = Counter(owners.values())
    share = -(-store.shard_count // len(names))
    if len(owners) != store.shard_count or not set(count) <= set(names):
        return None
    if all(0 < count[n] <= share for n in names):
        return owners
    return None


def _workflow_ids(owners: dict[int, str], node: str, count: int, tag: str) -> list[str]:
    ids = []
    for i in range(10_000):
        workflow_id = f"{tag}-{i}"
        if owners.get(shard_of("default", workflow_id, 16)) == node:
            ids.append(workflow_id)
            if len(ids) == count:
                return ids
    raise AssertionError(f"no workflow ids on {node}")


@contextlib.asynccontextmanager
async def _workers(*nodes: _Node) -> AsyncIterator[dict[str, Client]]:
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


def _check_history(events: Sequence[HistoryEvent]) -> None:
    """Gap-free, one timer fired once, closed once."""
    assert [e.event_id for e in events] == list(range(1, len(events) + 1))
    types = Counter(e.event_type for e in events)
    assert types[ET.EVENT_TYPE_TIMER_STARTED] == 1
    assert types[ET.EVENT_TYPE_TIMER_FIRED] == 1
    assert types[ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED] == 2
    assert types[ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED] == 1


async def _sleeping(client: Client, workflow_ids: Sequence[str]) -> bool:
    for workflow_id in workflow_ids:
        history = await client.get_workflow_handle(workflow_id).fetch_history()
        if not any(e.event_type == ET.EVENT_TYPE_TIMER_STARTED for e in history.events):
            return False
    return True


# -------------------------------------------------------------------------- tests


async def test_two_nodes_split_the_shards_and_serve_their_own(
    nodes: _Nodes, observer: HistoryStore
) -> None:
    a = await nodes.start("node-a")
    b = await nodes.start("node-b")
    owners = await _wait_until(
        lambda: _split(observer, "node-a", "node-b"), CONDITION_TIMEOUT_S, "a balanced split"
    )
    async with _workers(a, b) as clients:
        jobs = [
            (node, wid)
            for node in ("node-a", "node-b")
            for wid in _workflow_ids(owners, node, 3, "split")
        ]
        for n, (node, workflow_id) in enumerate(jobs):
            await _start(clients[node], workflow_id, n, 0.2)
        for n, (node, workflow_id) in enumerate(jobs):
            assert await _result(clients[node], workflow_id) == f"{n}:{n * 4}"
            _check_history(
                (await clients[node].get_workflow_handle(workflow_id).fetch_history()).events
            )

        # A run of node-a's shard, asked of node-b: UNAVAILABLE naming shard and owner.
        (foreign,) = _workflow_ids(owners, "node-a", 1, "foreign")
        shard = shard_of("default", foreign, 16)
        async with grpc.aio.insecure_channel(b.address) as channel:
            stub = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.StartWorkflow(
                    service_pb2.StartWorkflowRequest(
                        namespace="default",
                        workflow_id=foreign,
                        workflow_type=common_pb2.WorkflowType(name="Pause"),
                        task_queue=common_pb2.TaskQueue(name=QUEUE),
                        request_id=str(uuid.uuid4()),
                    ),
                    timeout=10,
                )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"shard {shard}" in str(refused.value.details())
        assert f"node node-a at {a.address}" in str(refused.value.details())

    # SIGTERM: node-a releases its shards and node-b takes them all.
    a.popen.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(a.popen.wait, 30) == 0
    released = [
        r
        for r in await observer.read_shards()
        if r.shard_id in owners and owners[r.shard_id] == "node-a"
    ]
    assert all(r.owner in ("", "node-b") for r in released), released
    await _wait_until(
        lambda: _split(observer, "node-b"), CONDITION_TIMEOUT_S, "node-b to hold every shard"
    )
    assert {e["action"] for e in nodes.lease_trace(a)} >= {
        "AcquireShard",
        "RenewLease",
        "ReleaseShard",
        "AppendEvent",
    }


async def test_zombie_owner_cannot_write_after_takeover_and_rejoins(
    nodes: _Nodes, observer: HistoryStore
) -> None:
    a = await nodes.start("node-a")
    b = await nodes.start("node-b")
    owners = await _wait_until(
        lambda: _split(observer, "node-a", "node-b"), CONDITION_TIMEOUT_S, "a balanced split"
    )
    async with _workers(a, b) as clients:
        # Sleeping on node-a's shards well past the pause: their timers are in node-a's
        # memory when it stops, and due when it comes back.
        zombie_ids = _workflow_ids(owners, "node-a", 3, "zombie")
        for n, workflow_id in enumerate(zombie_ids):
            await _start(clients["node-a"], workflow_id, n, LEASE_S * 2.5)
        await _wait_until(
            lambda: _sleeping(clients["node-a"], zombie_ids), CONDITION_TIMEOUT_S, "timers"
        )
        ranges_before = {r.shard_id: r.range_id for r in await observer.read_shards()}
        os.kill(a.popen.pid, signal.SIGSTOP)
        await _wait_until(
            lambda: _split(observer, "node-b"), CONDITION_TIMEOUT_S, "node-b to take over"
        )
        # node-b serves node-a's former shards and writes: a new run, and the
        # sleeping runs (their timers fire on node-b).
        (fresh,) = _workflow_ids(owners, "node-a", 1, "fresh")
        await _start(clients["node-b"], fresh, 7, 0.1)
        assert await _result(clients["node-b"], fresh) == "7:28"
        for n, workflow_id in enumerate(zombie_ids):
            assert await _result(clients["node-b"], workflow_id) == f"{n}:{n * 4}"
        os.kill(a.popen.pid, signal.SIGCONT)

        # node-a learns it lost every shard it had (a refused renewal or a fenced
        # write), and rejoins: the shards are balanced again over both nodes.
        lost = {s for s, owner in owners.items() if owner == "node-a"}

        def dropped() -> bool:
            refused = {
                e["shard"]
                for e in nodes.lease_trace(a)
                if (e["action"] == "RenewLease" and not e["ok"]) or e["action"] == "FencedWrite"
            }
            return lost <= refused

        await _wait_until(dropped, CONDITION_TIMEOUT_S, "node-a to find its shards lost")
        rejoined = await _wait_until(
            lambda: _split(observer, "node-a", "node-b"), CONDITION_TIMEOUT_S, "a new split"
        )
        for workflow_id in [*zombie_ids, fresh]:
            events = (
                await clients["node-b"].get_workflow_handle(workflow_id).fetch_history()
            ).events
            _check_history(events)
        # Every change of owner bumped the range id (the fence's token).
        after = {r.shard_id: r.range_id for r in await observer.read_shards()}
        assert all(after[s] >= ranges_before[s] + 1 for s in lost)
        # And node-a serves again.
        (again,) = _workflow_ids(rejoined, "node-a", 1, "again")
        await _start(clients["node-a"], again, 3, 0.1)
        assert await _result(clients["node-a"], again) == "3:12"
    fenced = [e for e in nodes.lease_trace(a) if e["action"] == "FencedWrite"]
    print(f"zombie: {len(fenced)} writes refused by the fence")


async def test_sigkilled_node_shards_are_served_within_the_lease(
    nodes: _Nodes, observer: HistoryStore
) -> None:
    a = await nodes.start("node-a")
    b = await nodes.start("node-b")
    owners = await _wait_until(
        lambda: _split(observer, "node-a", "node-b"), CONDITION_TIMEOUT_S, "a balanced split"
    )
    async with _workers(a, b) as clients:
        doomed = _workflow_ids(owners, "node-a", 4, "doomed")
        for n, workflow_id in enumerate(doomed):
            await _start(clients["node-a"], workflow_id, n, 1.0)
        await _wait_until(
            lambda: _sleeping(clients["node-a"], doomed), CONDITION_TIMEOUT_S, "timers"
        )
        a.popen.kill()
        killed = time.monotonic()
        await asyncio.to_thread(a.popen.wait, 10)
        await _wait_until(
            lambda: _split(observer, "node-b"), CONDITION_TIMEOUT_S, "node-b to take over"
        )
        takeover_s = time.monotonic() - killed
        print(f"takeover after SIGKILL: {takeover_s:.2f} s (lease {LEASE_S} s)")
        # The lease lapses within LEASE_S; node-b's next pass comes within a third.
        assert takeover_s < LEASE_S * 2 + 2, takeover_s
        for n, workflow_id in enumerate(doomed):
            assert await _result(clients["node-b"], workflow_id) == f"{n}:{n * 4}"
            _check_history(
                (await clients["node-b"].get_workflow_handle(workflow_id).fetch_history()).events
            )


async def test_a_conflicting_shard_count_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cluster.db'}"
    store = await HistoryStore.open(url)  # initialised with the default, 16
    await store.close()
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "tideflow.server._cli",
            "server",
            "start",
            "--db-url",
            url,
            "--port",
            "0",
            "--shards",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
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
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tideflow.server._cli",
            "server",
            "start",
            "--db-url",
            url,
            "--port",
            "0",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"tideflow server start: {message}"]
    assert not (tmp_path / "cluster.db").exists()  # refused before the database opens
