"""The durable timer queue.

Timers (user timers, activity and workflow task timeouts, retry backoffs, run
timeouts) are rows in the store, written in the transition that arms them. This
queue keeps the ones due within a window in a heap, refills the window from the
store periodically, and fires each due timer through the engine, which validates it
against the run's state and deletes the row in the same transaction. Timers survive
restarts because the window is refilled from the store on start.

TLA+ (tla/History.tla): ``FireSomeTimer`` / ``FireTimerA`` (a heap row handed to the
engine, whose transition is EngineCore's ``FireTimer``: server/_timeouts.py) and the
heap rebuilt from the store by ``Restart``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Awaitable, Callable, Collection

from tideflow.history import HistoryStore, RunKey, TimerRow

from ._config import Clock
from ._failures import log_retry

log = logging.getLogger("tideflow.server.timers")

_US = 1_000_000
_MAX_CONCURRENT_FIRES = 64
# Pause before firing a timer again whose transition failed (not a stale timer: an
# error, e.g. the store unavailable), and before reading the window again.
_FIRE_RETRY_S = 1.0
_REFILL_RETRY_S = 1.0


class TimerQueue:
    def __init__(
        self,
        store: HistoryStore,
        clock: Clock,
        *,
        window_s: float,
        owns: Callable[[RunKey], bool] | None = None,
        owned: Callable[[], Collection[int]] | None = None,
    ) -> None:
        self._store = store
        # The shards this node serves (server/_shards.py): refills read only theirs,
        # and timers of a shard it lost are dropped. None: every run.
        self._owns = owns
        self._owned = owned
        self._clock = clock
        self._window_us = int(window_s * _US)
        self._heap: list[tuple[int, str, TimerRow]] = []
        self._known: set[str] = set()
        self._loaded_until = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(_MAX_CONCURRENT_FIRES)

    def add(self, timers: list[TimerRow]) -> None:
        """Timers just committed. Those beyond the window are picked up by a refill."""
        wake = False
        for timer in timers:
            if timer.fire_at < self._loaded_until:
                wake |= self._push(timer)
        if wake:
            self._wakeup.set()

    def _push(self, timer: TimerRow) -> bool:
        key = timer.timer_key
        if key in self._known:
            return False
        self._known.add(key)
        earliest = self._heap[0][0] if self._heap else None
        heapq.heappush(self._heap, (timer.fire_at, key, timer))
        return earliest is None or timer.fire_at < earliest

    async def _refill(self) -> None:
        until = self._clock.now_micros() + self._window_us
        if self._owned is None:
            rows = await self._store.timers_due_before(until)
        else:
            rows = await self._store.timers_due_before(until, shards=list(self._owned()))
        # Set the horizon first: timers committed while we were reading and due
        # before it are added by add(); _known de-duplicates the overlap.
        self._loaded_until = max(self._loaded_until, until)
        for row in rows:
            self._push(row)

    async def recover_shard(self, shard: int) -> None:
        """A shard acquired: its timers due within the window already read."""
        if self._loaded_until == 0:
            return  # the first refill reads them
        rows = await self._store.timers_due_before(self._loaded_until, shards=[shard])
        if any([self._push(row) for row in rows]):
            self._wakeup.set()

    def drop_unowned(self) -> None:
        """Forget the timers of shards this node no longer serves."""
        owns = self._owns
        if owns is None:
            return
        kept = [entry for entry in self._heap if owns(entry[2].key)]
        for _, key, timer in self._heap:
            if not owns(timer.key):
                self._known.discard(key)
        heapq.heapify(kept)
        self._heap = kept

    async def run(self, fire: Callable[[TimerRow], Awaitable[None]]) -> None:
        """Fire due timers through ``fire`` until cancelled. Each firing is a task of
        this call's task group: cancelling the call cancels and awaits them all."""
        async with asyncio.TaskGroup() as fires:
            next_refill = 0
            while True:
                now = self._clock.now_micros()
                if now >= next_refill:
                    next_refill = await self._refill_or_retry(now)
                    continue
                while self._heap and self._heap[0][0] <= now:
                    _, key, timer = heapq.heappop(self._heap)
                    await self._slots.acquire()
                    fires.create_task(self._fire_one(fire, key, timer))
                wait_until = next_refill
                if self._heap:
                    wait_until = min(wait_until, self._heap[0][0])
                self._wakeup.clear()
                delay = max(0.0, (wait_until - self._clock.now_micros()) / _US)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wakeup.wait()

    async def _refill_or_retry(self, now: int) -> int:
        """Refill the window; returns when to refill next. A store that fails (an
        outage) is tried again shortly: timers already in the heap keep firing."""
        try:
            await self._refill()
        except Exception as exc:
            log_retry(log, "reading due timers", exc)
            return now + int(_REFILL_RETRY_S * _US)
        return now + self._window_us // 2

    async def _fire_one(
        self, fire: Callable[[TimerRow], Awaitable[None]], key: str, timer: TimerRow
    ) -> None:
        try:
            if self._owns is None or self._owns(timer.key):
                await fire(timer)
        except Exception as exc:
            if self._owns is not None and not self._owns(timer.key):
                self._known.discard(key)
                return  # its shard moved: the new owner fires it
            # Leave the row in the store; push it back for another try shortly.
            log_retry(log, f"firing timer {key}", exc)
            retry = TimerRow(
                key=timer.key,
                kind=timer.kind,
                ref_id=timer.ref_id,
                attempt=timer.attempt,
                fire_at=timer.fire_at,
            )
            self._known.discard(key)
            await asyncio.sleep(_FIRE_RETRY_S)
            self._push(retry)
            self._wakeup.set()
            return
        finally:
            self._slots.release()
        self._known.discard(key)

    def pending(self) -> int:
        return len(self._heap)
