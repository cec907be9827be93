"""The event model: constructing history events and classifying them.

An event's attributes live in a oneof whose field name is derived from the event type
(``EVENT_TYPE_TIMER_FIRED`` -> ``timer_fired_event_attributes``). Keeping that mapping
in one place lets the engine, the SDK and the replication code treat events uniformly.
Hand-written, next to the generated API: it imports only protobuf, so the SDK uses it
without the server's SQL stack (``tideflow.history`` re-exports it for the server).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from tideflow.api.v1 import history_pb2
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent


def _attribute_field(event_type: int) -> str:
    name = EventType.Name(event_type)
    return name.removeprefix("EVENT_TYPE_").lower() + "_event_attributes"


ATTRIBUTE_FIELD: dict[int, str] = {
    value: _attribute_field(value)
    for value in EventType.values()
    if value != EventType.EVENT_TYPE_UNSPECIFIED
}

# Events that a workflow task's commands produce. On replay the SDK matches each of
# them, in order, against the command its code emitted at that point.
COMMAND_EVENTS: frozenset[int] = frozenset(
    {
        EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
        EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED,
        EventType.EVENT_TYPE_TIMER_STARTED,
        EventType.EVENT_TYPE_TIMER_CANCELED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
        EventType.EVENT_TYPE_MARKER_RECORDED,
        EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED,
        EventType.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED,
        EventType.EVENT_TYPE_REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED,
        EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES,
    }
)

# Events that close a run; exactly one of them is the last event of a closed history.
CLOSE_EVENTS: frozenset[int] = frozenset(
    {
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
    }
)


def timestamp(moment: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(moment.astimezone(UTC))
    return ts


def micros_to_timestamp(micros: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMicroseconds(micros)
    return ts


# How make_event sets an attribute: assigned, copied (a message) or extended (repeated).
_SCALAR, _MESSAGE, _REPEATED = 0, 1, 2
# (event type, attribute name) -> one of the above: the descriptor lookups cost more
# than setting the value, and every transition builds a few events.
_FIELD_KINDS: dict[tuple[int, str], int] = {}


def _field_kind(attrs: Message, event_type: int, key: str) -> int:
    kind = _FIELD_KINDS.get((event_type, key))
    if kind is None:
        field = attrs.DESCRIPTOR.fields_by_name[key]  # KeyError: no such attribute
        if field.is_repeated:
            kind = _REPEATED
        else:
            kind = _SCALAR if field.message_type is None else _MESSAGE
        _FIELD_KINDS[(event_type, key)] = kind
    return kind


def make_event(event_type: int, event_time_micros: int, **attributes: Any) -> HistoryEvent:
    """Build an event (without an id) whose attributes are set from keyword arguments."""
    event = HistoryEvent(event_type=event_type)  # type: ignore[arg-type]
    event.event_time.FromMicroseconds(event_time_micros)
    attrs: Message = getattr(event, ATTRIBUTE_FIELD[event_type])
    attrs.SetInParent()
    for key, value in attributes.items():
        if value is None:
            continue
        kind = _field_kind(attrs, event_type, key)
        if kind == _SCALAR:
            setattr(attrs, key, value)
        elif kind == _MESSAGE:
            getattr(attrs, key).CopyFrom(value)
        else:
            getattr(attrs, key).extend(value)
    return event


def attributes_of(event: HistoryEvent) -> Any:
    """The attributes message of an event (typed as Any: it depends on the type)."""
    return getattr(event, ATTRIBUTE_FIELD[event.event_type])


def event_type_name(event_type: int) -> str:
    return history_pb2.EventType.Name(event_type)
