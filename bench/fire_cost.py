"""What firing a due user timer costs the server, in-process, without gRPC or workers.

A real ``HistoryEngine`` on a fresh SQLite file (WAL, ``--synchronous``): ``--runs``
runs each complete their first workflow task with a StartTimer command, so each has
one user timer row due; then every timer is fired through the timer queue's path
(``--path single``: ``HistoryEngine.fire_timer`` per timer, ``--concurrency`` in
flight, as the queue did before the bulk path; ``--path bulk``:
``HistoryEngine.fire_timers`` on pages of ``--page`` timers, two pages in flight, as
the queue does now). ``--cold`` drops the engine's cache of run states first, so each
fire reads its run from the store.

Prints one JSON line: fires per second (wall clock) and process CPU microseconds per
fire. Run it under ``py-spy record --format raw -- python bench/fire_cost.py`` to see
the steps (the writer thread's SQLite work included); ``--profile N`` prints
cProfile's top N of the event loop thread (the writer thread is not in it).

    python bench/fire_cost.py --runs 5000 --path single
    python bench/fire_cost.py --runs 5000 --path bulk
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import pstats
import sys
import tempfile
import time
import uuid
from pathlib import Path

from google.protobuf.duration_pb2 import Duration

from tideflow.api.v1 import command_pb2, common_pb2, service_pb2
from tideflow.history import HistoryStore, TaskKind, TaskRow, TimerKind, TimerRow
from tideflow.server import ServerConfig, SystemClock
from tideflow.server._cli import GC_YOUNG_THRESHOLD
from tideflow.server._engine import Dispatcher, HistoryEngine, decode_token


class _Rows(Dispatcher):
    """Keeps the workflow tasks and user timers commits hand over."""

    def __init__(self) -> None:
        self.tasks: list[TaskRow] = []
        self.timers: list[TimerRow] = []

    def add_tasks(self, tasks: list[TaskRow]) -> None:
        self.tasks.extend(t for t in tasks if t.kind == TaskKind.WORKFLOW)

    def add_timers(self, timers: list[TimerRow]) -> None:
        self.timers.extend(t for t in timers if t.kind == TimerKind.USER_TIMER)


def _start_timer() -> command_pb2.Command:
    after = Duration()
    after.FromSeconds(3600)
    return command_pb2.Command(
        command_type=command_pb2.COMMAND_TYPE_START_TIMER,
        start_timer_command_attributes=command_pb2.StartTimerCommandAttributes(
            timer_id="sleep", start_to_fire_timeout=after
        ),
    )


async def _arm(engine: HistoryEngine, rows: _Rows, runs: int) -> list[TimerRow]:
    """``runs`` runs, each sleeping on one user timer."""

    async def one(n: int) -> None:
        await engine.start_workflow(
            service_pb2.StartWorkflowRequest(
                namespace="default",
                workflow_id=f"sleeper-{n}",
                workflow_type=common_pb2.WorkflowType(name="Sleep"),
                task_queue=common_pb2.TaskQueue(name="q"),
                request_id=str(uuid.uuid4()),
            )
        )

    for first in range(0, runs, 200):
        await asyncio.gather(*(one(n) for n in range(first, min(runs, first + 200))))
        tasks, rows.tasks = rows.tasks, []
        started = await asyncio.gather(
            *(engine.record_workflow_task_started(t, "bench") for t in tasks)
        )
        await asyncio.gather(
            *(
                engine.complete_workflow_task(
                    decode_token(s.task_token, activity=False), [_start_timer()], "bench"
                )
                for s in started
                if s is not None
            )
        )
    return rows.timers


async def _fire_single(engine: HistoryEngine, timers: list[TimerRow], concurrency: int) -> None:
    slots = asyncio.Semaphore(concurrency)

    async def one(timer: TimerRow) -> None:
        async with slots:
            await engine.fire_timer(timer)

    await asyncio.gather(*(one(t) for t in timers))


async def _fire_bulk(engine: HistoryEngine, timers: list[TimerRow], page: int) -> None:
    slots = asyncio.Semaphore(2)

    async def one(batch: list[TimerRow]) -> None:
        async with slots:
            await engine.fire_timers(batch)

    await asyncio.gather(*(one(timers[i : i + page]) for i in range(0, len(timers), page)))


async def main(args: argparse.Namespace) -> dict[str, object]:
    gc.set_threshold(args.gc_young, *gc.get_threshold()[1:])
    path = Path(tempfile.mkdtemp(prefix="tideflow-fire-")) / "fire.db"
    store = await HistoryStore.open(f"sqlite:///{path}", sqlite_synchronous=args.synchronous)
    rows = _Rows()
    engine = HistoryEngine(store, rows, SystemClock(), ServerConfig())
    try:
        timers = await _arm(engine, rows, args.runs)
        if args.cold:
            for key in list(engine._cache):
                engine.invalidate(key)
        armed = dict(store.stats)
        print(f"armed {len(timers)} timers", file=sys.stderr, flush=True)
        await asyncio.sleep(args.pause)  # time to attach a sampling profiler
        profile = cProfile.Profile() if args.profile else None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if profile is not None:
            profile.enable()
        if args.path == "bulk":
            await _fire_bulk(engine, timers, args.page)
        else:
            await _fire_single(engine, timers, args.concurrency)
        if profile is not None:
            profile.disable()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        left = len(await store.timers_due_before(2**62, limit=len(timers) + 10))
    finally:
        await store.close()
    if profile is not None:
        pstats.Stats(profile, stream=sys.stderr).sort_stats(args.sort).print_stats(args.profile)
    return {
        "path": args.path,
        "runs": len(timers),
        "cold": args.cold,
        "synchronous": args.synchronous,
        "gc_young": args.gc_young,
        "fires_per_s": round(len(timers) / wall),
        "cpu_us_per_fire": round(cpu / len(timers) * 1e6),
        "timer_rows_left": left,
        "transitions_per_transaction": round(
            (store.stats["transitions"] - armed["transitions"])
            / max(1, store.stats["transactions"] - armed["transactions"]),
            1,
        ),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--path", choices=["single", "bulk"], default="bulk")
    parser.add_argument("--concurrency", type=int, default=128, help="single: fires in flight")
    parser.add_argument("--page", type=int, default=512, help="bulk: timers per call")
    parser.add_argument("--cold", action="store_true", help="no run state cached")
    parser.add_argument("--synchronous", default="NORMAL", choices=["NORMAL", "FULL"])
    parser.add_argument(
        "--gc-young",
        type=int,
        default=GC_YOUNG_THRESHOLD,
        help="young-generation GC threshold (default: the server process's; Python's is 700)",
    )
    parser.add_argument("--profile", type=int, default=0)
    parser.add_argument("--sort", default="cumulative", help="cProfile order")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds before firing")
    print(json.dumps(asyncio.run(main(parser.parse_args()))), flush=True)
