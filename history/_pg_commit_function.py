"""A group-commit batch on PostgreSQL in one round trip: a server-side function.

``_pg_batch.apply_batch_direct`` writes a batch as BEGIN, two statements and COMMIT:
four round trips before the WAL flush. Here the same writes run inside one PL/pgSQL
function, called by one statement outside an explicit transaction (so the statement's
implicit transaction commits it): Bind, Execute and Sync of a prepared statement,
one round trip. Inside, the statements run one after the other in the order of the
multi-statement path: the new runs' ``executions`` rows, the fence's read of the
shard rows and its check of the tokens, the deletes of the consumed task and timer
rows, the version-checked update, the current-run writes in the batch's order, and
the event, task and timer inserts. A failed check raises an error of the function's
own SQLSTATE class (``TF``), which rolls the whole statement back, as a refused batch
is rolled back today (``Rejected``); the store then commits each transition alone.

- The function's name carries a digest of its definition, so a changed definition is
  installed beside the old one, which nodes of the previous version keep calling
  during a rolling upgrade. ``install`` creates it when the store opens, on a new
  database and on one created before it existed (under an advisory lock: two nodes
  opening at once create it once).
- At SERIALIZABLE the direct connections' sessions default to SERIALIZABLE, so the
  implicit transaction is too, and a 40001 is retried like the multi-statement
  transaction's (nothing was committed).
- An answer lost after the statement was sent is a write in doubt, as a lost COMMIT
  answer is: the version guard and the unique keys make the store's retry safe.
- Batches with visibility rows (memos, search attributes: rare) keep the
  multi-statement path, and so does CockroachDB (``cockroachdb://`` URLs): its
  PL/pgSQL is a subset this function was never run on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import Table

from . import _cluster as cluster
from . import _schema as s
from ._batch_write import EXECUTION_COLUMNS, BatchRows, replaced_error, stale_error
from ._errors import ShardOwnershipLostError
from ._pg_batch import (
    _EVENT_COLUMNS,
    _RUNNING,
    _TASK_COLUMNS,
    _TIMER_COLUMNS,
    _UPDATE_KEYS,
    _array_type,
    _columns,
    apply_batch_direct,
)
from ._records import CurrentWrite

_FENCE_REFUSED = "TF001"
_STALE = "TF002"
_REPLACED = "TF003"

_CREATE_COLUMNS = ("namespace", "workflow_id", "run_id", *EXECUTION_COLUMNS)
_CURRENT_COLUMNS = ("kind", "namespace", "workflow_id", "run_id", "status", "request", "prior")


class _Arguments:
    """The function's parameters, numbered in the order they are declared."""

    def __init__(self) -> None:
        self.declared: list[str] = []

    def add(self, prefix: str, names: tuple[str, ...], kinds: list[str]) -> list[str]:
        params = [f"{prefix}_{name}" for name in names]
        self.declared += [f"{p} {kind}" for p, kind in zip(params, kinds, strict=True)]
        return params

    def table(self, prefix: str, table: Table, names: tuple[str, ...]) -> list[str]:
        return self.add(prefix, names, [_array_type(table, name) for name in names])


def _insert(table: Table, columns: tuple[str, ...], params: list[str]) -> str:
    return (
        f"INSERT INTO {table.name} ({', '.join(columns)})"
        f" SELECT * FROM unnest({', '.join(params)});"
    )


