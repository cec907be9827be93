"""The history store against real databases (see conftest.py: SQLite, PostgreSQL, and
PostgreSQL at SERIALIZABLE, the CockroachDB code path).

No mocks and no timed sleeps: concurrency comes from ``asyncio.gather``, whose tasks enqueue
their transitions before the store's writer runs, so they meet in one group-commit
batch.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from helpers_store import (
    COMPLETED,
    RUNNING,
    T0,
    create,
    run_key,
    task,
    timer,
    transition,
)
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from tideflow.api.v1.state_pb2 import MutableState
from tideflow.history import (
    ConditionFailedError,
    CurrentExecutionConflictError,
    CurrentWrite,
    HistoryStore,
    RetryableStoreError,
    RunKey,
    StoreError,
    TaskKind,
    TimerKind,
    TimerRow,
    Transition,
    timer_key_kind,
)
from tideflow.history._dialects import is_retryable

pytestmark = pytest.mark.serializable


def same_lane_workflow_id(store: HistoryStore, workflow_id: str) -> str:
    """Another workflow id on ``workflow_id``'s writer lane (PostgreSQL has several), so
    that transitions of both, submitted together, meet in one batch."""
    lanes = len(store._lanes)
    lane = hash(("default", workflow_id)) % lanes
    return next(f"wf-{i}" for i in range(1000) if hash(("default", f"wf-{i}")) % lanes == lane)


async def event_ids(store: HistoryStore, key: RunKey) -> list[int]:
    return [e.event_id for e in await store.read_events(key)]


async def task_keys(store: HistoryStore) -> set[str]:
    return {t.task_key for t in await store.list_tasks()}


async def timer_keys(store: HistoryStore) -> set[str]:
    return {t.timer_key for t in await store.timers_due_before(2**62)}


async def test_default_namespace_exists_and_ensure_is_idempotent(store: HistoryStore) -> None:
    assert await store.namespace_exists("default")
    assert not await store.ensure_namespace("default")
    assert not await store.namespace_exists("other")
    assert await store.ensure_namespace("other", description="d", retention_seconds=60)
    assert not await store.ensure_namespace("other")
    assert await store.namespace_exists("other")


async def test_create_run_writes_every_table(store: HistoryStore) -> None:
    key = run_key()
    tasks = [task(key, 0, TaskKind.WORKFLOW), task(key, 3)]
    timers = [timer(key, 1, T0 + 20), timer(key, 2, T0 + 10)]
    t = create(key, 5, new_tasks=tasks, new_timers=timers, start_request_id="req-1")
    await store.apply(t)

    record = await store.get_execution(key)
    assert record is not None
    assert (record.key, record.db_version, record.state) == (key, 1, t.state)
    assert record.summary == t.summary
    current = await store.get_current("default", "wf")
    assert current is not None
    assert (current.run_id, current.status, current.start_request_id) == ("run-1", RUNNING, "req-1")

    assert await store.read_events(key) == list(t.events)
    page = await store.read_events(key, first_event_id=2, max_events=2)
    assert [e.event_id for e in page] == [2, 3]
    assert [e.event_id for e in await store.read_events(key, first_event_id=4)] == [4, 5]
    assert await store.read_events(key, first_event_id=6) == []

    assert await store.list_tasks() == sorted(tasks, key=lambda r: r.task_key)
    first, second = sorted(r.task_key for r in tasks)
    assert [r.task_key for r in await store.list_tasks(limit=1)] == [first]
    assert [r.task_key for r in await store.list_tasks(after_key=first)] == [second]

    assert await store.timers_due_before(T0 + 10) == []
    assert await store.timers_due_before(T0 + 11) == [timers[1]]
    assert await store.timers_due_before(T0 + 21) == [timers[1], timers[0]]  # by fire_at

    assert await store.get_execution(run_key(run_id="nope")) is None
    assert await store.get_current("default", "nope") is None


async def test_concurrent_transitions_from_same_version_exactly_one_wins(
    store: HistoryStore,
) -> None:
    key = run_key()
    await store.apply(create(key, new_tasks=[task(key, 1)], new_timers=[timer(key, 1, T0)]))
    before_tasks, before_timers = await task_keys(store), await timer_keys(store)
    contenders = [
        transition(
            key,
            version=1,
            first_event_id=2,
            n_events=2 + i,
            marker=f"contender-{i}",
            new_tasks=[task(key, 10 + i)],
            new_timers=[timer(key, 10 + i, T0 + i)],
        )
        for i in range(2)
    ]
    # Same run, same lane: both land in one batch, which falls back to one commit each.
    results = await asyncio.gather(*(store.apply(t) for t in contenders), return_exceptions=True)
    winners = [t for t, r in zip(contenders, results, strict=True) if r is None]
    losers = [r for r in results if r is not None]
    assert len(winners) == 1
    assert len(losers) == 1
    assert isinstance(losers[0], ConditionFailedError)
    won = winners[0]
    record = await store.get_execution(key)
    assert record is not None
    assert (record.db_version, record.state) == (2, won.state)
    assert await store.read_events(key, first_event_id=2) == list(won.events)
    assert await task_keys(store) == before_tasks | {won.new_tasks[0].task_key}
    assert await timer_keys(store) == before_timers | {won.new_timers[0].timer_key}


async def test_concurrent_creations_of_one_run_exactly_one_wins(store: HistoryStore) -> None:
    key = run_key()
    contenders = [create(key, 1 + i, new_tasks=[task(key, 10 + i)]) for i in range(2)]
    results = await asyncio.gather(*(store.apply(t) for t in contenders), return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["ConditionFailedError", "NoneType"]
    won = contenders[results.index(None)]
    assert await store.read_events(key) == list(won.events)
    assert await task_keys(store) == {won.new_tasks[0].task_key}


async def test_rejected_transition_does_not_undo_others_in_its_batch(store: HistoryStore) -> None:
    stale_key = run_key("wf-stale")
    await store.apply(create(stale_key))
    key = run_key(same_lane_workflow_id(store, "wf-stale"))
    fresh = create(key, 2, new_tasks=[task(key, 1)], new_timers=[timer(key, 1, T0)])
    stale = transition(stale_key, version=7, first_event_id=2)
    results = await asyncio.gather(store.apply(fresh), store.apply(stale), return_exceptions=True)
    assert results[0] is None
    assert isinstance(results[1], ConditionFailedError)
    assert await event_ids(store, key) == [1, 2]
    assert await task_keys(store) == {fresh.new_tasks[0].task_key}
    assert await timer_keys(store) == {fresh.new_timers[0].timer_key}


async def test_invalid_transition_does_not_fail_others_in_its_batch(store: HistoryStore) -> None:
    bad_key = run_key("wf-bad")
    await store.apply(create(bad_key, new_tasks=[task(bad_key, 1)]))
    good = create(run_key(same_lane_workflow_id(store, "wf-bad")))
    bad = transition(bad_key, version=1, first_event_id=2, new_tasks=[task(bad_key, 1)])
    results = await asyncio.gather(store.apply(good), store.apply(bad), return_exceptions=True)
    assert results[0] is None
    assert isinstance(results[1], StoreError)  # not a raw database error
    assert await event_ids(store, good.key) == [1]


async def test_batched_transitions_of_one_run_apply_in_order(store: HistoryStore) -> None:
    # Submitted together they share a batch: the second must see the rows of the first.
    key = run_key()
    arm = create(key, new_tasks=[task(key, 1)], new_timers=[timer(key, 1, T0)])
    consume = transition(
        key,
        version=1,
        first_event_id=2,
        new_tasks=[task(key, 2)],
        done_task_keys=[arm.new_tasks[0].task_key],
        done_timer_keys=[arm.new_timers[0].timer_key],
    )
    await asyncio.gather(store.apply(arm), store.apply(consume))
    assert await event_ids(store, key) == [1, 2]
    assert await task_keys(store) == {consume.new_tasks[0].task_key}
    assert await timer_keys(store) == set()


async def test_duplicate_event_id_is_a_condition_failure(store: HistoryStore) -> None:
    key = run_key()
    first = create(key, 3)
    await store.apply(first)
    clash = transition(key, version=1, first_event_id=3, n_events=2, new_tasks=[task(key, 9)])
    with pytest.raises(ConditionFailedError):
        await store.apply(clash)
    record = await store.get_execution(key)
    assert record is not None
    assert (record.db_version, record.state, record.summary) == (1, first.state, first.summary)
    assert await store.read_events(key) == list(first.events)
    assert await store.list_tasks() == []


async def test_rejected_run_creation_writes_nothing(store: HistoryStore) -> None:
    await store.apply(create(run_key(run_id="run-1")))
    attempts: dict[str, dict[str, Any]] = {  # run-1 is open: neither may become current
        "run-2": {"current": CurrentWrite.INSERT},
        "run-3": {"current": CurrentWrite.REPLACE, "replaces_run_id": "run-1"},
    }
    for run_id, current_write in attempts.items():
        key = run_key(run_id=run_id)
        with pytest.raises(CurrentExecutionConflictError):
            await store.apply(create(key, 2, new_tasks=[task(key, 1)], **current_write))
        assert await store.read_events(key) == []
        assert await store.list_tasks() == []
        assert await store.get_execution(key) is None
    current = await store.get_current("default", "wf")
    assert current is not None
    assert current.run_id == "run-1"


async def test_current_replace_needs_the_named_run_closed(store: HistoryStore) -> None:
    first = run_key(run_id="run-1")
    await store.apply(create(first, start_request_id="req-1"))

    def replace(run_id: str, replaces: str) -> Transition:
        return create(
            run_key(run_id=run_id),
            current=CurrentWrite.REPLACE,
            replaces_run_id=replaces,
            start_request_id=f"req-{run_id}",
        )

    with pytest.raises(CurrentExecutionConflictError, match="run-1"):
        await store.apply(replace("run-2", "run-1"))  # run-1 is still running
    with pytest.raises(CurrentExecutionConflictError):
        await store.apply(  # INSERT is for a workflow id's first run only
            create(run_key(run_id="run-3"), current=CurrentWrite.INSERT)
        )

    close = transition(
        first, version=1, first_event_id=2, status=COMPLETED, current=CurrentWrite.UPDATE_STATUS
    )
    await store.apply(close)
    current = await store.get_current("default", "wf")
    assert current is not None
    assert (current.run_id, current.status, current.start_request_id) == (
        "run-1",
        COMPLETED,
        "req-1",
    )

    with pytest.raises(CurrentExecutionConflictError):
        await store.apply(replace("run-4", "not-the-current-run"))
    await store.apply(replace("run-5", "run-1"))
    current = await store.get_current("default", "wf")
    assert current is not None
    assert (current.run_id, current.status, current.start_request_id) == (
        "run-5",
        RUNNING,
        "req-run-5",
    )
    assert await event_ids(store, run_key(run_id="run-5")) == [1]
    assert await event_ids(store, run_key(run_id="run-2")) == []


async def test_done_keys_delete_exactly_those_rows_atomically(store: HistoryStore) -> None:
    key = run_key()
    tasks = [task(key, i) for i in range(3)]
    timers = [timer(key, i, T0 + i) for i in range(3)]
    await store.apply(create(key, new_tasks=tasks, new_timers=timers))
    done_tasks = [tasks[0].task_key, tasks[2].task_key]
    done_timers = [timers[1].timer_key]

    stale = transition(
        key, version=5, first_event_id=2, done_task_keys=done_tasks, done_timer_keys=done_timers
    )
    with pytest.raises(ConditionFailedError):
        await store.apply(stale)
    assert await store.count_rows("tasks") == 3
    assert await store.count_rows("timers") == 3

    new_task = task(key, 7)
    t = transition(
        key,
        version=1,
        first_event_id=2,
        new_tasks=[new_task],
        done_task_keys=done_tasks,
        done_timer_keys=done_timers,
    )
    await store.apply(t)
    assert await task_keys(store) == {tasks[1].task_key, new_task.task_key}
    assert await timer_keys(store) == {timers[0].timer_key, timers[2].timer_key}


async def commit_many_runs(store: HistoryStore) -> None:
    keys = [run_key(f"wf-{i}") for i in range(50)]
    await asyncio.gather(*(store.apply(create(k)) for k in keys))
    before = dict(store.stats)
    # Four transitions per run, all submitted at once; a run's transitions share a
    # writer lane, so they commit in submission order.
    steps = [
        transition(k, version=1 + step, first_event_id=2 + 2 * step, n_events=2)
        for step in range(4)
        for k in keys
    ]
    assert len(steps) == 200
    await asyncio.gather(*(store.apply(t) for t in steps))
    assert store.stats["transitions"] - before["transitions"] == 200
    assert store.stats["transactions"] - before["transactions"] < 200  # batched
    for k in keys:
        record = await store.get_execution(k)
        assert record is not None
        assert (record.db_version, record.summary.history_length) == (5, 9)
        assert await event_ids(store, k) == list(range(1, 10))
    assert await store.count_rows("history_events") == 50 * 9


async def contend_on_one_run(store: HistoryStore, writers: int = 10, each: int = 20) -> None:
    """``writers`` coroutines each append ``each`` events by read-modify-write, retrying
    on ConditionFailedError."""
    key = run_key("contended")
    await store.apply(create(key))
    conflicts = 0

    async def increment_many() -> None:
        nonlocal conflicts
        for _ in range(each):
            while True:
                record = await store.get_execution(key)
                assert record is not None
                t = transition(
                    key,
                    version=record.db_version,
                    first_event_id=record.summary.history_length + 1,
                )
                try:
                    await store.apply(t)
                    break
                except ConditionFailedError:
                    conflicts += 1

    await asyncio.gather(*(increment_many() for _ in range(writers)))
    total = 1 + writers * each
    assert conflicts > 0  # the writers did contend
    assert await event_ids(store, key) == list(range(1, total + 1))
    record = await store.get_execution(key)
    assert record is not None
    assert (record.db_version, record.summary.history_length) == (total, total)
    assert MutableState.FromString(record.state).next_event_id == total + 1


async def test_group_commit_of_many_runs(store: HistoryStore) -> None:
    await commit_many_runs(store)


async def test_contended_read_modify_write_loses_no_event(store: HistoryStore) -> None:
    await contend_on_one_run(store)


async def test_close_is_idempotent_and_fails_later_applies(store: HistoryStore) -> None:
    key = run_key()
    pending = asyncio.ensure_future(store.apply(create(key)))
    await asyncio.sleep(0)  # one loop turn: `pending` enqueues, the writer has not run
    await store.close()
    await store.close()
    with pytest.raises(RetryableStoreError):
        await pending
    with pytest.raises(RetryableStoreError):
        await store.apply(create(run_key(run_id="run-2")))


@pytest.mark.postgres
async def test_serialization_failure_is_retryable(pg_url: str) -> None:
    """Two raw SERIALIZABLE transactions that conflict (same driver stack as the store)
    fail with SQLSTATE 40001, which the store classifies as retryable."""
    store = await HistoryStore.open(pg_url)
    await store.apply(create(run_key()))
    await store.close()
    engine = create_async_engine(
        pg_url.replace("postgresql://", "postgresql+asyncpg://", 1),
        isolation_level="SERIALIZABLE",
    )
    read = text("SELECT db_version FROM executions WHERE run_id = 'run-1'")
    bump = text("UPDATE executions SET db_version = db_version + 1 WHERE run_id = 'run-1'")
    try:
        async with engine.connect() as c1, engine.connect() as c2:
            for conn in (c1, c2):  # both take their snapshot before either writes
                assert (await conn.execute(read)).scalar_one() == 1
            await c1.execute(bump)
            await c1.commit()
            with pytest.raises(DBAPIError) as caught:
                await c2.execute(bump)
            await c2.rollback()
            assert (await c2.execute(read)).scalar_one() == 2
            await c2.rollback()
    finally:
        await engine.dispose()
    assert getattr(caught.value.orig, "sqlstate", None) == "40001"
    assert is_retryable(caught.value)


def test_timer_key_kind_reads_the_kind_field_not_a_substring() -> None:
    """Workflow ids may contain "|", and ref ids or attempts may equal a kind's number:
    only the kind field decides (the engine keeps or drops an activity's timers by it)."""
    key = RunKey(namespace="default", workflow_id="order|5|3|", run_id="run-1")
    for kind in TimerKind:
        row = TimerRow(key=key, kind=kind, ref_id=5, attempt=3, fire_at=T0)
        assert timer_key_kind(row.timer_key) is kind
