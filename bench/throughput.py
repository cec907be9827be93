"""Throughput benchmark: workflows of one activity and of ten sequential activities
(and, with ``--local-activities``, of ten sequential local activities).

Starts the server (``tideflow server start-dev``, or ``--nodes N`` cluster nodes:
N ``tideflow server start`` processes on one database) and ``--workers`` worker
processes, runs ``--workflows`` workflows of each shape concurrently from this
process, and prints one JSON line per configuration with workflows/s, events/s,
activities/s and p50/p99 start-to-result latency per shape, and which configuration
ran (server command, nodes, workers, store). ``--table dev,1,2,3`` runs several
configurations one after the other and ends with a Markdown table of them.

    python bench/throughput.py --workflows 200 --workers 1
    python bench/throughput.py --db-url postgresql://postgres@127.0.0.1/bench
    python bench/throughput.py --workflows 200 --local-activities
    python bench/throughput.py --no-eager    # workers poll for every task
    python bench/throughput.py --no-batch    # every task completion its own RPC
    python bench/throughput.py --db-url postgresql://postgres@127.0.0.1/bench --nodes 2
    python bench/throughput.py --db-url postgresql://postgres@127.0.0.1/bench --table dev,1,2,3

On PostgreSQL each configuration gets a database of its own, created next to the one
named in ``--db-url`` and dropped afterwards, so configurations never share rows.
Cluster nodes run with ``--auth off``; their workers and clients spread over the
nodes: each connects to every node (``Client.connect("h1:p1,h2:p2,...")``), worker
and client ``i`` listing node ``i`` first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import make_url

from tideflow.history import HistoryStore, now_micros
from tideflow.worker_sdk import Client, Worker, activity, workflow

TASK_QUEUE = "bench"
# How long nodes may take to start and to spread the shards between them.
_START_TIMEOUT_S = 60.0
# Workflows run before the ones measured in the eager-start phase (code paths loaded).
_WARM_UP = 10


@activity.defn
async def step(value: int) -> int:
    return value + 1


@workflow.defn
class OneActivity:
    @workflow.run
    async def run(self, value: int) -> int:
        result: int = await workflow.execute_activity(
            step, value, start_to_close_timeout=timedelta(seconds=30)
        )
        return result


@workflow.defn
class TenActivities:
    @workflow.run
    async def run(self, value: int) -> int:
        for _ in range(10):
            value = await workflow.execute_activity(
                step, value, start_to_close_timeout=timedelta(seconds=30)
            )
        return value


@workflow.defn
class TenLocalActivities:
    """The ten steps as local activities: they run in the worker inside the workflow
    task and are recorded as markers (the counterpart of a DBOS step)."""

    @workflow.run
    async def run(self, value: int) -> int:
        for _ in range(10):
            value = await workflow.execute_local_activity(
                step, value, start_to_close_timeout=timedelta(seconds=30)
            )
        return value


@workflow.defn
class OneLocalActivity:
    """One step as a local activity: the start-to-result latency of DBOS's one-step
    workflow's counterpart (a start, then one workflow task that runs the step)."""

    @workflow.run
    async def run(self, value: int) -> int:
        result: int = await workflow.execute_local_activity(
            step, value, start_to_close_timeout=timedelta(seconds=30)
        )
        return result


# Activities (local or not) per workflow of each shape.
STEPS: dict[type, int] = {
    OneActivity: 1,
    TenActivities: 10,
    TenLocalActivities: 10,
    OneLocalActivity: 1,
}


