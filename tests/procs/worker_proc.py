"""A worker in its own process, for the tests that SIGKILL workers.

    python tests/procs/worker_proc.py HOST:PORT TASK_QUEUE IDENTITY FLAVOUR
        [--sticky-timeout-ms N] [--tier T] [--labels a,b] [--memory-mb N] [--cores N]

Runs a Worker with the workflows and activities of ``FLAVOUR`` until SIGTERM/SIGINT
(or SIGKILL, as the tests do) and prints ``worker ready`` on stdout once its pollers
run. ``helpers.Processes.start_worker`` starts it. Flavours:

- ``crashy`` (tests/test_crash_recovery.py): ``CrashyWorkflow`` runs the activity
  ``stall_on_first_attempt`` once.
- ``child`` (tests/test_child_workflows.py): ``CrashParent`` starts ``CrashChild`` (same
  task queue, id from its input), waits for its result, then runs ``parent_step``;
  the child runs ``child_step``.
- ``sticky`` (tests/test_sticky.py): ``Tally`` adds up signals. The test imports
  ``Tally`` from this file too, so an in-test worker runs the very same code.
- ``chaos`` (tests/test_chaos.py): ``ChaosWorkflow`` runs a quick activity, a timer,
  a slow heartbeating activity and a ``ChaosChild`` (an activity and a timer), and
  collects ``add`` signals; its result is a function of its input and the signals.
  Every execution of a chaos activity appends one line to the ledger file named in
  its input, so the test counts re-executions after kills.
- ``local`` (tests/test_local_activities_crash.py): ``LocalCrashy`` runs the local
  activity ``local_stall_once``, which writes ``<marker>.<pid>`` on every execution
  and blocks for 300 s on the first one only (the first to create ``<marker>.first``).
- ``placed`` (tests/test_placement.py): only the activity ``placed.where``, which
  returns this process's pid; ``--tier`` and the capability flags are what the worker
  advertises (README "Placement").

``stall_on_first_attempt`` and ``child_step`` write a marker file (path from their
input, ``.attemptN`` appended) on every attempt, so a test sees which attempt runs in
which process, and on attempt 1 only block for 300 s: only a crash of this process
and the server's start-to-close timeout end that attempt. Later attempts return at
once. The sticky schedule-to-start timeout is short by default, so tasks bound to a
killed worker's sticky queue move to the normal queue soon after it died.
"""

from __future__ import annotations

import argparse
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


async def _mark_attempt_then_stall_once(job: dict[str, Any]) -> int:
    """Write this attempt's marker (write-then-rename: the test never reads half a
    file); on attempt 1 block until the process dies. Returns the attempt."""
    info = activity.info()
    marker = Path(f"{job['marker']}.attempt{info.attempt}")
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(
        json.dumps({"pid": os.getpid(), "attempt": info.attempt, "workflow": info.workflow_id})
    )
    tmp.replace(marker)
    if info.attempt == 1:
        await asyncio.sleep(300)
    return info.attempt


# ------------------------------------------------------------------ crashy


@activity.defn
async def stall_on_first_attempt(job: dict[str, Any]) -> str:
    attempt = await _mark_attempt_then_stall_once(job)
    return f"{job['value']}:done-on-attempt-{attempt}"


@workflow.defn
class CrashyWorkflow:
    @workflow.run
    async def run(self, job: dict[str, Any]) -> str:
        result: str = await workflow.execute_activity(
            stall_on_first_attempt, job, start_to_close_timeout=START_TO_CLOSE, retry_policy=RETRY
        )
        return result


# ------------------------------------------------------------------- child


@activity.defn
async def child_step(job: dict[str, Any]) -> str:
    attempt = await _mark_attempt_then_stall_once(job)
    return f"{job['value']}:step-on-attempt-{attempt}"


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


# ------------------------------------------------------------------ sticky


@workflow.defn
class Tally:
    """Adds up ``add`` signals until it has ``count`` of them; returns the values and
    a deterministic random draw (so a replay that went wrong would show)."""

    def __init__(self) -> None:
        self.values: list[int] = []

    @workflow.run
    async def run(self, count: int) -> dict[str, object]:
        draw = workflow.random().randint(0, 10**9)
        await workflow.wait_condition(lambda: len(self.values) >= count)
        return {"values": self.values, "sum": sum(self.values), "draw": draw}

    @workflow.signal
    def add(self, value: int) -> None:
        self.values.append(value)


# ------------------------------------------------------------------- chaos

# Unlimited attempts: a kill must only ever delay an activity, never fail it. The
# short heartbeat timeout notices a killed worker's slow attempt quickly.
CHAOS_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=100), maximum_interval=timedelta(seconds=1)
)
CHAOS_STEP_TIMEOUT = timedelta(seconds=3)
CHAOS_SLOW_TIMEOUT = timedelta(seconds=30)
CHAOS_HEARTBEAT = timedelta(seconds=2)
CHAOS_SLOW_BEATS = 4


