"""Every background task of a server node has an owner that cancels and awaits it.

The timer queue, the transfer processor and the sticky mover each run their work in
a task group of their own ``run()`` call, and the server runs those loops in one task
group that ``stop()`` cancels and waits for: after ``stop()`` nothing of the node is
left running, and ``stop()`` may be called again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, cast

from tideflow.history import HistoryStore, RunKey, TaskKind, TaskRow, TimerKind, TimerRow
from tideflow.server import ServerConfig, TideflowServer
from tideflow.server._timers import TimerQueue
from tideflow.server._transfer import TransferProcessor
from tideflow.worker_sdk import Client

_KEY = RunKey(namespace="default", workflow_id="wf", run_id="run")
_NOW_US = 1_000_000_000


class _Clock:
    def now_micros(self) -> int:
        return _NOW_US


class _Store:
    """The store calls the timer queue and transfer processor make, with fixed rows."""

    def __init__(self, timers: list[TimerRow]) -> None:
        self._timers = timers

    async def timers_due_before(self, until_us: int, **_page: object) -> list[TimerRow]:
        return [t for t in self._timers if t.fire_at < until_us]


class _Blocked:
    """A handler that parks until cancelled and records that it was."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.cancelled = False

    async def __call__(self, row: object) -> None:
        self.entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def _cancelling_awaits_the_handler(
    run: Callable[[_Blocked], Coroutine[Any, Any, None]],
) -> None:
    """Start ``run(handler)``, wait until the handler is busy, cancel the run: the
    run ends cancelled, and the handler's own cancellation has already happened."""
    handler = _Blocked()
    runner = asyncio.create_task(run(handler))
    async with asyncio.timeout(30):
        await handler.entered.wait()
    runner.cancel()
    await asyncio.wait([runner])
    assert runner.cancelled()
    assert handler.cancelled


async def test_cancelling_the_timer_queue_cancels_and_awaits_a_fire_in_flight() -> None:
    due = TimerRow(key=_KEY, kind=TimerKind.USER_TIMER, ref_id=5, attempt=0, fire_at=_NOW_US - 1)
    queue = TimerQueue(cast(HistoryStore, _Store([due])), _Clock(), window_s=30.0)
    await _cancelling_awaits_the_handler(queue.run)


async def test_cancelling_the_transfer_processor_cancels_and_awaits_a_row_in_flight() -> None:
    processor = TransferProcessor(cast(HistoryStore, _Store([])))
    row = TaskRow(
        key=_KEY, task_queue="transfer:start-child", kind=TaskKind.TRANSFER, ref_id=5, attempt=0
    )
    processor.add([row])
    await _cancelling_awaits_the_handler(processor.run)


async def test_stop_leaves_no_task_of_the_node_running_and_is_safe_twice(
    store_url: str,
) -> None:
    before = asyncio.all_tasks()
    server = TideflowServer(store_url, port=0, config=ServerConfig())
    await server.start()
    loops = {
        "tideflow-timer-queue",
        "tideflow-transfers",
        "tideflow-sticky-mover",
        "tideflow-scheduler",
    }
    # A round trip through the node: its background task has run by then.
    client = await Client.connect(server.address)
    try:
        assert await client.count_workflows() == 0
    finally:
        await client.close()
    assert loops <= {t.get_name() for t in asyncio.all_tasks()}
    await server.stop()
    left = {t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()}
    assert not [t for t in left if not t.done()], left
    await server.stop()  # a second stop does nothing and raises nothing
