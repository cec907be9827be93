"""Writing a group-commit batch inside its transaction: one statement per kind of row.

``HistoryStore`` runs ``apply_batch`` in one transaction per group of transitions
(no two of one run); a write that must not happen raises ``Rejected`` to roll the
transaction back with the store error to report.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, delete, insert, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.dml import UpdateBase

from . import _cluster as cluster
from . import _schema as s
from ._errors import ConditionFailedError, CurrentExecutionConflictError
from ._records import CurrentWrite, Transition, now_micros
from ._visibility_store import VisibilityRows, visibility_rows, write_visibility_rows

_RUNNING = 1  # WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING


class Rejected(Exception):
    """Raised inside a transaction to roll it back with a store error to report."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


#: The ``executions`` columns a transition sets (``_execution_row``).
EXECUTION_COLUMNS = (
    "workflow_type",
    "task_queue",
    "status",
    "start_time",
    "close_time",
    "history_length",
    "db_version",
    "state",
)
_UPDATE_EXECUTION = (
    update(s.executions)
    .where(
        s.executions.c.namespace == bindparam("b_namespace"),
        s.executions.c.workflow_id == bindparam("b_workflow_id"),
        s.executions.c.run_id == bindparam("b_run_id"),
        s.executions.c.db_version == bindparam("b_expected"),
    )
    .values({name: bindparam(name) for name in EXECUTION_COLUMNS})
)


# The batch's statements are built once: building one (operators, coercions, the
# cache key walk) cost more than SQLAlchemy's compiled-cache hit it then makes.
_INSERT_EXECUTIONS = insert(s.executions)
_INSERT_EVENTS = insert(s.history_events)
_INSERT_TASKS = insert(s.tasks)
_INSERT_TIMERS = insert(s.timers)
_DELETE_TASKS = delete(s.tasks).where(s.tasks.c.task_key.in_(bindparam("keys", expanding=True)))
_DELETE_TIMERS = delete(s.timers).where(s.timers.c.timer_key.in_(bindparam("keys", expanding=True)))
_DELETE_TASK = delete(s.tasks).where(s.tasks.c.task_key == bindparam("key"))
_DELETE_TIMER = delete(s.timers).where(s.timers.c.timer_key == bindparam("key"))
_CURRENT = s.current_executions
_INSERT_CURRENT = insert(_CURRENT)
_REPLACE_CURRENT = (
    update(_CURRENT)
    .where(
        _CURRENT.c.namespace == bindparam("b_namespace"),
        _CURRENT.c.workflow_id == bindparam("b_workflow_id"),
        _CURRENT.c.run_id == bindparam("b_replaces"),
        _CURRENT.c.status != _RUNNING,
    )
    .values(
        run_id=bindparam("run_id"),
        status=bindparam("status"),
        start_request_id=bindparam("start_request_id"),
    )
)
_UPDATE_CURRENT_STATUS = (
    update(_CURRENT)
    .where(
        _CURRENT.c.namespace == bindparam("b_namespace"),
        _CURRENT.c.workflow_id == bindparam("b_workflow_id"),
        _CURRENT.c.run_id == bindparam("b_run_id"),
    )
    .values(status=bindparam("status"))
)


# SQLite: each statement's SQL text and parameter order, compiled once per set of
# parameter names, then run straight on the sqlite3 cursor of the transaction's
# connection. SQLAlchemy's execution path (execution context, parameter processing,
# result set-up) cost about 0.1 ms per statement, several times SQLite's own work for
# these rows; the columns are plain integers, strings and bytes, which need no bind
# processing. Other dialects keep SQLAlchemy's execution.
_SQLITE_TEXT: dict[tuple[int, tuple[str, ...]], tuple[str, tuple[str, ...]]] = {}


def _write(conn: Connection, statement: UpdateBase, rows: Sequence[Mapping[str, Any]]) -> int:
    """Run ``statement`` once per row (one executemany); the rows it changed."""
    if conn.dialect.name != "sqlite":
        # One row as one execution: a driver's executemany may not count its rows.
        one_or_many = rows[0] if len(rows) == 1 else list(rows)
        return int(conn.execute(statement, one_or_many).rowcount)
    names = tuple(rows[0])
    key = (id(statement), names)
    text = _SQLITE_TEXT.get(key)
    if text is None:
        compiled = statement.compile(dialect=conn.dialect, column_keys=list(names))
        text = _SQLITE_TEXT[key] = (compiled.string, tuple(compiled.positiontup or ()))
    sql, order = text
    params = [tuple([row[name] for name in order]) for row in rows]
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        if len(params) == 1:
            cursor.execute(sql, params[0])
        else:
            cursor.executemany(sql, params)
        return int(cursor.rowcount)
    except sqlite3.Error as exc:
        # As SQLAlchemy would raise it: IntegrityError is a race the store reports.
        raise DBAPIError.instance(sql, params, exc, sqlite3.Error) from exc
    finally:
        cursor.close()


