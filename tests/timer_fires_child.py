"""A process that fires every timer row of a database a page at a time and SIGKILLs
itself in the middle (tests/test_timer_fires.py).

    python timer_fires_child.py <store url> <page size> <transaction> <when>

Pages of ``page size`` timers go through ``HistoryEngine.fire_timers`` one after
another (so each is its own transaction); during the ``transaction``-th write (1 is
the first) the process kills itself with SIGKILL: ``when`` = ``before-commit``, after
the transaction's statements ran but before it committed; ``after-commit``, once it
committed, before the engine heard of it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

from helpers_store import RunnerWrapper
from sqlalchemy import Connection

from tideflow.history import HistoryStore, TaskRow, TimerRow
from tideflow.history._dialects import Runner, open_runner
from tideflow.server import ServerConfig, SystemClock
from tideflow.server._engine import Dispatcher, HistoryEngine

T = TypeVar("T")


class _KillOnWrite(RunnerWrapper):
    """Kills the process during its ``transaction``-th write once ``armed``."""

    def __init__(self, inner: Runner, transaction: int, when: str) -> None:
        super().__init__(inner)
        # One writer lane: a page is then one transaction on PostgreSQL too (its
        # lanes would split a page by workflow id).
        self.writer_lanes = 1
        self.armed = False
        self._left = transaction
        self._when = when

    async def write(self, fn: Callable[[Connection], T]) -> T:
        if not self.armed:
            return await self._inner.write(fn)
        self._left -= 1
        last = self._left == 0

        def txn(conn: Connection) -> T:
            result = fn(conn)
            if last and self._when == "before-commit":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        result = await self._inner.write(txn)
        if last:
            os.kill(os.getpid(), signal.SIGKILL)  # after-commit (before-commit died already)
        return result


class _Nowhere(Dispatcher):
    def add_tasks(self, tasks: list[TaskRow]) -> None:
        pass

    def add_timers(self, timers: list[TimerRow]) -> None:
        pass


async def main(url: str, page: int, transaction: int, when: str) -> None:
    runner = _KillOnWrite(open_runner(url), transaction, when)
    store = await HistoryStore.open_on(runner)
    engine = HistoryEngine(store, _Nowhere(), SystemClock(), ServerConfig())
    timers = await store.timers_due_before(2**62)
    runner.armed = True
    for first in range(0, len(timers), page):
        outcomes = await engine.fire_timers(timers[first : first + page])
        assert outcomes == [None] * len(outcomes), outcomes
    print("all fired: the kill never came", flush=True)
    await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
