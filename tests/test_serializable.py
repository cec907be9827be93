"""The CockroachDB code path, run on PostgreSQL at SERIALIZABLE (history/_postgres.py).

A CockroachDB server cannot be installed here; ``?isolation_level=serializable`` runs
PostgreSQL on the very statements, fence and retries a ``cockroachdb://`` URL runs.

- A transaction the database aborts (SQLSTATE 40001) is run again, and the retry is
  counted (``stats["conflict_retries"]``): a deterministic lost-update race.
- Two stores on one database (two nodes, unfenced) contend: concurrent group commits
  of many runs, read-modify-write appends to the same runs, and starts of the same
  workflow ids from both. Conflicts happen and are retried (the counter proves the
  test is not vacuous) and nothing is lost or doubled: exact event counts, gap-free
  histories, one winner per workflow id.
- The fence as a plain read: an old owner's transaction that read the shard row
  before another node's acquisition either commits before it (and the new owner's
  scan sees its rows) or, once the new owner scanned the shard, is aborted, run
  again and refused by the fence.
- Through the server: many concurrent starts (retried with one request id, or
  racing with several) and signals (each sent twice with one request id) on the same
  and different runs, then exact histories (this one also on SQLite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
import pytest
from conftest import serializable_url
from helpers import ET, assert_gap_free, events_of, new_id, of_type
from helpers_store import create, run_key, task, transition
from sqlalchemy import Connection, event, select, update
from sqlalchemy.engine import Engine

from tideflow.history import (
    ConditionFailedError,
    CurrentExecutionConflictError,
    HistoryStore,
    RunKey,
    ShardOwnershipLostError,
    shard_of,
)
from tideflow.history import _pg_commit_function as pg_commit_function
from tideflow.history import _schema as schema
from tideflow.history._dialects import GuardedRunner, open_runner
from tideflow.history._pg_batch import apply_batch_direct
from tideflow.worker_sdk import Client
from tideflow.worker_sdk.exceptions import WorkflowAlreadyStartedError

pytestmark = pytest.mark.serializable

T = TypeVar("T")

LEASE_US = 60_000_000


@pytest.fixture
def serializable(pg_url: str) -> str:
    """This test's PostgreSQL database, every transaction SERIALIZABLE."""
    return serializable_url(pg_url)


