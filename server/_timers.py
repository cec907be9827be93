"""The durable timer queue.

Timers (user timers, activity and workflow task timeouts, retry backoffs, run
timeouts) are rows in the store, written in the transition that arms them. This
queue holds a bounded number of them in a heap and fires each due timer through the
engine, which validates it against the run's state and deletes the row in the same
transaction. Timers survive restarts because the queue reads them back from the store.

Memory is bounded by ``max_in_memory`` rows (the heap plus the fires in flight), however
many timers are due at once: the window (timers due before ``now + window``) is read in
pages in (fire_at, timer_key) order (keyset pagination), the next page once half of
the room is free. The cursor says where the next page starts; every timer of the
window before it is in memory or fired already, so the heap's earliest timer is the
earliest timer of the window (up to ties in fire_at, which fire at the same instant
anyway). A timer a commit arms (``add``) goes into the heap while there is room; when
the heap is full, a timer due earlier than the heap's latest takes that one's place (the
evicted one goes back to the store's side of the cursor), and any other moves the
cursor back to its due time so a page reads it; a timer due after the cursor's due
time is left to the pages too. Pages, shard recoveries and commits may bring the same
row twice: ``_known`` keeps one copy, and the engine drops a timer that fires after
its row is gone. Every ``window / 2`` the window advances (pages read the new part);
after a store outage the cursor restarts from the beginning (``reread``, called by
server/_resync.py), which finds rows nobody handed to ``add`` (a commit whose
outcome was in doubt).

Due timers go to the engine one at a time (``run``'s ``fire``) or, in a server, a page
at a time (``fire_page``: server/_timer_fires.py), which changes how the transitions
are computed and committed together, not what each one is or when it may happen.

TLA+ (tla/History.tla): ``FireSomeTimer`` / ``FireTimerA`` (a heap row handed to the
engine, whose transition is EngineCore's ``FireTimer``: server/_timeouts.py) and the
heap rebuilt from the store by ``Restart``. The model's ``heap`` is this queue's heap
together with the rows of the window past the cursor, which pages read in due order:
paging changes when a row is loaded, never which rows fire.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence

from tideflow.history import HistoryStore, RunKey, TimerRow

from ._config import Clock
from ._failures import log_retry

log = logging.getLogger("tideflow.server.timers")

_US = 1_000_000
# Fires in flight at once. The store commits concurrent transitions together (group
# commit, up to 64 per transaction): twice that keeps the next batch forming while one
# commits.
_MAX_CONCURRENT_FIRES = 128
# With a page-firing callback (``run``'s ``fire_page``: server/_timer_fires.py), the
# due timers go in pages of up to this many, as many pages in flight as the room holds:
# every timer due and in memory has its transition computed (and its event time
# taken) at once, without waiting for the commits of the pages before it.
_PAGE = 512
# How long after its due time each of the last this many fires ended (its transition
# committed): reported by the line the queue logs when it stops (bench/timers.py).
_DONE_LATENESS_KEPT = 65_536
# Pause before firing a timer again whose transition failed (not a stale timer: an
# error, e.g. the store unavailable), and before reading the window again.
_FIRE_RETRY_S = 1.0
_REFILL_RETRY_S = 1.0
#: Entries of dropped rows the heap may keep before it is compacted (when they are
#: also half of it): so the heap holds at most ``max_in_memory`` + this many entries.
DEAD_ENTRIES_KEPT = 64
# A keyset cursor: (fire_at, key) reads the rows after that row, (fire_at, "") the rows
# due at or after fire_at (history/_store.py timers_due_before). Python only ever
# compares cursors by fire_at, so the database's collation of keys never matters here.
_Cursor = tuple[int, str]
FirePage = Callable[[list[TimerRow]], Awaitable[Sequence[BaseException | None]]]
_FROM_START: _Cursor = (-(2**62), "")


def _back_to(cursor: _Cursor | None, fire_at: int) -> _Cursor:
    """``cursor`` moved back, if need be, so the next pages read timers due at ``fire_at``."""
    if cursor is not None and cursor[0] < fire_at:
        return cursor
    return (fire_at, "")


class TimerQueue:
    def __init__(
        self,
        store: HistoryStore,
        clock: Clock,
        *,
        window_s: float,
        max_in_memory: int = 4096,
        owns: Callable[[RunKey], bool] | None = None,
        owned: Callable[[], Collection[int]] | None = None,
    ) -> None:
        if max_in_memory < 1:
            raise ValueError("max_in_memory must be at least 1")
        self._store = store
        # The shards this node serves (server/_shards.py): pages read only theirs,
        # and timers of a shard it lost are dropped. None: every run.
        self._owns = owns
        self._owned = owned
        self._clock = clock
        self._window_us = int(window_s * _US)
        self._cap = max_in_memory
        self._heap: list[tuple[int, str, TimerRow]] = []
        # Keys in the heap or firing: len(_known) is what the queue holds.
        self._known: set[str] = set()
        # Keys being fired, and keys whose rows a commit deleted while they sat in
        # the heap (their heap entries are skipped when popped, or compacted away).
        self._firing: set[str] = set()
        self._dead: set[str] = set()
        self.peak_held = 0  # the most rows held at once (diagnostics, tests)
        # Timers due before the horizon belong to the window; past the cursor, the
        # window's rows are still to be read (None: all read).
        self._horizon = 0
        self._cursor: _Cursor | None = _FROM_START
        # Reads of the store in progress, and the keys whose fire ended meanwhile: a
        # read may return a row its fire deleted after the read began.
        self._reads = 0
        self._fired_while_reading: set[str] = set()
        # The earliest due time _move_back was asked for while a page was being read.
        self._moved_back_to: int | None = None
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(min(_MAX_CONCURRENT_FIRES, max_in_memory))
        self._pages = asyncio.Semaphore(max(1, max_in_memory // _PAGE))
        # Microseconds from due to fired of the last fires (a ring): diagnostics.
        self._done_late: list[int] = []
        self._fired_count = 0

    def held(self) -> int:
        """Timer rows in memory: the heap and the fires in flight."""
        return len(self._known)

    def memory_held(self) -> dict[str, int]:
        """The heap (with the entries of dropped rows until compacted), and the key sets
        beside it; ``held`` (rows in memory) is at most ``max_in_memory``."""
        return {
            "timer_rows_held": self.held(),
            "timer_heap_entries": len(self._heap),
            "timer_dead_keys": len(self._dead),
            "timer_fired_while_reading": len(self._fired_while_reading),
        }

    def pending(self) -> int:
        return len(self._heap) - len(self._dead)

    def add(self, timers: list[TimerRow]) -> None:
        """Timers just committed. Those beyond the window are read by a later page."""
        wake = False
        for timer in timers:
            if timer.fire_at < self._horizon:
                wake |= self._offer(timer)
        if wake:
            self._wakeup.set()

    def drop(self, timer_keys: Collection[str]) -> None:
        """Rows a commit deleted: they leave the queue now instead of firing stale."""
        for key in timer_keys:
            if key in self._known and key not in self._firing:
                self._known.discard(key)
                self._dead.add(key)
        if len(self._dead) > DEAD_ENTRIES_KEPT and len(self._dead) * 2 > len(self._heap):
            self._compact()

    def _compact(self) -> None:
        """The heap without the entries of dropped rows."""
        if self._dead:
            dead = self._dead
            self._heap = [entry for entry in self._heap if entry[1] not in dead]
            heapq.heapify(self._heap)
            dead.clear()

    def _offer(self, timer: TimerRow, *, paged: bool = False) -> bool:
        """Take ``timer`` into the heap if it fits or displaces a later one; else leave
        it to a page. True if it is the heap's new earliest.

        The heap never holds a timer due after the cursor's due time (unless read by
        the page that moves the cursor past it): the rows not read yet are due no
        earlier than anything in the heap, so the heap's earliest is due first."""
        key = timer.timer_key
        if key in self._known:
            return False
        if key in self._dead:
            self._compact()  # its old entry must not shadow the new one
        cursor = self._cursor
        if not paged and cursor is not None and timer.fire_at > cursor[0]:
            # Past the cursor: a page reads it in its turn. Not the page in flight,
            # though, if it read the store before this row's commit: that page must
            # end before the row (it would move the cursor past it, losing the timer
            # until a restart).
            self._move_back(timer.fire_at)
            return False
        if len(self._known) >= self._cap:
            self._compact()
            latest = max(self._heap) if self._heap else None
            if latest is None or latest[0] <= timer.fire_at:
                self._move_back(timer.fire_at)
                return False
            # Rare (a full heap and an earlier timer): O(heap), fine.
            self._heap.remove(latest)
            heapq.heapify(self._heap)
            self._known.discard(latest[1])
            self._move_back(latest[0])
        self._known.add(key)
        self.peak_held = max(self.peak_held, len(self._known))
        earliest = self._heap[0][0] if self._heap else None
        heapq.heappush(self._heap, (timer.fire_at, key, timer))
        return earliest is None or timer.fire_at < earliest

    def _move_back(self, fire_at: int) -> None:
        """A timer due at ``fire_at`` stays in the store: the next pages read it."""
        self._cursor = _back_to(self._cursor, fire_at)
        if self._moved_back_to is None or fire_at < self._moved_back_to:
            self._moved_back_to = fire_at

    def _advance_window(self) -> None:
        """Move the horizon to ``now + window``: pages read the timers newly in it."""
        horizon = self._clock.now_micros() + self._window_us
        if horizon <= self._horizon:
            return
        if self._cursor is None:
            self._cursor = (self._horizon, "")
        self._horizon = horizon

    def reread(self) -> None:
        """Read the whole window again: after a store outage, a commit whose outcome
        was in doubt may have written timers nobody handed to ``add``."""
        # Through _move_back: a page in flight (it may have read before that commit)
        # must not move the cursor past the beginning when it ends.
        self._move_back(_FROM_START[0])
        self._wakeup.set()

    def _wants_page(self) -> bool:
        if self._cursor is None:
            return False
        room = self._cap - len(self._known)
        return room > 0 and (room * 2 >= self._cap or not self._heap)

    async def _read_page(self) -> None:
        """Read the next page of the window into the room there is."""
        cursor = self._cursor
        assert cursor is not None
        room = self._cap - len(self._known)
        shards = None if self._owned is None else list(self._owned())
        self._moved_back_to = None
        rows, read_to = await self._read(limit=room, shards=shards, after=cursor)
        wake = False
        for row in rows:
            wake |= self._offer(row, paged=True)
        # A timer left to the store meanwhile (by add(), a shard's recovery, or this
        # page when add() took its room) must stay ahead of the cursor.
        if self._moved_back_to is not None:
            read_to = _back_to(read_to, self._moved_back_to)
        self._cursor = read_to
        if wake:
            self._wakeup.set()

    async def _read(
        self, *, limit: int, shards: list[int] | None, after: _Cursor | None = None
    ) -> tuple[list[TimerRow], _Cursor | None]:
        """The window's rows without those whose fire ended while reading, and the
        cursor after the last row read (None: fewer than ``limit``, the end)."""
        self._reads += 1
        try:
            rows = await self._store.timers_due_before(
                self._horizon, limit=limit, shards=shards, after=after
            )
            end = None if len(rows) < limit else (rows[-1].fire_at, rows[-1].timer_key)
            fired = self._fired_while_reading
            return [row for row in rows if row.timer_key not in fired] if fired else rows, end
        finally:
            self._reads -= 1
            if not self._reads:
                self._fired_while_reading.clear()

    def _forget(self, key: str) -> None:
        self._firing.discard(key)
        self._known.discard(key)
        if self._reads:
            self._fired_while_reading.add(key)

    async def recover_shard(self, shard: int) -> None:
        """A shard acquired: its timers due within the window, up to the room there is
        (or the place of later ones); the rest are read by pages."""
        if self._horizon == 0:
            return  # the first page reads them
        rows, end = await self._read(limit=self._cap, shards=[shard])
        if end is not None:
            self._move_back(end[0])  # the shard's later ones
        if any([self._offer(row) for row in rows]):
            self._wakeup.set()

    def drop_unowned(self) -> None:
        """Forget the timers of shards this node no longer serves."""
        owns = self._owns
        if owns is None:
            return
        self._compact()
        kept = [entry for entry in self._heap if owns(entry[2].key)]
        for _, key, timer in self._heap:
            if not owns(timer.key):
                self._known.discard(key)
        heapq.heapify(kept)
        self._heap = kept

    async def run(
        self, fire: Callable[[TimerRow], Awaitable[None]], fire_page: FirePage | None = None
    ) -> None:
        """Fire due timers through ``fire`` until cancelled, or a page at a time through
        ``fire_page`` if given (per timer: None, fired; else the error its fire ended
        with). Each firing is a task of this call's task group: cancelling the call
        cancels and awaits them all."""
        try:
            async with asyncio.TaskGroup() as fires:
                await self._loop(fires, fire, fire_page)
        finally:
            log.info(
                "timer queue stopped: at most %d timer rows were in memory (limit %d); "
                "%d fired, %s",
                self.peak_held,
                self._cap,
                self._fired_count,
                self._done_lateness(),
            )

    def _done_lateness(self) -> str:
        late = sorted(self._done_late)
        if not late:
            return "none late"
        p50, p99 = late[len(late) // 2], late[min(len(late) - 1, len(late) * 99 // 100)]
        return (
            f"committed after due p50 {p50 / 1000:.1f} ms, p99 {p99 / 1000:.1f} ms, "
            f"max {late[-1] / 1000:.1f} ms (last {len(late)})"
        )

    def _fired(self, key: str, timer: TimerRow) -> None:
        """``timer``'s fire ended (committed, or dropped as stale)."""
        late = self._clock.now_micros() - timer.fire_at
        if len(self._done_late) < _DONE_LATENESS_KEPT:
            self._done_late.append(late)
        else:
            self._done_late[self._fired_count % _DONE_LATENESS_KEPT] = late
        self._fired_count += 1
        self._forget(key)

    async def _loop(
        self,
        fires: asyncio.TaskGroup,
        fire: Callable[[TimerRow], Awaitable[None]],
        fire_page: FirePage | None,
    ) -> None:
        next_advance = 0
        retry_page_at = 0
        while True:
            now = self._clock.now_micros()
            if now >= next_advance:
                self._advance_window()
                next_advance = now + self._window_us // 2
            if self._wants_page() and now >= retry_page_at:
                try:
                    await self._read_page()
                except Exception as exc:
                    # A store outage: timers already in the heap keep firing.
                    log_retry(log, "reading due timers", exc)
                    retry_page_at = now + int(_REFILL_RETRY_S * _US)
                continue
            while self._heap and self._heap[0][0] <= now:
                if fire_page is not None:
                    page = self._pop_due(now, min(_PAGE, self._cap))
                    if page:
                        await self._pages.acquire()
                        fires.create_task(self._fire_page(fire_page, page))
                    if self._wants_page():
                        break
                    continue
                _, key, timer = heapq.heappop(self._heap)
                if key in self._dead:
                    self._dead.discard(key)
                    continue
                self._firing.add(key)
                await self._slots.acquire()
                fires.create_task(self._fire_one(fire, key, timer))
                if self._wants_page():
                    break  # read on while the fires in flight commit
            else:
                await self._sleep_until_due(next_advance, retry_page_at)

    async def _sleep_until_due(self, next_advance: int, retry_page_at: int) -> None:
        wait_until = next_advance
        if self._heap:
            wait_until = min(wait_until, self._heap[0][0])
        if self._wants_page():
            wait_until = min(wait_until, retry_page_at)
        self._wakeup.clear()
        delay = max(0.0, (wait_until - self._clock.now_micros()) / _US)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wakeup.wait()

    def _pop_due(self, now: int, most: int) -> list[tuple[str, TimerRow]]:
        """Up to ``most`` timers due by ``now``, out of the heap and marked firing."""
        page: list[tuple[str, TimerRow]] = []
        while self._heap and self._heap[0][0] <= now and len(page) < most:
            _, key, timer = heapq.heappop(self._heap)
            if key in self._dead:
                self._dead.discard(key)
                continue
            self._firing.add(key)
            page.append((key, timer))
        return page

    async def _fire_page(self, fire_page: FirePage, page: list[tuple[str, TimerRow]]) -> None:
        owns = self._owns
        owned = [(k, t) for k, t in page if owns is None or owns(t.key)]
        for key, timer in page:
            if owns is not None and not owns(timer.key):
                self._forget(key)  # its shard moved: the new owner fires it
        outcomes: Sequence[BaseException | None]
        try:
            outcomes = await fire_page([t for _, t in owned]) if owned else []
        except Exception as exc:
            outcomes = [exc] * len(owned)
        finally:
            self._pages.release()
        failed: list[tuple[str, TimerRow, BaseException]] = []
        for (key, timer), outcome in zip(owned, outcomes, strict=True):
            if outcome is None:
                self._fired(key, timer)
            elif owns is not None and not owns(timer.key):
                self._forget(key)
            else:
                failed.append((key, timer, outcome))
        if failed:
            # Leave the rows in the store; push them back for another try shortly.
            key, _, error = failed[0]
            log_retry(log, f"firing {len(failed)} timers ({key} first)", error)
            await asyncio.sleep(_FIRE_RETRY_S)
            for key, timer, _ in failed:
                self._firing.discard(key)
                self._known.discard(key)
                self._offer(timer)
            self._wakeup.set()
        elif self._wants_page():
            self._wakeup.set()

    async def _fire_one(
        self, fire: Callable[[TimerRow], Awaitable[None]], key: str, timer: TimerRow
    ) -> None:
        try:
            if self._owns is None or self._owns(timer.key):
                await fire(timer)
        except Exception as exc:
            if self._owns is not None and not self._owns(timer.key):
                self._forget(key)
                return  # its shard moved: the new owner fires it
            # Leave the row in the store; push it back for another try shortly.
            log_retry(log, f"firing timer {key}", exc)
            await asyncio.sleep(_FIRE_RETRY_S)
            self._firing.discard(key)
            self._known.discard(key)
            self._offer(timer)
            self._wakeup.set()
            return
        finally:
            self._slots.release()
        self._fired(key, timer)
        if self._wants_page():
            self._wakeup.set()
