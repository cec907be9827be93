"""A worker process for the sticky-execution tests (tests/test_sticky.py).

    python tests/procs/sticky_worker_proc.py HOST:PORT TASK_QUEUE IDENTITY STICKY_TIMEOUT_MS

Registers ``Tally`` and runs a Worker (which caches runs and so asks for sticky
execution, with the given sticky schedule-to-start timeout) until SIGTERM/SIGINT or,
as the test does, SIGKILL. Prints ``worker ready`` on stdout once its pollers run.

The test imports ``Tally`` from this file too, so that an in-test worker runs the
very same workflow code.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from datetime import timedelta

from tideflow.worker_sdk import Client, Worker, workflow


@workflow.defn
class Tally:
    """Adds up ``add`` signals until it has ``count`` of them; returns the values and
    a deterministic random draw (so a replay that went wrong would show)."""

    def __init__(self) -> None:
        self.values: list[int] = []

    @workflow.run
    async def run(self, count: int) -> dict[str, object]:
        draw = workflow.random().randint(0, 10**9)
        for seen in range(count):
            await workflow.wait_condition(lambda seen=seen: len(self.values) > seen)
        return {"values": self.values, "sum": sum(self.values), "draw": draw}

    @workflow.signal
    def add(self, value: int) -> None:
        self.values.append(value)


async def _main(address: str, task_queue: str, identity: str, sticky_timeout_ms: str) -> None:
    client = await Client.connect(address, identity=identity)
    worker = Worker(
        client,
        task_queue=task_queue,
        workflows=[Tally],
        identity=identity,
        sticky_queue_schedule_to_start_timeout=timedelta(milliseconds=int(sticky_timeout_ms)),
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
    if len(sys.argv) != 5:
        sys.exit(f"usage: {sys.argv[0]} HOST:PORT TASK_QUEUE IDENTITY STICKY_TIMEOUT_MS")
    asyncio.run(_main(*sys.argv[1:5]))
