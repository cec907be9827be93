"""Memory: the server's RSS with many open runs idle, waiting on a signal.

Starts ``tideflow server start-dev`` (a new SQLite file, or ``--db-url``) and one worker
process, starts ``--runs`` workflows that each wait for a signal (``--concurrency``
starts in flight), and prints one JSON line: the server's resident set size (VmRSS)
before the first start and after each quarter of the runs (sampled once the worker has
taken every workflow task: the runs idle, none queued), and the RSS per thousand runs
over the last three quarters. An idle run holds no per-run structure on the server
beyond the engine's bounded cache of mutable states (``state_cache_size``, 10,000 runs
by default): the RSS grows until that cache is full and then stays flat.

    .venv/bin/python bench/memory.py --runs 100000
    .venv/bin/python bench/memory.py --runs 20000 --db-url postgresql://postgres@127.0.0.1/postgres

``--trace DIR`` runs the server under tracemalloc (bench/_traced_server.py, with
``--state-cache-size``) and prints the growth between the first and the last quarter by
line, by traceback and by live object type (bench/tracediff.py):

    .venv/bin/python bench/memory.py --runs 12000 --trace /tmp/memtrace --state-cache-size 1000

``--probe DIR`` is the same without tracemalloc (bench/_memory_probe.py): after each
quarter the server's resident memory by allocator (glibc malloc in use and free but
kept, SQLite's share of it, pymalloc's arenas, the mappings), and at the end its RSS
after ``malloc_trim(0)``:

    .venv/bin/python bench/memory.py --runs 100000 --probe /tmp/memprobe

The worker caches at most ``max_cached_workflows`` instances (1,000 by default) and
replays the others when their signal comes; its RSS is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from throughput import Setup, _database, _free_port, _listening, _spawn_server, _stop
from tracediff import memory_quarters, snapshot_diff

from tideflow.worker_sdk import Client, Worker, workflow
from tideflow.worker_sdk.task_queues import describe_task_queue

TASK_QUEUE = "bench-memory"


@workflow.defn
class WaitForSignal:
    def __init__(self) -> None:
        self.released = False

    @workflow.signal
    def release(self) -> None:
        self.released = True

    @workflow.run
    async def run(self) -> str:
        await workflow.wait_condition(lambda: self.released)
        return "released"


async def run_worker(address: str) -> None:
    client = await Client.connect(address)
    worker = Worker(client, task_queue=TASK_QUEUE, workflows=[WaitForSignal], workflow_pollers=8)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with worker:
        await stop.wait()


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no {field} for process {pid}")


async def _drained(client: Client) -> float:
    """Wait until no workflow task waits in the queue's backlog (the worker has taken
    every first workflow task, so the runs are idle, not queued); returns the wait.
    Without this the samples would count the backlog of a worker that lags the starts
    (about 600 bytes a waiting task), not idle runs."""
    began = time.perf_counter()
    while True:
        if not (await describe_task_queue(client, TASK_QUEUE)).backlog_count_hint:
            break
        await asyncio.sleep(0.5)
    # The last tasks taken are being handled: let their completions land.
    await asyncio.sleep(2)
    return round(time.perf_counter() - began, 1)


async def _start_runs(client: Client, prefix: str, first: int, count: int, limit: int) -> None:
    gate = asyncio.Semaphore(limit)

    async def one(i: int) -> None:
        async with gate:
            await client.start_workflow(WaitForSignal, id=f"{prefix}-{i}", task_queue=TASK_QUEUE)

    await asyncio.gather(*(one(i) for i in range(first, first + count)))


def _spawn_traced_server(
    args: argparse.Namespace, db_url: str, port: int
) -> subprocess.Popen[bytes]:
    """The server under tracemalloc (bench/_traced_server.py): slower, so the cache is
    usually made smaller (``--state-cache-size``) to see the growth past it sooner."""
    Path(args.trace).mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(Path(__file__).with_name("_traced_server.py")), args.trace]
    argv += [str(args.state_cache_size), "server", "start-dev", "--db-url", db_url, "--no-ui"]
    argv += ["--port", str(port), "--ip", "127.0.0.1", "--log-level", "WARNING"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.probe:
        env["TIDEFLOW_TRACE_FRAMES"] = "0"
    return subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)


async def _snapshot(args: argparse.Namespace, pid: int, n: int | None) -> None:
    """Ask the traced server for snapshot ``n`` (None: its allocators' figures, then
    after ``malloc_trim``) and wait until it is written."""
    if not args.trace:
        return
    os.kill(pid, signal.SIGUSR1 if n is not None else signal.SIGUSR2)
    done = Path(args.trace) / (f"objects-{n}.json" if n is not None else "memory-trim.json")
    while True:
        if done.exists():
            return
        await asyncio.sleep(0.5)


async def main(args: argparse.Namespace) -> None:
    async with _database(args.db_url) as db_url:
        port = _free_port()
        if args.trace:
            server = _spawn_traced_server(args, db_url, port)
        else:
            server = _spawn_server(Setup(None), 1, db_url, port)
        worker: subprocess.Popen[bytes] | None = None
        try:
            await asyncio.wait_for(_listening(server), 60)
            address = f"127.0.0.1:{port}"
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            worker = subprocess.Popen([sys.executable, __file__, "--worker", address], env=env)
            client = await Client.connect(address)
            prefix = uuid.uuid4().hex[:8]
            samples = [{"runs": 0, "server_rss_mb": rss_mb(server.pid)}]
            await _snapshot(args, server.pid, 0)
            started = time.perf_counter()
            quarter = args.runs // 4
            for step in range(4):
                await _start_runs(client, prefix, step * quarter, quarter, args.concurrency)
                drain_s = await _drained(client)
                samples.append(
                    {
                        "runs": (step + 1) * quarter,
                        "backlog_drain_s": drain_s,
                        "server_rss_mb": rss_mb(server.pid),
                        "server_rss_anon_mb": rss_mb(server.pid, "RssAnon"),
                        "server_rss_file_shmem_mb": round(
                            rss_mb(server.pid, "RssFile") + rss_mb(server.pid, "RssShmem"), 1
                        ),
                        "worker_rss_mb": rss_mb(worker.pid),
                    }
                )
                await _snapshot(args, server.pid, step + 1)
            await _snapshot(args, server.pid, None)
            elapsed = time.perf_counter() - started
            # Still served: one run released and its result read back.
            handle = client.get_workflow_handle(f"{prefix}-0")
            await handle.signal(WaitForSignal.release)
            assert await handle.result() == "released"
            await client.close()
        finally:
            _stop([p for p in (worker, server) if p is not None])
    growth = samples[-1]["server_rss_mb"] - samples[1]["server_rss_mb"]
    print(
        json.dumps(
            {
                "runs": quarter * 4,
                "store": "sqlite" if db_url.startswith("sqlite") else "postgresql",
                "seconds_starts_and_drains": round(elapsed, 1),
                "samples": samples,
                "server_rss_mb_per_1000_runs_after_first_quarter": round(
                    growth * 1000 / (quarter * 3), 3
                ),
            }
        ),
        flush=True,
    )
    if args.trace:
        print(memory_quarters(Path(args.trace), 4), flush=True)
        if not args.probe:
            print(snapshot_diff(Path(args.trace), 1, 4), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--db-url", default=None)
    parser.add_argument(
        "--trace",
        default=None,
        metavar="DIR",
        help="run the server under tracemalloc; write a snapshot to DIR after each quarter "
        "and print the top growths between the first and the last quarter",
    )
    parser.add_argument(
        "--probe",
        default=None,
        metavar="DIR",
        help="as --trace, without tracemalloc: only the allocators' figures (malloc, "
        "SQLite, pymalloc, mappings) after each quarter, at the server's own speed",
    )
    parser.add_argument(
        "--state-cache-size",
        type=int,
        default=10_000,
        help="the server's state_cache_size under --trace (the default server otherwise)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    parsed.trace = parsed.trace or parsed.probe
    if parsed.worker:
        asyncio.run(run_worker(parsed.worker))
    else:
        asyncio.run(main(parsed))
