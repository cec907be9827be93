"""Visibility: memos and search attributes of runs, and filtered listing of runs.

What is stored
    ``executions`` already holds one row per run with the system fields that queries
    filter on (workflow id, type, task queue, status, start/close time, history
    length); the engine refreshes them in every transition. Custom search attributes
    live in ``search_attributes``, one row per (run, name) with typed value columns
    (``str_value`` for keywords, ``int_value`` for ints, bools and datetimes as
    microseconds, ``float_value`` for doubles), so every filter is a plain indexed SQL
    predicate on SQLite and PostgreSQL alike. The memo of a run is kept, opaque, in
    ``run_memos``.

When it is written
    In the transaction of the transition itself: ``visibility_rows`` is called by the
    store's batch writer and derives the rows from the transition's events
    (``WorkflowExecutionStarted`` carries the memo and initial search attributes,
    ``UpsertWorkflowSearchAttributes`` the upserts). Whatever starts a run - a client,
    a schedule, continue-as-new, a parent workflow - is indexed the same way, and the
    visibility rows can never disagree with history.

How it is queried
    The server parses the query language (``tideflow.server._visibility``) into the
    small AST below; ``compile_filter`` turns it into a SQLAlchemy expression over
    ``executions`` (custom attributes become ``EXISTS`` sub-queries). Values are always
    bound parameters: no query text ever reaches the database.

How values look on the wire (the one codec, shared by the SDK and the server) is
``tideflow.api.search_attributes``: it imports no SQL, so clients can use it too.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Float,
    and_,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    true,
)

from tideflow.api.search_attributes import (
    SearchAttributeType,
    SearchAttributeValue,
    parse_rfc3339,
    python_value,
    typed_value,
)
from tideflow.api.v1.common_pb2 import Memo, SearchAttributes
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent

from . import _schema as s
from ._errors import InvalidValueError
from ._records import ExecutionSummary, RunKey

log = logging.getLogger("tideflow.history.visibility")

# Plain ints: an enum wrapper's attribute lookup per event cost more than the loop.
_STARTED = int(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED)
_UPSERTED = int(EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES)
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
MAX_SEARCH_ATTRIBUTES = 100
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}\Z")


class FieldKind(IntEnum):
    """What kind of value a built-in query field holds."""

    KEYWORD = 1
    INT = 2
    DATETIME = 3
    STATUS = 4


# Built-in fields of the query language: columns of ``executions``.
BUILTIN_FIELDS: dict[str, FieldKind] = {
    "WorkflowId": FieldKind.KEYWORD,
    "RunId": FieldKind.KEYWORD,
    "WorkflowType": FieldKind.KEYWORD,
    "TaskQueue": FieldKind.KEYWORD,
    "ExecutionStatus": FieldKind.STATUS,
    "StartTime": FieldKind.DATETIME,
    "CloseTime": FieldKind.DATETIME,
    "HistoryLength": FieldKind.INT,
}

_COLUMNS = {
    "WorkflowId": s.executions.c.workflow_id,
    "RunId": s.executions.c.run_id,
    "WorkflowType": s.executions.c.workflow_type,
    "TaskQueue": s.executions.c.task_queue,
    "ExecutionStatus": s.executions.c.status,
    "StartTime": s.executions.c.start_time,
    "CloseTime": s.executions.c.close_time,
    "HistoryLength": s.executions.c.history_length,
}
# A run that is still open has no close time; it sorts as if it closed in the far
# future (after every closed run ascending, before them descending), and the
# sort key never is NULL, which keeps keyset pagination simple on every dialect.
_OPEN_CLOSE_TIME = 2**62


def search_attributes_problem(proto: SearchAttributes, *, allow_removal: bool) -> str | None:
    """Why these search attributes cannot be stored, or None if they can."""
    if len(proto.indexed_fields) > MAX_SEARCH_ATTRIBUTES:
        return f"more than {MAX_SEARCH_ATTRIBUTES} search attributes"
    for name in sorted(proto.indexed_fields):
        if not _NAME.match(name):
            return (
                f"search attribute name {name!r} is invalid: letters, digits and '_', "
                "not starting with a digit, at most 255 characters"
            )
        if name in BUILTIN_FIELDS:
            return f"search attribute name {name!r} is reserved for a built-in field"
        try:
            typed = typed_value(proto.indexed_fields[name])
        except ValueError as exc:
            return f"search attribute {name!r}: {exc}"
        if typed is None and not allow_removal:
            return f"search attribute {name!r} has no value"
    return None


# ---------------------------------------------------------------------- writing


def _row_values(kind: SearchAttributeType, stored: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "value_type": int(kind),
        "str_value": None,
        "int_value": None,
        "float_value": None,
    }
    if kind == SearchAttributeType.KEYWORD:
        row["str_value"] = stored
    elif kind == SearchAttributeType.KEYWORD_LIST:
        row["str_value"] = _keyword_list_text(stored)
    elif kind == SearchAttributeType.DOUBLE:
        row["float_value"] = float(stored)
    else:
        row["int_value"] = int(stored)
    return row


@dataclass(slots=True)
class VisibilityRows:
    """The visibility rows a batch writes: memos, the search attribute names each run's
    events set or removed (deleted first) and the values they set (inserted then).

    A batch's upserts of one run are merged (the last value of a name wins), so each
    name of a run is deleted and inserted at most once: what running the upserts one
    after the other would leave."""

    memos: list[dict[str, Any]]
    deletes: list[tuple[RunKey, list[str]]]
    attributes: list[dict[str, Any]]

    def __bool__(self) -> bool:
        return bool(self.memos or self.deletes)


def _collect_attributes(
    key: RunKey, proto: SearchAttributes, names: dict[str, dict[str, Any] | None]
) -> None:
    """Add the values ``proto`` sets (a row) or removes (None) to ``names``."""
    for name, payload in sorted(proto.indexed_fields.items()):
        try:
            typed = typed_value(payload)
        except ValueError as exc:
            # The frontend and the engine refuse these; never fail a transition for one.
            log.warning("run %s: search attribute %r not indexed: %s", key, name, exc)
            continue
        names[name] = None
        if typed is not None:
            names[name] = {
                "namespace": key.namespace,
                "workflow_id": key.workflow_id,
                "run_id": key.run_id,
                "name": name,
                **_row_values(*typed),
            }


def visibility_rows(batch: Sequence[tuple[RunKey, Sequence[HistoryEvent]]]) -> VisibilityRows:
    """The memo and search attribute rows the events of each run set."""
    rows = VisibilityRows(memos=[], deletes=[], attributes=[])
    for key, events in batch:
        names: dict[str, dict[str, Any] | None] = {}
        for event in events:
            et = event.event_type
            if et == _STARTED:
                a = event.workflow_execution_started_event_attributes
                if a.HasField("memo") and a.memo.fields:
                    rows.memos.append(
                        {
                            "namespace": key.namespace,
                            "workflow_id": key.workflow_id,
                            "run_id": key.run_id,
                            "data": a.memo.SerializeToString(),
                        }
                    )
                if a.HasField("search_attributes"):
                    _collect_attributes(key, a.search_attributes, names)
            elif et == _UPSERTED:
                upserted = event.upsert_workflow_search_attributes_event_attributes
                _collect_attributes(key, upserted.search_attributes, names)
        if names:
            rows.deletes.append((key, list(names)))
            rows.attributes.extend(row for row in names.values() if row is not None)
    return rows


def write_visibility_rows(conn: Connection, rows: VisibilityRows) -> None:
    """Write ``rows`` (``visibility_rows``) in the caller's transaction."""
    sa = s.search_attributes
    if rows.memos:
        conn.execute(insert(s.run_memos), rows.memos)
    for key, names in rows.deletes:
        conn.execute(
            delete(sa).where(
                sa.c.namespace == key.namespace,
                sa.c.workflow_id == key.workflow_id,
                sa.c.run_id == key.run_id,
                sa.c.name.in_(names),
            )
        )
    if rows.attributes:
        conn.execute(insert(sa), rows.attributes)


