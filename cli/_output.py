"""How the ``tideflow workflow`` commands print: tables that fit the terminal, JSON and
JSON lines (``-o table|json|jsonl``), and payloads as readable values.

A payload is shown as its value when its encoding is one the default converter writes
(JSON, null, bytes); a payload still encoded after the CLI's codec (no key given, or a
key id the CLI does not hold) is shown as a placeholder naming what it is, e.g.
``<encrypted: key id a>``, never as its bytes.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from tideflow.api.v1.common_pb2 import Payload, Payloads
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.worker_sdk.codec import ENCODING, ENCODING_AES_GCM, KEY_ID

ELLIPSIS = "…"
# A column never narrower than this, so a squeezed table still shows something.
MIN_COLUMN = 6
# Event attribute fields that say nothing a reader of a history table needs.
_QUIET_FIELDS = frozenset({"identity", "request_id", "binary_checksum", "header"})


def payload_value(payload: Payload) -> Any:
    """The value of a payload, or a placeholder string for one still encoded."""
    encoding = payload.metadata.get(ENCODING, b"json/plain")
    if encoding == b"binary/null":
        return None
    if encoding == b"json/plain":
        try:
            return json.loads(payload.data)
        except ValueError:
            return f"<malformed json: {len(payload.data)} bytes>"
    if encoding == b"binary/plain":
        return {"bytes_base64": base64.b64encode(payload.data).decode()}
    if encoding == ENCODING_AES_GCM:
        key_id = payload.metadata.get(KEY_ID, b"").decode(errors="replace")
        return f"<encrypted: key id {key_id}>"
    return f"<encoded: {encoding.decode(errors='replace')}, {len(payload.data)} bytes>"


def payloads_value(payloads: Payloads) -> list[Any]:
    return [payload_value(p) for p in payloads.payloads]


def compact(value: Any) -> str:
    """A value on one line: JSON, except plain strings, which read better bare."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def timestamp(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- messages


def message_dict(message: Message) -> dict[str, Any]:
    """A proto message as JSON-ready data, payloads replaced by their values."""
    return _readable(message)  # type: ignore[no-any-return]


def _readable(message: Message) -> Any:
    if isinstance(message, Payload):
        return payload_value(message)
    if isinstance(message, Payloads):
        return payloads_value(message)
    if not _holds_payload(message):
        return json_format.MessageToDict(message)  # timestamps, durations: their JSON forms
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[field.json_name] = {k: _field_value(v) for k, v in value.items()}
        elif _is_repeated(field):
            out[field.json_name] = [_field_value(v, field) for v in value]
        else:
            out[field.json_name] = _field_value(value, field)
    return out