async def run_worker(addresses: str, eager: bool = True, batch: bool = True) -> None:
    client = await Client.connect(addresses)
    worker = Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=[OneActivity, TenActivities, TenLocalActivities, OneLocalActivity],
        activities=[step],
        workflow_pollers=4,
        activity_pollers=4,
        disable_eager_activity_execution=not eager,
        disable_eager_workflow_tasks=not eager,
        batch_completions=batch,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with worker:
        await stop.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds a process has used so far (``None``: this one)."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    # Fields 14 and 15 of /proc/<pid>/stat (after the parenthesised command name).
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Roles:
    """The processes whose CPU a shape is charged with, by role."""

    servers: Sequence[int]
    workers: Sequence[int]

    def sample(self) -> dict[str, float]:
        return {
            "server": sum(_cpu_seconds(pid) for pid in self.servers),
            "worker": sum(_cpu_seconds(pid) for pid in self.workers),
            "client": _cpu_seconds(None),
            # Every process of the machine, the database's included (so only meaningful
            # on an otherwise idle machine): how close a configuration is to using both
            # cores, which the roles' own figures cannot say.
            "machine": _machine_busy_seconds(),
        }


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (``/proc/stat``: all but idle and
    iowait), summed over its cores."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


async def _measure(
    clients: Sequence[Client],
    shape: type,
    count: int,
    concurrency: int,
    roles: Roles | None = None,
) -> dict[str, object]:
    """Run ``count`` workflows of ``shape``, workflow ``i`` through client ``i`` (mod
    the clients, so the load spreads over the nodes). With ``roles``, also the CPU
    milliseconds each role (all its processes) spent per activity: a figure that,
    unlike the rates, hardly moves with other load on the machine."""
    latencies: list[float] = []
    limiter = asyncio.Semaphore(concurrency)
    prefix = uuid.uuid4().hex[:8]
    handles = []

    async def one(i: int) -> None:
        async with limiter:
            t0 = time.perf_counter()
            handle = await clients[i % len(clients)].start_workflow(
                shape, i, id=f"{prefix}-{i}", task_queue=TASK_QUEUE
            )
            result = await handle.result()
            latencies.append(time.perf_counter() - t0)
            expected = i + STEPS[shape]
            if result != expected:
                raise AssertionError(f"workflow {i} returned {result}, expected {expected}")
            handles.append(handle)

    cpu_before = roles.sample() if roles else {}
    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    elapsed = time.perf_counter() - started
    cpu_after = roles.sample() if roles else {}
    # Counted after the clock stopped, so describing runs does not load the server.
    events = sum([(await h.describe()).history_length for h in handles])
    activities_per_workflow = STEPS[shape]
    latencies.sort()
    return {
        "workflows": count,
        "seconds": round(elapsed, 3),
        "workflows_per_s": round(count / elapsed, 1),
        "activities_per_s": round(count * activities_per_workflow / elapsed, 1),
        "events_per_s": round(events / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 2),
        "machine_busy_cores": round((cpu_after["machine"] - cpu_before["machine"]) / elapsed, 2)
        if roles
        else None,
        "cpu_ms_per_activity": {
            role: round(
                (cpu_after[role] - cpu_before[role]) * 1000 / (count * activities_per_workflow), 3
            )
            for role in cpu_after
        },
    }


# ------------------------------------------------------------------ configurations


@dataclass(frozen=True, slots=True)
class Setup:
    """What serves the benchmark: ``start-dev`` (nodes None) or N ``start`` nodes."""

    nodes: int | None

    @classmethod
    def parse(cls, text: str) -> Setup:
        if text == "dev":
            return cls(None)
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: 'dev' or a number of nodes (1 or more)")
        return cls(int(text))

    @property
    def command(self) -> str:
        return "start-dev" if self.nodes is None else "start"

    @property
    def processes(self) -> int:
        return self.nodes or 1


def _rotated(addresses: Sequence[str], first: int) -> str:
    """Every address, node ``first`` (mod their count) first, as one connect string."""
    n = first % len(addresses)
    return ",".join([*addresses[n:], *addresses[:n]])