def _definition_body() -> tuple[str, str]:
    """(parameter list, body) of the function; its name is derived from both."""
    e, args = s.executions, _Arguments()
    fence = args.add("f", ("shards", "pair_shards", "pair_tokens", "locked"),
                      ["int4[]", "int4[]", "int8[]", "boolean"])  # fmt: skip
    done = args.add("d", ("tasks", "timers"), ["text[]", "text[]"])
    creates = args.table("c", e, _CREATE_COLUMNS)
    keys = args.add("u", _UPDATE_KEYS, ["text[]", "text[]", "text[]", "int8[]"])
    values = args.table("u", e, EXECUTION_COLUMNS)
    cur = dict(zip(_CURRENT_COLUMNS, args.add("k", _CURRENT_COLUMNS, ["int4[]", *["text[]"] * 3,
               "int4[]", "text[]", "text[]"]), strict=True))  # fmt: skip
    events = args.table("ev", s.history_events, _EVENT_COLUMNS)
    tasks = args.table("ta", s.tasks, _TASK_COLUMNS)
    timers = args.table("ti", s.timers, _TIMER_COLUMNS)
    shards, pairs, tokens, locked = fence
    fence_read = (
        f"SELECT array_agg(shard_id), array_agg(range_id) INTO shards, range_ids"
        f" FROM (SELECT shard_id, range_id FROM {s.shards.name}"
        f" WHERE shard_id = ANY({shards}) ORDER BY shard_id{{lock}}) AS f;"
    )
    assignments = ", ".join(f"{name} = v.{name}" for name in EXECUTION_COLUMNS)
    c = s.current_executions.name
    body = f"""
DECLARE
  changed bigint;
  refused record;
BEGIN
  {_insert(e, _CREATE_COLUMNS, creates)}
  IF {locked} THEN {fence_read.format(lock=" FOR SHARE")}
  ELSE {fence_read.format(lock="")}
  END IF;
  SELECT p.shard, p.token, coalesce(r.range_id, {cluster.INITIAL_RANGE_ID}) AS actual
    INTO refused
    FROM unnest({pairs}, {tokens}) AS p(shard, token)
    LEFT JOIN unnest(shards, range_ids) AS r(shard_id, range_id) ON r.shard_id = p.shard
    WHERE p.token <> coalesce(r.range_id, {cluster.INITIAL_RANGE_ID})
    ORDER BY p.shard LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'refused by the fence' USING ERRCODE = '{_FENCE_REFUSED}',
      DETAIL = refused.shard || ' ' || refused.token || ' ' || refused.actual;
  END IF;
  DELETE FROM {s.tasks.name} WHERE task_key = ANY({done[0]});
  DELETE FROM {s.timers.name} WHERE timer_key = ANY({done[1]});
  UPDATE {e.name} AS e SET {assignments}
    FROM unnest({", ".join(keys + values)})
    AS v(b_namespace, b_workflow_id, b_run_id, b_expected, {", ".join(EXECUTION_COLUMNS)})
    WHERE e.namespace = v.b_namespace AND e.workflow_id = v.b_workflow_id
    AND e.run_id = v.b_run_id AND e.db_version = v.b_expected;
  GET DIAGNOSTICS changed = ROW_COUNT;
  IF changed <> coalesce(cardinality({keys[0]}), 0) THEN
    RAISE EXCEPTION 'a run changed since it was read' USING ERRCODE = '{_STALE}';
  END IF;
  FOR i IN 1 .. coalesce(cardinality({cur["kind"]}), 0) LOOP
    IF {cur["kind"]}[i] = {CurrentWrite.INSERT.value} THEN
      INSERT INTO {c} (namespace, workflow_id, run_id, status, start_request_id)
        VALUES ({cur["namespace"]}[i], {cur["workflow_id"]}[i], {cur["run_id"]}[i],
                {cur["status"]}[i], {cur["request"]}[i]);
    ELSIF {cur["kind"]}[i] = {CurrentWrite.REPLACE.value} THEN
      UPDATE {c} SET run_id = {cur["run_id"]}[i], status = {cur["status"]}[i],
        start_request_id = {cur["request"]}[i]
        WHERE namespace = {cur["namespace"]}[i] AND workflow_id = {cur["workflow_id"]}[i]
        AND run_id = {cur["prior"]}[i] AND status <> {_RUNNING};
      GET DIAGNOSTICS changed = ROW_COUNT;
      IF changed <> 1 THEN
        RAISE EXCEPTION 'the current run was replaced' USING ERRCODE = '{_REPLACED}',
          DETAIL = (i - 1)::text;
      END IF;
    ELSE
      UPDATE {c} SET status = {cur["status"]}[i]
        WHERE namespace = {cur["namespace"]}[i] AND workflow_id = {cur["workflow_id"]}[i]
        AND run_id = {cur["prior"]}[i];
    END IF;
  END LOOP;
  {_insert(s.history_events, _EVENT_COLUMNS, events)}
  {_insert(s.tasks, _TASK_COLUMNS, tasks)}
  {_insert(s.timers, _TIMER_COLUMNS, timers)}
END;"""
    return ", ".join(args.declared), body


def _function() -> tuple[str, str, int]:
    """(name, CREATE statement, parameter count) of the batch function."""
    params, body = _definition_body()
    digest = hashlib.sha256(f"{params}\n{body}".encode()).hexdigest()[:12]
    name = f"tideflow_commit_batch_{digest}"
    create = (
        f"CREATE OR REPLACE FUNCTION {name}({params},"
        " OUT shards int4[], OUT range_ids int8[])"
        f" LANGUAGE plpgsql AS $tideflow${body}$tideflow$"
    )
    return name, create, params.count(",") + 1


