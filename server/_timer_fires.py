"""Firing a page of due timers together: one pass computing the transitions, and
commits that share large transactions.

The timer queue (server/_timers.py) hands the engine the timers due now a page at a
time (``fire_page``) instead of one fire task per timer. Each timer's transition is the
one ``HistoryEngine.fire_timer`` computes (``_timeouts.fire``: EngineCore's
``FireTimer``), computed the same way: under its run's lock, on a copy of the cached
state, stamped with the clock when computed, which is never before the timer is due
(the queue hands over due rows only). What changes is the work around it, which cost
more than the transition itself: no task, semaphore, retry loop or store round trip
per timer, and the page's commits are submitted together (``bulk``), so the store
writes them in transactions of up to 512 transitions, each kind of row with one
executemany (history/_store.py, _batch_write.py).

Each commit is still its own transition with its own version check: sharing a
transaction changes nothing about what commits. A timer counts as fired only once its
commit landed (the queue forgets its row then); a crash before leaves the row, which
the restarted queue reads and fires, and a fire whose run shows the timer already
fired is stale (the state no longer tracks it), so no timer fires twice.

A timer the page cannot take goes through ``HistoryEngine.fire_timer`` after the page,
as before: its run busy (another transition holds the lock: a page never waits for a
held lock, since it holds others), a second timer of a run already in the page, its
run's state unreadable, a stale verdict (judged again on a state read from the store
before its row is deleted), a lost race (recomputed on the reloaded run), or an error
computing it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tideflow.api.v1 import state_pb2
from tideflow.history import RunKey, TimerRow

from . import _timeouts
from ._home import check_home
from ._mutation import Mutation
from ._run_cache import CachedRun

if TYPE_CHECKING:
    from ._engine import HistoryEngine

# A computed fire waiting for its commit: the timer's index in the page, its run
# (locked) and its transition.
_Held = tuple[int, CachedRun, Mutation]


async def fire_page(
    engine: HistoryEngine, timers: Sequence[TimerRow]
) -> list[BaseException | None]:
    """Fire ``timers`` (due now); per timer, None (fired, or dropped as stale) or the
    error its fire ended with (the queue tries it again)."""
    outcomes: list[BaseException | None] = [None] * len(timers)
    runs = await _runs_of(engine, timers)
    held: list[_Held] = []
    alone: list[int] = []
    try:
        for index, timer in enumerate(timers):
            computed = await _compute(engine, runs.get(timer.key), timer)
            if computed is None:
                alone.append(index)
            else:
                held.append((index, *computed))
        results = await _commit_all(engine, held, timers)
    finally:
        for _, run, _ in held:
            run.lock.release()
    for (index, _, _), result in zip(held, results, strict=True):
        if result is False:
            alone.append(index)  # another writer changed the run: compute it again
        elif isinstance(result, BaseException):
            outcomes[index] = result
    singles = await asyncio.gather(
        *(engine.fire_timer(timers[index]) for index in alone), return_exceptions=True
    )
    for index, single in zip(alone, singles, strict=True):
        if isinstance(single, BaseException):
            outcomes[index] = single
    return outcomes


async def _runs_of(engine: HistoryEngine, timers: Sequence[TimerRow]) -> dict[RunKey, CachedRun]:
    """The page's runs, those not cached read from the store concurrently. A run that
    cannot be had (not found, its shard not held, the store failing) is left out: its
    timer goes alone, where the error surfaces as it always did."""
    runs: dict[RunKey, CachedRun] = {}
    missing: dict[RunKey, None] = {}  # in page order, once each
    for timer in timers:
        key = timer.key
        run = engine._cache.get(key)
        if run is None:
            missing[key] = None
        else:
            runs[key] = run
    loaded = await asyncio.gather(*(engine._load(key) for key in missing), return_exceptions=True)
    for key, read in zip(missing, loaded, strict=True):
        if isinstance(read, CachedRun):
            runs[key] = read
    return runs


async def _compute(
    engine: HistoryEngine, run: CachedRun | None, timer: TimerRow
) -> tuple[CachedRun, Mutation] | None:
    """The fire's transition computed under its run's lock, which stays held for the
    commit; None if the timer must go alone (the lock released)."""
    key = timer.key
    if run is None or run.lock.locked() or engine._cache.get(key) is not run:
        return None
    store = engine._store
    if engine._shards is not None and not store.holds(store.shard_of(key)):
        return None  # alone: refused there as any request of a shard not held
    await run.lock.acquire()  # free: no wait, unless a released lock's waiter is due
    try:
        if engine._cache.get(key) is not run:
            raise LookupError("evicted while the lock was taken")
        ms = state_pb2.MutableState()
        ms.CopyFrom(run.state)
        m = Mutation(ms, engine._clock.now_micros())
        check_home(key, ms, engine._config.cluster_name)
        if _timeouts.fire(m, timer, engine._config) and m.dirty:
            return run, m
    except Exception:
        pass  # alone, where the error (or the refusal) is met again and reported
    run.lock.release()
    return None


async def _commit_all(
    engine: HistoryEngine, held: list[_Held], timers: Sequence[TimerRow]
) -> list[bool | BaseException]:
    """Commit the page's transitions: each submitted to the store as ``bulk`` (its own
    transition and version check, in shared transactions), all awaited together, the
    cache updated as ``HistoryEngine._commit`` does, and the committed ones' rows
    handed over in one batch. Per transition: True, False (another writer changed
    the run first: the cache entry is dropped), or the error its write ended with."""
    submitted: list[tuple[asyncio.Future[None], int, int | None] | Exception] = []
    for index, run, m in held:
        try:
            submitted.append(engine._submit(run, m, _action(timers[index]), bulk=True))
        except Exception as exc:  # refused at once (a shard lost meanwhile, the store closed)
            submitted.append(exc)
    writes = [s[0] for s in submitted if not isinstance(s, Exception)]
    try:
        if writes:
            await asyncio.wait(writes)  # no task per commit; cancelling leaves them be
    except asyncio.CancelledError:
        for (_, run, m), sub in zip(held, submitted, strict=True):
            if not isinstance(sub, Exception):
                engine._abandon(run, m, sub[0])
        raise
    results: list[bool | BaseException] = []
    landed: list[tuple[CachedRun, Mutation]] = []
    for (_, run, m), sub in zip(held, submitted, strict=True):
        if isinstance(sub, Exception):
            results.append(sub)  # as ``HistoryEngine._commit`` raises it
            continue
        write, rseq, lease = sub
        error = write.exception()
        if error is None:
            engine._landed(run, m, rseq, lease)
            landed.append((run, m))
            results.append(True)
            continue
        try:
            results.append(engine._not_committed(run, m, error))
        except BaseException as raised:
            results.append(raised)
    engine._after_commits(landed)
    return results


def _action(timer: TimerRow) -> str:
    """The transition's name in trace mode, as ``HistoryEngine.fire_timer`` names it."""
    return f"FireTimer:{timer.kind.name}"