@contextlib.asynccontextmanager
async def _database(db_url: str | None) -> AsyncIterator[str]:
    """The URL a configuration runs on: a new SQLite file, or a new PostgreSQL
    database next to ``db_url``'s (dropped afterwards); another URL as it is."""
    if db_url is None:
        yield f"sqlite:///{Path(tempfile.mkdtemp(prefix='tideflow-bench-')) / 'bench.db'}"
        return
    url = make_url(db_url)
    if not url.drivername.startswith("postgres"):
        yield db_url
        return
    name = f"{url.database or 'tideflow'}_bench_{uuid.uuid4().hex[:8]}"
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield url.set(database=name).render_as_string(hide_password=False)
        finally:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _spawn_server(
    setup: Setup,
    index: int,
    db_url: str,
    port: int,
    sqlite_synchronous: str | None = None,
    metrics_port: int | None = None,
    local_poll_s: float = 0.0,
) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "tideflow.cli", "server", setup.command, "--db-url", db_url]
    if sqlite_synchronous and db_url.startswith("sqlite"):
        argv += ["--sqlite-synchronous", sqlite_synchronous]
    argv += ["--port", str(port), "--ip", "127.0.0.1"]
    argv += ["--log-level", os.environ.get("TIDEFLOW_BENCH_LOG", "WARNING")]
    if setup.nodes is not None:
        argv += ["--node-id", f"bench-node-{index}", "--auth", "off"]
        argv += ["--local-poll-seconds", str(local_poll_s)]
    if metrics_port is not None:
        argv += ["--metrics-port", str(metrics_port)]
    elif setup.nodes is None:
        argv.append("--no-ui")  # start-dev's web UI: not measured, and its port may be taken
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)


async def _listening(server: subprocess.Popen[bytes]) -> None:
    """Wait for the line a server prints once it serves (``readline`` in a thread: a
    node may log before it)."""
    assert server.stdout is not None
    while True:
        line = (await asyncio.to_thread(server.stdout.readline)).decode()
        if not line:
            raise RuntimeError(f"server exited with {server.wait()} before it listened")
        if "listening" in line:
            return