def index_events(conn: Connection, key: RunKey, events: Sequence[HistoryEvent]) -> None:
    """Index what ``events`` of one run set (a replica applying a replicated batch)."""
    write_visibility_rows(conn, visibility_rows([(key, events)]))


# ------------------------------------------------------------------- query AST

QueryValue = str | int | float | bool

# Operators of a comparison. IN / NOT IN take several values, the others one.
COMPARE_OPS = ("=", "!=", "<", ">", "<=", ">=", "IN", "NOT IN", "STARTS_WITH")


@dataclass(frozen=True, slots=True)
class Compare:
    """``field op value(s)``. For a built-in field the parser has already converted
    the values to the column's type (status numbers, epoch microseconds); for a custom
    search attribute they are the literals as written."""

    field: str
    op: str
    values: tuple[QueryValue, ...]


@dataclass(frozen=True, slots=True)
class LogicalOp:
    op: str  # "AND" or "OR"
    items: tuple[QueryExpr, ...]


QueryExpr = Compare | LogicalOp


@dataclass(frozen=True, slots=True)
class OrderBy:
    field: str  # a built-in field
    descending: bool


@dataclass(frozen=True, slots=True)
class VisibilityQuery:
    where: QueryExpr | None = None
    order_by: tuple[OrderBy, ...] = ()


