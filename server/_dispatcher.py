"""What the history engine tells matching, the timer queue and the sites after each
commit (server/_server.py implements it); an interface of its own so that the engine
module holds the engine alone."""

from __future__ import annotations

from collections.abc import Sequence

from tideflow.history import RunKey, TaskRow, TimerRow


class Dispatcher:
    """What the engine needs from matching and the timer queue after a commit."""

    def add_tasks(self, tasks: list[TaskRow]) -> None:
        raise NotImplementedError

    def add_timers(self, timers: list[TimerRow]) -> None:
        raise NotImplementedError

    def drop_timers(self, timer_keys: Sequence[str]) -> None:
        """Timers a commit deleted (their task or activity moved on): without this,
        each sat in the timer queue until due and then cost a stale fire (a store
        read, the run's cache entry and a delete of its own). Optional."""

    def committed(self, key: RunKey) -> None:
        """A transition of ``key`` committed (server/_sites.py tells the peers)."""