FUNCTION_NAME, _CREATE_FUNCTION, _PARAMETER_COUNT = _function()
_CALL = (
    f"SELECT shards, range_ids FROM {FUNCTION_NAME}"
    f"({', '.join(f'${n + 1}' for n in range(_PARAMETER_COUNT))})"
)


async def install(runner: Any) -> None:
    """Create the batch function unless the database has it (one transaction on a
    direct connection; the advisory lock orders two nodes installing at once), then
    let the runner's direct connections call it."""

    async def create(conn: Any) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", FUNCTION_NAME)
        found = await conn.fetchval(
            "SELECT count(*) FROM pg_proc WHERE proname = $1", FUNCTION_NAME
        )
        if not found:
            await conn.execute(_CREATE_FUNCTION)

    await runner.write_direct(create)
    runner.direct.batch_function = FUNCTION_NAME


def _current_columns(rows: BatchRows) -> list[list[Any]]:
    """The current-run writes as the function's ``k_*`` arrays, in the batch's order."""
    flat = []
    for write, row in rows.currents:
        prior = row.get("b_replaces") if write == CurrentWrite.REPLACE else row.get("b_run_id")
        flat.append(
            (
                int(write),
                row.get("namespace", row.get("b_namespace")),
                row.get("workflow_id", row.get("b_workflow_id")),
                row.get("run_id"),
                row["status"],
                row.get("start_request_id"),
                prior,
            )
        )
    return [list(column) for column in zip(*flat, strict=True)] or [[] for _ in _CURRENT_COLUMNS]


async def commit_batch_once(
    conn: Any,
    rows: BatchRows,
    tokens: Mapping[int, set[int]],
    fence: cluster.FenceRead,
) -> dict[int, int]:
    """Write ``rows`` with one call of the batch function on ``conn`` (outside a
    transaction: the call commits); the errors of ``apply_batch_direct``."""
    pairs = sorted((shard, token) for shard, held in tokens.items() for token in held)
    try:
        found = await conn.fetchrow(
            _CALL,
            sorted(tokens),
            [shard for shard, _ in pairs],
            [token for _, token in pairs],
            fence == cluster.FenceRead.LOCKED,
            rows.done_tasks,
            rows.done_timers,
            *_columns(rows.creates, _CREATE_COLUMNS),
            *_columns(rows.updates, _UPDATE_KEYS),
            *_columns(rows.updates, EXECUTION_COLUMNS),
            *_current_columns(rows),
            *_columns(rows.events, _EVENT_COLUMNS),
            *_columns(rows.new_tasks, _TASK_COLUMNS),
            *_columns(rows.new_timers, _TIMER_COLUMNS),
        )
    except asyncpg.PostgresError as exc:
        refusal = _refusal(exc, rows)
        if refusal is None:
            raise
        raise refusal from exc
    shards, range_ids = found
    return cluster.fence_verdict(tokens, dict(zip(shards or (), range_ids or (), strict=True)))


def _refusal(exc: Any, rows: BatchRows) -> Exception | None:
    """The store's error for a check the function failed; None for other errors."""
    code = getattr(exc, "sqlstate", None)
    if code == _FENCE_REFUSED:
        shard, held, actual = (int(part) for part in str(exc.detail).split())
        return ShardOwnershipLostError(shard, held, actual, "refused by the fence")
    if code == _STALE:
        return stale_error(rows)
    if code == _REPLACED:
        return replaced_error(rows.currents[int(exc.detail)][1])
    return None


async def write_batch_direct(
    runner: Any,
    rows: BatchRows,
    tokens: Mapping[int, set[int]],
    fence: cluster.FenceRead,
) -> dict[int, int]:
    """Write a batch on the runner's direct connections: one call of the batch function
    where the database has it, else BEGIN, ``apply_batch_direct`` and COMMIT."""
    if getattr(runner.direct, "batch_function", None) and not rows.visibility:
        return await runner.write_direct(  # type: ignore[no-any-return]
            lambda conn: commit_batch_once(conn, rows, tokens, fence), implicit=True
        )
    return await runner.write_direct(  # type: ignore[no-any-return]
        lambda conn: apply_batch_direct(conn, rows, tokens, fence)
    )