DEFAULT_ORDER = (OrderBy("StartTime", True),)


@dataclass(frozen=True, slots=True, kw_only=True)
class VisibilityRecord:
    """One run as visibility lists it."""

    key: RunKey
    summary: ExecutionSummary
    memo: Memo | None
    search_attributes: dict[str, SearchAttributeValue]


# Keyset cursor: the sort values of the last row of a page, then workflow id, run id.
Cursor = tuple[Any, ...]


# ------------------------------------------------------------------- compiling


def _int_compare(column: Any, op: str, value: float) -> ColumnElement[bool]:
    """``column op value`` for an integer column, with only integers bound (asyncpg
    refuses a float parameter for a BIGINT comparison)."""
    if isinstance(value, int) or value.is_integer():
        bound = int(value)
    elif op == "=":
        return false()
    elif op == "!=":
        return column.is_not(None)  # type: ignore[no-any-return]
    elif op in ("<", ">="):
        bound = math.ceil(value)
    else:  # "<=", ">"
        bound = math.floor(value)
    bound = max(_INT64_MIN, min(_INT64_MAX, bound))
    return _op(column, op, bound)


def _op(left: Any, op: str, right: Any) -> ColumnElement[bool]:
    if op == "=":
        return left == right  # type: ignore[no-any-return]
    if op == "!=":
        return left != right  # type: ignore[no-any-return]
    if op == "<":
        return left < right  # type: ignore[no-any-return]
    if op == ">":
        return left > right  # type: ignore[no-any-return]
    if op == "<=":
        return left <= right  # type: ignore[no-any-return]
    if op == ">=":
        return left >= right  # type: ignore[no-any-return]
    raise ValueError(f"unknown operator {op!r}")


def _prefix(column: Any, prefix: str) -> ColumnElement[bool]:
    # substr, not LIKE: LIKE is case-insensitive on SQLite and needs escaping.
    if not prefix:
        return column.is_not(None)  # type: ignore[no-any-return]
    return func.substr(column, 1, len(prefix)) == prefix


def _system_compare(c: Compare) -> ColumnElement[bool]:
    column = _COLUMNS[c.field]
    kind = BUILTIN_FIELDS[c.field]
    if c.op in ("IN", "NOT IN"):
        parts = [_system_compare(Compare(c.field, "=", (v,))) for v in c.values]
        matched = or_(*parts) if parts else false()
        if c.op == "IN":
            return matched
        return and_(column.is_not(None), ~matched)
    value = c.values[0]
    if c.op == "STARTS_WITH":
        return _prefix(column, str(value))
    if kind == FieldKind.KEYWORD:
        return _op(column, c.op, str(value))
    assert isinstance(value, int | float) and not isinstance(value, bool)
    return _int_compare(column, c.op, value)


def _keyword_list_text(keywords: Sequence[str]) -> str:
    """A keyword list as stored: compact JSON (``["a","b"]``), in which a keyword is an
    item iff ``[k,``, ``[k]``, ``,k,`` or ``,k]`` occurs, ``k`` being its JSON: inside
    a JSON string every '"' is escaped, so no item's text can fake a boundary."""
    return json.dumps(list(keywords), separators=(",", ":"))