def _field_value(value: Any, field: FieldDescriptor | None = None) -> Any:
    if isinstance(value, Message):
        return _readable(value)
    if field is not None and field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def _is_repeated(field: FieldDescriptor) -> bool:
    flag = getattr(field, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return getattr(field, "label", None) == FieldDescriptor.LABEL_REPEATED


def _holds_payload(message: Message) -> bool:
    """Whether to walk ``message`` field by field (it may hold payloads) instead of
    letting json_format render it (timestamps, durations keep their JSON forms)."""
    full_name = message.DESCRIPTOR.full_name
    return not full_name.startswith("google.protobuf.")


def event_dict(event: HistoryEvent) -> dict[str, Any]:
    data = message_dict(event)
    data["eventType"] = event_type_name(event.event_type)
    return data


def event_type_name(event_type: int) -> str:
    return "".join(
        part.capitalize()
        for part in EventType.Name(event_type).removeprefix("EVENT_TYPE_").split("_")
    )


def event_details(event: HistoryEvent) -> str:
    """The key details of an event on one line: its attributes, quiet ones left out,
    names of types and queues as bare strings, payloads as values."""
    which = event.WhichOneof("attributes")
    if which is None:
        return ""
    attributes = getattr(event, which)
    parts = []
    for field, value in attributes.ListFields():
        if field.name in _QUIET_FIELDS:
            continue
        if isinstance(value, Message) and not isinstance(value, Payloads | Payload):
            shown = _short_message(value)
        elif isinstance(value, Payloads):
            shown = compact(payloads_value(value))
        elif isinstance(value, Payload):
            shown = compact(payload_value(value))
        elif field.enum_type is not None:
            shown = field.enum_type.values_by_number[value].name
        else:
            shown = compact(value)
        if shown not in ("", "{}"):
            parts.append(f"{field.name}={shown}")
    return " ".join(parts)


def _short_message(value: Message) -> str:
    name = getattr(value, "name", None)
    if isinstance(name, str) and name:
        return name  # WorkflowType, ActivityType, TaskQueue
    if value.DESCRIPTOR.full_name == "google.protobuf.Duration":
        return f"{value.ToTimedelta().total_seconds():g}s"  # type: ignore[attr-defined]
    if value.DESCRIPTOR.full_name == "google.protobuf.Timestamp":
        return timestamp(value.ToDatetime(tzinfo=UTC))  # type: ignore[attr-defined]
    if value.DESCRIPTOR.full_name.endswith(".Failure"):
        return compact(getattr(value, "message", ""))
    return compact(message_dict(value))


# ------------------------------------------------------------------ tables


def fit_table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], width: int | None = None
) -> str:
    """A plain-text table no wider than the terminal: the widest columns give up room
    first, and cells cut short end in an ellipsis."""
    cells = [[_one_line(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    limit = width if width is not None else shutil.get_terminal_size((120, 24)).columns
    gaps = 2 * (len(headers) - 1)
    while sum(widths) + gaps > limit and max(widths) > MIN_COLUMN:
        widest = widths.index(max(widths))
        widths[widest] -= 1
    lines = [_row(headers, widths), _row(["-" * w for w in widths], widths)]
    lines.extend(_row(row, widths) for row in cells)
    return "\n".join(lines)


def _one_line(value: Any) -> str:
    text = value if isinstance(value, str) else compact(value)
    return text.replace("\n", " ")


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    out = []
    for cell, width in zip(cells, widths, strict=True):
        out.append(cell if len(cell) <= width else cell[: width - 1] + ELLIPSIS)
    return "  ".join(c.ljust(w) for c, w in zip(out, widths, strict=True)).rstrip()


# Fixed widths of the history table's first columns, so rows printed one at a time
# (``show --follow``) line up; the details take the rest of the terminal.
_HISTORY_FIXED = (6, 24, 34)


def history_widths(width: int | None = None) -> list[int]:
    """The follow table's widths: the fixed columns as wide as they like while the
    details keep room; on a narrow terminal the time and type columns give way."""
    limit = width if width is not None else shutil.get_terminal_size((120, 24)).columns
    room = limit - 2 * len(_HISTORY_FIXED)  # the gaps between four columns
    widths = [*_HISTORY_FIXED, 0]
    while sum(widths[:3]) + MIN_COLUMN * 2 > room and max(widths[1:3]) > MIN_COLUMN * 2:
        widest = 1 if widths[1] >= widths[2] else 2
        widths[widest] -= 1
    widths[3] = max(MIN_COLUMN * 2, room - sum(widths[:3]))
    return widths


def history_table(events: Sequence[HistoryEvent], width: int | None = None) -> str:
    """A whole history as a table fitted to the terminal."""
    return fit_table(["ID", "TIME", "TYPE", "DETAILS"], [_history_cells(e) for e in events], width)


def history_header(widths: Sequence[int]) -> str:
    rule = _row(["-" * w for w in widths], widths)
    return _row(["ID", "TIME", "TYPE", "DETAILS"], widths) + "\n" + rule


def history_row(event: HistoryEvent, widths: Sequence[int]) -> str:
    return _row(_history_cells(event), widths)


def _history_cells(event: HistoryEvent) -> list[str]:
    return [
        str(event.event_id),
        timestamp(event.event_time.ToDatetime(tzinfo=UTC)),
        event_type_name(event.event_type),
        _one_line(event_details(event)),
    ]


def key_values(fields: Mapping[str, Any], width: int | None = None) -> str:
    """One ``field  value`` line each, values cut to the terminal's width."""
    return fit_table(["FIELD", "VALUE"], list(fields.items()), width)


def emit(output: str, records: Sequence[Mapping[str, Any]] | Mapping[str, Any], table: str) -> str:
    """What a command prints: ``table`` (already rendered), one JSON document (the
    list of records, or the one record), or JSON lines (one record a line)."""
    if output == "json":
        data: Any = records if isinstance(records, Mapping) else list(records)
        return json.dumps(data, indent=2, default=str, ensure_ascii=False)
    if output == "jsonl":
        if isinstance(records, Mapping):
            records = [records]
        return "\n".join(json.dumps(r, default=str, ensure_ascii=False) for r in records)
    return table
