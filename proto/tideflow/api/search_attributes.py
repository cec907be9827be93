"""The search-attribute codec and the time helpers it needs, shared by the SDK and the server.

Search attribute values travel as payloads with ``metadata["encoding"] = "json/plain"``
and ``metadata["type"]`` one of Keyword, Int, Double, Bool, Datetime (RFC 3339 text),
KeywordList (a JSON array of keywords: Temporal SDKs record the patches a run took as
one, ``TemporalChangeVersion``);
a ``binary/null`` payload in an upsert removes the attribute. ``encode_search_attribute``
and ``decode_search_attribute`` are the one codec.

Hand-written (not generated): it sits next to the wire API because it defines how values
look on the wire, and it imports only protobuf, so a client that encodes search
attributes does not load the server's SQL stack (``tests/test_layering.py`` checks it).
``tideflow.history`` re-exports these names for the server.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import Any

from tideflow.api.v1.common_pb2 import Payload, SearchAttributes

SearchAttributeValue = str | int | float | bool | datetime | list[str]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
# Longest keyword value, in UTF-8 bytes (keeps the value index usable everywhere).
MAX_KEYWORD_BYTES = 2048


class SearchAttributeType(IntEnum):
    """The type of a stored search attribute value (``value_type`` column)."""

    KEYWORD = 1
    INT = 2
    DOUBLE = 3
    BOOL = 4
    DATETIME = 5
    KEYWORD_LIST = 6


_TYPE_NAMES = {
    SearchAttributeType.KEYWORD: "Keyword",
    SearchAttributeType.INT: "Int",
    SearchAttributeType.DOUBLE: "Double",
    SearchAttributeType.BOOL: "Bool",
    SearchAttributeType.DATETIME: "Datetime",
    SearchAttributeType.KEYWORD_LIST: "KeywordList",
}
_TYPES_BY_NAME = {name: t for t, name in _TYPE_NAMES.items()}


# ------------------------------------------------------------------ time helpers


def micros_of(moment: datetime) -> int:
    """Microseconds since the epoch; a naive datetime is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def datetime_of(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def format_rfc3339(micros: int) -> str:
    """``2024-05-01T12:00:00Z``, with a fraction only when there is one."""
    moment = datetime_of(micros)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


def parse_rfc3339(text: str) -> int | None:
    """Microseconds since the epoch, or None if ``text`` is not an RFC 3339 time (or
    a plain date, taken as midnight UTC)."""
    if not 10 <= len(text) <= 40 or not text[:4].isdigit():
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return micros_of(moment)


# ------------------------------------------------------------------------ codec


def encode_search_attribute(value: SearchAttributeValue | None) -> Payload:
    """The payload of one search attribute value (None: remove it in an upsert)."""
    if value is None:
        return Payload(metadata={"encoding": b"binary/null"})
    if isinstance(value, bool):
        kind, data = SearchAttributeType.BOOL, json.dumps(value)
    elif isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"int search attribute value {value} does not fit in 64 bits")
        kind, data = SearchAttributeType.INT, json.dumps(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"float search attribute value {value} is not finite")
        kind, data = SearchAttributeType.DOUBLE, json.dumps(value)
    elif isinstance(value, datetime):
        kind, data = SearchAttributeType.DATETIME, json.dumps(format_rfc3339(micros_of(value)))
    elif isinstance(value, str):
        if len(value.encode()) > MAX_KEYWORD_BYTES:
            raise ValueError(f"keyword search attribute value is over {MAX_KEYWORD_BYTES} bytes")
        kind, data = SearchAttributeType.KEYWORD, json.dumps(value)
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        if any(len(item.encode()) > MAX_KEYWORD_BYTES for item in value):
            raise ValueError(f"a keyword of a keyword list is over {MAX_KEYWORD_BYTES} bytes")
        kind, data = SearchAttributeType.KEYWORD_LIST, json.dumps(value)
    else:
        raise TypeError(
            f"search attribute values are str, int, float, bool, datetime or list[str], "
            f"not {type(value).__name__}"
        )
    return Payload(
        metadata={"encoding": b"json/plain", "type": _TYPE_NAMES[kind].encode()},
        data=data.encode(),
    )


def typed_value(payload: Payload) -> tuple[SearchAttributeType, Any] | None:
    """(type, stored value) of a payload; None for a removal; ValueError if invalid."""
    encoding = payload.metadata.get("encoding", b"").decode(errors="replace")
    if encoding == "binary/null":
        return None
    if encoding != "json/plain":
        raise ValueError(f"encoding must be json/plain, not {encoding!r}")
    type_name = payload.metadata.get("type", b"").decode(errors="replace")
    kind = _TYPES_BY_NAME.get(type_name)
    if kind is None:
        raise ValueError(f"type must be one of {sorted(_TYPES_BY_NAME)}, not {type_name!r}")
    try:
        value = json.loads(payload.data)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"data is not JSON: {exc}") from None
    if kind == SearchAttributeType.KEYWORD and isinstance(value, str):
        if len(value.encode()) > MAX_KEYWORD_BYTES:
            raise ValueError(f"keyword value is over {MAX_KEYWORD_BYTES} bytes")
        return kind, value
    if kind == SearchAttributeType.BOOL and isinstance(value, bool):
        return kind, value
    if (
        kind == SearchAttributeType.KEYWORD_LIST
        and isinstance(value, list)
        and all(isinstance(item, str) and len(item.encode()) <= MAX_KEYWORD_BYTES for item in value)
    ):
        return kind, value
    if (
        kind == SearchAttributeType.INT
        and isinstance(value, int)
        and not isinstance(value, bool)
        and _INT64_MIN <= value <= _INT64_MAX
    ):
        return kind, value
    if (
        kind == SearchAttributeType.DOUBLE
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    ):
        return kind, float(value)
    if kind == SearchAttributeType.DATETIME and isinstance(value, str):
        micros = parse_rfc3339(value)
        if micros is not None:
            return kind, micros
    raise ValueError(f"{type_name} value {value!r} is invalid")


def decode_search_attribute(payload: Payload) -> SearchAttributeValue | None:
    """The Python value of a search attribute payload (None for a removal)."""
    typed = typed_value(payload)
    if typed is None:
        return None
    return python_value(*typed)


def python_value(kind: SearchAttributeType, stored: Any) -> SearchAttributeValue:
    if kind == SearchAttributeType.DATETIME:
        return datetime_of(int(stored))
    if kind == SearchAttributeType.BOOL:
        return bool(stored)
    if kind == SearchAttributeType.KEYWORD_LIST:
        return [str(item) for item in stored]
    return stored  # type: ignore[no-any-return]


def encode_search_attributes(
    values: Mapping[str, SearchAttributeValue | None],
) -> SearchAttributes:
    proto = SearchAttributes()
    for name, value in values.items():
        proto.indexed_fields[name].CopyFrom(encode_search_attribute(value))
    return proto


def decode_search_attributes(proto: SearchAttributes) -> dict[str, SearchAttributeValue | None]:
    return {
        name: decode_search_attribute(payload) for name, payload in proto.indexed_fields.items()
    }
