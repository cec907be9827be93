"""Throughput benchmark: workflows of one activity and of ten sequential activities
(and, with ``--local-activities``, of ten sequential local activities).

Starts a tideflow server process (SQLite file by default, ``--db-url`` for PostgreSQL)
and ``--workers`` worker processes, runs ``--workflows`` workflows of each shape
concurrently from this process, and prints one JSON line with workflows/s, events/s,
activities/s and p50/p99 start-to-result latency per shape.

    python bench/throughput.py --workflows 200 --workers 1
    python bench/throughput.py --db-url postgresql://postgres@127.0.0.1/bench
    python bench/throughput.py --workflows 200 --local-activities
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

from tideflow.worker_sdk import Client, Worker, activity, workflow

TASK_QUEUE = "bench"


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


# Activities (local or not) per workflow of each shape.
STEPS: dict[type, int] = {OneActivity: 1, TenActivities: 10, TenLocalActivities: 10}


async def run_worker(address: str) -> None:
    client = await Client.connect(address)
    worker = Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=[OneActivity, TenActivities, TenLocalActivities],
        activities=[step],
        workflow_pollers=4,
        activity_pollers=4,
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


async def _measure(client: Client, shape: type, count: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    limiter = asyncio.Semaphore(concurrency)
    prefix = uuid.uuid4().hex[:8]
    handles = []

    async def one(i: int) -> None:
        async with limiter:
            t0 = time.perf_counter()
            handle = await client.start_workflow(
                shape, i, id=f"{prefix}-{i}", task_queue=TASK_QUEUE
            )
            result = await handle.result()
            latencies.append(time.perf_counter() - t0)
            expected = i + STEPS[shape]
            if result != expected:
                raise AssertionError(f"workflow {i} returned {result}, expected {expected}")
            handles.append(handle)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    elapsed = time.perf_counter() - started
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
    }


async def _measure_local(client: Client, args: argparse.Namespace) -> dict[str, float] | None:
    """Ten local activities per workflow (``--local-activities``), reported apart."""
    if not args.local_activities:
        return None
    return await _measure(client, TenLocalActivities, args.workflows, args.concurrency)


async def main(args: argparse.Namespace) -> dict[str, object]:
    tmp = tempfile.mkdtemp(prefix="tideflow-bench-")
    db_url = args.db_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tideflow.cli",
            "server",
            "start-dev",
            "--db-url",
            db_url,
            "--port",
            str(port),
            "--log-level",
            os.environ.get("TIDEFLOW_BENCH_LOG", "WARNING"),
        ],
        stdout=subprocess.PIPE,
        env=env,
    )
    workers: list[subprocess.Popen[bytes]] = []
    try:
        assert server.stdout is not None
        line = server.stdout.readline().decode()
        if "listening" not in line:
            raise RuntimeError(f"server did not start: {line!r}")
        address = f"127.0.0.1:{port}"
        for _ in range(args.workers):
            workers.append(
                subprocess.Popen([sys.executable, __file__, "--worker", address], env=env)
            )
        client = await Client.connect(address)
        # Warm up: workers connected and code paths loaded.
        await _measure(client, OneActivity, 5, 5)
        # One at a time: the latency of a single workflow on an idle system.
        serial = await _measure(client, OneActivity, min(args.workflows, 50), 1)
        one = await _measure(client, OneActivity, args.workflows, args.concurrency)
        ten = await _measure(client, TenActivities, args.workflows, args.concurrency)
        local = await _measure_local(client, args)
        await client.close()
        return {
            "store": "sqlite" if db_url.startswith("sqlite") else db_url.split(":")[0],
            "workers": args.workers,
            "concurrency": args.concurrency,
            "one_activity_serial": serial,
            "one_activity": one,
            "ten_activities": ten,
            **({"ten_local_activities": local} if local else {}),
        }
    finally:
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        for proc in workers:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workflows", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=100, help="workflows in flight at once")
    parser.add_argument("--db-url", default=None)
    parser.add_argument(
        "--local-activities",
        action="store_true",
        help="also run ten-step workflows of local activities",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.worker:
        asyncio.run(run_worker(parsed.worker))
    else:
        print(json.dumps(asyncio.run(main(parsed))), flush=True)
