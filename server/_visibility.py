"""The visibility query language: what ``ListWorkflowExecutions`` and
``CountWorkflowExecutions`` (``client.list_workflows`` / ``client.count_workflows``)
accept, parsed here into the store's query AST (``tideflow.history``), which the store
compiles to SQL with bound parameters only.

The language
============

A query is an optional filter followed by an optional ``ORDER BY``::

    WorkflowType = 'Billing' AND (ExecutionStatus = 'Running' OR StartTime > '2024-05-01T00:00:00Z')
    CustomerId IN ('c-1', 'c-2') AND Amount >= 100 ORDER BY StartTime DESC

An empty query matches every run of the namespace.

Fields
    Built-in (names are case-insensitive):

    ================  =======================================================
    WorkflowId        string
    RunId             string
    WorkflowType      string
    TaskQueue         string
    ExecutionStatus   one of Running, Completed, Failed, Canceled, Terminated,
                      ContinuedAsNew, TimedOut (as a string, case-insensitive)
    StartTime         RFC 3339 time as a string, e.g. '2024-05-01T12:00:00Z'
    CloseTime         same; a run that is still open has no close time
    HistoryLength     integer
    ================  =======================================================

    Any other name is a custom search attribute (set with ``search_attributes=`` at
    start or ``workflow.upsert_search_attributes``): letters, digits and ``_``. Quote
    a name in backticks when it is a keyword of the language (AND, OR, IN, NOT, ORDER,
    BY, ASC, DESC, STARTS_WITH, TRUE, FALSE), e.g. ```Order` = 'o-1'``. Values are
    typed: a string literal matches Keyword values (and Datetime values when it is an
    RFC 3339 time), a number matches Int and Double values, ``true``/``false`` match
    Bool values. On a KeywordList value ``=`` / ``IN`` test for an item and ``!=`` /
    ``NOT IN`` for its absence; ordering comparisons never match it. A comparison on a
    custom attribute is true only for runs that have the attribute, so
    ``Region != 'eu'`` does not match runs without a ``Region``.
    Attribute names need no registration: a name no run has simply matches nothing.

Literals
    Strings in single or double quotes (a quote inside is doubled, ``'it''s'``, or
    escaped with a backslash); integers and decimals, optionally negative;
    ``true`` / ``false``.

Operators
    ``=``, ``!=`` (also ``<>``), ``<``, ``>``, ``<=``, ``>=``;
    ``field IN (v1, v2, ...)`` and ``field NOT IN (...)``;
    ``field STARTS_WITH 'prefix'`` (strings only). Comparisons combine with ``AND``
    (binding tighter) and ``OR``, grouped with parentheses. Keywords are
    case-insensitive. ExecutionStatus supports only ``=``, ``!=``, ``IN``, ``NOT IN``.

Ordering
    ``ORDER BY field [ASC|DESC] [, field [ASC|DESC] ...]`` over built-in fields; the
    default is ``StartTime DESC``. Ties are broken by workflow id and run id, so pages
    never repeat or skip a run. Open runs sort as if their CloseTime were in the far
    future. ``CountWorkflowExecutions`` takes no ORDER BY.

Errors
    A query that does not parse, names an unknown status, compares a field with a
    value of the wrong type, or orders by a custom attribute is refused with
    INVALID_ARGUMENT; the message names the offending token and its position
    (1-based character offset), e.g. ``invalid query: unexpected 'AND' at position
    17; expected a field name``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tideflow.api.v1.common_pb2 import SearchAttributes
from tideflow.api.v1.service_pb2 import WorkflowExecutionInfo
from tideflow.history import (
    BUILTIN_FIELDS,
    Compare,
    FieldKind,
    LogicalOp,
    OrderBy,
    QueryExpr,
    QueryValue,
    VisibilityCursor,
    VisibilityQuery,
    VisibilityRecord,
    encode_search_attribute,
    parse_rfc3339,
    search_attributes_problem,
)

from ._errors import InvalidArgumentError

MAX_QUERY_LENGTH = 16_384
_MAX_DEPTH = 32
_MAX_COMPARISONS = 256
_MAX_IN_VALUES = 1_000
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

_STATUSES = {
    "running": 1,
    "completed": 2,
    "failed": 3,
    "canceled": 4,
    "cancelled": 4,
    "terminated": 5,
    "continuedasnew": 6,
    "timedout": 7,
}
_STATUS_NAMES = "Running, Completed, Failed, Canceled, Terminated, ContinuedAsNew, TimedOut"
_KEYWORDS = {
    "AND",
    "OR",
    "IN",
    "NOT",
    "ORDER",
    "BY",
    "ASC",
    "DESC",
    "STARTS_WITH",
    "TRUE",
    "FALSE",
}
_BUILTIN_BY_LOWER = {name.lower(): name for name in BUILTIN_FIELDS}


class QueryError(InvalidArgumentError):
    """An invalid visibility query (INVALID_ARGUMENT)."""


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # IDENT, STRING, NUMBER, OP, LPAREN, RPAREN, COMMA, KEYWORD, EOF
    text: str  # as written (for messages)
    value: Any  # identifier name, decoded string, number, operator, keyword
    pos: int  # 0-based offset in the query

    def describe(self) -> str:
        if self.kind == "EOF":
            return "end of query"
        return repr(self.text)


def _error(token: _Token, what: str) -> QueryError:
    """A problem with one token: the message names it and its position."""
    return QueryError(f"invalid query: {token.describe()} at position {token.pos + 1}: {what}")


def _unexpected(token: _Token, expected: str) -> QueryError:
    return QueryError(
        f"invalid query: unexpected {token.describe()} at position {token.pos + 1}; "
        f"expected {expected}"
    )


def _tokenize(query: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(query)
    while i < n:
        c = query[i]
        if c.isspace():
            i += 1
            continue
        start = i
        if c in "'\"":
            token, i = _read_string(query, start)
        elif c == "`":
            token, i = _read_quoted_name(query, start)
        elif c.isdigit() or (c in "-+." and i + 1 < n and (query[i + 1].isdigit())):
            token, i = _read_number(query, start)
        elif c.isalpha() or c == "_":
            token, i = _read_word(query, start)
        elif query.startswith(("!=", "<>", "<=", ">="), i):
            op = query[i : i + 2]
            i += 2
            token = _Token("OP", op, "!=" if op == "<>" else op, start)
        elif c in _SINGLE_CHAR_TOKENS:
            i += 1
            token = _Token(_SINGLE_CHAR_TOKENS[c], c, c, start)
        else:
            raise QueryError(f"invalid query: unexpected character {c!r} at position {start + 1}")
        tokens.append(token)
    tokens.append(_Token("EOF", "", None, n))
    return tokens


_SINGLE_CHAR_TOKENS = {
    "=": "OP",
    "<": "OP",
    ">": "OP",
    "(": "LPAREN",
    ")": "RPAREN",
    ",": "COMMA",
}


def _read_string(query: str, start: int) -> tuple[_Token, int]:
    """A quoted string from ``start``: backslash escapes, a doubled quote is one."""
    n = len(query)
    quote, i, chars = query[start], start + 1, []
    while True:
        if i >= n:
            raise QueryError(f"invalid query: unterminated string starting at position {start + 1}")
        ch = query[i]
        if ch == "\\" and i + 1 < n:
            chars.append(query[i + 1])
            i += 2
        elif ch == quote:
            if i + 1 < n and query[i + 1] == quote:
                chars.append(quote)
                i += 2
            else:
                i += 1
                break
        else:
            chars.append(ch)
            i += 1
    return _Token("STRING", query[start:i], "".join(chars), start), i


def _read_quoted_name(query: str, start: int) -> tuple[_Token, int]:
    end = query.find("`", start + 1)
    if end < 0:
        raise QueryError(f"invalid query: unterminated `name` starting at position {start + 1}")
    return _Token("IDENT", query[start : end + 1], query[start + 1 : end], start), end + 1


def _read_number(query: str, start: int) -> tuple[_Token, int]:
    n = len(query)
    i = start + 1
    while i < n and (query[i].isalnum() or query[i] in "._+-"):
        # 1e-5 and 1E+5 keep their sign; "-" elsewhere ends the number.
        if query[i] in "+-" and query[i - 1] not in "eE":
            break
        i += 1
    text = query[start:i]
    try:
        number: int | float = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            raise QueryError(
                f"invalid query: malformed number {text!r} at position {start + 1}"
            ) from None
    return _Token("NUMBER", text, number, start), i


def _read_word(query: str, start: int) -> tuple[_Token, int]:
    n = len(query)
    i = start
    while i < n and (query[i].isalnum() or query[i] == "_"):
        i += 1
    word = query[start:i]
    if word.upper() in _KEYWORDS:
        return _Token("KEYWORD", word, word.upper(), start), i
    return _Token("IDENT", word, word, start), i


class _Parser:
    """Recursive descent over the token list (grammar in the module docstring)."""

    def __init__(self, tokens: list[_Token]) -> None:
        self._tokens = tokens
        self._i = 0
        self._comparisons = 0

    @property
    def _peek(self) -> _Token:
        return self._tokens[self._i]

    def _next(self) -> _Token:
        token = self._tokens[self._i]
        if token.kind != "EOF":
            self._i += 1
        return token

    def _keyword(self, *words: str) -> bool:
        token = self._peek
        return token.kind == "KEYWORD" and token.value in words

    def parse(self) -> VisibilityQuery:
        where: QueryExpr | None = None
        if self._peek.kind != "EOF" and not self._keyword("ORDER"):
            where = self._or(0)
        order: tuple[OrderBy, ...] = ()
        if self._keyword("ORDER"):
            self._next()
            if not self._keyword("BY"):
                raise _unexpected(self._peek, "BY after ORDER")
            self._next()
            order = self._order_by()
        if self._peek.kind != "EOF":
            expected = "AND, OR, ORDER BY or the end" if order == () else "',' or the end"
            raise _unexpected(self._peek, expected)
        return VisibilityQuery(where=where, order_by=order)

    def _or(self, depth: int) -> QueryExpr:
        items = [self._and(depth)]
        while self._keyword("OR"):
            self._next()
            items.append(self._and(depth))
        return items[0] if len(items) == 1 else LogicalOp("OR", tuple(items))

    def _and(self, depth: int) -> QueryExpr:
        items = [self._primary(depth)]
        while self._keyword("AND"):
            self._next()
            items.append(self._primary(depth))
        return items[0] if len(items) == 1 else LogicalOp("AND", tuple(items))

    def _primary(self, depth: int) -> QueryExpr:
        token = self._peek
        if token.kind == "LPAREN":
            if depth >= _MAX_DEPTH:
                raise _error(token, f"parentheses nested deeper than {_MAX_DEPTH}")
            self._next()
            inner = self._or(depth + 1)
            if self._peek.kind != "RPAREN":
                raise _unexpected(self._peek, "')'")
            self._next()
            return inner
        return self._comparison()

    def _field(self) -> tuple[_Token, str]:
        token = self._next()
        if token.kind != "IDENT":
            raise _unexpected(token, "a field name")
        name = str(token.value)
        builtin = _BUILTIN_BY_LOWER.get(name.lower())
        if builtin is not None:
            return token, builtin
        if not name or not (name[0].isalpha() or name[0] == "_"):
            raise _error(token, "invalid search attribute name")
        return token, name

    def _comparison(self) -> Compare:
        self._comparisons += 1
        field_token, field = self._field()
        if self._comparisons > _MAX_COMPARISONS:
            raise _error(field_token, f"more than {_MAX_COMPARISONS} comparisons")
        op_token = self._next()
        if op_token.kind == "OP":
            value_token = self._next()
            value = _literal(value_token)
            return Compare(field, op_token.value, (_convert(field, op_token, value_token, value),))
        if op_token.kind == "KEYWORD" and op_token.value == "STARTS_WITH":
            value_token = self._next()
            value = _literal(value_token)
            if not isinstance(value, str):
                raise _error(value_token, "STARTS_WITH takes a string")
            kind = BUILTIN_FIELDS.get(field)
            if kind is not None and kind != FieldKind.KEYWORD:
                raise _error(op_token, f"STARTS_WITH does not apply to {field}")
            return Compare(field, "STARTS_WITH", (value,))
        negated = False
        if op_token.kind == "KEYWORD" and op_token.value == "NOT":
            negated = True
            op_token = self._next()
            if not (op_token.kind == "KEYWORD" and op_token.value == "IN"):
                raise _unexpected(op_token, "IN after NOT")
        if op_token.kind == "KEYWORD" and op_token.value == "IN":
            if self._peek.kind != "LPAREN":
                raise _unexpected(self._peek, "'(' after IN")
            self._next()
            values: list[QueryValue] = []
            while True:
                value_token = self._next()
                value = _literal(value_token)
                values.append(_convert(field, op_token, value_token, value))
                if len(values) > _MAX_IN_VALUES:
                    raise _error(value_token, f"more than {_MAX_IN_VALUES} values in IN")
                separator = self._next()
                if separator.kind == "RPAREN":
                    break
                if separator.kind != "COMMA":
                    raise _unexpected(separator, "',' or ')'")
            return Compare(field, "NOT IN" if negated else "IN", tuple(values))
        raise _unexpected(op_token, "an operator (=, !=, <, >, <=, >=, IN)")

    def _order_by(self) -> tuple[OrderBy, ...]:
        items: list[OrderBy] = []
        seen: set[str] = set()
        while True:
            token, field = self._field()
            if field not in BUILTIN_FIELDS:
                raise _error(
                    token,
                    "ORDER BY takes a built-in field (" + ", ".join(BUILTIN_FIELDS) + ")",
                )
            if field in seen:
                raise _error(token, f"{field} appears twice in ORDER BY")
            seen.add(field)
            descending = False
            if self._keyword("ASC", "DESC"):
                descending = self._next().value == "DESC"
            items.append(OrderBy(field, descending))
            if self._peek.kind != "COMMA":
                return tuple(items)
            self._next()


def _literal(token: _Token) -> QueryValue:
    if token.kind in ("STRING", "NUMBER"):
        value: QueryValue = token.value
        return value
    if token.kind == "KEYWORD" and token.value in ("TRUE", "FALSE"):
        return bool(token.value == "TRUE")
    raise _unexpected(token, "a value (a string, number, true or false)")


def _convert(field: str, op: _Token, token: _Token, value: QueryValue) -> QueryValue:
    """A literal as the field's column holds it (built-in fields) or as written."""
    kind = BUILTIN_FIELDS.get(field)
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and not _INT64_MIN <= value <= _INT64_MAX
    ):
        raise _error(token, "integer out of the 64-bit range")
    if kind is None:
        return value
    if kind == FieldKind.KEYWORD:
        if not isinstance(value, str):
            raise _error(token, f"{field} compares with a string")
        return value
    if kind == FieldKind.STATUS:
        if op.value not in ("=", "!=", "IN"):
            raise _error(op, "ExecutionStatus supports only =, !=, IN and NOT IN")
        status = (
            _STATUSES.get(str(value).replace("_", "").lower()) if isinstance(value, str) else None
        )
        if status is None:
            raise _error(token, f"unknown ExecutionStatus (one of {_STATUS_NAMES})")
        return status
    if kind == FieldKind.DATETIME:
        micros = parse_rfc3339(value) if isinstance(value, str) else None
        if micros is None:
            raise _error(
                token, f"{field} compares with an RFC 3339 time such as '2024-05-01T00:00:00Z'"
            )
        return micros
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _error(token, f"{field} compares with a number")
    return value


