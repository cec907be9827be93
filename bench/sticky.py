"""Sticky execution benchmark: does a workflow task cost the same at event 100 and at
event 4,000?

One workflow runs ``--steps`` sequential activities (6 history events per step). The
worker runs in this process and times every workflow task it handles (the processing
of the task plus the server round trip that completes it); the server is a separate
process on a fresh SQLite file. The JSON line reports the median per-task cost in a
window around event 100 and around event 4,000, and the median step time (from the
history's own event times). ``--no-sticky`` sets ``max_cached_workflows=0``: every task
then ships and replays the whole history, for comparison.

    python bench/sticky.py                 # 2,000 steps with sticky execution
    python bench/sticky.py --no-sticky --steps 700
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
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
from typing import Any

from tideflow.api.v1.history_pb2 import EventType
from tideflow.api.v1.service_pb2 import PollWorkflowTaskResponse
from tideflow.worker_sdk import Client, Worker, WorkerInterceptor, activity, workflow
from tideflow.worker_sdk.interceptor import WorkflowTaskHandler


@activity.defn
async def step(value: int) -> int:
    return value + 1


@workflow.defn
class LongSequence:
    @workflow.run
    async def run(self, steps: int) -> int:
        value = 0
        for _ in range(steps):
            value = await workflow.execute_activity(
                step, value, start_to_close_timeout=timedelta(seconds=30)
            )
        return value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TaskTimer(WorkerInterceptor):
    """(last event id, seconds) of every workflow task the worker handles."""

    def __init__(self) -> None:
        self.samples: list[tuple[int, float]] = []

    def intercept_workflow_task(self, next: WorkflowTaskHandler) -> WorkflowTaskHandler:
        async def timed(task: PollWorkflowTaskResponse) -> None:
            started = time.perf_counter()
            await next(task)
            last = task.history.events[-1].event_id if task.history.events else 0
            self.samples.append((last, time.perf_counter() - started))

        return timed


def _window(samples: list[tuple[int, float]], around: int, width: int = 300) -> float | None:
    picked = [cost for event_id, cost in samples if abs(event_id - around) <= width]
    return round(statistics.median(picked) * 1000, 3) if picked else None


async def main(args: argparse.Namespace) -> dict[str, Any]:
    db = Path(tempfile.mkdtemp(prefix="tideflow-sticky-")) / "bench.db"
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tideflow.cli",
            "server",
            "start-dev",
            "--db",
            str(db),
            "--port",
            str(port),
            "--log-level",
            "WARNING",
            "--no-ui",
        ],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    timer = TaskTimer()
    try:
        assert server.stdout is not None
        if "listening" not in server.stdout.readline().decode():
            raise RuntimeError("server did not start")
        client = await Client.connect(f"127.0.0.1:{port}")
        async with Worker(
            client,
            task_queue="sticky-bench",
            workflows=[LongSequence],
            activities=[step],
            max_cached_workflows=0 if args.no_sticky else 100,
            interceptors=[timer],
        ):
            began = time.perf_counter()
            handle = await client.start_workflow(
                LongSequence.run, args.steps, id=f"long-{uuid.uuid4()}", task_queue="sticky-bench"
            )
            result = await handle.result()
            elapsed = time.perf_counter() - began
        history = await handle.fetch_history()
        await client.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    assert result == args.steps, result
    scheduled = [
        (e.event_id, e.event_time.ToMicroseconds())
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    steps = [(b[0], (b[1] - a[1]) / 1e6) for a, b in itertools.pairwise(scheduled)]
    return {
        "sticky": not args.no_sticky,
        "steps": args.steps,
        "events": len(history.events),
        "seconds": round(elapsed, 2),
        "task_ms_at_event_100": _window(timer.samples, 100, 60),
        "task_ms_at_event_4000": _window(timer.samples, 4000),
        "step_ms_at_event_100": _window(steps, 100, 60),
        "step_ms_at_event_4000": _window(steps, 4000),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--no-sticky", action="store_true")
    print(json.dumps(asyncio.run(main(parser.parse_args()))), flush=True)
