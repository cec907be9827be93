"""The scheduler's background loops: owned by ``Scheduler.run``'s TaskGroup, stopped
with it, and never swallowing a cancellation; a failed pass is logged and retried."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import pytest

from tideflow.history import HistoryStore
from tideflow.server._config import SystemClock
from tideflow.server._engine import HistoryEngine
from tideflow.server._schedules import Scheduler

_LOOPS = {"tideflow-scheduler-decide", "tideflow-scheduler-act"}
_BOUND_S = 30.0


class _ClockFailingOnce:
    """A clock whose first reading fails, as a store or clock hiccup would make the
    first decide pass fail; the events tell the test where the scheduler is."""

    def __init__(self) -> None:
        self.failed = asyncio.Event()
        self.read_again = asyncio.Event()
        self._system = SystemClock()

    def now_micros(self) -> int:
        if not self.failed.is_set():
            self.failed.set()
            raise RuntimeError("clock unavailable")
        self.read_again.set()
        return self._system.now_micros()


def _loops_alive() -> set[str]:
    return {t.get_name() for t in asyncio.all_tasks() if not t.done()} & _LOOPS


async def test_failed_pass_is_retried_and_cancel_stops_both_loops(
    store: HistoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    clock = _ClockFailingOnce()
    # With no schedule in the store the scheduler never starts a workflow, so it
    # needs no engine here.
    scheduler = Scheduler(store, cast(HistoryEngine, None), clock)
    with caplog.at_level(logging.ERROR, logger="tideflow.server.schedules"):
        run = asyncio.create_task(scheduler.run())
        async with asyncio.timeout(_BOUND_S):
            await clock.failed.wait()
            scheduler.wake()  # skip the pause after a failure
            await clock.read_again.wait()  # the decide loop went on after the failure
        assert _loops_alive() == _LOOPS
        assert not run.done()
    assert [r.getMessage() for r in caplog.records] == ["scheduler decide pass failed; retrying"]

    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(_BOUND_S):
            await run
    assert run.cancelled()
    assert _loops_alive() == set()  # the TaskGroup waited for both loops to end
