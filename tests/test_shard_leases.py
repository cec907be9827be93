"""Shard leases and the range-id fence at the store level (tla/ShardLease.tla).

Two ``HistoryStore`` objects on one database play two nodes. On SQLite and PostgreSQL
(``TIDEFLOW_TEST_DB=all``), and on PostgreSQL at SERIALIZABLE, where the fence is a
plain read as on CockroachDB (``serializable``): the shard count is fixed once; two
nodes acquiring one shard at the same moment, exactly one wins; a renewal after a
steal fails; a write carrying a stale range id never commits, alone or in a
group-commit batch, where it fails alone; a node that does not hold a shard cannot
write it at all; a recovery scan by a node whose token is stale finds nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from helpers_store import T0, create, task
from sqlalchemy import Connection, MetaData, Table, insert, text
from sqlalchemy.ext.asyncio import create_async_engine

from tideflow.history import (
    ClusterConfigError,
    HistoryStore,
    MemberRecord,
    RunKey,
    ShardOwnershipLostError,
    TaskKind,
    TaskRow,
    TimerKind,
    TimerRow,
    Transition,
    queue_shard_of,
    shard_of,
)
from tideflow.history import _schema as schema
from tideflow.history._dialects import open_runner

pytestmark = pytest.mark.serializable

LEASE_US = 60_000_000  # a live lease: nobody may take it
LAPSED_US = -1  # a lease that lapsed the moment it was taken


@pytest.fixture
async def nodes(store_url: str) -> AsyncIterator[tuple[HistoryStore, HistoryStore]]:
    """Two nodes' stores on one fresh database."""
    a = await HistoryStore.open(store_url)
    b = await HistoryStore.open(store_url)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def _create(key: RunKey, *, tasks: int = 0) -> Transition:
    """A new run of ``key`` carrying ``tasks`` activity tasks."""
    return create(key, new_tasks=[task(key, i) for i in range(tasks)])


def _key_on(store: HistoryStore, shard: int, tag: str = "") -> RunKey:
    """A run key of a workflow id that hashes to ``shard``."""
    for i in range(100_000):
        workflow_id = f"wf{tag}-{i}"
        if shard_of("default", workflow_id, store.shard_count) == shard:
            return RunKey(namespace="default", workflow_id=workflow_id, run_id="r1")
    raise AssertionError("no workflow id found")


async def _take(store: HistoryStore, shard: int, node: str, lease_us: int = LEASE_US) -> int:
    """Acquire ``shard`` for ``node`` (it must be free) and hold it for writes."""
    range_id = await store.acquire_shard(await store.read_shard(shard), node, lease_us)
    assert range_id is not None, f"{node} could not acquire shard {shard}"
    store.hold_shard(shard, range_id)
    return range_id


async def test_shard_count_is_fixed_once_and_a_conflict_is_refused(store_url: str) -> None:
    first = await HistoryStore.open(store_url, shards=8)
    await first.close()
    again = await HistoryStore.open(store_url)  # no --shards: the stored count holds
    assert again.shard_count == 8
    await again.close()
    same = await HistoryStore.open(store_url, shards=8)
    await same.close()
    with pytest.raises(ClusterConfigError, match="initialised with 8 shards; --shards 16"):
        await HistoryStore.open(store_url, shards=16)
    with pytest.raises(ClusterConfigError, match="between 1 and"):
        await HistoryStore.open(store_url, shards=0)


async def test_default_shard_count_and_stable_hash(store: HistoryStore) -> None:
    assert store.shard_count == HistoryStore.DEFAULT_SHARD_COUNT == 16
    # The documented hash: first 8 bytes of BLAKE2b("default\0order-1"), modulo 16.
    assert shard_of("default", "order-1", 16) == shard_of("default", "order-1", 16)
    spread = {shard_of("default", f"order-{i}", 16) for i in range(200)}
    assert spread == set(range(16))


async def test_two_nodes_acquiring_one_shard_exactly_one_wins(
    nodes: tuple[HistoryStore, HistoryStore],
) -> None:
    a, b = nodes
    for shard in range(4):
        # Both read the same row (absent for shards 0-1: the INSERT is the CAS; for
        # 2-3 a lapsed lease: the UPDATE ... WHERE range_id is), then both try.
        if shard >= 2:
            assert await a.acquire_shard(await a.read_shard(shard), "z", LAPSED_US) == 2
        row_a, row_b = await a.read_shard(shard), await b.read_shard(shard)
        assert row_a == row_b
        won = await asyncio.gather(
            a.acquire_shard(row_a, "node-a", LEASE_US), b.acquire_shard(row_b, "node-b", LEASE_US)
        )
        assert won.count(None) == 1, won
        assert [r for r in won if r is not None] == [row_a.range_id + 1]
        row = await a.read_shard(shard)
        assert row.owner == ("node-a" if won[0] is not None else "node-b")
        assert row.range_id == row_a.range_id + 1


