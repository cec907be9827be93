"""PostgreSQL's driver-direct batch write (history/_pg_batch.py, _postgres.py):
what it must guarantee beyond the store suites, which run on it too.

- It is the path the store takes on PostgreSQL (at both isolations).
- The races keep their errors: a stale version (ConditionFailedError), a current run
  replaced meanwhile (CurrentExecutionConflictError), and the batch rolled back whole.
- Without a pre-ping, a connection the database killed is handled by the store's
  in-doubt and retry logic: killed (``pg_terminate_backend``) in the middle of a batch
  or just before its ``COMMIT``, the write is reported in doubt and committed exactly
  once by the retry; an answer lost after the ``COMMIT`` is in doubt and the retry
  meets its own commit; idle connections killed between writes are replaced without
  a write failing.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
import pytest
from conftest import serializable_url
from helpers_store import COMPLETED, create, run_key, task, timer, transition

from tideflow.history import (
    ConditionFailedError,
    CurrentExecutionConflictError,
    CurrentWrite,
    HistoryStore,
    RunKey,
)
from tideflow.history import _store as store_module
from tideflow.history._dialects import open_runner
from tideflow.history._pg_batch import apply_batch_direct
from tideflow.history._postgres import DirectConnections

pytestmark = pytest.mark.postgres

T = TypeVar("T")


@pytest.fixture(params=["read-committed", "serializable"])
def url(request: pytest.FixtureRequest, pg_url: str) -> str:
    return serializable_url(pg_url) if request.param == "serializable" else pg_url


@pytest.fixture
async def store(url: str) -> AsyncIterator[HistoryStore]:
    opened = await HistoryStore.open(url)
    assert opened._runner.direct is not None  # the direct path is the one under test
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def admin(pg_url: str) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(pg_url)
    try:
        yield conn
    finally:
        await conn.close()


async def _kill(admin: Any, pid: int) -> None:
    """Terminate backend ``pid`` and wait until it is gone."""
    assert await admin.fetchval("SELECT pg_terminate_backend($1, 10000)", pid)


def _around_batch(
    monkeypatch: pytest.MonkeyPatch,
    before: Callable[[Any], Awaitable[None]] | None = None,
    after: Callable[[Any], Awaitable[None]] | None = None,
) -> list[int]:
    """Run ``before``/``after`` (once) around the next direct batch write, with its
    connection; returns the list of backends the batch writes ran on."""
    direct = apply_batch_direct
    pids: list[int] = []

    async def wrapped(conn: Any, *args: Any) -> dict[int, int]:
        nonlocal before, after
        pids.append(conn.get_server_pid())
        if before is not None:
            hook, before = before, None
            await hook(conn)
        result = await direct(conn, *args)
        if after is not None:
            hook, after = after, None
            await hook(conn)
        return result

    monkeypatch.setattr(store_module, "apply_batch_direct", wrapped)
    return pids


async def _events_of(store: HistoryStore, key: RunKey) -> list[int]:
    return [e.event_id for e in await store.read_events(key)]


async def test_stale_versions_and_replaced_current_runs_are_refused(
    store: HistoryStore,
) -> None:
    key = run_key("stale", "r1")
    await store.apply(create(key, new_tasks=[task(key, 1)]))
    await store.apply(transition(key, version=1, first_event_id=2))
    with pytest.raises(ConditionFailedError, match="changed since it was read"):
        await store.apply(transition(key, version=1, first_event_id=3, new_tasks=[task(key, 3)]))
    # A duplicate start: the current run's row exists.
    again = run_key("stale", "r2")
    with pytest.raises(CurrentExecutionConflictError):
        await store.apply(create(again))
    # A successor replacing a run that is not the closed current one.
    successor = run_key("stale", "r3")
    replacing = create(successor, current=CurrentWrite.REPLACE, replaces_run_id="r0")
    with pytest.raises(CurrentExecutionConflictError, match="no longer the closed current"):
        await store.apply(replacing)
    # Nothing of a refused transition was written.
    assert await _events_of(store, key) == [1, 2]
    assert await store.get_execution(again) is None
    assert await store.get_execution(successor) is None
    assert await store.count_rows("tasks") == 1
    # The rightful successor, after the run closed, replaces it.
    await store.apply(
        transition(
            key, version=2, first_event_id=3, status=COMPLETED, current=CurrentWrite.UPDATE_STATUS
        ),
        create(successor, current=CurrentWrite.REPLACE, replaces_run_id="r1"),
    )
    current = await store.get_current("default", "stale")
    assert current is not None and current.run_id == "r3"


async def test_a_batch_whose_connection_is_killed_midway_commits_once_on_retry(
    store: HistoryStore, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = run_key("killed-midway", "r1")
    await store.apply(create(key, new_timers=[timer(key, 1, 10)]))

    async def kill_after_the_first_statement(conn: Any) -> None:
        # The transaction began and ran a statement; the batch's meet a dead connection.
        await conn.fetchval("SELECT 1")
        await _kill(admin, conn.get_server_pid())

    pids = _around_batch(monkeypatch, before=kill_after_the_first_statement)
    await store.apply(transition(key, version=1, first_event_id=2, n_events=2))
    assert store.writes_in_doubt.is_set()
    assert len(pids) == 2 and pids[0] != pids[1]  # the retry ran on a new connection
    assert await _events_of(store, key) == [1, 2, 3]
    record = await store.get_execution(key)
    assert record is not None and record.db_version == 2


async def test_a_connection_killed_before_commit_is_in_doubt_and_retried(
    store: HistoryStore, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = run_key("killed-at-commit", "r1")
    await store.apply(create(key, new_tasks=[task(key, 1)]))

    async def kill(conn: Any) -> None:
        await _kill(admin, conn.get_server_pid())

    # Every row of the transaction was written; its COMMIT meets a dead connection.
    pids = _around_batch(monkeypatch, after=kill)
    await store.apply(
        transition(
            key,
            version=1,
            first_event_id=2,
            done_task_keys=[task(key, 1).task_key],
            new_tasks=[task(key, 2)],
        )
    )
    assert store.writes_in_doubt.is_set()
    assert len(pids) == 2
    assert await _events_of(store, key) == [1, 2]
    assert [t.ref_id for t in await store.list_tasks()] == [2]


class _LosesTheAnswer:
    """Direct transactions that, once armed, commit and then fail as a connection
    lost before the database's answer to the COMMIT arrived."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.armed = False

    async def transaction(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        result: T = await self._inner.transaction(fn)
        if self.armed:
            self.armed = False
            raise ConnectionResetError(104, "connection reset before the commit was answered")
        return result

    async def close(self) -> None:
        await self._inner.close()


async def test_a_lost_commit_answer_is_in_doubt_and_meets_its_own_commit(url: str) -> None:
    runner: Any = open_runner(url)
    lossy = runner.direct = _LosesTheAnswer(runner.direct)
    store = await HistoryStore.open_on(runner)
    try:
        key = run_key(f"lost-{uuid.uuid4().hex[:6]}", "r1")
        lossy.armed = True
        with pytest.raises((ConditionFailedError, CurrentExecutionConflictError)):
            await store.apply(create(key, new_tasks=[task(key, 1)]))
        assert store.writes_in_doubt.is_set()
        assert await store.get_execution(key) is not None
        assert await store.count_rows("tasks") == 1
    finally:
        await store.close()


async def test_idle_connections_killed_between_writes_are_replaced(
    store: HistoryStore, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database restart closes every idle connection; no pre-ping, yet no write
    fails and none is in doubt: a closed connection is dropped when taken, and one
    whose BEGIN fails is replaced before anything was written."""
    keys = [run_key(f"idle-{n}", "r1") for n in range(4)]
    for key in keys:
        await store.apply(create(key))
    pids = _around_batch(monkeypatch)
    await store.apply(transition(keys[0], version=1, first_event_id=2))
    for pid in set(pids):
        await _kill(admin, pid)
    for n, key in enumerate(keys):
        version = 2 if n == 0 else 1
        await store.apply(transition(key, version=version, first_event_id=version + 1))
    assert not store.writes_in_doubt.is_set()
    assert all(pid not in pids[:1] for pid in pids[1:])
    assert await _events_of(store, keys[0]) == [1, 2, 3]


async def test_a_connection_left_mid_operation_is_not_reused(store: HistoryStore) -> None:
    """A connection whose statement a timeout cut short is dropped, never given back:
    one given back mid-operation made the next BEGIN fail with asyncpg's "another
    operation is in progress", an internal error (the chaos suite on PostgreSQL). And
    an idle connection found busy anyway is replaced, since BEGIN wrote nothing."""
    direct = store._runner.direct
    assert isinstance(direct, DirectConnections)

    async def sleeps(conn: Any) -> None:
        await conn.execute("SELECT pg_sleep(30)")

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await direct.transaction(sleeps)
    assert all(not conn.is_in_transaction() for conn in direct._idle)

    busy = await asyncpg.connect(direct._dsn)
    statement = asyncio.ensure_future(busy.execute("SELECT pg_sleep(30)"))
    await asyncio.sleep(0)  # the statement is sent: the connection is mid-operation
    direct._idle.append(busy)
    key = run_key("after-busy", "r1")
    await store.apply(create(key))
    assert await _events_of(store, key) == [1]
    statement.cancel()
    assert busy.is_closed()
