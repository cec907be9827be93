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
    ShardOwnershipLostError,
)
from tideflow.history import _pg_commit_function as pg_commit_function
from tideflow.history._dialects import open_runner
from tideflow.history._pg_commit_function import FUNCTION_NAME
from tideflow.history._postgres import DirectConnections

pytestmark = pytest.mark.postgres

T = TypeVar("T")


@pytest.fixture(params=["read-committed", "serializable"])
def url(request: pytest.FixtureRequest, pg_url: str) -> str:
    return serializable_url(pg_url) if request.param == "serializable" else pg_url


@pytest.fixture(params=["one-statement", "begin-commit"])
def shape(request: pytest.FixtureRequest) -> str:
    """How a batch is committed: one call of the batch function (PostgreSQL's path),
    or BEGIN, statements, COMMIT (CockroachDB's, and batches with visibility rows)."""
    return str(request.param)


@pytest.fixture
async def store(url: str, shape: str) -> AsyncIterator[HistoryStore]:
    opened = await HistoryStore.open(url)
    direct = opened._runner.direct
    assert isinstance(direct, DirectConnections)  # the direct path is the one under test
    assert direct.batch_function == FUNCTION_NAME
    if shape == "begin-commit":
        direct.batch_function = None
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
    pids: list[int] = []

    def wrapping(direct: Callable[..., Awaitable[dict[int, int]]]) -> Any:
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

        return wrapped

    for name in ("apply_batch_direct", "commit_batch_once"):
        monkeypatch.setattr(pg_commit_function, name, wrapping(getattr(pg_commit_function, name)))
    return pids


def _second_step(key: RunKey, **extra: Any) -> Any:
    """The run's second transition: it consumes task 1 and adds task 2."""
    return transition(
        key,
        version=1,
        first_event_id=2,
        done_task_keys=[task(key, 1).task_key],
        new_tasks=[task(key, 2)],
        **extra,
    )


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