async def test_a_live_lease_is_never_stolen_and_a_release_frees_it_at_once(
    nodes: tuple[HistoryStore, HistoryStore],
) -> None:
    a, b = nodes
    token = await _take(a, 3, "node-a")
    assert await b.acquire_shard(await b.read_shard(3), "node-b", LEASE_US) is None
    assert await a.release_shard(3, token)
    row = await b.read_shard(3)
    assert row.owner == "" and row.range_id == token
    assert await b.acquire_shard(row, "node-b", LEASE_US) == token + 1
    assert not await a.release_shard(3, token)  # no longer ours


async def test_renew_after_a_steal_fails(nodes: tuple[HistoryStore, HistoryStore]) -> None:
    a, b = nodes
    token = await _take(a, 5, "node-a", LAPSED_US)
    await a.renew_shard(5, token, LAPSED_US)  # a lapsed lease nobody took: renewed
    stolen = await _take(b, 5, "node-b")
    assert stolen == token + 1
    with pytest.raises(ShardOwnershipLostError, match="shard 5") as lost:
        await a.renew_shard(5, token, LEASE_US)
    assert (lost.value.held, lost.value.current) == (token, stolen)
    await b.renew_shard(5, stolen, LEASE_US)


async def test_one_renewal_pass_renews_the_held_and_names_the_stolen(
    nodes: tuple[HistoryStore, HistoryStore],
) -> None:
    a, b = nodes
    kept = await _take(a, 6, "node-a", LAPSED_US)
    gone = await _take(a, 7, "node-a", LAPSED_US)
    stolen = await _take(b, 7, "node-b")
    lost = await a.renew_shards({6: kept, 7: gone}, LEASE_US)
    assert list(lost) == [7]
    assert (lost[7].held, lost[7].current) == (gone, stolen)
    # Shard 6 was renewed in the same transaction: no longer free for node-b.
    assert await b.acquire_shard(await b.read_shard(6), "node-b", LEASE_US) is None
    assert (await a.read_shard(7)).owner == "node-b"


async def test_a_write_with_a_stale_range_id_never_commits(
    nodes: tuple[HistoryStore, HistoryStore],
) -> None:
    a, b = nodes
    refused: list[ShardOwnershipLostError] = []
    a.on_fenced = refused.append
    key = _key_on(a, 7)
    token = await _take(a, 7, "node-a", LAPSED_US)
    await a.apply(_create(key, tasks=1))  # the owner writes
    # node-b takes the lapsed lease over; node-a, paused meanwhile, still holds its
    # token and writes: the fence refuses it, and nothing of it is in the store.
    await _take(b, 7, "node-b")
    zombie = _key_on(a, 7, "zombie")
    with pytest.raises(ShardOwnershipLostError, match="refused by the fence"):
        await a.apply(_create(zombie, tasks=2))
    assert await a.get_execution(zombie) is None
    assert await a.read_events(zombie) == []
    assert await a.count_rows("tasks", workflow_id=zombie.workflow_id) == 0
    assert [(e.shard_id, e.held) for e in refused] == [(7, token)]
    # Deleting a row of the shard is a write too.
    (task,) = await b.list_tasks(shards=[7])
    with pytest.raises(ShardOwnershipLostError):
        await a.delete_task(task.task_key, run=key)
    assert await b.list_tasks(shards=[7]) == [task]
    # A recovery scan checks the range id in its own transaction: the stale holder
    # finds nothing of the shard.
    assert await a.list_tasks(shards=[7]) == []
    assert await a.list_tasks() == [task]  # an unscoped scan is not fenced
    # The new owner writes.
    await b.apply(_create(zombie, tasks=2))
    assert await b.count_rows("tasks", workflow_id=zombie.workflow_id) == 2


async def test_a_fenced_transition_fails_alone_in_its_batch(
    nodes: tuple[HistoryStore, HistoryStore],
) -> None:
    a, b = nodes
    await _take(a, 1, "node-a", LAPSED_US)
    await _take(a, 2, "node-a")
    await _take(b, 1, "node-b")  # node-a's token for shard 1 is stale now
    lost, kept = _key_on(a, 1), _key_on(a, 2)
    # Submitted together, they meet in one group-commit batch (one lane on SQLite).
    results = await asyncio.gather(
        a.apply(_create(lost)), a.apply(_create(kept)), return_exceptions=True
    )
    assert isinstance(results[0], ShardOwnershipLostError)
    assert results[1] is None
    assert await a.get_execution(lost) is None
    assert await a.get_execution(kept) is not None


async def test_a_shard_not_held_is_refused_before_any_transaction(store: HistoryStore) -> None:
    store.enable_fencing()
    key = _key_on(store, 4)
    before = dict(store.stats)
    with pytest.raises(ShardOwnershipLostError, match="does not hold it"):
        await store.apply(_create(key))
    assert store.stats == before
    token = await _take(store, 4, "node-a")
    await store.apply(_create(key))
    store.drop_shard(4)
    with pytest.raises(ShardOwnershipLostError):
        await store.delete_task("any", run=key)
    assert (await store.read_shard(4)).range_id == token


