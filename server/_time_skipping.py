"""Time skipping for the test environment (``tideflow.worker_sdk.testing``).

A test of a workflow that sleeps for 30 days must not take 30 days. The engine reads
time from a ``Clock``; the ``SkippingClock`` is the system clock plus an offset that
only moves forward. The ``TimeSkipper`` moves it: when nothing else is running it jumps
to the earliest timer, which then fires as if its time had come.

"Nothing else is running" is read from the store, in one statement, so it describes
one committed state (``HistoryStore.work_outstanding``): no task row (no workflow,
activity or transfer task waiting to be handed out), no timer that exists only while a
task is with a worker (a workflow task's timeout, an activity's start-to-close or
heartbeat timeout, a schedule-to-start timeout: the work is in a worker's hands) and
no timer due now that has not fired yet (its transition is still to come). Every
transition commits its events, task rows and timer rows together, so a state the
skipper reads as idle really is one in which only the passage of time can cause the
next event. A jump then fires exactly the earliest timer(s), never a task timeout, and
a workflow always sees time move forward from one task to the next.

The skipper polls that statement (a test environment holds a handful of runs; the
poll backs off while nothing changes) instead of hooking the engine's commit path,
which stays free of anything test-only. After a jump it wakes the timer queue
(``on_jump``), which otherwise sleeps until the real time of its next window.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tideflow.history import HistoryStore, TimerKind

# Timers that exist only while a task is waiting for, or being worked on by, a worker.
BUSY_TIMER_KINDS = frozenset(
    {
        TimerKind.WORKFLOW_TASK_TIMEOUT,
        TimerKind.ACTIVITY_SCHEDULE_TO_START,
        TimerKind.ACTIVITY_START_TO_CLOSE,
        TimerKind.ACTIVITY_HEARTBEAT,
        TimerKind.STICKY_SCHEDULE_TO_START,
    }
)
# Poll interval bounds: right after a change the next state comes soon (a worker
# answering a task); while nothing changes the interval doubles up to the maximum.
_MIN_POLL_S = 0.002
_MAX_POLL_S = 0.05


class SkippingClock:
    """The system clock plus a forward-only offset (microseconds since the epoch)."""

    def __init__(self) -> None:
        self._offset_us = 0

    def now_micros(self) -> int:
        return time.time_ns() // 1000 + self._offset_us

    def advance_to(self, moment_us: int) -> None:
        """Move to ``moment_us`` if that is ahead; the clock never goes back."""
        ahead = moment_us - self.now_micros()
        if ahead > 0:
            self._offset_us += ahead


@dataclass(order=True)
class _Sleeper:
    until_us: int
    done: asyncio.Future[None] = field(compare=False)


class TimeSkipper:
    """Moves a ``SkippingClock`` ahead whenever the store says nothing is running:
    to the earliest timer while ``auto`` is on, and, for ``sleep``, through the timers
    due before the sleeper's end, in order, then to its end."""

    def __init__(
        self, store: HistoryStore, clock: SkippingClock, on_jump: Callable[[], None]
    ) -> None:
        self._store = store
        self._clock = clock
        self._on_jump = on_jump
        self._sleepers: list[_Sleeper] = []
        self._changed = asyncio.Event()
        # Depth of auto_disabled() blocks; auto skipping is on at depth 0.
        self._auto_off = 0
        # How many states were read and how often the clock jumped (diagnostics, tests).
        self.reads = 0
        self.jumps = 0

    @property
    def auto(self) -> bool:
        return self._auto_off == 0

    @contextlib.contextmanager
    def auto_disabled(self) -> Iterator[None]:
        self._auto_off += 1
        try:
            yield
        finally:
            self._auto_off -= 1
            self._changed.set()

    async def sleep(self, seconds: float) -> None:
        """Return once the clock has moved ``seconds`` ahead, timers due meanwhile
        fired in order and what they caused settled (a running activity holds time)."""
        sleeper = _Sleeper(
            self._clock.now_micros() + int(seconds * 1_000_000),
            asyncio.get_running_loop().create_future(),
        )
        self._sleepers.append(sleeper)
        self._changed.set()
        try:
            await sleeper.done
        finally:
            if sleeper in self._sleepers:
                self._sleepers.remove(sleeper)

    async def run(self) -> None:
        """Until cancelled: read the store, jump when idle, wait a little, again."""
        delay = _MIN_POLL_S
        last: tuple[bool, int | None] | None = None
        while True:
            state = await self._store.work_outstanding(self._clock.now_micros(), BUSY_TIMER_KINDS)
            moved = self._step(*state)
            self.reads += 1
            delay = _MIN_POLL_S if moved or state != last else min(delay * 2, _MAX_POLL_S)
            last = state
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._changed.wait()

    def _step(self, busy: bool, next_timer_us: int | None) -> bool:
        """One decision on one state read from the store; True if the clock jumped.
        A sleeper wakes only in an idle state: what came due by its end has settled."""
        if busy:
            return False
        now = self._clock.now_micros()
        for sleeper in self._sleepers:
            if sleeper.until_us <= now and not sleeper.done.done():
                sleeper.done.set_result(None)
        waiting = [s.until_us for s in self._sleepers if not s.done.done()]
        if waiting:
            target: int | None = min(waiting)
            if next_timer_us is not None:
                target = min(min(waiting), next_timer_us)
        else:
            target = next_timer_us if self.auto else None
        if target is None:
            return False
        self._clock.advance_to(target)
        self.jumps += 1
        self._on_jump()
        return True