def _chaos_record(job: dict[str, Any], step: str) -> None:
    """One ledger line per execution, in one O_APPEND write: lines from several
    processes never interleave, and a SIGKILL leaves a whole line or none."""
    info = activity.info()
    line = json.dumps({"wf": job["wf"], "step": step, "attempt": info.attempt, "pid": os.getpid()})
    fd = os.open(job["ledger"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@activity.defn
async def chaos_step(job: dict[str, Any]) -> int:
    _chaos_record(job, job["step"])
    # tests/test_chaos.py expects exactly this (its oracle).
    return int(job["value"]) * 7 + len(job["step"])


@activity.defn
async def chaos_slow(job: dict[str, Any]) -> int:
    """A slow activity that heartbeats: killed mid-way, it is retried once the
    heartbeat timeout passes (not the much longer start-to-close timeout)."""
    _chaos_record(job, "slow")
    for beat in range(CHAOS_SLOW_BEATS):
        activity.heartbeat(beat)
        await asyncio.sleep(0.1)
    return int(job["value"]) * 11


@workflow.defn
class ChaosChild:
    @workflow.run
    async def run(self, job: dict[str, Any]) -> int:
        await workflow.sleep(timedelta(milliseconds=50))
        step: int = await workflow.execute_activity(
            chaos_step,
            {**job, "step": "child"},
            start_to_close_timeout=CHAOS_STEP_TIMEOUT,
            retry_policy=CHAOS_RETRY,
        )
        return step + 1


@workflow.defn
class ChaosWorkflow:
    """Input ``{"wf", "value", "signals", "ledger"}``; waits for ``signals`` signals."""

    def __init__(self) -> None:
        self.signals: list[str] = []

    @workflow.signal
    def add(self, value: str) -> None:
        self.signals.append(value)

    @workflow.run
    async def run(self, job: dict[str, Any]) -> dict[str, Any]:
        first: int = await workflow.execute_activity(
            chaos_step,
            {**job, "step": "first"},
            start_to_close_timeout=CHAOS_STEP_TIMEOUT,
            retry_policy=CHAOS_RETRY,
        )
        await workflow.sleep(timedelta(milliseconds=200))
        slow: int = await workflow.execute_activity(
            chaos_slow,
            job,
            start_to_close_timeout=CHAOS_SLOW_TIMEOUT,
            heartbeat_timeout=CHAOS_HEARTBEAT,
            retry_policy=CHAOS_RETRY,
        )
        child: int = await workflow.execute_child_workflow(
            ChaosChild.run,
            job,
            id=f"{job['wf']}-child",
            task_timeout=timedelta(seconds=2),
        )
        await workflow.wait_condition(lambda: len(self.signals) >= int(job["signals"]))
        # Signals in arrival order: one applied twice or lost changes the result.
        return {"first": first, "slow": slow, "child": child, "signals": self.signals}


# ------------------------------------------------------------------- local


@activity.defn
async def local_stall_once(job: dict[str, Any]) -> int:
    info = activity.info()
    record = {"pid": os.getpid(), "attempt": info.attempt, "local": info.is_local}
    marker = Path(f"{job['marker']}.{os.getpid()}")
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(marker)
    try:
        os.close(os.open(f"{job['marker']}.first", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return os.getpid()
    await asyncio.sleep(300)  # only the process's death ends the first execution
    return os.getpid()


@workflow.defn
class LocalCrashy:
    @workflow.run
    async def run(self, job: dict[str, Any]) -> str:
        pid: int = await workflow.execute_local_activity(
            local_stall_once, job, start_to_close_timeout=timedelta(minutes=10)
        )
        return f"{job['value']}:local-in-{pid}"


@activity.defn(name="placed.where")
async def placed_where() -> int:
    return os.getpid()


FLAVOURS: dict[str, tuple[list[type], list[Any]]] = {
    "crashy": ([CrashyWorkflow], [stall_on_first_attempt]),
    "child": ([CrashParent, CrashChild], [child_step, parent_step]),
    "sticky": ([Tally], []),
    "chaos": ([ChaosWorkflow, ChaosChild], [chaos_step, chaos_slow]),
    "local": ([LocalCrashy], [local_stall_once]),
    "placed": ([], [placed_where]),
}


async def _run(args: argparse.Namespace) -> None:
    workflows, activities = FLAVOURS[args.flavour]
    # A worker restarted by a chaos test may meet a server that is itself restarting
    # or recovering on a loaded machine: wait for it as a deployed worker would.
    client = await Client.connect(args.address, identity=args.identity, connect_timeout=60)
    worker = Worker(
        client,
        task_queue=args.task_queue,
        workflows=workflows,
        activities=activities,
        identity=args.identity,
        sticky_queue_schedule_to_start_timeout=timedelta(milliseconds=args.sticky_timeout_ms),
        tier=args.tier,
        capabilities={
            "labels": [label for label in args.labels.split(",") if label],
            "memory_mb": args.memory_mb,
            "cores": args.cores,
        },
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with worker:
        print("worker ready", flush=True)
        await stop.wait()
    await client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="HOST:PORT of the server")
    parser.add_argument("task_queue")
    parser.add_argument("identity")
    parser.add_argument("flavour", choices=sorted(FLAVOURS))
    parser.add_argument("--sticky-timeout-ms", type=int, default=300)
    parser.add_argument("--tier", choices=["cloud", "edge", "device"])
    parser.add_argument("--labels", default="")
    parser.add_argument("--memory-mb", type=int, default=0)
    parser.add_argument("--cores", type=int, default=0)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
