"""The store floor: commits/s and rows/s each store does here with tideflow's shapes.

One transition of an activity's life writes, in one transaction: the run's
``executions`` row (optimistic version check), two history events, the task row it
consumed (deleted) and the one it creates, the timer row it drops and the one it
arms: 7 rows in 6 statements (``history/_batch_write.py``; the fence read of a
server holding shards comes on top). This program measures, per store:

- ``driver_serial``: those statements written straight on the driver (sqlite3, or
  asyncpg with prepared statements), one transaction at a time: the database's own
  floor for a commit, without tideflow's Python;
- ``store_serial``: the same transitions through ``HistoryStore.apply`` one at a time
  (group commit of one; the batch written on the sqlite3 cursor, or on asyncpg in two
  statements, ``history/_pg_batch.py``);
- ``store_grouped``: ``--runs`` runs transitioning concurrently, so the store's group
  commit puts many transitions into one transaction.

Each prints commits (transactions)/s, transitions/s, rows/s and this process's CPU
milliseconds per transition. SQLite runs WAL with ``synchronous=FULL`` (what the
issue's durability bar asks) and NORMAL (the server's default: also survives a process
SIGKILL, not a power cut); PostgreSQL with ``synchronous_commit`` on.

    .venv/bin/python bench/store_floor.py
    .venv/bin/python bench/store_floor.py --pg-url postgresql://postgres@127.0.0.1/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import make_url

from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.api.v1.state_pb2 import MutableState
from tideflow.history import (
    CurrentWrite,
    ExecutionSummary,
    HistoryStore,
    RunKey,
    TaskKind,
    TaskRow,
    TimerKind,
    TimerRow,
    Transition,
    make_event,
)

_ROWS_PER_TRANSITION = 7
_T0 = 1_700_000_000_000_000


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def _events(first: int, count: int) -> list[HistoryEvent]:
    out = []
    for event_id in range(first, first + count):
        event = make_event(EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED, _T0, activity_id="a")
        event.event_id = event_id
        out.append(event)
    return out


def _transition(key: RunKey, version: int) -> Transition:
    """Transition ``version`` -> ``version + 1``: two events, a task and a timer swapped."""
    first = 2 * version + 1
    task = TaskRow(key=key, task_queue="q", kind=TaskKind.ACTIVITY, ref_id=version, attempt=1)
    old_task = TaskRow(
        key=key, task_queue="q", kind=TaskKind.ACTIVITY, ref_id=version - 1, attempt=1
    )
    timer = TimerRow(key=key, kind=TimerKind.USER_TIMER, ref_id=version, attempt=1, fire_at=_T0)
    old_timer = TimerRow(
        key=key, kind=TimerKind.USER_TIMER, ref_id=version - 1, attempt=1, fire_at=_T0
    )
    return Transition(
        key=key,
        expected_version=version,
        new_version=version + 1,
        state=MutableState(next_event_id=first + 2).SerializeToString(),
        summary=ExecutionSummary(
            workflow_type="Wf",
            task_queue="q",
            status=1,
            start_time=_T0,
            close_time=None,
            history_length=first + 1,
        ),
        events=_events(first, 2),
        new_tasks=[task],
        done_task_keys=[old_task.task_key] if version else [],
        new_timers=[timer],
        done_timer_keys=[old_timer.timer_key] if version else [],
        current=CurrentWrite.INSERT if version == 0 else CurrentWrite.NONE,
    )


async def _timed(
    count: int, transactions: Callable[[], int], body: Callable[[], Awaitable[None]]
) -> dict[str, float]:
    tx0, cpu0, t0 = transactions(), _cpu(), time.perf_counter()
    await body()
    elapsed, cpu, tx = time.perf_counter() - t0, _cpu() - cpu0, transactions() - tx0
    return {
        "commits_per_s": round(tx / elapsed, 1),
        "transitions_per_s": round(count / elapsed, 1),
        "rows_per_s": round(count * _ROWS_PER_TRANSITION / elapsed, 1),
        "cpu_ms_per_transition": round(cpu * 1000 / count, 3),
    }


async def _store_runs(url: str, args: argparse.Namespace, sync: str) -> dict[str, object]:
    store = await HistoryStore.open(url, sqlite_synchronous=sync)
    try:
        stats = store.stats

        def transactions() -> int:
            return stats["transactions"]

        prefix = uuid.uuid4().hex[:6]
        one = RunKey(namespace="default", workflow_id=f"{prefix}-serial", run_id="r")

        async def serial() -> None:
            for version in range(args.transitions):
                await store.apply(_transition(one, version))

        keys = [
            RunKey(namespace="default", workflow_id=f"{prefix}-{n}", run_id="r")
            for n in range(args.runs)
        ]
        per_run = max(1, args.transitions * 4 // args.runs)

        async def grouped() -> None:
            async def run(key: RunKey) -> None:
                for version in range(per_run):
                    await store.apply(_transition(key, version))

            await asyncio.gather(*(run(key) for key in keys))

        return {
            "store_serial": await _timed(args.transitions, transactions, serial),
            "store_grouped": await _timed(per_run * len(keys), transactions, grouped),
        }
    finally:
        await store.close()


_SQLITE_SCHEMA = [
    "CREATE TABLE executions (k TEXT PRIMARY KEY, v INTEGER, state BLOB, len INTEGER)",
    "CREATE TABLE events (k TEXT, id INTEGER, type INTEGER, data BLOB, PRIMARY KEY (k, id))",
    "CREATE TABLE tasks (task_key TEXT PRIMARY KEY, k TEXT, q TEXT, created BIGINT)",
    "CREATE TABLE timers (timer_key TEXT PRIMARY KEY, k TEXT, fire_at BIGINT)",
    "CREATE INDEX timers_due ON timers (fire_at, timer_key)",
]


def _driver_rows(t: Transition) -> tuple[list[tuple[object, ...]], ...]:
    key = f"{t.key.workflow_id}|{t.key.run_id}"
    events: list[tuple[object, ...]] = [
        (key, e.event_id, int(e.event_type), e.SerializeToString()) for e in t.events
    ]
    tasks: list[tuple[object, ...]] = [
        (task.task_key, key, task.task_queue, _T0) for task in t.new_tasks
    ]
    timers: list[tuple[object, ...]] = [
        (timer.timer_key, key, timer.fire_at) for timer in t.new_timers
    ]
    return events, tasks, timers


def _sqlite_driver(path: str, sync: str, count: int) -> dict[str, float]:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={sync}")
    for statement in _SQLITE_SCHEMA:
        db.execute(statement)
    db.execute("INSERT INTO executions VALUES ('wf|r', 0, x'', 0)")
    transitions = [
        _transition(RunKey(namespace="default", workflow_id="wf", run_id="r"), v)
        for v in range(count)
    ]
    cpu0, t0 = _cpu(), time.perf_counter()
    for t in transitions:
        events, tasks, timers = _driver_rows(t)
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "UPDATE executions SET v = ?, state = ?, len = ? WHERE k = ? AND v = ?",
            (t.new_version, t.state, t.summary.history_length, "wf|r", t.expected_version),
        )
        db.executemany("INSERT INTO events VALUES (?, ?, ?, ?)", events)
        db.executemany("DELETE FROM tasks WHERE task_key = ?", [(k,) for k in t.done_task_keys])
        db.executemany("INSERT INTO tasks VALUES (?, ?, ?, ?)", tasks)
        db.executemany("DELETE FROM timers WHERE timer_key = ?", [(k,) for k in t.done_timer_keys])
        db.executemany("INSERT INTO timers VALUES (?, ?, ?)", timers)
        db.execute("COMMIT")
    elapsed, cpu = time.perf_counter() - t0, _cpu() - cpu0
    db.close()
    return {
        "commits_per_s": round(count / elapsed, 1),
        "transitions_per_s": round(count / elapsed, 1),
        "rows_per_s": round(count * _ROWS_PER_TRANSITION / elapsed, 1),
        "cpu_ms_per_transition": round(cpu * 1000 / count, 3),
    }


async def _pg_driver(url: str, count: int) -> dict[str, float]:
    conn = await asyncpg.connect(url)
    try:
        for statement in _SQLITE_SCHEMA:
            await conn.execute(statement.replace("BLOB", "BYTEA"))
        await conn.execute("INSERT INTO executions VALUES ('wf|r', 0, ''::bytea, 0)")
        transitions = [
            _transition(RunKey(namespace="default", workflow_id="wf", run_id="r"), v)
            for v in range(count)
        ]
        update = await conn.prepare(
            "UPDATE executions SET v = $1, state = $2, len = $3 WHERE k = $4 AND v = $5"
        )
        cpu0, t0 = _cpu(), time.perf_counter()
        for t in transitions:
            events, tasks, timers = _driver_rows(t)
            async with conn.transaction():
                await update.fetch(
                    t.new_version, t.state, t.summary.history_length, "wf|r", t.expected_version
                )
                await conn.executemany("INSERT INTO events VALUES ($1, $2, $3, $4)", events)
                await conn.execute("DELETE FROM tasks WHERE task_key = ANY($1)", t.done_task_keys)
                await conn.executemany("INSERT INTO tasks VALUES ($1, $2, $3, $4)", tasks)
                await conn.execute(
                    "DELETE FROM timers WHERE timer_key = ANY($1)", t.done_timer_keys
                )
                await conn.executemany("INSERT INTO timers VALUES ($1, $2, $3)", timers)
        elapsed, cpu = time.perf_counter() - t0, _cpu() - cpu0
    finally:
        await conn.close()
    return {
        "commits_per_s": round(count / elapsed, 1),
        "transitions_per_s": round(count / elapsed, 1),
        "rows_per_s": round(count * _ROWS_PER_TRANSITION / elapsed, 1),
        "cpu_ms_per_transition": round(cpu * 1000 / count, 3),
    }


async def _pg_database(url: str, body: Callable[[str], Awaitable[None]]) -> None:
    """Run ``body`` on a new database next to ``url``'s, dropped afterwards."""
    base = make_url(url)
    name = f"{base.database or 'tideflow'}_floor_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(base.set(drivername="postgresql").render_as_string(False))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            await body(base.set(database=name).render_as_string(hide_password=False))
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def main(args: argparse.Namespace) -> None:
    for sync in ("FULL", "NORMAL"):
        folder = Path(tempfile.mkdtemp(prefix="tideflow-floor-"))
        line: dict[str, object] = {"store": "sqlite", "synchronous": sync}
        line["driver_serial"] = _sqlite_driver(str(folder / "raw.db"), sync, args.transitions)
        line.update(await _store_runs(f"sqlite:///{folder / 'store.db'}", args, sync))
        print(json.dumps(line), flush=True)
    if args.pg_url:
        pg_line: dict[str, object] = {"store": "postgresql", "synchronous_commit": "on"}

        async def on_driver(url: str) -> None:
            pg_line["driver_serial"] = await _pg_driver(
                make_url(url).set(drivername="postgresql").render_as_string(False),
                args.transitions,
            )

        async def on_store(url: str) -> None:
            pg_line.update(await _store_runs(url, args, "FULL"))

        await _pg_database(args.pg_url, on_driver)
        await _pg_database(args.pg_url, on_store)
        print(json.dumps(pg_line), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--transitions", type=int, default=500, help="serial transitions")
    parser.add_argument("--runs", type=int, default=64, help="concurrent runs (grouped)")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    asyncio.run(main(parser.parse_args()))