def parse_query(query: str) -> VisibilityQuery:
    """Parse a visibility query; raises ``QueryError`` (INVALID_ARGUMENT)."""
    if len(query) > MAX_QUERY_LENGTH:
        raise QueryError(f"invalid query: longer than {MAX_QUERY_LENGTH} characters")
    return _Parser(_tokenize(query)).parse()


# ----------------------------------------------------------------- page tokens


def _fingerprint(namespace: str, query: str) -> str:
    return hashlib.sha256(f"{namespace}\0{query}".encode()).hexdigest()[:16]


def encode_page_token(namespace: str, query: str, cursor: VisibilityCursor) -> bytes:
    """An opaque token for the page after ``cursor``; valid only for the same query."""
    body = json.dumps({"q": _fingerprint(namespace, query), "c": list(cursor)})
    return base64.urlsafe_b64encode(body.encode())


def decode_page_token(namespace: str, query: str, token: bytes) -> VisibilityCursor:
    try:
        body = json.loads(base64.urlsafe_b64decode(token))
        fingerprint, cursor = body["q"], body["c"]
        if not isinstance(cursor, list) or not all(
            isinstance(v, int | str) and not isinstance(v, bool) for v in cursor
        ):
            raise ValueError("bad cursor")
    except (ValueError, KeyError, TypeError, RecursionError):
        # RecursionError: a deeply nested JSON body (was INTERNAL with a traceback).
        raise InvalidArgumentError("next_page_token is malformed") from None
    if fingerprint != _fingerprint(namespace, query):
        raise InvalidArgumentError("next_page_token belongs to a different query")
    return tuple(cursor)


# ------------------------------------------------------------- frontend helpers


def check_search_attributes(proto: SearchAttributes, *, allow_removal: bool = False) -> None:
    """Refuse search attributes the store cannot index (INVALID_ARGUMENT)."""
    problem = search_attributes_problem(proto, allow_removal=allow_removal)
    if problem:
        raise InvalidArgumentError(problem)


def execution_info(record: VisibilityRecord) -> WorkflowExecutionInfo:
    """The wire form of one listed run."""
    info = WorkflowExecutionInfo(
        status=record.summary.status,  # type: ignore[arg-type]
        history_length=record.summary.history_length,
        task_queue=record.summary.task_queue,
    )
    info.execution.workflow_id = record.key.workflow_id
    info.execution.run_id = record.key.run_id
    info.type.name = record.summary.workflow_type
    info.start_time.FromMicroseconds(record.summary.start_time)
    if record.summary.close_time is not None:
        info.close_time.FromMicroseconds(record.summary.close_time)
    if record.memo is not None:
        info.memo.CopyFrom(record.memo)
    for name, value in sorted(record.search_attributes.items()):
        info.search_attributes.indexed_fields[name].CopyFrom(encode_search_attribute(value))
    return info