def _listed(column: Any, keyword: str) -> ColumnElement[bool]:
    """``column`` (a stored keyword list) has ``keyword`` as an item. replace() rather
    than LIKE: case-sensitive on every dialect and nothing to escape."""
    item = json.dumps(keyword)
    needles = (f"[{item},", f"[{item}]", f",{item},", f",{item}]")
    return or_(*(func.replace(column, needle, "") != column for needle in needles))


def _value_condition(sa: Any, op: str, value: QueryValue) -> ColumnElement[bool]:
    """The condition on one search_attributes row for ``attribute op value``."""
    t = SearchAttributeType
    if op == "STARTS_WITH":
        return and_(sa.c.value_type == int(t.KEYWORD), _prefix(sa.c.str_value, str(value)))
    if isinstance(value, bool):
        return and_(sa.c.value_type == int(t.BOOL), _op(sa.c.int_value, op, int(value)))
    if isinstance(value, int | float):
        return or_(
            and_(sa.c.value_type == int(t.INT), _int_compare(sa.c.int_value, op, value)),
            and_(
                sa.c.value_type == int(t.DOUBLE),
                _op(sa.c.float_value, op, literal(float(value), Float)),
            ),
        )
    conditions = [and_(sa.c.value_type == int(t.KEYWORD), _op(sa.c.str_value, op, value))]
    if op in ("=", "!="):
        # Temporal's meaning for a keyword list: "has this item" (and "has it not").
        listed = _listed(sa.c.str_value, value)
        conditions.append(
            and_(sa.c.value_type == int(t.KEYWORD_LIST), listed if op == "=" else ~listed)
        )
    micros = parse_rfc3339(value)
    if micros is not None:
        conditions.append(and_(sa.c.value_type == int(t.DATETIME), _op(sa.c.int_value, op, micros)))
    return or_(*conditions)


def _custom_compare(c: Compare) -> ColumnElement[bool]:
    """A custom attribute comparison: true if the run has the attribute and its value
    satisfies the comparison (so ``!=`` and ``NOT IN`` never match runs without it)."""
    e = s.executions
    sa = s.search_attributes.alias()
    if c.op == "IN":
        value_condition = or_(*(_value_condition(sa, "=", v) for v in c.values))
    elif c.op == "NOT IN":
        value_condition = ~or_(*(_value_condition(sa, "=", v) for v in c.values))
    else:
        value_condition = _value_condition(sa, c.op, c.values[0])
    return exists(
        select(sa.c.name).where(
            sa.c.namespace == e.c.namespace,
            sa.c.workflow_id == e.c.workflow_id,
            sa.c.run_id == e.c.run_id,
            sa.c.name == c.field,
            value_condition,
        )
    )


def compile_filter(expr: QueryExpr | None) -> ColumnElement[bool]:
    """The SQL condition on ``executions`` that the query's WHERE part means."""
    if expr is None:
        return true()
    if isinstance(expr, LogicalOp):
        parts = [compile_filter(item) for item in expr.items]
        return and_(*parts) if expr.op == "AND" else or_(*parts)
    if expr.field in BUILTIN_FIELDS:
        return _system_compare(expr)
    return _custom_compare(expr)


def _sort_key(field: str) -> Any:
    column = _COLUMNS[field]
    if field == "CloseTime":
        return func.coalesce(column, _OPEN_CLOSE_TIME)
    return column


def _sort_keys(order_by: Sequence[OrderBy]) -> list[tuple[Any, bool]]:
    e = s.executions
    keys = [(_sort_key(o.field), o.descending) for o in order_by or DEFAULT_ORDER]
    # Tie-breakers: a run's identity makes the order total, as keyset paging needs.
    keys += [(e.c.workflow_id, False), (e.c.run_id, False)]
    return keys


def _after(keys: Sequence[tuple[Any, bool]], cursor: Cursor) -> ColumnElement[bool]:
    """Rows strictly after ``cursor`` in the order ``keys`` define."""
    alternatives = []
    for i, (key, descending) in enumerate(keys):
        equal = [k == cursor[j] for j, (k, _) in enumerate(keys[:i])]
        beyond = key < cursor[i] if descending else key > cursor[i]
        alternatives.append(and_(*equal, beyond))
    return or_(*alternatives)


