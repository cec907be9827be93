"""The durable timer queue.

Timers (user timers, activity and workflow task timeouts, retry backoffs, run
timeouts) are rows in the store, written in the transition that arms them. This
queue keeps the ones due within a window in a heap, refills the window from the
store periodically, and fires each due timer through the engine, which validates it
against the run's state and deletes the row in the same transaction. Timers survive
restarts because the window is refilled from the store on start.

TLA+ (tla/History.tla): ``FireTimer``.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Awaitable, Callable

from tideflow.history import HistoryStore, StoreError, TimerRow

from ._config import Clock

log = logging.getLogger("tideflow.server.timers")

_US = 1_000_000
_MAX_CONCURRENT_FIRES = 64
_REFILL_RETRY_US = _US


class TimerQueue:
    def __init__(
        self,
        store: HistoryStore,
        fire: Callable[[TimerRow], Awaitable[None]],
        clock: Clock,
        *,
        window_s: float,
    ) -> None:
        self._store = store
        self._fire = fire
        self._clock = clock
        self._window_us = int(window_s * _US)
        self._heap: list[tuple[int, str, TimerRow]] = []
        self._known: set[str] = set()
        self._loaded_until = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(_MAX_CONCURRENT_FIRES)
        self._inflight: set[asyncio.Task[None]] = set()

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
        rows = await self._store.timers_due_before(until)
        # Set the horizon first: timers committed while we were reading and due
        # before it are added by add(); _known de-duplicates the overlap.
        self._loaded_until = max(self._loaded_until, until)
        for row in rows:
            self._push(row)

    async def run(self) -> None:
        """Fire timers until cancelled."""
        next_refill = 0
        try:
            while True:
                now = self._clock.now_micros()
                if now >= next_refill:
                    try:
                        await self._refill()
                    except StoreError as exc:
                        # The database is away: keep firing what the heap holds and
                        # try the refill again shortly; never let the loop die.
                        log.warning("timer refill failed (%s); retrying in 1 s", exc)
                        next_refill = now + _REFILL_RETRY_US
                    else:
                        next_refill = now + self._window_us // 2
                        continue
                while self._heap and self._heap[0][0] <= now:
                    _, key, timer = heapq.heappop(self._heap)
                    await self._slots.acquire()
                    task = asyncio.create_task(self._fire_one(key, timer))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
                wait_until = next_refill
                if self._heap:
                    wait_until = min(wait_until, self._heap[0][0])
                self._wakeup.clear()
                delay = max(0.0, (wait_until - self._clock.now_micros()) / _US)
                try:
                    async with asyncio.timeout(delay):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
        finally:
            for task in list(self._inflight):
                task.cancel()
            await asyncio.gather(*self._inflight, return_exceptions=True)

    async def _fire_one(self, key: str, timer: TimerRow) -> None:
        try:
            await self._fire(timer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Leave the row in the store; push it back for another try shortly. A store
            # outage fails every timer alike: one line each, not a traceback.
            if isinstance(exc, StoreError):
                log.warning("firing timer %s failed (%s); will retry", key, exc)
            else:
                log.exception("firing timer %s failed; will retry", key)
            retry = TimerRow(
                key=timer.key,
                kind=timer.kind,
                ref_id=timer.ref_id,
                attempt=timer.attempt,
                fire_at=timer.fire_at,
            )
            self._known.discard(key)
            await asyncio.sleep(1.0)
            self._push(retry)
            self._wakeup.set()
            return
        finally:
            self._slots.release()
        self._known.discard(key)

    def pending(self) -> int:
        return len(self._heap)