def _delete_keys(
    conn: Connection, by_list: UpdateBase, by_key: UpdateBase, keys: Sequence[str]
) -> None:
    if conn.dialect.name == "sqlite":
        _write(conn, by_key, [{"key": key} for key in keys])
    else:
        conn.execute(by_list, {"keys": list(keys)})


@dataclass(slots=True)
class BatchRows:
    """The rows a batch writes, kind by kind, built once per batch: every driver path
    (SQLAlchemy here, asyncpg in ``_pg_batch``) writes the same rows."""

    creates: list[dict[str, Any]]  # executions rows of new runs
    updates: list[dict[str, Any]]  # executions rows of existing runs, at b_expected
    stale: str  # the run a failed version check names
    # The current-run writes in the batch's order (a continue-as-new's closing run's
    # status comes before its successor's REPLACE, which needs it closed).
    currents: list[tuple[CurrentWrite, dict[str, Any]]]
    events: list[dict[str, Any]]
    done_tasks: list[str]
    new_tasks: list[dict[str, Any]]
    done_timers: list[str]
    new_timers: list[dict[str, Any]]
    visibility: VisibilityRows


def batch_rows(batch: Sequence[Transition], shard_count: int) -> BatchRows:
    """The rows of ``batch`` (no two transitions of one run)."""
    updates = [t for t in batch if t.expected_version != 0]
    rows = BatchRows(
        creates=[
            {
                "namespace": t.key.namespace,
                "workflow_id": t.key.workflow_id,
                "run_id": t.key.run_id,
                **_execution_row(t),
            }
            for t in batch
            if t.expected_version == 0
        ],
        updates=[
            {
                "b_namespace": t.key.namespace,
                "b_workflow_id": t.key.workflow_id,
                "b_run_id": t.key.run_id,
                "b_expected": t.expected_version,
                **_execution_row(t),
            }
            for t in updates
        ],
        stale=str(updates[0].key) if len(updates) == 1 else "one of the batch",
        currents=[],
        events=_event_rows(batch),
        done_tasks=[key for t in batch for key in t.done_task_keys],
        new_tasks=_task_rows(batch, shard_count),
        done_timers=[key for t in batch for key in t.done_timer_keys],
        new_timers=_timer_rows(batch, shard_count),
        visibility=visibility_rows([(t.key, t.events) for t in batch]),
    )
    for t in batch:
        _add_current_row(rows, t)
    return rows


def _execution_row(t: Transition) -> dict[str, Any]:
    summary = t.summary
    return {
        "workflow_type": summary.workflow_type,
        "task_queue": summary.task_queue,
        "status": summary.status,
        "start_time": summary.start_time,
        "close_time": summary.close_time,
        "history_length": summary.history_length,
        "db_version": t.new_version,
        "state": t.state,
    }


def _add_current_row(rows: BatchRows, t: Transition) -> None:
    k = t.key
    if t.current == CurrentWrite.INSERT:
        row = {
            "namespace": k.namespace,
            "workflow_id": k.workflow_id,
            "run_id": k.run_id,
            "status": t.summary.status,
            "start_request_id": t.start_request_id,
        }
    elif t.current == CurrentWrite.REPLACE:
        row = {
            "b_namespace": k.namespace,
            "b_workflow_id": k.workflow_id,
            "b_replaces": t.replaces_run_id,
            "run_id": k.run_id,
            "status": t.summary.status,
            "start_request_id": t.start_request_id,
        }
    elif t.current == CurrentWrite.UPDATE_STATUS:
        row = {
            "b_namespace": k.namespace,
            "b_workflow_id": k.workflow_id,
            "b_run_id": k.run_id,
            "status": t.summary.status,
        }
    else:
        return
    rows.currents.append((t.current, row))


def stale_error(rows: BatchRows) -> Rejected:
    """What a batch whose version check failed is rejected with."""
    return Rejected(ConditionFailedError(f"run {rows.stale} changed since it was read"))


def replaced_error(row: dict[str, Any]) -> Rejected:
    """What a batch whose current-run replacement found another run is rejected with."""
    return Rejected(
        CurrentExecutionConflictError(
            f"workflow id {row['b_workflow_id']!r}: run {row['b_replaces']} is no longer "
            "the closed current run"
        )
    )