def _fits(keys: Sequence[tuple[Any, bool]], cursor: Cursor) -> bool:
    """Whether ``cursor`` has a value of each key's type. It comes back from the client
    inside its page token: one of another length was an IndexError in ``_after``, and
    a text value for an integer key an SQL error on PostgreSQL (INTERNAL, both)."""
    if len(cursor) != len(keys):
        return False
    for (key, _), value in zip(keys, cursor, strict=True):
        try:
            expected = key.type.python_type
        except NotImplementedError:
            continue
        if value is not None and type(value) is not expected:
            return False
    return True


# ----------------------------------------------------------------- statements


def list_executions(
    conn: Connection,
    namespace: str,
    query: VisibilityQuery,
    page_size: int,
    cursor: Cursor | None,
) -> tuple[list[VisibilityRecord], Cursor | None]:
    """One page of runs matching ``query``, and the cursor of the next page."""
    e = s.executions
    keys = _sort_keys(query.order_by)
    labelled = [k.label(f"sort_{i}") for i, (k, _) in enumerate(keys)]
    statement = select(
        e.c.namespace,
        e.c.workflow_id,
        e.c.run_id,
        e.c.workflow_type,
        e.c.task_queue,
        e.c.status,
        e.c.start_time,
        e.c.close_time,
        e.c.history_length,
        *labelled,
    ).where(e.c.namespace == namespace, compile_filter(query.where))
    if cursor is not None:
        if not _fits(keys, cursor):
            raise InvalidValueError("the page token's cursor does not fit the query")
        statement = statement.where(_after(keys, cursor))
    statement = statement.order_by(
        *(k.desc() if descending else k.asc() for k, descending in keys)
    ).limit(page_size + 1)
    rows = conn.execute(statement).all()
    more = len(rows) > page_size
    rows = rows[:page_size]
    if not rows:
        return [], None
    run_ids = [r.run_id for r in rows]
    attributes: dict[str, dict[str, SearchAttributeValue]] = {rid: {} for rid in run_ids}
    sa = s.search_attributes
    for a in conn.execute(
        select(sa).where(sa.c.namespace == namespace, sa.c.run_id.in_(run_ids))
    ).all():
        attributes.setdefault(a.run_id, {})[a.name] = _row_python_value(a)
    m = s.run_memos
    memos = {
        r.run_id: Memo.FromString(r.data)
        for r in conn.execute(
            select(m.c.run_id, m.c.data).where(m.c.namespace == namespace, m.c.run_id.in_(run_ids))
        ).all()
    }
    records = [
        VisibilityRecord(
            key=RunKey(namespace=r.namespace, workflow_id=r.workflow_id, run_id=r.run_id),
            summary=ExecutionSummary(
                workflow_type=r.workflow_type,
                task_queue=r.task_queue,
                status=r.status,
                start_time=r.start_time,
                close_time=r.close_time,
                history_length=r.history_length,
            ),
            memo=memos.get(r.run_id),
            search_attributes=attributes.get(r.run_id, {}),
        )
        for r in rows
    ]
    last = rows[-1]
    next_cursor = tuple(getattr(last, f"sort_{i}") for i in range(len(keys))) if more else None
    return records, next_cursor


def count_executions(conn: Connection, namespace: str, query: VisibilityQuery) -> int:
    """How many runs of the namespace match the query's filter."""
    e = s.executions
    statement = (
        select(func.count())
        .select_from(e)
        .where(e.c.namespace == namespace, compile_filter(query.where))
    )
    return int(conn.execute(statement).scalar_one())


def run_search_attributes(conn: Connection, key: RunKey) -> dict[str, SearchAttributeValue]:
    """The current search attributes of one run."""
    sa = s.search_attributes
    result: dict[str, SearchAttributeValue] = {}
    for a in conn.execute(
        select(sa).where(
            sa.c.namespace == key.namespace,
            sa.c.workflow_id == key.workflow_id,
            sa.c.run_id == key.run_id,
        )
    ).all():
        result[a.name] = _row_python_value(a)
    return result


def _row_python_value(row: Any) -> SearchAttributeValue:
    kind = SearchAttributeType(row.value_type)
    if kind == SearchAttributeType.KEYWORD:
        return python_value(kind, row.str_value)
    if kind == SearchAttributeType.KEYWORD_LIST:
        return python_value(kind, json.loads(row.str_value))
    if kind == SearchAttributeType.DOUBLE:
        return python_value(kind, row.float_value)
    return python_value(kind, row.int_value)
