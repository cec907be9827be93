"""A worker process running a parent and its child workflow, for the crash test of
tests/test_composition.py (the parent's worker dies while the child runs).

    python tests/procs/child_worker_proc.py HOST:PORT TASK_QUEUE IDENTITY

Registers ``CrashParent``, ``CrashChild`` and the activity ``child_step`` and runs a
Worker until SIGTERM/SIGINT (or SIGKILL, as the test does). Prints ``worker ready``
on stdout once its pollers are running.

``CrashParent`` starts ``CrashChild`` (same task queue, id from its input), waits for
its result and then runs one more activity. The child runs ``child_step``, which
writes a marker file (path from its input) on every attempt and, on attempt 1 only,
blocks for 300 s: the test kills this process while the child is in that attempt.
The sticky schedule-to-start timeout is short, so the tasks that were bound to this
worker's sticky queue move to the normal queue soon after it died.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from tideflow.worker_sdk import Client, RetryPolicy, Worker, activity, workflow

# Short, so the attempt abandoned by the killed worker is retried quickly.
START_TO_CLOSE = timedelta(seconds=2)
RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=100), maximum_attempts=5)
STICKY_TIMEOUT = timedelta(milliseconds=300)


@activity.defn
async def child_step(job: dict[str, Any]) -> str:
    info = activity.info()
    marker = Path(f"{job['marker']}.attempt{info.attempt}")
    # Write-then-rename: the test never sees a half-written marker.
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(
        json.dumps({"pid": os.getpid(), "attempt": info.attempt, "workflow": info.workflow_id})
    )
    tmp.replace(marker)
    if info.attempt == 1:
        await asyncio.sleep(300)
    return f"{job['value']}:step-on-attempt-{info.attempt}"


@activity.defn
async def parent_step(text: str) -> str:
    return f"{text}:parent-step"


@workflow.defn
class CrashChild:
    @workflow.run
    async def run(self, job: dict[str, Any]) -> str:
        result: str = await workflow.execute_activity(
            child_step, job, start_to_close_timeout=START_TO_CLOSE, retry_policy=RETRY
        )
        return f"child({result})"


@workflow.defn
class CrashParent:
    @workflow.run
    async def run(self, job: dict[str, Any]) -> str:
        child_result: str = await workflow.execute_child_workflow(
            CrashChild.run, job, id=job["child_id"], task_timeout=timedelta(seconds=2)
        )
        result: str = await workflow.execute_activity(
            parent_step, child_result, start_to_close_timeout=START_TO_CLOSE, retry_policy=RETRY
        )
        return result


async def _main(address: str, task_queue: str, identity: str) -> None:
    client = await Client.connect(address, identity=identity)
    worker = Worker(
        client,
        task_queue=task_queue,
        workflows=[CrashParent, CrashChild],
        activities=[child_step, parent_step],
        identity=identity,
        sticky_queue_schedule_to_start_timeout=STICKY_TIMEOUT,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with worker:
        print("worker ready", flush=True)
        await stop.wait()
    await client.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if len(sys.argv) != 4:
        sys.exit(f"usage: {sys.argv[0]} HOST:PORT TASK_QUEUE IDENTITY")
    asyncio.run(_main(*sys.argv[1:4]))
