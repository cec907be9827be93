"""A worker in its own process, for crash tests (tests/test_crash_recovery.py).

    python tests/procs/worker_proc.py HOST:PORT TASK_QUEUE IDENTITY

Registers ``CrashyWorkflow`` and its activity ``stall_on_first_attempt`` and runs a
Worker until SIGTERM/SIGINT (or, as the tests do, SIGKILL). Prints ``worker ready``
on stdout once its pollers are running.

The activity writes a marker file (path from its input) on every attempt, so a test
can see which attempt is running where, and then, on attempt 1 only, blocks for 300 s:
long enough that only a crash of this process and the server's start-to-close timeout
can end it. Later attempts return at once.
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

# Kept short so the test is quick: attempt 1 is abandoned (its worker is killed) and
# the server retries it after this timeout.
START_TO_CLOSE = timedelta(seconds=2)
RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=100), maximum_attempts=5)


@activity.defn
async def stall_on_first_attempt(job: dict[str, Any]) -> str:
    info = activity.info()
    marker = Path(f"{job['marker']}.attempt{info.attempt}")
    # Write-then-rename: the test never sees a half-written marker.
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "attempt": info.attempt}))
    tmp.replace(marker)
    if info.attempt == 1:
        await asyncio.sleep(300)
    return f"{job['value']}:done-on-attempt-{info.attempt}"


@workflow.defn
class CrashyWorkflow:
    @workflow.run
    async def run(self, job: dict[str, Any]) -> str:
        result: str = await workflow.execute_activity(
            stall_on_first_attempt,
            job,
            start_to_close_timeout=START_TO_CLOSE,
            retry_policy=RETRY,
        )
        return result


async def _main(address: str, task_queue: str, identity: str) -> None:
    client = await Client.connect(address, identity=identity)
    worker = Worker(
        client,
        task_queue=task_queue,
        workflows=[CrashyWorkflow],
        activities=[stall_on_first_attempt],
        identity=identity,
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
