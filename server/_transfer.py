"""The transfer processor: effects of one run's transition on other runs.

A transition that starts a child, finishes a child, signals or cancels another run,
or closes a parent with children writes an outbox row (``TaskKind.TRANSFER``) in its
own transaction. This processor acts on each row after the commit; the engine
method it calls records the outcome on the source run and deletes the row in one
transaction, and every action is idempotent (request ids derived from the source run
and event), so a crash at any point replays the row safely. Rows are reloaded from
the store when the server starts.

TLA+ (tla/History.tla): the cross-run steps of ``StartChild``, ``ReportChild``,
``SignalExternal``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from tideflow.history import HistoryStore, StoreError, TaskKind, TaskRow

log = logging.getLogger("tideflow.server.transfer")

_CONCURRENCY = 16
_RETRY_DELAY_S = 1.0


class TransferProcessor:
    def __init__(self, store: HistoryStore, process: Callable[[TaskRow], Awaitable[None]]) -> None:
        self._store = store
        self._process = process
        self._queue: asyncio.Queue[TaskRow] = asyncio.Queue()
        self._queued: set[str] = set()
        self._slots = asyncio.Semaphore(_CONCURRENCY)
        self._inflight: set[asyncio.Task[None]] = set()

    def add(self, tasks: list[TaskRow]) -> None:
        for task in tasks:
            if task.task_key not in self._queued:
                self._queued.add(task.task_key)
                self._queue.put_nowait(task)

    async def recover(self) -> int:
        """Queue every transfer row left in the store (server start)."""
        count = 0
        after = ""
        while True:
            rows = await self._store.list_tasks(after_key=after, limit=5000)
            if not rows:
                return count
            transfers = [r for r in rows if r.kind == TaskKind.TRANSFER]
            self.add(sorted(transfers, key=lambda r: r.created_at))
            count += len(transfers)
            after = rows[-1].task_key

    async def run(self) -> None:
        try:
            while True:
                task = await self._queue.get()
                await self._slots.acquire()
                job = asyncio.create_task(self._one(task))
                self._inflight.add(job)
                job.add_done_callback(self._inflight.discard)
        finally:
            for job in list(self._inflight):
                job.cancel()
            await asyncio.gather(*self._inflight, return_exceptions=True)

    async def _one(self, task: TaskRow) -> None:
        try:
            await self._process(task)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, StoreError):  # an outage: one line, not a traceback
                log.warning("transfer %s failed (%s); retrying", task.task_key, exc)
            else:
                log.exception("transfer %s failed; retrying", task.task_key)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(_RETRY_DELAY_S)
            self._queue.put_nowait(task)
            return
        finally:
            self._slots.release()
        self._queued.discard(task.task_key)