def apply_batch(
    conn: Connection,
    rows: BatchRows,
    tokens: dict[int, set[int]],
    fence: cluster.FenceRead = cluster.FenceRead.LOCKED,
) -> dict[int, int]:
    """Write a batch's rows (``batch_rows``) with one statement per kind of row, not
    one per transition.

    First the fence: each shard the batch writes is checked once against the tokens
    its transitions carry, read as ``fence`` says (ShardOwnershipLostError: nothing is
    written). The function only writes through ``conn``: the runner may run it again
    after a serialization failure. A unique
    violation anywhere (an event id or run that another writer already wrote) aborts
    the whole transaction; ``_run_txn`` maps it to the store error. The rows are
    written in the order the constraints need: executions, current, events, tasks,
    timers, visibility. Returns the range ids the fence read (shard -> range id).
    """
    current = cluster.check_fence_txn(conn, tokens, fence)
    if rows.creates:
        _write(conn, _INSERT_EXECUTIONS, rows.creates)
    _update_executions(conn, rows)
    _write_current_rows(conn, rows)
    if rows.events:
        _write(conn, _INSERT_EVENTS, rows.events)
    if rows.done_tasks:
        _delete_keys(conn, _DELETE_TASKS, _DELETE_TASK, rows.done_tasks)
    if rows.new_tasks:
        _write(conn, _INSERT_TASKS, rows.new_tasks)
    if rows.done_timers:
        _delete_keys(conn, _DELETE_TIMERS, _DELETE_TIMER, rows.done_timers)
    if rows.new_timers:
        _write(conn, _INSERT_TIMERS, rows.new_timers)
    # Memos and search attributes the events set: same transaction as the events.
    if rows.visibility:
        write_visibility_rows(conn, rows.visibility)
    return current


def _update_executions(conn: Connection, rows: BatchRows) -> None:
    """The rows of existing runs, each only at the version it was read at (else the
    whole batch is rejected: one changed since)."""
    params = rows.updates
    if not params:
        return
    if len(params) > 1 and conn.dialect.supports_sane_multi_rowcount:
        changed = _write(conn, _UPDATE_EXECUTION, params)
    else:
        # A driver that cannot count the rows of an executemany: one at a time.
        changed = 0
        for row in params:
            changed += _write(conn, _UPDATE_EXECUTION, [row])
    if changed != len(params):
        raise stale_error(rows)


def _event_rows(batch: Sequence[Transition]) -> list[dict[str, Any]]:
    return [
        {
            "namespace": t.key.namespace,
            "workflow_id": t.key.workflow_id,
            "run_id": t.key.run_id,
            "event_id": e.event_id,
            "event_type": e.event_type,
            "data": e.SerializeToString(),
        }
        for t in batch
        for e in t.events
    ]


def _task_rows(batch: Sequence[Transition], shard_count: int) -> list[dict[str, Any]]:
    created = now_micros()
    return [
        {
            "task_key": task.task_key,
            "shard_id": cluster.shard_of(task.key.namespace, task.key.workflow_id, shard_count),
            "queue_shard": cluster.queue_shard_of(
                task.key.namespace, task.task_queue, int(task.kind), shard_count
            ),
            "namespace": task.key.namespace,
            "task_queue": task.task_queue,
            "kind": int(task.kind),
            "workflow_id": task.key.workflow_id,
            "run_id": task.key.run_id,
            "ref_id": task.ref_id,
            "attempt": task.attempt,
            "created_at": task.created_at or created,
            "placement": task.placement or None,
        }
        for t in batch
        for task in t.new_tasks
    ]


def _timer_rows(batch: Sequence[Transition], shard_count: int) -> list[dict[str, Any]]:
    return [
        {
            "timer_key": timer.timer_key,
            "fire_at": timer.fire_at,
            "shard_id": cluster.shard_of(timer.key.namespace, timer.key.workflow_id, shard_count),
            "namespace": timer.key.namespace,
            "workflow_id": timer.key.workflow_id,
            "run_id": timer.key.run_id,
            "kind": int(timer.kind),
            "ref_id": timer.ref_id,
            "attempt": timer.attempt,
        }
        for t in batch
        for timer in t.new_timers
    ]


def _write_current_rows(conn: Connection, rows: BatchRows) -> None:
    for write, row in rows.currents:
        if write == CurrentWrite.INSERT:
            conn.execute(_INSERT_CURRENT, row)
        elif write == CurrentWrite.REPLACE:
            if conn.execute(_REPLACE_CURRENT, row).rowcount != 1:
                raise replaced_error(row)
        else:
            conn.execute(_UPDATE_CURRENT_STATUS, row)
