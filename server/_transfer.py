"""The transfer processor: effects of one run's transition on other runs.

A transition that starts a child, finishes a child, signals or cancels another run,
or closes a parent with children writes an outbox row (``TaskKind.TRANSFER``) in its
own transaction. This processor acts on each row after the commit; the engine
method it calls records the outcome on the source run and deletes the row in one
transaction, and every action is idempotent (request ids derived from the source run
and event), so a crash at any point replays the row safely. Rows are reloaded from
the store when the server starts.

TLA+ (tla/EngineCore.tla): the ``TransferRow`` outbox rows that the transitions
``RecordChildStarted``, ``RecordChildClosed`` and ``RecordExternalOutcome`` consume
(server/_cross_run.py), and the parent-close policy rows ``Close`` writes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection

from tideflow.history import HistoryStore, RunKey, TaskKind, TaskRow

from ._failures import log_retry

log = logging.getLogger("tideflow.server.transfer")

_CONCURRENCY = 16
_RETRY_DELAY_S = 1.0


class TransferProcessor:
    def __init__(self, store: HistoryStore, owns: Callable[[RunKey], bool] | None = None) -> None:
        self._store = store
        # Whether this node serves a run's shard now (server/_shards.py): the rows of
        # a shard it lost are dropped when their turn comes (the new owner recovered
        # them). None: every run.
        self._owns = owns
        self._queue: asyncio.Queue[TaskRow] = asyncio.Queue()
        self._queued: set[str] = set()
        self._slots = asyncio.Semaphore(_CONCURRENCY)

    def add(self, tasks: list[TaskRow]) -> None:
        for task in tasks:
            if task.task_key not in self._queued:
                self._queued.add(task.task_key)
                self._queue.put_nowait(task)

    def memory_held(self) -> dict[str, int]:
        return {"transfer_queued_rows": len(self._queued)}

    async def recover(self, shards: Collection[int] | None = None) -> int:
        """Queue the transfer rows left in the store (of ``shards`` only, if given):
        a server start, a shard acquired, the store back after an outage."""
        count = 0
        after = ""
        while True:
            rows = await self._store.list_tasks(after_key=after, limit=5000, shards=shards)
            if not rows:
                return count
            transfers = [r for r in rows if r.kind == TaskKind.TRANSFER]
            self.add(sorted(transfers, key=lambda r: r.created_at))
            count += len(transfers)
            after = rows[-1].task_key

    async def run(self, process: Callable[[TaskRow], Awaitable[None]]) -> None:
        """Carry out queued rows through ``process`` until cancelled, up to
        ``_CONCURRENCY`` at a time. Each row is a task of this call's task group:
        cancelling the call cancels and awaits them all (a row cut short stays in the
        store and is recovered by the next start)."""
        async with asyncio.TaskGroup() as jobs:
            while True:
                task = await self._queue.get()
                await self._slots.acquire()
                jobs.create_task(self._one(process, task))

    def _served(self, task: TaskRow) -> bool:
        return self._owns is None or self._owns(task.key)

    async def _one(self, process: Callable[[TaskRow], Awaitable[None]], task: TaskRow) -> None:
        try:
            if self._served(task):
                await process(task)
        except Exception as exc:
            if not self._served(task):
                self._queued.discard(task.task_key)
                return  # its shard moved: the new owner carries it out
            log_retry(log, f"transfer {task.task_key}", exc)
            # Queued again later without holding a slot meanwhile: rows that wait
            # for the sites' link (any number, for hours) must not starve the rest.
            asyncio.get_running_loop().call_later(_RETRY_DELAY_S, self._queue.put_nowait, task)
            return
        finally:
            self._slots.release()
        self._queued.discard(task.task_key)
