"""Re-reading the backlog after a store outage.

A transition whose connection went away around its commit may have committed without
its caller knowing (``HistoryStore.writes_in_doubt``): the caller got an error, or a
retry of the same transaction found its own commit as a conflict, and the task and
transfer rows it wrote reached neither matching nor the transfer processor. Nothing
would dispatch them before a restart, and the run would wait for ever. So once such a
write happened, this loop re-reads every task row as soon as the store answers again,
exactly as a server start does (the rows of the task queues this node serves into its
backlogs, the rows of its runs to their queues' nodes); matching and the transfer
processor skip the ones they hold, and the engine drops any that turn out stale. The timer
queue reads its window again from the start (``TimerQueue.reread``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from tideflow.history import HistoryStore, StoreError

from ._timers import TimerQueue
from ._transfer import TransferProcessor

log = logging.getLogger("tideflow.server.resync")

_RETRY_DELAY_S = 1.0


async def resync_after_outages(
    store: HistoryStore,
    recover_tasks: Callable[[list[int] | None], Awaitable[int]],
    transfers: TransferProcessor,
    timers: TimerQueue,
) -> None:
    """Run until cancelled: after each write in doubt, re-dispatch the stored backlog
    (``recover_tasks``: of the shards given, server/_server.py ``_ShardHooks``)."""
    while True:
        await store.writes_in_doubt.wait()
        store.writes_in_doubt.clear()
        timers.reread()
        while True:
            try:
                # Only the shards this node holds (all of them for a store without
                # fencing, a tool's or a test's).
                shards = list(store.held_shards) if store.fencing else None
                tasks = await recover_tasks(shards)
                moved = await transfers.recover(shards)
            except StoreError as exc:
                log.warning("re-reading the backlog failed (%s); retrying", exc)
                await asyncio.sleep(_RETRY_DELAY_S)
                continue
            log.info("store answers again: re-read %d task rows (%d transfers)", tasks, moved)
            break
