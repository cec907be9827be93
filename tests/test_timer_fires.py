"""A page of due timers fired together (server/_timer_fires.py) fires each timer once.

The engine on a real store (both databases): runs sleeping on one user timer each,
their timers fired as one page through ``HistoryEngine.fire_timers`` as the timer
queue does (half of the runs not cached: read from the store first). Each run then
has exactly one TimerFired and a workflow task; the page shares transactions; a page
fired again (a queue that read the rows twice, or retried after an error) fires
nothing twice. Faults in the middle of a page's transaction: the database gone
before the commit (nothing written, each timer's fire reports the error and fires once
when tried again), and the commit landed but its answer lost (the store's retry meets
its own commit; each timer is then found fired, not fired again). A run whose lock
another transition holds is fired alone, after it. A run another writer changed
behind the engine's cache (another node fired its timer first) fails its version
check in the page's transaction; the other runs' fires still commit, and that one is
found fired. A page the store refuses at submission (the node's fence no longer
holds the shards) reports each fire's error and writes nothing. A process SIGKILLed
in the middle of a page's transaction, or right after it committed
(tests/timer_fires_child.py, a real process), loses no timer and fires none twice:
the rows left are fired by the next process, as a restarted server's queue would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from helpers import eventually
from helpers_store import RunnerWrapper
from raw_workflow import start_request, start_timer
from sqlalchemy import Connection

from tideflow.api.v1.history_pb2 import EventType
from tideflow.history import (
    HistoryStore,
    ShardOwnershipLostError,
    StoreUnavailableError,
    TaskKind,
    TaskRow,
    TimerKind,
    TimerRow,
)
from tideflow.history._dialects import Runner, open_runner
from tideflow.server import ServerConfig, SystemClock
from tideflow.server._engine import Dispatcher, HistoryEngine, decode_token

T = TypeVar("T")
ET = EventType
_RUNS = 24
_HOUR = timedelta(hours=1)
_CHILD = Path(__file__).with_name("timer_fires_child.py")
_CHILD_TIMEOUT_S = 120


class _Faults(RunnerWrapper):
    """A runner whose writes can fail inside their transaction, after its statements
    ran (``broken``: rolled back, as a database lost mid-transaction), or after it
    committed (``lose_answer``: once, as a connection lost before the answer)."""

    def __init__(self, inner: Runner) -> None:
        super().__init__(inner)
        self.broken = False
        self.lose_answer = False
        self.failed = 0

    async def write(self, fn: Callable[[Connection], T]) -> T:
        def txn(conn: Connection) -> T:
            result = fn(conn)
            if self.broken:
                self.failed += 1
                raise ConnectionResetError(104, "connection reset mid-transaction")
            return result

        result = await self._inner.write(txn)
        if self.lose_answer:
            self.lose_answer = False
            raise ConnectionResetError(104, "connection reset before the commit was answered")
        return result


class _WorkflowTasks(Dispatcher):
    """Keeps the workflow task rows the commits hand over (timers: read from the store)."""

    def __init__(self) -> None:
        self.tasks: list[TaskRow] = []

    def add_tasks(self, tasks: list[TaskRow]) -> None:
        self.tasks += [t for t in tasks if t.kind == TaskKind.WORKFLOW]

    def add_timers(self, timers: list[TimerRow]) -> None:
        pass


@asynccontextmanager
async def _engine(store_url: str) -> AsyncIterator[tuple[HistoryEngine, _WorkflowTasks, _Faults]]:
    faults = _Faults(open_runner(store_url))
    store = await HistoryStore.open_on(faults)
    rows = _WorkflowTasks()
    try:
        yield HistoryEngine(store, rows, SystemClock(), ServerConfig()), rows, faults
    finally:
        await store.close()


async def _sleepers(engine: HistoryEngine, rows: _WorkflowTasks, runs: int) -> list[TimerRow]:
    """``runs`` runs whose first workflow task started a user timer: its rows."""
    for _ in range(runs):
        await engine.start_workflow(start_request("Sleep"))
    tasks, rows.tasks = rows.tasks, []
    for task in tasks:
        started = await engine.record_workflow_task_started(task, "test")
        assert started is not None
        token = decode_token(started.task_token, activity=False)
        await engine.complete_workflow_task(token, [start_timer("sleep", after=_HOUR)], "test")
    timers = await engine._store.timers_due_before(2**62)
    sleeps = [t for t in timers if t.kind == TimerKind.USER_TIMER]
    assert len(sleeps) == runs
    return sleeps


async def _fired_once_each(store: HistoryStore, timers: list[TimerRow]) -> None:
    """Each run has exactly one TimerFired, followed by a workflow task; no user timer
    row is left."""
    for timer in timers:
        types = [e.event_type for e in await store.read_events(timer.key)]
        assert types.count(ET.EVENT_TYPE_TIMER_FIRED) == 1, types
        fired = types.index(ET.EVENT_TYPE_TIMER_FIRED)
        assert types[fired + 1] == ET.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED, types
    left = await store.timers_due_before(2**62)
    assert not {t.timer_key for t in left} & {t.timer_key for t in timers}


async def test_a_page_fires_each_timer_once_in_shared_transactions(store_url: str) -> None:
    async with _engine(store_url) as (engine, rows, _):
        store = engine._store
        timers = await _sleepers(engine, rows, _RUNS)
        for timer in timers[::2]:
            engine.invalidate(timer.key)  # half the page's runs are read from the store
        before = store.stats["transactions"]
        assert await engine.fire_timers(timers) == [None] * _RUNS
        assert store.stats["transactions"] - before < _RUNS // 4  # shared, not one each
        await _fired_once_each(store, timers)
        assert sorted(t.key.workflow_id for t in rows.tasks) == sorted(
            t.key.workflow_id for t in timers
        )
        # Read again and fired again (rows a page read twice): stale, dropped.
        assert await engine.fire_timers(timers) == [None] * _RUNS
        await _fired_once_each(store, timers)


async def test_a_page_whose_transaction_broke_fires_each_timer_once_when_tried_again(
    store_url: str,
) -> None:
    async with _engine(store_url) as (engine, rows, faults):
        timers = await _sleepers(engine, rows, _RUNS)
        faults.broken = True
        outcomes = await engine.fire_timers(timers)
        assert faults.failed > 0
        assert all(isinstance(o, StoreUnavailableError) for o in outcomes), outcomes
        for timer in timers:  # nothing of the page was written
            types = [e.event_type for e in await engine._store.read_events(timer.key)]
            assert ET.EVENT_TYPE_TIMER_FIRED not in types
        faults.broken = False
        engine._store.writes_in_doubt.clear()
        assert await engine.fire_timers(timers) == [None] * _RUNS  # the queue's retry
        await _fired_once_each(engine._store, timers)


async def test_a_page_whose_commit_answer_was_lost_fires_nothing_twice(store_url: str) -> None:
    async with _engine(store_url) as (engine, rows, faults):
        timers = await _sleepers(engine, rows, _RUNS)
        faults.lose_answer = True
        # The store runs the transaction again, which meets its own commit: each
        # fire is then computed again on the run read back, which shows it fired.
        assert await engine.fire_timers(timers) == [None] * _RUNS
        assert not faults.lose_answer
        await _fired_once_each(engine._store, timers)
        assert await engine.fire_timers(timers) == [None] * _RUNS
        await _fired_once_each(engine._store, timers)


async def test_a_run_busy_with_another_transition_is_fired_after_it(store_url: str) -> None:
    async with _engine(store_url) as (engine, rows, _):
        timers = await _sleepers(engine, rows, 4)
        busy = engine._cache[timers[0].key]
        await busy.lock.acquire()
        page = asyncio.create_task(engine.fire_timers(timers))
        # The other three commit while the busy run's lock is held.
        others = {t.key for t in timers[1:]}
        await eventually(lambda: others <= {r.key for r in rows.tasks}, "the other three fired")
        assert not page.done()
        busy.lock.release()
        assert await page == [None] * 4
        await _fired_once_each(engine._store, timers)


async def test_a_lost_race_in_a_page_costs_the_other_runs_nothing(store_url: str) -> None:
    async with _engine(store_url) as (engine, rows, _):
        store = engine._store
        timers = await _sleepers(engine, rows, _RUNS)
        # Another node's engine fires one of the timers first, behind this engine's
        # cache: this engine's fire of it fails its version check in the page's
        # transaction, which then commits each fire alone.
        raced = timers[5]
        other = HistoryEngine(store, _WorkflowTasks(), SystemClock(), ServerConfig())
        assert await other.fire_timers([raced]) == [None]
        before = store.stats["transitions"]
        assert await engine.fire_timers(timers) == [None] * _RUNS
        await _fired_once_each(store, timers)
        # The others committed (and reached matching) once each; the raced one was
        # recomputed on the run read back, found fired, and dropped.
        assert store.stats["transitions"] - before == _RUNS - 1
        fired = sorted(t.key.workflow_id for t in rows.tasks)
        assert fired == sorted(t.key.workflow_id for t in timers if t is not raced)


async def test_a_page_refused_at_submission_reports_each_fire_and_writes_nothing(
    store_url: str,
) -> None:
    async with _engine(store_url) as (engine, rows, _):
        timers = await _sleepers(engine, rows, _RUNS)
        # The node's fence holds no shard any more (this engine has no shard
        # controller to refuse the fires earlier): each submission is refused.
        engine._store.enable_fencing()
        outcomes = await engine.fire_timers(timers)
        assert all(isinstance(o, ShardOwnershipLostError) for o in outcomes), outcomes
        assert rows.tasks == []
    async with _engine(store_url) as (engine, rows, _):  # the shards' next owner
        assert len(await engine._store.timers_due_before(2**62)) == _RUNS
        assert await engine.fire_timers(timers) == [None] * _RUNS
        await _fired_once_each(engine._store, timers)


async def _run_child(store_url: str, page: int, transaction: int, when: str) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(_CHILD),
        store_url,
        str(page),
        str(transaction),
        when,
        env={**os.environ, "PYTHONPATH": str(_CHILD.parent)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(_CHILD_TIMEOUT_S):
            out, err = await child.communicate()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode == -signal.SIGKILL, (child.returncode, out, err)


@pytest.mark.parametrize("when", ["before-commit", "after-commit"])
async def test_a_sigkill_mid_page_loses_no_timer_and_fires_none_twice(
    store_url: str, when: str
) -> None:
    page = _RUNS // 3
    async with _engine(store_url) as (engine, rows, _):
        timers = await _sleepers(engine, rows, _RUNS)
    await _run_child(store_url, page, 2, when)  # dies in the second page's transaction
    async with _engine(store_url) as (engine, rows, _):
        left = await engine._store.timers_due_before(2**62)
        # The first page committed; the second only if the kill came after its commit;
        # the third was never tried.
        assert len(left) == _RUNS - page * (2 if when == "after-commit" else 1)
        # What the restarted queue does: fire the rows left (and, as a queue that
        # read rows twice would, the fired ones too: found stale).
        assert await engine.fire_timers(left) == [None] * len(left)
        assert await engine.fire_timers(timers) == [None] * _RUNS
        await _fired_once_each(engine._store, timers)
