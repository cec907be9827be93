"""How a run's transition is committed: the engine's commit machinery, apart from the
transitions themselves (server/_engine.py) so that other paths that commit many at
once (server/_timer_fires.py) share it rather than copy it.

A transition is submitted to the store (``_submit``), and then exactly one of: it
landed (``_landed``, then ``_after_commits``: the cache follows and the rows are
handed over), it did not (``_not_committed``: a lost race, or a store failure whose
outcome is in doubt), or its committer went away (``_abandon``). ``_commit`` is the
three for one transition. tla/History.tla: ``CommitTaking`` (a commit and
``_after_commits``), a stale writer's commit refused (``ZombieCommit``: ``_forget``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from tideflow.history import (
    ConditionFailedError,
    CurrentExecutionConflictError,
    HistoryStore,
    RunKey,
    TaskRow,
    TimerRow,
)

from ._dispatcher import Dispatcher
from ._mutation import Mutation
from ._replication_trace import ReplicationTracer
from ._run_cache import CachedRun, RunCache
from ._trace import Tracer

log = logging.getLogger("tideflow.server.engine")

# Longest history kept in memory per cached run.
MAX_CACHED_EVENTS = 2_000


class CommitMachinery:
    """Mixed into ``HistoryEngine``, which sets these attributes."""

    _store: HistoryStore
    _cache: RunCache
    _dispatcher: Dispatcher
    _tracer: Tracer
    # Replaced by server/_sites.py on a site in trace mode.
    replication_tracer: ReplicationTracer

    def _lease_of(self, key: RunKey) -> int | None:
        """The range id under which this node holds ``key``'s shard now (None: not
        held, or a store without shards)."""
        return self._store.held_shards.get(self._store.shard_of(key))

    def _cache_if_held(self, key: RunKey, run: CachedRun, lease: int | None) -> None:
        """Cache ``run`` (read or committed under lease ``lease``) unless the shard was
        lost meanwhile: an entry that outlived a loss would be served, stale, once the
        shard came back, and a stale state judges a live task stale (its row deleted,
        the task lost). Such a run is still returned to its caller, just not kept."""
        if self._lease_of(key) == lease:
            self._cache.keep(key, run)

    def _forget(self, key: RunKey, run: CachedRun) -> None:
        if self._cache.get(key) is run:
            del self._cache[key]
        run.changed.set()

    def invalidate(self, key: RunKey) -> None:  # the next use reads the store
        if key in self._cache:
            self._forget(key, self._cache[key])

    async def _commit(
        self, key: RunKey, run: CachedRun, m: Mutation, action: str, *, bulk: bool = False
    ) -> bool:
        """Commit ``m`` (and the runs it creates) and update the cache; False if
        another writer changed the run first (the cache entry is dropped). ``bulk``:
        one of many submitted at once (``HistoryStore.submit``)."""
        write, rseq, lease = self._submit(run, m, action, bulk=bulk)
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            self._abandon(run, m, write)
            raise
        except BaseException as exc:
            return self._not_committed(run, m, exc)
        self._landed(run, m, rseq, lease)
        self._after_commit(run, m, action)
        return True

    def _submit(
        self, run: CachedRun, m: Mutation, action: str, *, bulk: bool
    ) -> tuple[asyncio.Future[None], int, int | None]:
        """Hand ``m`` to the store: its write, its replication trace sequence, and the
        range id its shard is held with now if it creates runs (they are cached only
        if the shard is still held so once it committed)."""
        together = [x.to_transition(0, start_request_id=x.ms.start_request_id) for x in m.side_runs]
        # Trace mode logs ahead of the commit, then its outcome: a crash between
        # the two leaves a transition marked "may have happened", never one
        # missing from the log.
        self._tracer.write_ahead(action, m)
        rseq = self.replication_tracer.home_step(action, m)
        lease = self._lease_of(m.key) if m.side_runs else None
        write = self._store.submit(m.to_transition(run.db_version), *together, bulk=bulk)
        return write, rseq, lease

    def _abandon(self, run: CachedRun, m: Mutation, write: asyncio.Future[None]) -> None:
        """The committer went away (cancelled) with ``m``'s write submitted. A commit no
        store writer has taken is withdrawn (a poll that went away starts nothing),
        unless it creates task rows: those always go on.

        Never trust the cache again (trace mode: the line written ahead stays
        unconfirmed). Rows handed over while the commit is in flight would be judged
        against a state that does not show them yet, found stale and deleted, and the
        work committed a moment later lost (a transfer row without its pending child,
        a workflow task's timeout fired before its start landed: the chaos suite). So
        they go when the commit ends."""
        self._forget(m.key, run)
        if m.new_tasks or not self._store.withdraw(write):
            write.add_done_callback(lambda done: self._dispatch_if_committed(done, m))

    def _not_committed(self, run: CachedRun, m: Mutation, error: BaseException) -> bool:
        """``m``'s write ended in ``error``: False if another writer changed the run
        first (the cache entry is dropped); else ``error`` is raised."""
        self._forget(m.key, run)
        if isinstance(error, ConditionFailedError | CurrentExecutionConflictError):
            log.debug("run %s changed under us; reloading", m.key)
            self._tracer.outcome(m, committed=False)
            return False
        # The store failed the write (an outage, a lost connection): it is over, but
        # it may have committed. Its task and timer rows would then reach matching
        # and the timer queue only after a restart or a refill, so hand them over
        # anyway: both are validated against the run's state when started or fired,
        # and ones that did not commit are dropped as stale there.
        self._dispatch_rows(m)
        raise error

    def _landed(self, run: CachedRun, m: Mutation, rseq: int, lease: int | None) -> None:
        """``m`` committed: the cache follows (the rows are handed over by the caller,
        ``_after_commit``). ``lease``: the shard's range id when it was submitted."""
        self._tracer.outcome(m, committed=True)
        self.replication_tracer.outcome(rseq, "ok")
        for side in m.side_runs:
            side_run = CachedRun(state=side.ms, db_version=1, events=list(side.events))
            self._cache_if_held(side.key, side_run, lease)
            self._after_commit(side_run, side, "StartRun")
        run.state = m.ms
        run.db_version += 1
        run.scheduled_activities.update(m.scheduled_activities)
        if run.events is not None:
            run.events.extend(m.events)
            if len(run.events) > MAX_CACHED_EVENTS:
                run.events = None

    def _dispatch_rows(self, m: Mutation) -> None:
        if m.new_tasks:
            self._dispatcher.add_tasks(m.new_tasks)
        if m.new_timers:
            self._dispatcher.add_timers(m.new_timers)

    def _dispatch_if_committed(self, write: asyncio.Future[Any], m: Mutation) -> None:
        """A write whose caller went away has finished: hand its rows over if it may
        have committed (a conflict means it did not), and drop the cached state a read
        may have taken from before it meanwhile."""
        if write.cancelled():
            return
        self.invalidate(m.key)
        error = write.exception()  # retrieved, so it is never reported as unhandled
        if isinstance(error, ConditionFailedError | CurrentExecutionConflictError):
            return
        self._dispatch_rows(m)

    def _after_commit(self, run: CachedRun, m: Mutation, action: str) -> None:
        """``m`` committed on ``run`` (``action`` names it in trace mode)."""
        self._after_commits(((run, m),))

    def _after_commits(self, landed: Sequence[tuple[CachedRun, Mutation]]) -> None:
        """Commits known to have landed: their runs' waiters woken, and their rows
        handed to matching and the timer queue, one call each for all of them (a page
        of timer fires hands over hundreds at once). Only a commit known to have
        landed deleted its dropped timers' rows, so only here are they dropped."""
        tasks: list[TaskRow] = []
        timers: list[TimerRow] = []
        dropped: list[str] = []
        for run, m in landed:
            old = run.changed
            run.changed = asyncio.Event()
            old.set()
            tasks.extend(m.new_tasks)
            timers.extend(m.new_timers)
            dropped.extend(m.done_timer_keys)
        if tasks:
            self._dispatcher.add_tasks(tasks)
        if timers:
            self._dispatcher.add_timers(timers)
        if dropped:
            self._dispatcher.drop_timers(dropped)
        for _, m in landed:
            self._dispatcher.committed(m.key)