@pytest.mark.parametrize("shape", ["begin-commit"])  # the one-statement shape: below
async def test_a_connection_killed_before_commit_is_in_doubt_and_retried(
    store: HistoryStore, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = run_key("killed-at-commit", "r1")
    await store.apply(create(key, new_tasks=[task(key, 1)]))

    async def kill(conn: Any) -> None:
        await _kill(admin, conn.get_server_pid())

    # Every row of the transaction was written; its COMMIT meets a dead connection.
    pids = _around_batch(monkeypatch, after=kill)
    await store.apply(_second_step(key))
    assert store.writes_in_doubt.is_set()
    assert len(pids) == 2
    assert await _events_of(store, key) == [1, 2]
    assert [t.ref_id for t in await store.list_tasks()] == [2]


@pytest.mark.parametrize("shape", ["one-statement"])
async def test_a_connection_killed_inside_the_batch_statement_is_in_doubt_and_retried(
    store: HistoryStore, admin: Any, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch function ran its first statements (new runs, fence, deletes) and waits
    on a row lock at the version-checked update when its backend is killed: nothing
    of it commits, the write is in doubt, and the retry commits it once."""
    key = run_key("killed-inside", "r1")
    await store.apply(create(key, new_tasks=[task(key, 1)]))
    other = run_key("killed-inside-new", "r1")
    locker = await asyncpg.connect(pg_url)
    killed = asyncio.Event()
    killers: list[asyncio.Future[None]] = []

    async def kill_while_waiting(conn: Any) -> None:
        pid = conn.get_server_pid()

        async def killer() -> None:
            waiting = "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1"
            while True:  # until the statement waits on the row lock
                if await admin.fetchval(waiting, pid):
                    break
                await asyncio.sleep(0.01)
            await _kill(admin, pid)
            killed.set()
            await locker.execute("ROLLBACK")

        killers.append(asyncio.ensure_future(killer()))

    try:
        await locker.execute("BEGIN")
        await locker.execute(
            "SELECT 1 FROM executions WHERE workflow_id = $1 FOR UPDATE", key.workflow_id
        )
        pids = _around_batch(monkeypatch, before=kill_while_waiting)
        await store.apply(
            transition(key, version=1, first_event_id=2, done_task_keys=[task(key, 1).task_key]),
            create(other),
        )
    finally:
        await locker.close()
    assert killed.is_set() and store.writes_in_doubt.is_set()
    assert len(pids) == 2 and pids[0] != pids[1]
    assert await _events_of(store, key) == [1, 2]
    assert await _events_of(store, other) == [1]
    assert await store.count_rows("tasks") == 0


async def test_a_batch_refused_by_the_fence_writes_nothing(store: HistoryStore) -> None:
    key = run_key("fenced", "r1")
    await store.apply(create(key, new_tasks=[task(key, 1)]))
    shard = store.shard_of(key)
    store.hold_shard(shard, 7)  # the store's row says otherwise (no row: range id 1)
    with pytest.raises(ShardOwnershipLostError, match="refused by the fence"):
        await store.apply(_second_step(key, new_timers=[timer(key, 2, 10)]))
    assert await _events_of(store, key) == [1]
    assert [t.ref_id for t in await store.list_tasks()] == [1]
    assert await store.count_rows("timers") == 0
    record = await store.get_execution(key)
    assert record is not None and record.db_version == 1


async def test_the_batch_function_is_installed_on_a_database_without_it(
    pg_url: str, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database from before the function (or from before its current definition):
    opening the store creates it, and batches go through it."""
    first = await HistoryStore.open(pg_url)
    await first.close()
    await admin.execute(f"DROP FUNCTION {FUNCTION_NAME}")
    store = await HistoryStore.open(pg_url)
    try:
        assert await admin.fetchval(
            "SELECT count(*) FROM pg_proc WHERE proname = $1", FUNCTION_NAME
        )
        calls: list[int] = []
        once = pg_commit_function.commit_batch_once

        async def counted(conn: Any, *args: Any) -> dict[int, int]:
            calls.append(conn.get_server_pid())
            return await once(conn, *args)

        monkeypatch.setattr(pg_commit_function, "commit_batch_once", counted)
        key = run_key(f"installed-{uuid.uuid4().hex[:6]}", "r1")
        await store.apply(create(key))
        assert len(calls) == 1
        assert await _events_of(store, key) == [1]
    finally:
        await store.close()


class _LosesTheAnswer:
    """Direct transactions that, once armed, commit and then fail as a connection
    lost before the database's answer to the COMMIT arrived."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.armed = False

    @property
    def batch_function(self) -> str | None:
        return self._inner.batch_function  # type: ignore[no-any-return]

    @batch_function.setter
    def batch_function(self, name: str | None) -> None:
        self._inner.batch_function = name

    async def transaction(self, fn: Callable[[Any], Awaitable[T]], *, implicit: bool = False) -> T:
        result: T = await self._inner.transaction(fn, implicit=implicit)
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
    store: HistoryStore, admin: Any, monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    """A database restart closes every idle connection; no pre-ping, yet no write
    fails and none is in doubt: a closed connection is dropped when taken, and one
    whose BEGIN fails is replaced before anything was written. The one-statement
    shape sends no BEGIN: a connection asyncpg has not yet seen closed would make its
    write in doubt (retried safely), so there the writes wait until asyncpg read the
    database's goodbye on every killed connection."""
    keys = [run_key(f"idle-{n}", "r1") for n in range(4)]
    for key in keys:
        await store.apply(create(key))
    pids = _around_batch(monkeypatch)
    await store.apply(transition(keys[0], version=1, first_event_id=2))
    direct = store._runner.direct
    assert isinstance(direct, DirectConnections)
    idle = list(direct._idle)
    for pid in set(pids):
        await _kill(admin, pid)
    while shape == "one-statement":
        if all(conn.is_closed() for conn in idle if conn.get_server_pid() in pids):
            break
        await asyncio.sleep(0.01)
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