async def test_membership_rows(nodes: tuple[HistoryStore, HistoryStore]) -> None:
    a, b = nodes
    await a.heartbeat(MemberRecord("node-a", "h:1", T0, T0))
    await b.heartbeat(MemberRecord("node-b", "h:2", T0, T0))
    await a.heartbeat(MemberRecord("node-a", "h:1", T0 + 5, T0 + 99))
    members = await b.list_members()
    assert [(m.node_id, m.address, m.heartbeat_at, m.started_at) for m in members] == [
        ("node-a", "h:1", T0 + 5, T0),
        ("node-b", "h:2", T0, T0),
    ]
    await a.leave("node-a")
    assert [m.node_id for m in await a.list_members()] == ["node-b"]


@pytest.mark.empty_database
async def test_a_database_from_before_shards_is_upgraded(store_url: str) -> None:
    # tasks, timers and schedules as they were before shards: no shard_id (nor
    # queue_shard) column.
    old = MetaData()
    for table in (schema.tasks, schema.timers, schema.schedules):
        new_columns = ("shard_id", "queue_shard")
        Table(table.name, old, *[c._copy() for c in table.columns if c.name not in new_columns])
    runner = open_runner(store_url)
    key = RunKey(namespace="default", workflow_id="old-order", run_id="r1")
    old_task = TaskRow(key=key, task_queue="q", kind=TaskKind.ACTIVITY, ref_id=5, attempt=1)
    old_timer = TimerRow(key=key, kind=TimerKind.USER_TIMER, ref_id=6, attempt=1, fire_at=T0)
    row = {"namespace": "default", "workflow_id": "old-order", "run_id": "r1", "attempt": 1}

    def legacy(conn: Connection) -> None:
        old.create_all(conn)
        conn.execute(
            insert(old.tables["tasks"]).values(
                task_key=old_task.task_key, task_queue="q", kind=1, ref_id=5, created_at=T0, **row
            )
        )
        conn.execute(
            insert(old.tables["timers"]).values(
                timer_key=old_timer.timer_key, fire_at=T0, kind=0, ref_id=6, **row
            )
        )
        counters = ("version", "action_count", "missed_catchup_count", "overlap_skipped_count")
        conn.execute(
            insert(old.tables["schedules"]).values(
                namespace="default",
                schedule_id="old-nightly",
                definition=b"",
                paused=False,
                notes="",
                last_slot=T0,
                next_fire_at=T0,
                created_at=T0,
                updated_at=T0,
                create_request_id="",
                **dict.fromkeys(counters, 0),
            )
        )

    await runner.write(legacy)
    await runner.close()
    store = await HistoryStore.open(store_url)
    try:
        shard = store.shard_of(key)
        assert [t.task_key for t in await store.list_tasks(shards=[shard])] == [old_task.task_key]
        assert await store.list_tasks(shards=[(shard + 1) % 16]) == []
        queue_shard = queue_shard_of("default", "q", int(TaskKind.ACTIVITY), 16)
        assert [t.task_key for t in await store.list_tasks(queue_shards=[queue_shard])] == [
            old_task.task_key
        ]
        assert await store.list_tasks(queue_shards=[(queue_shard + 1) % 16]) == []
        assert await store.timers_due_before(T0 + 1, shards=[shard]) == [old_timer]
        nightly = store.schedules.shard_of("default", "old-nightly")
        assert [r.schedule_id for r in await store.schedules.due(T0, shards=[nightly])] == [
            "old-nightly"
        ]
        assert await store.schedules.due(T0, shards=[(nightly + 1) % 16]) == []
    finally:
        await store.close()
    again = await HistoryStore.open(store_url)  # nothing left to upgrade
    await again.close()


async def test_an_acquisition_does_not_wait_on_a_paused_nodes_transaction(pg_url: str) -> None:
    """A node paused (SIGSTOP) inside a transaction on a shard row (its release, say)
    holds the row's lock while paused: an acquisition gives up after its lock wait
    (``lock_timeout``), and the shard is taken once the lock is gone. Before, the
    acquirer's whole lease pass, renewals included, waited with it."""
    store = await HistoryStore.open(pg_url)
    engine = create_async_engine(pg_url.replace("postgresql://", "postgresql+asyncpg://", 1))
    try:
        assert await store.acquire_shard(await store.read_shard(2), "z", LAPSED_US) is not None
        row = await store.read_shard(2)
        async with engine.connect() as paused:
            await paused.execute(text("SELECT shard_id FROM shards WHERE shard_id = 2 FOR UPDATE"))
            assert await asyncio.wait_for(store.acquire_shard(row, "node-b", LEASE_US), 30) is None
            await paused.rollback()
        assert await store.acquire_shard(row, "node-b", LEASE_US) == row.range_id + 1
    finally:
        await engine.dispose()
        await store.close()
