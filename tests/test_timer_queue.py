"""The timer queue holds a bounded number of timer rows however many are due.

A real store (both databases), the real TimerQueue and a manual clock; the fire
handler deletes the row as the engine's FireTimer transition does. Assertions are on
what fired and on the queue's own count of rows it held, never on timing.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import Any

import pytest
from helpers import eventually
from helpers_store import T0, create, run_key, timer

from tideflow.history import HistoryStore, RunKey, TimerRow, shard_of
from tideflow.server._timers import TimerQueue

_S = 1_000_000


class _ManualClock:
    def __init__(self, now: int) -> None:
        self.now = now

    def now_micros(self) -> int:
        return self.now


class _Firing:
    """The fire handler: records each timer, then deletes its row like FireTimer.
    After ``stop_after`` timers it hangs (a node about to be stopped)."""

    def __init__(self, store: HistoryStore, stop_after: int | None = None) -> None:
        self._store = store
        self._stop_after = stop_after
        self.fired: collections.Counter[str] = collections.Counter()

    async def __call__(self, row: TimerRow) -> None:
        if self._stop_after is not None and len(self.fired) >= self._stop_after:
            await asyncio.Event().wait()
        self.fired[row.timer_key] += 1
        await self._store.delete_timer(row.timer_key)


class _PageFiring:
    """The page handler (``TimerQueue.run``'s ``fire_page``): records each timer and
    deletes its row, except, in the first page, every other timer, whose fire fails
    (an error: its row stays, the queue tries it again)."""

    def __init__(self, store: HistoryStore) -> None:
        self._store = store
        self.fired: collections.Counter[str] = collections.Counter()
        self.failed: set[str] = set()
        self.pages: list[int] = []

    async def __call__(self, rows: list[TimerRow]) -> list[BaseException | None]:
        first = not self.pages
        self.pages.append(len(rows))
        outcomes: list[BaseException | None] = []
        for n, row in enumerate(rows):
            if first and n % 2:
                self.failed.add(row.timer_key)
                outcomes.append(RuntimeError("the store went away"))
                continue
            self.fired[row.timer_key] += 1
            await self._store.delete_timer(row.timer_key)
            outcomes.append(None)
        return outcomes

    async def one(self, row: TimerRow) -> None:
        raise AssertionError("with a page handler, no timer is fired alone")


async def _arm(store: HistoryStore, runs: int, per_run: int, fire_at: int) -> list[TimerRow]:
    """``runs`` new runs with ``per_run`` timers each, all due at ``fire_at``."""
    rows: list[TimerRow] = []
    for n in range(runs):
        key = run_key(f"wf-{fire_at}-{n}")
        timers = [timer(key, ref, fire_at) for ref in range(per_run)]
        await store.apply(create(key, new_timers=timers))
        rows += timers
    return rows


async def _arm_one(store: HistoryStore, queue: TimerQueue, name: str, fire_at: int) -> TimerRow:
    """A timer committed with its run and handed to the queue, as the engine's commit does."""
    key = run_key(name)
    row = timer(key, 1, fire_at)
    await store.apply(create(key, new_timers=[row]))
    queue.add([row])
    return row


@asynccontextmanager
async def _running(queue: TimerQueue, firing: _Firing | _PageFiring) -> AsyncIterator[None]:
    if isinstance(firing, _PageFiring):
        task = asyncio.create_task(queue.run(firing.one, firing))
    else:
        task = asyncio.create_task(queue.run(firing))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait([task])


async def _count_rows_are(store: HistoryStore, count: int) -> bool:
    return await store.count_rows("timers") == count


async def _count_rows_is_zero(store: HistoryStore) -> bool:
    return await _count_rows_are(store, 0)


def _keys(rows: Collection[TimerRow]) -> set[str]:
    return {r.timer_key for r in rows}


@pytest.mark.parametrize("pages", [False, True], ids=["one-by-one", "pages"])
async def test_timers_due_at_one_instant_fire_once_each_within_the_cap(
    store: HistoryStore, pages: bool
) -> None:
    """One by one, or in pages (``fire_page``: every other timer of the first page
    fails and is fired again later)."""
    rows = await _arm(store, runs=10, per_run=50, fire_at=T0)
    queue = TimerQueue(store, _ManualClock(T0), window_s=30.0, max_in_memory=50)
    firing = _PageFiring(store) if pages else _Firing(store)
    async with _running(queue, firing):
        await eventually(lambda: _count_rows_is_zero(store))
    assert set(firing.fired) == _keys(rows)
    assert set(firing.fired.values()) == {1}
    assert 0 < queue.peak_held <= 50
    if isinstance(firing, _PageFiring):
        assert firing.failed and firing.failed <= set(firing.fired)
        assert max(firing.pages) <= 50


async def test_a_timer_armed_while_the_heap_is_full_fires_whether_earlier_or_later(
    store: HistoryStore,
) -> None:
    clock = _ManualClock(T0)
    far = await _arm(store, runs=2, per_run=50, fire_at=T0 + 1000 * _S)
    queue = TimerQueue(store, clock, window_s=2000.0, max_in_memory=50)
    firing = _Firing(store)
    async with _running(queue, firing):
        await eventually(lambda: queue.held() == 50)
        # Due after every loaded one, with the heap full: a page reads it later.
        late = await _arm_one(store, queue, "late", T0 + 1500 * _S)
        assert queue.held() == 50
        # Due before every loaded one: it takes the place of the latest.
        early = await _arm_one(store, queue, "early", T0 - 1)
        await eventually(lambda: early.timer_key in firing.fired)
        assert not set(firing.fired) & _keys(far)
        clock.now = T0 + 2000 * _S
        # A commit of a due timer wakes the queue, which now finds everything due.
        nudge = await _arm_one(store, queue, "nudge", T0 - 1)
        expected = _keys(far) | {early.timer_key, late.timer_key, nudge.timer_key}
        await eventually(lambda: _count_rows_is_zero(store))
    assert set(firing.fired) == expected
    assert set(firing.fired.values()) == {1}
    assert queue.peak_held <= 50


async def test_a_restarted_queue_fires_the_timers_the_first_left(store: HistoryStore) -> None:
    rows = await _arm(store, runs=10, per_run=40, fire_at=T0)
    first = _Firing(store, stop_after=100)
    queue = TimerQueue(store, _ManualClock(T0), window_s=30.0, max_in_memory=30)
    async with _running(queue, first):
        await eventually(lambda: len(first.fired) == 100)
    # The node stopped (its heap lost) with timers left in the store.
    left = await store.count_rows("timers")
    assert left >= len(rows) - 100
    second = _Firing(store)
    restarted = TimerQueue(store, _ManualClock(T0), window_s=30.0, max_in_memory=30)
    async with _running(restarted, second):
        await eventually(lambda: _count_rows_is_zero(store))
    assert set(first.fired) | set(second.fired) == _keys(rows)
    assert restarted.peak_held <= 30


async def test_each_shard_is_read_only_once_owned(store: HistoryStore) -> None:
    rows = await _arm(store, runs=40, per_run=5, fire_at=T0)
    by_shard: dict[int, set[str]] = collections.defaultdict(set)
    for row in rows:
        by_shard[shard_of(row.key.namespace, row.key.workflow_id, store.shard_count)].add(
            row.timer_key
        )
    first, second, *_ = sorted(by_shard, key=lambda shard: -len(by_shard[shard]))
    owned = {first}

    def owns(key: RunKey) -> bool:
        return shard_of(key.namespace, key.workflow_id, store.shard_count) in owned

    queue = TimerQueue(
        store, _ManualClock(T0), window_s=30.0, max_in_memory=4, owns=owns, owned=lambda: owned
    )
    firing = _Firing(store)
    async with _running(queue, firing):
        await eventually(lambda: set(firing.fired) == by_shard[first])
        owned.add(second)  # acquired: the node's hook recovers its timers
        await queue.recover_shard(second)
        both = by_shard[first] | by_shard[second]
        await eventually(lambda: _count_rows_are(store, len(rows) - len(both)))
    assert set(firing.fired) == both
    assert set(firing.fired.values()) == {1}
    assert queue.peak_held <= 4


async def test_reread_finds_a_timer_committed_without_add(store: HistoryStore) -> None:
    """A commit whose outcome was in doubt reached the store but not the queue."""
    queue = TimerQueue(store, _ManualClock(T0), window_s=30.0, max_in_memory=50)
    firing = _Firing(store)
    async with _running(queue, firing):
        first = await _arm_one(store, queue, "first", T0 - 1)
        await eventually(lambda: first.timer_key in firing.fired)
        [doubtful] = await _arm(store, runs=1, per_run=1, fire_at=T0 - 1)
        queue.reread()  # server/_resync.py, once the store answers again
        await eventually(lambda: _count_rows_is_zero(store))
    assert set(firing.fired) == {first.timer_key, doubtful.timer_key}


async def test_timers_due_before_pages_by_fire_time_then_key(store: HistoryStore) -> None:
    tied = await _arm(store, runs=1, per_run=5, fire_at=T0)
    later = await _arm(store, runs=1, per_run=2, fire_at=T0 + 1)
    pages: list[list[TimerRow]] = []
    after: tuple[int, str] | None = None
    while not pages or len(pages[-1]) == 2:
        page = await store.timers_due_before(T0 + 2, limit=2, after=after)
        pages.append(page)
        if page:
            after = (page[-1].fire_at, page[-1].timer_key)
    read = [row for page in pages for row in page]
    assert len(read) == len(tied) + len(later)
    assert set(read) == set(tied) | set(later)
    assert [row.fire_at for row in read] == sorted(row.fire_at for row in read)
    # (fire_at, ""): every row due at or after fire_at.
    assert set(await store.timers_due_before(T0 + 2, after=(T0 + 1, ""))) == set(later)


async def test_dropped_timers_leave_the_queue_and_never_fire(store: HistoryStore) -> None:
    """A commit that deletes timer rows (a task that moved on) tells the queue, which
    forgets them at once: they take no room and cost no stale fire later."""
    clock = _ManualClock(T0)
    queue = TimerQueue(store, clock, window_s=2000.0, max_in_memory=500)
    firing = _Firing(store)
    async with _running(queue, firing):
        kept = await _arm_one(store, queue, "kept", T0 + 100 * _S)
        dropped = [await _arm_one(store, queue, f"dropped-{n}", T0 + 100 * _S) for n in range(80)]
        await eventually(lambda: queue.held() == 81)
        for row in dropped:
            await store.delete_timer(row.timer_key)
        queue.drop([row.timer_key for row in dropped])
        assert queue.held() == 1
        assert queue.pending() == 1
        clock.now = T0 + 200 * _S
        nudge = await _arm_one(store, queue, "nudge", T0 - 1)
        await eventually(lambda: _count_rows_is_zero(store))
    assert set(firing.fired) == {kept.timer_key, nudge.timer_key}


class _HeldReads:
    """The store, except that a page read, once it has read, waits for ``release``
    before answering: a commit can land while the page is in flight."""

    def __init__(self, store: HistoryStore) -> None:
        self._store = store
        self.read_done = asyncio.Event()
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def timers_due_before(self, horizon: int, **kwargs: Any) -> list[TimerRow]:
        rows: list[TimerRow] = await self._store.timers_due_before(horizon, **kwargs)
        self.read_done.set()
        await self.release.wait()
        return rows


async def test_a_timer_committed_while_a_page_is_read_fires(store: HistoryStore) -> None:
    """The page in flight read the store before the commit (it cannot return the row)
    and add() left the row to the pages (due after the cursor): the page must not move
    the cursor past it. Found by the chaos suite: a run waiting for ever on a
    TimerStarted whose row was in the store, after a restart's first page."""
    held = _HeldReads(store)
    queue = TimerQueue(held, _ManualClock(T0), window_s=30.0, max_in_memory=50)  # type: ignore[arg-type]
    firing = _Firing(store)
    async with _running(queue, firing):
        await held.read_done.wait()  # the first page has read (nothing)
        during = await _arm_one(store, queue, "during", T0 - 1)
        held.release.set()
        await eventually(lambda: during.timer_key in firing.fired, "the timer to fire")


async def test_a_reread_asked_for_while_a_page_is_read_reads_from_the_start(
    store: HistoryStore,
) -> None:
    """A commit in doubt landed after the page in flight had read; the reread it
    causes must outlive that page's end."""
    held = _HeldReads(store)
    queue = TimerQueue(held, _ManualClock(T0), window_s=30.0, max_in_memory=50)  # type: ignore[arg-type]
    firing = _Firing(store)
    async with _running(queue, firing):
        await held.read_done.wait()
        [doubtful] = await _arm(store, runs=1, per_run=1, fire_at=T0 - 1)  # no add()
        queue.reread()
        held.release.set()
        await eventually(lambda: doubtful.timer_key in firing.fired, "the timer to fire")
