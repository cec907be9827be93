"""Timer benchmark: many workflows sleeping to one instant.

Starts a tideflow server process (SQLite file by default, ``--db-url`` for PostgreSQL)
and ``--workers`` worker processes, starts ``--workflows`` workflows that each
``workflow.sleep`` until the same wall-clock instant (``--lead`` seconds ahead, so all
of them sleep before it), waits for all of them to finish, and prints one JSON line:

- ``timer_lateness_ms``: p50/p99/max of each TimerFired event's time minus its timer's
  due time (the TimerStarted event's time plus the timer's duration): the timer queue
  and the FireTimer transition alone;
- ``completion_lateness_ms``: the same for the WorkflowExecutionCompleted event minus the
  instant: the fire, the workflow task and the worker's reply;
- ``fire_committed_lateness_ms``: p50/p99/max of each fire's commit time minus its due
  time, for every timer the server fired (workflow task and sticky timeouts too), from
  the line the timer queue logs when it stops;
- ``peak_timer_rows_in_memory``: the most timer rows the server's timer queue held at
  once (the line the server logs when it stops), against its limit.

With ``--nodes N`` the server is N ``tideflow server start`` nodes on the one database
(a SQLite file too): each fires the timers of the shards it holds, so the fires spread
over N processes; the client and the workers connect to every node, and the
``fire_committed_lateness_ms`` / ``peak_timer_rows_in_memory`` figures are per node.

    python bench/timers.py --workflows 10000
    python bench/timers.py --workflows 10000 --nodes 2
    python bench/timers.py --workflows 2000 --db-url postgresql://postgres@127.0.0.1/bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.history import HistoryStore, now_micros
from tideflow.worker_sdk import Client, Worker, workflow

TASK_QUEUE = "bench-timers"
_PEAK_LINE = re.compile(r"at most (\d+) timer rows were in memory \(limit (\d+)\)")
_COMMITTED_LINE = re.compile(
    r"committed after due p50 ([\d.]+) ms, p99 ([\d.]+) ms, max ([\d.]+) ms \(last (\d+)\)"
)


@workflow.defn
class SleepUntil:
    @workflow.run
    async def run(self, due_s: float) -> None:
        await workflow.sleep(max(due_s - workflow.now().timestamp(), 0.001))


async def run_worker(address: str) -> None:
    client = await Client.connect(address)
    worker = Worker(client, task_queue=TASK_QUEUE, workflows=[SleepUntil], workflow_pollers=8)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with worker:
        await stop.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentiles(values_us: list[int]) -> dict[str, float]:
    ordered = sorted(values_us)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {
        "p50_ms": round(statistics.median(ordered) / 1000, 1),
        "p99_ms": round(p99 / 1000, 1),
        "max_ms": round(ordered[-1] / 1000, 1),
    }


def _event(events: list[HistoryEvent], event_type: int) -> HistoryEvent:
    return next(e for e in events if e.event_type == event_type)


async def _run(client: Client, args: argparse.Namespace) -> dict[str, object]:
    prefix = uuid.uuid4().hex[:8]
    due_s = time.time() + args.lead
    limiter = asyncio.Semaphore(args.concurrency)

    async def start(i: int) -> None:
        async with limiter:
            await client.start_workflow(
                SleepUntil, due_s, id=f"{prefix}-{i}", task_queue=TASK_QUEUE
            )

    await asyncio.gather(*(start(i) for i in range(args.workflows)))
    started_by = time.time()
    if started_by >= due_s:
        raise RuntimeError(f"starting took longer than --lead {args.lead}s: raise it")
    await asyncio.sleep(due_s - time.time())

    # Polled rather than awaited per run: 10,000 parked result() calls would load the
    # server while it fires.
    running = f"ExecutionStatus = 'Running' AND WorkflowId STARTS_WITH '{prefix}-'"
    while True:
        if not await client.count_workflows(running):
            break
        await asyncio.sleep(1.0)

    async def history(i: int) -> list[HistoryEvent]:
        async with limiter:
            handle = client.get_workflow_handle(f"{prefix}-{i}")
            return (await handle.fetch_history()).events

    histories = await asyncio.gather(*(history(i) for i in range(args.workflows)))
    timer_late: list[int] = []
    completion_late: list[int] = []
    armed_late = 0
    due_us = int(due_s * 1_000_000)
    for events in histories:
        started = _event(events, EventType.EVENT_TYPE_TIMER_STARTED)
        fired = _event(events, EventType.EVENT_TYPE_TIMER_FIRED)
        done = _event(events, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED)
        armed_at = started.event_time.ToMicroseconds()
        timer_due = armed_at + (
            started.timer_started_event_attributes.start_to_fire_timeout.ToMicroseconds()
        )
        armed_late += armed_at >= due_us
        timer_late.append(fired.event_time.ToMicroseconds() - timer_due)
        completion_late.append(done.event_time.ToMicroseconds() - due_us)
    return {
        "workflows": args.workflows,
        "started_before_instant_s": round(due_s - started_by, 1),
        "timers_armed_after_instant": armed_late,
        "timer_lateness_ms": _percentiles(timer_late),
        "completion_lateness_ms": _percentiles(completion_late),
    }


def _peak_from_log(log_path: Path) -> dict[str, int] | None:
    match = _PEAK_LINE.search(log_path.read_text(errors="replace"))
    if match is None:
        return None
    return {"peak": int(match.group(1)), "limit": int(match.group(2))}


def _committed_from_log(log_path: Path) -> dict[str, float] | None:
    """When each fire's commit landed, from the queue's stop line: all timers the
    server fired (workflow task and sticky timeouts too), not only the sleeps."""
    match = _COMMITTED_LINE.search(log_path.read_text(errors="replace"))
    if match is None:
        return None
    p50, p99, most, fires = match.groups()
    return {"p50_ms": float(p50), "p99_ms": float(p99), "max_ms": float(most), "fires": int(fires)}


def _spawn_server(
    args: argparse.Namespace, db_url: str, index: int, log_path: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """``start-dev``, or node ``index`` of ``--nodes``; its address once it listens."""
    port = _free_port()
    command = [sys.executable, "-m", "tideflow.cli", "server"]
    if args.nodes is None:
        command += ["start-dev", "--db-url", db_url, "--no-ui"]
    else:
        command += ["start", "--db-url", db_url, "--auth", "off"]
        command += ["--node-id", f"bench-node-{index}"]
    # INFO: the timer queue's stop line reports the peak of rows it held.
    command += ["--port", str(port), "--log-level", "INFO"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, env=env)
    assert server.stdout is not None
    line = server.stdout.readline().decode()
    if "listening" not in line:
        raise RuntimeError(f"server did not start: {line!r}")
    return server, f"127.0.0.1:{port}"


async def _shards_spread(db_url: str, nodes: int) -> None:
    """Wait until each of the ``nodes`` nodes holds shards and no shard is free (a node
    that joined later gets its share a moment after it started)."""
    store = await HistoryStore.open(db_url)
    try:
        for _ in range(600):
            now = now_micros()
            held = [r.owner for r in await store.read_shards() if not r.free_at(now)]
            if len(held) == store.shard_count and len(set(held)) == nodes:
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the shards did not spread over {nodes} nodes")
    finally:
        await store.close()


async def main(args: argparse.Namespace) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="tideflow-bench-"))
    db_url = args.db_url or f"sqlite:///{tmp / 'bench.db'}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    logs = [tmp / f"server-{i + 1}.log" for i in range(args.nodes or 1)]
    servers: list[subprocess.Popen[bytes]] = []
    workers: list[subprocess.Popen[bytes]] = []
    try:
        addresses = []
        # One after the other: the first node initialises the database.
        for index, log_path in enumerate(logs):
            server, address = _spawn_server(args, db_url, index + 1, log_path)
            servers.append(server)
            addresses.append(address)
        if args.nodes is not None:
            await _shards_spread(db_url, args.nodes)
        address = ",".join(addresses)
        for _ in range(args.workers):
            workers.append(
                subprocess.Popen([sys.executable, __file__, "--worker", address], env=env)
            )
        client = await Client.connect(address)
        result = await _run(client, args)
        await client.close()
    finally:
        # Workers first: the servers' stop lines are the fire figures.
        for group, grace_s in ((workers, 10), (servers, 30)):
            for proc in group:
                proc.send_signal(signal.SIGTERM)
            for proc in group:
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
    per_node = args.nodes is not None
    return {
        "store": "sqlite" if db_url.startswith("sqlite") else db_url.split(":")[0],
        "server": "start-dev" if args.nodes is None else "start",
        "nodes": args.nodes or 1,
        "workers": args.workers,
        **result,
        "peak_timer_rows_in_memory": [_peak_from_log(p) for p in logs]
        if per_node
        else _peak_from_log(logs[0]),
        "fire_committed_lateness_ms": [_committed_from_log(p) for p in logs]
        if per_node
        else _committed_from_log(logs[0]),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workflows", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--lead",
        type=float,
        default=None,
        help="seconds from the first start to the instant (default: 15 + 6 ms per workflow)",
    )
    parser.add_argument("--concurrency", type=int, default=100, help="starts in flight at once")
    parser.add_argument("--db-url", default=None)
    parser.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="run N `tideflow server start` nodes on the database instead of start-dev",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.worker:
        asyncio.run(run_worker(parsed.worker))
    else:
        if parsed.lead is None:
            parsed.lead = 15 + 0.006 * parsed.workflows
        print(json.dumps(asyncio.run(main(parsed))), flush=True)