async def _balanced(db_url: str, node_ids: Sequence[str]) -> None:
    """Wait until every node holds its share of the shards (a node that joined last
    gets its share when the others shed theirs, a moment after it started)."""
    store = await HistoryStore.open(db_url)
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            now = now_micros()
            owners = Counter(r.owner for r in await store.read_shards() if not r.free_at(now))
            share = -(-store.shard_count // len(node_ids))
            if sum(owners.values()) == store.shard_count and all(
                0 < owners[n] <= share for n in node_ids
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"shards not balanced over {list(node_ids)}: {dict(owners)}")
            await asyncio.sleep(0.2)
    finally:
        await store.close()


def _matching_counts(metrics_ports: Sequence[int]) -> dict[str, float]:
    """Where the tasks went over the whole run, summed over the nodes (their /metrics):
    tasks dispatched by kind of match (sync, backlog, local: on the run's own node for
    another node's queue) and the RPCs served by method (a call forwarded to another
    node counts on both: against one node, the excess is the hops)."""
    counts: dict[str, float] = {}
    wanted = {
        "tideflow_task_dispatch_total": "match",
        "tideflow_rpc_requests_total": "method",
    }
    for port in metrics_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        for line in text.splitlines():
            name, _, rest = line.partition("{")
            label = wanted.get(name)
            if label is None or "} " not in rest:
                continue
            labels, _, value = rest.rpartition("} ")
            found = dict(part.split("=", 1) for part in labels.split(","))
            key = found.get(label, "").strip('"')
            counts[key] = counts.get(key, 0.0) + float(value)
    return counts


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


async def run_setup(setup: Setup, args: argparse.Namespace) -> dict[str, object]:
    """Start the servers and workers of ``setup``, measure, stop them."""
    workers_count = args.workers if args.workers is not None else setup.processes
    async with _database(args.db_url) as db_url:
        store = "sqlite" if db_url.startswith("sqlite") else db_url.split(":")[0]
        print(
            f"bench: server {setup.command}, {setup.processes} node(s), "
            f"{workers_count} worker(s), store {store}",
            file=sys.stderr,
            flush=True,
        )
        ports = [_free_port() for _ in range(setup.processes)]
        addresses = [f"127.0.0.1:{port}" for port in ports]
        metrics_ports = [_free_port() if args.matching_counts else None for _ in ports]
        servers: list[subprocess.Popen[bytes]] = []
        workers: list[subprocess.Popen[bytes]] = []
        try:
            # One after the other: the first node initialises the database.
            for index, port in enumerate(ports):
                servers.append(
                    _spawn_server(
                        setup,
                        index + 1,
                        db_url,
                        port,
                        args.sqlite_synchronous,
                        metrics_ports[index],
                        args.local_poll_seconds,
                    )
                )
                await asyncio.wait_for(_listening(servers[-1]), _START_TIMEOUT_S)
            if setup.nodes is not None:
                await _balanced(db_url, [f"bench-node-{i + 1}" for i in range(setup.processes)])
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            for i in range(workers_count):
                argv = [sys.executable, __file__, "--worker", _rotated(addresses, i)]
                argv += ["--no-eager"] if args.no_eager else []
                argv += ["--no-batch"] if args.no_batch else []
                workers.append(subprocess.Popen(argv, env=env))
            clients = [await Client.connect(_rotated(addresses, i)) for i in range(len(addresses))]
            roles = Roles([s.pid for s in servers], [w.pid for w in workers])
            result = await _measure_shapes(clients, args, roles)
            if args.matching_counts:
                result["matching"] = await asyncio.to_thread(
                    _matching_counts, [p for p in metrics_ports if p is not None]
                )
            for client in clients:
                await client.close()
        finally:
            _stop(workers)
            _stop(servers)
    return {
        "server": setup.command,
        "nodes": setup.processes,
        "store": store,
        "workers": workers_count,
        "concurrency": args.concurrency,
        "sqlite_synchronous": args.sqlite_synchronous or "NORMAL (server default)",
        "eager": not args.no_eager,
        "batch_completions": not args.no_batch,
        "local_poll_seconds": args.local_poll_seconds if setup.nodes is not None else None,
        **result,
    }


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return round(statistics.median(ordered) * 1000, 2), round(p99 * 1000, 2)


async def _serial_eager_start(client: Client, count: int) -> dict[str, object]:
    """One-activity workflows one at a time with eager workflow start: a worker in this
    process, on ``client``, takes each run's first workflow task from its start (no
    poll, one commit fewer). Alternated with plain starts through the same client,
    workflow by workflow, so that the machine's changing load falls on both alike:
    ``plain_*`` are those (the worker processes' pollers and this one compete for
    their first tasks)."""
    latencies: dict[bool, list[float]] = {False: [], True: []}
    prefix = uuid.uuid4().hex[:8]
    worker = Worker(client, task_queue=TASK_QUEUE, workflows=[OneActivity], activities=[step])
    async with worker:
        for i in range(2 * count + _WARM_UP):
            eager = i % 2 == 1
            t0 = time.perf_counter()
            handle = await client.start_workflow(
                OneActivity, i, id=f"{prefix}-{i}", task_queue=TASK_QUEUE, request_eager_start=eager
            )
            if await handle.result() != i + 1:
                raise AssertionError(f"workflow {prefix}-{i} returned a wrong result")
            if i >= _WARM_UP:
                latencies[eager].append(time.perf_counter() - t0)
    p50, p99 = _percentiles(latencies[True])
    plain_p50, plain_p99 = _percentiles(latencies[False])
    result: dict[str, object] = {"workflows": count, "p50_ms": p50, "p99_ms": p99}
    result.update(plain_p50_ms=plain_p50, plain_p99_ms=plain_p99)
    return result


async def _measure_shapes(
    clients: Sequence[Client], args: argparse.Namespace, roles: Roles
) -> dict[str, object]:
    # Warm up: workers connected and code paths loaded.
    await _measure(clients, OneActivity, 5, 5)
    # One at a time: the latency of a single workflow on an idle system.
    serial = await _measure(clients, OneActivity, min(args.workflows, 50), 1, roles)
    serial_eager = await _serial_eager_start(clients[0], min(args.workflows, 50))
    one = await _measure(clients, OneActivity, args.workflows, args.concurrency, roles)
    ten = await _measure(clients, TenActivities, args.workflows, args.concurrency, roles)
    result: dict[str, object] = {
        "one_activity_serial": serial,
        "one_activity_serial_eager_start": serial_eager,
        "one_activity": one,
        "ten_activities": ten,
    }
    if args.local_activities:
        # Ten local activities per workflow, and one at a time, reported apart.
        local = await _measure(clients, TenLocalActivities, args.workflows, args.concurrency, roles)
        result["ten_local_activities"] = local
        result["one_local_activity_serial"] = await _measure(
            clients, OneLocalActivity, min(args.workflows, 50), 1, roles
        )
    return result


def table(results: Sequence[dict[str, object]]) -> str:
    """The configurations side by side (Markdown)."""
    lines = [
        "| server | nodes | workers | store | 1-activity wf/s | 10-activity wf/s "
        "| 10-activity activities/s | 10-activity p50 ms | 10-activity p99 ms "
        "| 10-activity machine busy cores | 10-activity server CPU ms/activity |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        one, ten = r["one_activity"], r["ten_activities"]
        assert isinstance(one, dict) and isinstance(ten, dict)
        cells = [r["server"], r["nodes"], r["workers"], r["store"], one["workflows_per_s"]]
        cells += [ten["workflows_per_s"], ten["activities_per_s"], ten["p50_ms"], ten["p99_ms"]]
        cpu = ten.get("cpu_ms_per_activity") or {}
        cells += [ten.get("machine_busy_cores"), cpu.get("server")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    setups = args.table or [Setup(args.nodes)]
    results = []
    for setup in setups:
        result = await run_setup(setup, args)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.table:
        print(table(results), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workflows", type=int, default=200)
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: one per server process)",
    )
    parser.add_argument("--concurrency", type=int, default=100, help="workflows in flight at once")
    parser.add_argument("--db-url", default=None)
    parser.add_argument(
        "--sqlite-synchronous",
        choices=["NORMAL", "FULL"],
        default=None,
        help="start-dev on SQLite: PRAGMA synchronous (default: the server's, NORMAL)",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="run N `tideflow server start` nodes on the database instead of start-dev",
    )
    parser.add_argument(
        "--local-activities",
        action="store_true",
        help="also run ten-step workflows of local activities",
    )
    parser.add_argument(
        "--table",
        type=lambda text: [Setup.parse(part) for part in text.split(",")],
        default=None,
        metavar="dev,1,2,...",
        help="run each configuration ('dev' is start-dev, a number that many nodes) "
        "and print a table of them",
    )
    parser.add_argument(
        "--no-eager",
        action="store_true",
        help="workers without eager execution: every activity and workflow task "
        "through matching and a poll (what eager execution saves)",
    )
    parser.add_argument(
        "--no-batch",
        action="store_true",
        help="workers send each task completion as its own RPC (what batching saves)",
    )
    parser.add_argument(
        "--local-poll-seconds",
        type=float,
        default=0.0,
        help="nodes (--nodes, --table): local dispatch's turn, passed to every node "
        "(default 0: off, the server's default)",
    )
    parser.add_argument(
        "--matching-counts",
        action="store_true",
        help="report where the tasks went (the nodes' dispatch and internal RPC counters)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.nodes is not None and parsed.nodes < 1:
        parser.error(f"--nodes {parsed.nodes}: must be 1 or more")
    if parsed.worker:
        asyncio.run(run_worker(parsed.worker, eager=not parsed.no_eager, batch=not parsed.no_batch))
    else:
        asyncio.run(main(parsed))
