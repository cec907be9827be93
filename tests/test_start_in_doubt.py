"""A start whose commit answer was lost finds its own run (issue 10 follow-up).

The store retries a transaction whose connection broke around the commit; when the
first attempt did commit, the retry meets that attempt's rows and the store reports a
conflict. ``start_workflow`` took only the current-run conflict for "decide again", so
this one reached the client as UNAVAILABLE: a retry then found the run, but only after
a client round trip and backoff, and the run's first task waited for a resync. Now the
engine decides again at once and answers with the run, on every store under test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from raw_workflow import start_request
from sqlalchemy import Connection

from tideflow.history import HistoryStore, RunKey, TaskKind, TaskRow, TimerRow
from tideflow.history._dialects import Runner, open_runner
from tideflow.server import ServerConfig, SystemClock
from tideflow.server._engine import Dispatcher, HistoryEngine

T = TypeVar("T")


class _CommitsThenDropsTheAnswer:
    """Runs each write; the first ``answers_to_lose`` of them then fail as if the
    connection broke before the database's answer came back."""

    def __init__(self, inner: Runner, answers_to_lose: int) -> None:
        self.name, self.writer_lanes = inner.name, inner.writer_lanes
        self.isolation = inner.isolation
        self.answers_to_lose = answers_to_lose
        self._inner = inner

    async def write(self, fn: Callable[[Connection], T]) -> T:
        committed = await self._inner.write(fn)
        if self.answers_to_lose > 0:
            self.answers_to_lose -= 1
            raise ConnectionResetError(104, "connection reset by peer after COMMIT")
        return committed

    async def read(self, fn: Callable[[Connection], T]) -> T:
        return await self._inner.read(fn)

    async def close(self) -> None:
        await self._inner.close()


class _Recorded(Dispatcher):
    def __init__(self) -> None:
        self.tasks: list[TaskRow] = []

    def add_tasks(self, tasks: list[TaskRow]) -> None:
        self.tasks.extend(tasks)

    def add_timers(self, timers: list[TimerRow]) -> None:
        pass  # a plain start arms no timer


async def test_a_start_whose_commit_answer_was_lost_answers_with_its_run(store_url: str) -> None:
    runner = _CommitsThenDropsTheAnswer(open_runner(store_url), answers_to_lose=0)
    store = await HistoryStore.open_on(runner)
    try:
        dispatched = _Recorded()
        engine = HistoryEngine(store, dispatched, SystemClock(), ServerConfig())
        request = start_request()
        runner.answers_to_lose = 1
        run_id, _ = await engine.start_workflow(request)

        assert runner.answers_to_lose == 0  # the answer was indeed lost
        assert store.writes_in_doubt.is_set()
        current = await store.get_current("default", request.workflow_id)
        assert current is not None
        assert (current.run_id, current.start_request_id) == (run_id, request.request_id)
        key = RunKey(namespace="default", workflow_id=request.workflow_id, run_id=run_id)
        assert await store.get_execution(key) is not None
        # Its first workflow task reaches matching without waiting for a resync.
        assert [(t.key, t.kind) for t in dispatched.tasks] == [(key, TaskKind.WORKFLOW)]

        # A retry of the same request (the client's, after any error) finds the same run.
        assert (await engine.start_workflow(request))[0] == run_id
    finally:
        await store.close()
