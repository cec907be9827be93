"""Writing a group-commit batch on PostgreSQL straight through asyncpg.

The same rows as ``_batch_write.apply_batch`` (``BatchRows``), the same checks, in
fewer round trips and without SQLAlchemy's execution path (a greenlet hop, parameter
processing and result set-up per statement cost more than asyncpg's own work here).
A transition of a running workflow is two statements:

- ``_CHECK_AND_UPDATE``: the fence's read of the shard rows (``FOR SHARE`` at READ
  COMMITTED, plain at SERIALIZABLE: ``_cluster.check_fence_txn`` says why), the
  version-checked update of the runs' ``executions`` rows, and the deletes of the task
  and timer rows the batch consumed, as data-modifying CTEs of one statement. Every
  row kind comes as one array parameter per column (``unnest``), so the statement has
  one shape for any batch, is prepared once per connection (asyncpg's statement
  cache), and returns the rows it updated and the range ids it read;
- ``_INSERT_ROWS``: the events, task and timer rows, likewise one statement.

The deletes and the inserts of a table stay in separate statements: a batch may delete
a task row and insert one with the same key (a sticky task put back on its normal
queue), and the CTEs of one statement do not see each other's changes.

Rarer rows go one statement per kind before (new runs' ``executions`` rows) or after
(the current-run rows, in the batch's order; memos and search attributes) the two.
The fence and version checks run before the commit, in the same transaction: a batch
refused or stale is rolled back whole (``Rejected``). A unique violation surfaces as
SQLAlchemy's ``IntegrityError`` (``_postgres.DirectConnections``), as on the
SQLAlchemy path, and the store maps it to the race it means.

CockroachDB runs the same statements (the tests run them on PostgreSQL at
SERIALIZABLE): data-modifying CTEs that each change a different table, a
multi-argument ``unnest`` and ``UPDATE ... FROM`` are all in its SQL, but like the
rest of the store's SQL they were never run against a CockroachDB server.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import BigInteger, Integer, LargeBinary, Table

from . import _cluster as cluster
from . import _schema as s
from ._batch_write import EXECUTION_COLUMNS, BatchRows, replaced_error, stale_error
from ._records import CurrentWrite

_RUNNING = 1  # WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING
# The parameter's array type of a column type: text for every string type (a cast to
# varchar(n) would truncate silently; the column's own assignment cast refuses a value
# too long, as a bound parameter would be refused).
_ARRAY_TYPES = ((BigInteger, "int8[]"), (Integer, "int4[]"), (LargeBinary, "bytea[]"))

_UPDATE_KEYS = ("b_namespace", "b_workflow_id", "b_run_id", "b_expected")
_TASK_COLUMNS = tuple(c.name for c in s.tasks.columns)
_TIMER_COLUMNS = tuple(c.name for c in s.timers.columns)
_EVENT_COLUMNS = tuple(c.name for c in s.history_events.columns)


def _array_type(table: Table, column: str) -> str:
    kind = table.c[column].type
    return next((array for t, array in _ARRAY_TYPES if isinstance(kind, t)), "text[]")


def _unnest(table: Table, columns: Sequence[str], first: int) -> str:
    """``unnest`` of one array parameter per column, numbered from ``$first``."""
    arrays = ", ".join(
        f"${first + i}::{_array_type(table, column)}" for i, column in enumerate(columns)
    )
    return f"unnest({arrays})"


def _check_and_update_sql(locked: bool) -> str:
    e = s.executions
    key_types = [_array_type(e, name) for name in ("namespace", "workflow_id", "run_id")]
    keys = ", ".join(f"${4 + i}::{kind}" for i, kind in enumerate([*key_types, "int8[]"]))
    values = ", ".join(
        f"${8 + i}::{_array_type(e, name)}" for i, name in enumerate(EXECUTION_COLUMNS)
    )
    assignments = ", ".join(f"{name} = v.{name}" for name in EXECUTION_COLUMNS)
    lock = " FOR SHARE" if locked else ""
    return (
        f"WITH fence AS (SELECT shard_id, range_id FROM {s.shards.name}"
        f" WHERE shard_id = ANY($1::int4[]){lock}),"
        f" done_tasks AS (DELETE FROM {s.tasks.name} WHERE task_key = ANY($2::text[])),"
        f" done_timers AS (DELETE FROM {s.timers.name} WHERE timer_key = ANY($3::text[])),"
        f" updated AS (UPDATE {e.name} AS e SET {assignments}"
        f" FROM unnest({keys}, {values})"
        f" AS v(b_namespace, b_workflow_id, b_run_id, b_expected, {', '.join(EXECUTION_COLUMNS)})"
        " WHERE e.namespace = v.b_namespace AND e.workflow_id = v.b_workflow_id"
        " AND e.run_id = v.b_run_id AND e.db_version = v.b_expected RETURNING 1)"
        " SELECT (SELECT count(*) FROM updated), array_agg(shard_id), array_agg(range_id)"
        " FROM fence"
    )


def _insert_rows_sql() -> str:
    tables = (
        (s.history_events, _EVENT_COLUMNS),
        (s.tasks, _TASK_COLUMNS),
        (s.timers, _TIMER_COLUMNS),
    )
    inserts, first = [], 1
    for table, columns in tables:
        inserts.append(
            f"INSERT INTO {table.name} ({', '.join(columns)})"
            f" SELECT * FROM {_unnest(table, columns, first)}"
        )
        first += len(columns)
    return f"WITH new_events AS ({inserts[0]}), new_tasks AS ({inserts[1]}) {inserts[2]}"


_CHECK_AND_UPDATE = {
    cluster.FenceRead.LOCKED: _check_and_update_sql(locked=True),
    cluster.FenceRead.PLAIN: _check_and_update_sql(locked=False),
}
_INSERT_ROWS = _insert_rows_sql()
_REPLACE_CURRENT = (
    f"UPDATE {s.current_executions.name} SET run_id = $1, status = $2, start_request_id = $3"
    f" WHERE namespace = $4 AND workflow_id = $5 AND run_id = $6 AND status != {_RUNNING}"
)
_UPDATE_CURRENT_STATUS = (
    f"UPDATE {s.current_executions.name} SET status = $1"
    " WHERE namespace = $2 AND workflow_id = $3 AND run_id = $4"
)
_DELETE_ATTRIBUTES = (
    f"DELETE FROM {s.search_attributes.name}"
    " WHERE namespace = $1 AND workflow_id = $2 AND run_id = $3 AND name = ANY($4::text[])"
)


def _columns(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[list[Any]]:
    """One list per column of ``names``: the arrays ``unnest`` takes apart."""
    return [[row[name] for row in rows] for name in names]


@functools.cache
def _insert_sql(table: Table, names: tuple[str, ...]) -> str:
    params = ", ".join(f"${i + 1}" for i in range(len(names)))
    return f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({params})"


async def _insert(conn: Any, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Plain rows of one table (one executemany: asyncpg pipelines its rows)."""
    if not rows:
        return
    names = tuple(rows[0])
    sql = _insert_sql(table, names)
    if len(rows) == 1:
        await conn.execute(sql, *rows[0].values())
    else:
        await conn.executemany(sql, [tuple(row.values()) for row in rows])


