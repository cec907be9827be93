"""The engine's cache of run states: the only per-run structure a node keeps for an
idle run (one waiting on a signal, a timer or an activity), and a bounded one.

Least recently used runs leave past ``size`` (``ServerConfig.state_cache_size``);
a run that is busy stays (a transition holds its lock, or a long poll waits on its
``changed``): evicting it would leave the poll asleep while commits reach a reloaded
copy. So the cache exceeds its size by the busy runs only, which a node's concurrent
transitions and parked long polls bound. A run that left is read again from the
store when next needed.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from tideflow.api.v1 import history_pb2, state_pb2
from tideflow.history import RunKey


@dataclass(slots=True, eq=False)
class CachedRun:
    state: state_pb2.MutableState
    db_version: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    scheduled_activities: dict[int, history_pb2.ActivityTaskScheduledEventAttributes] = field(
        default_factory=dict
    )
    # The run's history while it is short enough to keep (None: read from the store).
    events: list[history_pb2.HistoryEvent] | None = None
    # Long polls waiting on ``changed`` (HistoryEngine.wait_for_change).
    watchers: int = 0

    def busy(self) -> bool:
        return self.lock.locked() or self.watchers > 0


class RunCache(OrderedDict[RunKey, CachedRun]):
    """Runs by key, least recently used first (``move_to_end`` on use)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def keep(self, key: RunKey, run: CachedRun) -> None:
        self[key] = run
        self.trim()

    def trim(self) -> None:
        """Evict down to ``size`` runs plus the busy ones (also when a run stops being
        busy: a burst of long polls leaves no oversized cache behind)."""
        busy = 0
        while len(self) - busy > self.size:
            oldest, candidate = next(iter(self.items()))
            if candidate.busy():
                self.move_to_end(oldest)
                busy += 1
            else:
                del self[oldest]