@pytest.fixture
async def two_nodes(serializable: str) -> AsyncIterator[tuple[HistoryStore, HistoryStore]]:
    a = await HistoryStore.open(serializable)
    b = await HistoryStore.open(serializable)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def _in_a_thread(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``work`` to completion on its own event loop in another thread, blocking:
    another node acting while a transaction of this one is open (the caller is inside
    that transaction, on this loop's thread)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def main() -> None:
        try:
            result.append(asyncio.run(work()))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=main)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the other node's work did not finish"
    if errors:
        raise errors[0]
    return result[0]


# ------------------------------------------------------------ one conflict, retried


@pytest.mark.postgres
async def test_a_serialization_failure_is_run_again_and_loses_no_update(
    serializable: str,
) -> None:
    """A read-modify-write whose row another transaction changes meanwhile fails with
    40001; the runner runs the function again, on fresh data, and counts the retry."""
    store = await HistoryStore.open(serializable)  # creates the schema and "default"
    await store.close()
    db = serializable.split("?")[0]
    stats: dict[str, int] = {}
    runner = GuardedRunner(open_runner(serializable), stats)
    runs = 0
    ns = schema.namespaces
    default = ns.c.name == "default"

    async def bump_elsewhere() -> None:
        conn = await asyncpg.connect(db)
        try:
            await conn.execute(
                "UPDATE namespaces SET retention_seconds = retention_seconds + 100 "
                "WHERE name = 'default'"
            )
        finally:
            await conn.close()

    def add_one(conn: Connection) -> int:
        nonlocal runs
        runs += 1
        seen = int(conn.execute(select(ns.c.retention_seconds).where(default)).scalar_one())
        if runs == 1:  # another writer commits between our read and our write
            _in_a_thread(bump_elsewhere)
        conn.execute(update(ns).where(default).values(retention_seconds=seen + 1))
        return seen

    try:
        seen = await runner.write(add_one)
        final = await runner.read(
            lambda conn: conn.execute(select(ns.c.retention_seconds).where(default)).scalar()
        )
    finally:
        await runner.close()
    assert runs == 2 and stats["conflict_retries"] == 1
    assert (seen, final) == (100, 101)  # both updates are there, none lost


# ---------------------------------------------------- two nodes, many transactions


async def _append_many(store: HistoryStore, key: RunKey, appends: int) -> int:
    """Append ``appends`` events to ``key``'s run by read-modify-write, reloading after
    every lost race; returns how many races were lost."""
    lost = 0
    for _ in range(appends):
        while True:
            record = await store.get_execution(key)
            assert record is not None
            step = transition(
                key, version=record.db_version, first_event_id=record.summary.history_length + 1
            )
            try:
                await store.apply(step)
                break
            except ConditionFailedError:
                lost += 1
    return lost


async def _start_once(store: HistoryStore, key: RunKey) -> bool:
    try:
        await store.apply(create(key, new_tasks=[task(key, 1)]))
    except CurrentExecutionConflictError:
        return False
    return True


async def _contend(a: HistoryStore, b: HistoryStore, round_no: int) -> None:
    """One round of contention between the two nodes, then its exact checks."""
    shared = [run_key(f"shared-{round_no}-{i}") for i in range(4)]
    await asyncio.gather(*(a.apply(create(k)) for k in shared))
    solo = {
        store: [run_key(f"solo-{round_no}-{tag}-{i}") for i in range(40)]
        for store, tag in ((a, "a"), (b, "b"))
    }
    raced = [f"raced-{round_no}-{i}" for i in range(20)]
    writers, appends = 3, 5

    async def group_commits(store: HistoryStore, keys: list[RunKey]) -> None:
        await asyncio.gather(*(store.apply(create(k)) for k in keys))
        steps = [transition(k, version=1 + n, first_event_id=2 + n) for n in range(3) for k in keys]
        await asyncio.gather(*(store.apply(t) for t in steps))

    async def races(store: HistoryStore, run_id: str) -> list[bool]:
        return list(await asyncio.gather(*(_start_once(store, run_key(w, run_id)) for w in raced)))

    _, _, _, won_a, won_b = await asyncio.gather(
        asyncio.gather(
            *(_append_many(s, k, appends) for k in shared for s in (a, b) for _ in range(writers))
        ),
        group_commits(a, solo[a]),
        group_commits(b, solo[b]),
        races(a, "run-a"),
        races(b, "run-b"),
    )

    total = 1 + 2 * writers * appends
    for key in shared:
        record = await a.get_execution(key)
        assert record is not None
        assert (record.db_version, record.summary.history_length) == (total, total)
        assert [e.event_id for e in await b.read_events(key)] == list(range(1, total + 1))
    for key in solo[a] + solo[b]:
        assert [e.event_id for e in await a.read_events(key)] == [1, 2, 3, 4]
    for workflow_id, by_a, by_b in zip(raced, won_a, won_b, strict=True):
        assert by_a != by_b, f"{workflow_id}: exactly one node starts it"
        winner, loser = ("run-a", "run-b") if by_a else ("run-b", "run-a")
        current = await a.get_current("default", workflow_id)
        assert current is not None and current.run_id == winner
        assert await a.get_execution(run_key(workflow_id, loser)) is None
        assert await a.count_rows("tasks", workflow_id=workflow_id) == 1


@pytest.mark.postgres
async def test_two_nodes_contending_lose_nothing_and_double_nothing(
    two_nodes: tuple[HistoryStore, HistoryStore],
) -> None:
    a, b = two_nodes
    # A round is 2 x 4 runs x 30 contended appends, 80 runs in group commits and 20
    # raced starts: conflicts are near certain in the first; more rounds only if not.
    for round_no in range(5):
        await _contend(a, b, round_no)
        if a.stats["conflict_retries"] + b.stats["conflict_retries"] > 0:
            break
    assert a.stats["conflict_retries"] + b.stats["conflict_retries"] > 0, (a.stats, b.stats)


# -------------------------------------------------------------- the fence, plain read


class _AfterFenceRead:
    """Runs ``interlude`` (blocking) right after the next fence read of database
    ``db``: another node acts while the writer's transaction is open."""

    def __init__(self, db: str, interlude: Callable[[], None]) -> None:
        self._db = db
        self._interlude: Callable[[], None] | None = interlude

    def __call__(self, conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        fence = "FROM shards" in statement and "tasks" not in statement
        if fence and conn.engine.url.database == self._db:
            self.fire()

    def fire(self) -> None:
        if self._interlude is not None:
            interlude, self._interlude = self._interlude, None
            interlude()


class _FenceReadThen:
    """An asyncpg connection of the direct batch write (history/_pg_batch.py) that
    fires ``listener`` after the statement that reads the shard rows."""

    def __init__(self, conn: Any, listener: _AfterFenceRead) -> None:
        self._conn = conn
        self._listener = listener

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        row = await self._conn.fetchrow(sql, *args)
        if sql.startswith("WITH fence AS"):
            self._listener.fire()
        return row

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@pytest.fixture
def after_fence_read(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[str, Callable[[], None]], None]]:
    """Arms an interlude after the next fence read, on SQLAlchemy's path (an event
    listener) and on the direct one (its connection wrapped)."""
    listeners: list[_AfterFenceRead] = []
    direct = apply_batch_direct

    def arm(db: str, interlude: Callable[[], None]) -> None:
        listener = _AfterFenceRead(db, interlude)
        event.listen(Engine, "after_cursor_execute", listener)
        listeners.append(listener)

        async def watched(conn: Any, *args: Any) -> dict[int, int]:
            return await direct(_FenceReadThen(conn, listener), *args)

        monkeypatch.setattr(pg_commit_function, "apply_batch_direct", watched)

    yield arm
    for listener in listeners:
        event.remove(Engine, "after_cursor_execute", listener)


def _key_on(shard: int, shard_count: int, tag: str) -> RunKey:
    for i in range(100_000):
        if shard_of("default", f"{tag}-{i}", shard_count) == shard:
            return run_key(f"{tag}-{i}", "r1")
    raise AssertionError("no workflow id found")


@pytest.mark.postgres
@pytest.mark.parametrize("new_owner_scans_first", [False, True], ids=["commits", "refused"])
async def test_a_write_racing_a_takeover_is_ordered_before_it_or_refused(
    serializable: str,
    after_fence_read: Callable[[str, Callable[[], None]], None],
    new_owner_scans_first: bool,
) -> None:
    """Node A's transaction reads the shard row (range id r), then node B acquires the
    shard (r + 1) and commits, all before A commits. Without a scan by B in between,
    A commits, ordered before B's acquisition, and B's fenced scan finds A's task. If
    B scanned the shard first, A's commit would be ordered after it: PostgreSQL
    aborts A (40001), the store runs it again, and the fence refuses it."""
    shard = 3
    a = await HistoryStore.open(serializable)
    # BEGIN ... COMMIT (CockroachDB's shape): the interlude needs a point between the
    # fence read and the commit on the client's side, which one call has not.
    assert a._runner.direct is not None
    a._runner.direct.batch_function = None
    try:
        range_a = await a.acquire_shard(await a.read_shard(shard), "node-a", -1)  # lapses
        assert range_a is not None
        a.hold_shard(shard, range_a)
        key = _key_on(shard, a.shard_count, "late")
        scanned: list[list[str]] = []

        async def take_over() -> None:
            b = await HistoryStore.open(serializable)
            try:
                range_b = await b.acquire_shard(await b.read_shard(shard), "node-b", LEASE_US)
                assert range_b == range_a + 1
                b.hold_shard(shard, range_b)
                if new_owner_scans_first:
                    scanned.append([t.task_key for t in await b.list_tasks(shards=[shard])])
            finally:
                await b.close()

        after_fence_read(serializable.split("/")[-1].split("?")[0], lambda: _in_a_thread(take_over))
        if new_owner_scans_first:
            with pytest.raises(ShardOwnershipLostError, match="refused by the fence"):
                await a.apply(create(key, new_tasks=[task(key, 1)]))
            assert a.stats["conflict_retries"] >= 1
            assert scanned == [[]]
            assert await a.get_execution(key) is None
            assert await a.count_rows("tasks") == 0
        else:
            await a.apply(create(key, new_tasks=[task(key, 1)]))
            assert a.stats["conflict_retries"] == 0
        # B's view once it holds the shard: A's task exactly when A committed.
        b = await HistoryStore.open(serializable)
        try:
            b.hold_shard(shard, range_a + 1)
            found = [t.task_key for t in await b.list_tasks(shards=[shard])]
        finally:
            await b.close()
        assert found == ([] if new_owner_scans_first else [task(key, 1).task_key])
    finally:
        await a.close()


# ------------------------------------------------------------ through the server


async def test_concurrent_starts_and_signals_through_the_server_are_exact(
    client: Client,
) -> None:
    """Ten workflow ids, each started five times at once (three retries of one request
    id, two rival requests) and signalled twenty times at once (ten signals, each
    sent twice with one request id): one run per id, each signal in it exactly once."""
    queue = new_id("q")
    ids = [new_id("exact") for _ in range(10)]

    async def start(workflow_id: str, request_id: str) -> str | None:
        try:
            handle = await client.start_workflow(
                "Inbox", id=workflow_id, task_queue=queue, request_id=request_id
            )
        except WorkflowAlreadyStartedError:
            return None
        return handle.run_id

    async def starts(workflow_id: str) -> list[str | None]:
        same = str(uuid.uuid4())
        requests = [same, same, same, str(uuid.uuid4()), str(uuid.uuid4())]
        return list(await asyncio.gather(*(start(workflow_id, r) for r in requests)))

    started = await asyncio.gather(*(starts(w) for w in ids))
    for runs in started:
        winners = {r for r in runs if r is not None}
        assert len(winners) == 1, runs  # the retries share the run, or a rival won

    async def signal(workflow_id: str, n: int) -> None:
        handle = client.get_workflow_handle(workflow_id)
        request_id = str(uuid.uuid4())
        await asyncio.gather(
            *(handle.signal("add", f"{workflow_id}/{n}", request_id=request_id) for _ in "ab")
        )

    await asyncio.gather(*(signal(w, n) for w in ids for n in range(10)))
    for workflow_id, runs in zip(ids, started, strict=True):
        (run_id,) = {r for r in runs if r is not None}
        events = await events_of(client.get_workflow_handle(workflow_id, run_id=run_id))
        assert_gap_free(events)
        assert len(of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED)) == 1
        signalled = [
            client.data_converter.from_payloads(
                e.workflow_execution_signaled_event_attributes.input
            )[0]
            for e in of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)
        ]
        assert sorted(signalled) == sorted(f"{workflow_id}/{n}" for n in range(10))