async def apply_batch_direct(
    conn: Any,
    rows: BatchRows,
    tokens: Mapping[int, set[int]],
    fence: cluster.FenceRead,
) -> dict[int, int]:
    """Write ``rows`` on the asyncpg connection ``conn`` inside its open transaction;
    what ``_batch_write.apply_batch`` does, with the same errors (``Rejected``,
    ``ShardOwnershipLostError``). Returns the range ids the fence read."""
    await _insert(conn, s.executions, rows.creates)
    updates = rows.updates
    found = await conn.fetchrow(
        _CHECK_AND_UPDATE[fence],
        sorted(tokens),
        rows.done_tasks,
        rows.done_timers,
        *_columns(updates, _UPDATE_KEYS),
        *_columns(updates, EXECUTION_COLUMNS),
    )
    changed, shards, range_ids = found
    current = cluster.fence_verdict(tokens, dict(zip(shards or (), range_ids or (), strict=True)))
    if changed != len(updates):
        raise stale_error(rows)
    await _write_currents(conn, rows)
    if rows.events or rows.new_tasks or rows.new_timers:
        await conn.execute(
            _INSERT_ROWS,
            *_columns(rows.events, _EVENT_COLUMNS),
            *_columns(rows.new_tasks, _TASK_COLUMNS),
            *_columns(rows.new_timers, _TIMER_COLUMNS),
        )
    visibility = rows.visibility
    if visibility:
        await _insert(conn, s.run_memos, visibility.memos)
        await conn.executemany(
            _DELETE_ATTRIBUTES,
            [(k.namespace, k.workflow_id, k.run_id, names) for k, names in visibility.deletes],
        )
        await _insert(conn, s.search_attributes, visibility.attributes)
    return current


async def _write_currents(conn: Any, rows: BatchRows) -> None:
    for write, row in rows.currents:
        if write == CurrentWrite.INSERT:
            await _insert(conn, s.current_executions, [row])
        elif write == CurrentWrite.REPLACE:
            status = await conn.execute(
                _REPLACE_CURRENT,
                row["run_id"],
                row["status"],
                row["start_request_id"],
                row["b_namespace"],
                row["b_workflow_id"],
                row["b_replaces"],
            )
            if status != "UPDATE 1":
                raise replaced_error(row)
        else:
            await conn.execute(
                _UPDATE_CURRENT_STATUS,
                row["status"],
                row["b_namespace"],
                row["b_workflow_id"],
                row["b_run_id"],
            )
