"""Bounds on every client-supplied field, checked at the frontend before anything reaches
the engine or the store.

One walk over the request's set fields (protobuf descriptors, so a new field is covered
the day it is added) refuses, with INVALID_ARGUMENT naming the field:

- strings over their length (ids and names ``max_id_length``, free text
  ``max_text_length``; run ids, request ids and namespaces what the schema holds) and
  strings with a NUL character (PostgreSQL text columns cannot store one; refused on
  every store so a request means the same everywhere);
- payload-bearing fields (payloads, memo, header, search attributes, failures) over
  ``max_payload_bytes``, each on its own: together with the string bounds, this keeps
  every history event well under the gRPC message limit, so history pages always fit;
- durations that are negative or over ``max_duration_s`` (``now + timeout`` must stay a
  valid int64 microsecond timestamp), timestamps before 1970 or after 9000;
- enum values the API does not define (``Command(command_type=999)``), non-finite
  numbers, failure cause chains deeper than ``max_nesting_depth``, search attribute
  values that are JSON arrays or objects (values are scalars; a 100,000-deep array
  crashed the JSON decoder with RecursionError);
- opaque tokens over ``_MAX_TOKEN_BYTES``.

The commands of a workflow task's completion are the exception: they are the workflow's
output, not the caller's request, so a command out of bounds (``check_command``) fails
the workflow task with a WorkflowTaskFailed event that says why, as Temporal does,
instead of refusing the request and leaving no trace in history.
"""

from __future__ import annotations

import functools
import json
import math

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from tideflow.api.v1 import command_pb2, common_pb2

from . import _retry
from ._config import ServerConfig
from ._errors import InvalidArgumentError

# Lengths the database schema fixes (history/_schema.py). A namespace is shorter than
# its column so that task and timer keys (namespace|workflow_id|run_id|...) fit theirs.
_MAX_NAMESPACE_LENGTH = 100
_MAX_RUN_ID_LENGTH = 64
_MAX_REQUEST_ID_LENGTH = 255
# Task tokens and page tokens are the server's own, a few hundred bytes.
_MAX_TOKEN_BYTES = 64 * 1024
# Messages nest this deep at most in the API (a failure's cause chain is counted apart).
_MAX_MESSAGE_DEPTH = 16
# A command carries at most this many payload-bearing fields' worth of bytes (a child
# start: input, memo, header, search attributes); it becomes one history event, which
# must fit one history page message.
_PAYLOAD_FIELDS_PER_COMMAND = 4
# Items of repeated fields that the server iterates on every evaluation.
_MAX_REPEATED = {"cron_expressions": 100, "intervals": 100, "non_retryable_error_types": 100}

_FIXED_LENGTHS = {
    "namespace": _MAX_NAMESPACE_LENGTH,
    "workflow_namespace": _MAX_NAMESPACE_LENGTH,
    "run_id": _MAX_RUN_ID_LENGTH,
    "request_id": _MAX_REQUEST_ID_LENGTH,
}
# Free-text string fields (the rest are ids and names).
_TEXT_FIELDS = frozenset(
    {
        "reason",
        "notes",
        "note",
        "description",
        "query",
        "cron_schedule",
        "cron_expressions",
        "control",
        "error_message",
        "binary_checksum",
        "non_retryable_error_types",
    }
)
# A worker's exception text, answered to a query caller and never stored: may hold NUL
# and is as long as a failure may be.
_NUL_ALLOWED = frozenset({"error_message"})

_PAYLOAD_TYPES = frozenset(
    d.full_name
    for d in (
        common_pb2.Payloads.DESCRIPTOR,
        common_pb2.Payload.DESCRIPTOR,
        common_pb2.Memo.DESCRIPTOR,
        common_pb2.Header.DESCRIPTOR,
        common_pb2.SearchAttributes.DESCRIPTOR,
        common_pb2.Failure.DESCRIPTOR,
    )
)
_SEARCH_ATTRIBUTES = common_pb2.SearchAttributes.DESCRIPTOR.full_name
_FAILURE = common_pb2.Failure.DESCRIPTOR.full_name
_DURATION = Duration.DESCRIPTOR.full_name
_TIMESTAMP = Timestamp.DESCRIPTOR.full_name
# Times a client may give (schedule start and end): from the epoch to 9000-01-01, so that
# the next slot after one, or a window around it, is still a valid datetime (a start in
# year 9999 overflowed the scheduler's date arithmetic).
_MIN_TIMESTAMP_S = 0
_MAX_TIMESTAMP_S = 221_845_392_000


class TooLargeError(InvalidArgumentError):
    """A field over its size limit (a workflow task's command: cause PAYLOAD_TOO_LARGE)."""


class RequestValidator:
    """Checks one request against the bounds of a server's configuration."""

    def __init__(self, config: ServerConfig) -> None:
        self._config = config

    def check(self, request: Message, *, skip: frozenset[str] = frozenset()) -> None:
        """Raise ``InvalidArgumentError`` naming the first field out of bounds (a
        ``TooLargeError`` for sizes). Top-level fields named in ``skip`` are left to
        their handler."""
        self._message(request, "", 0, skip)

    def check_command(self, index: int, command: command_pb2.Command) -> None:
        """The bounds of one command of a workflow task's completion, its attributes
        and its size as one future history event (``check_command_attributes``)."""
        name = f"commands[{index}]"
        limit = _PAYLOAD_FIELDS_PER_COMMAND * self._config.max_payload_bytes
        size = command.ByteSize()
        if size > limit:
            raise TooLargeError(f"{name} is {size} bytes, over the limit of {limit} bytes")
        self._message(command, name, 1)
        check_command_attributes(index, command)

    # ------------------------------------------------------------------ walk

    def _message(
        self, message: Message, path: str, depth: int, skip: frozenset[str] = frozenset()
    ) -> None:
        if depth > _MAX_MESSAGE_DEPTH:
            raise InvalidArgumentError(f"{path} nests deeper than {_MAX_MESSAGE_DEPTH} messages")
        for field, value in message.ListFields():
            field_name, is_map, repeated, limit = _facts_of(field)
            if field_name in skip:
                continue
            name = f"{path}.{field_name}" if path else field_name
            if is_map:
                self._map(field, value, name, depth)
            elif repeated:
                if limit is not None and len(value) > limit:
                    raise InvalidArgumentError(f"{name} has more than {limit} items")
                for index, item in enumerate(value):
                    self._value(field, item, f"{name}[{index}]", depth)
            else:
                self._value(field, value, name, depth)

    def _map(self, field: FieldDescriptor, value: object, name: str, depth: int) -> None:
        entry = field.message_type
        assert entry is not None
        key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
        for key in value:  # type: ignore[attr-defined]
            item_name = f"{name}[{key!r}]"
            self._value(key_field, key, f"{name} key {key!r}", depth)
            self._value(value_field, value[key], item_name, depth)  # type: ignore[index]

    def _value(self, field: FieldDescriptor, value: object, name: str, depth: int) -> None:
        kind = field.type
        if kind == FieldDescriptor.TYPE_MESSAGE:
            assert isinstance(value, Message) and field.message_type is not None
            self._submessage(field.message_type, value, name, depth)
        elif kind == FieldDescriptor.TYPE_STRING:
            assert isinstance(value, str)
            self._string(field.name, value, name)
        elif kind == FieldDescriptor.TYPE_BYTES:
            assert isinstance(value, bytes)
            if len(value) > _MAX_TOKEN_BYTES:
                raise InvalidArgumentError(
                    f"{name} is {len(value)} bytes, over the limit of {_MAX_TOKEN_BYTES} bytes"
                )
        elif kind == FieldDescriptor.TYPE_ENUM:
            assert isinstance(value, int) and field.enum_type is not None
            _check_enum(field.enum_type, value, name)
        elif kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            assert isinstance(value, float)
            if not math.isfinite(value):
                raise InvalidArgumentError(f"{name} must be a finite number, not {value}")

    def _submessage(self, descriptor: Descriptor, value: Message, name: str, depth: int) -> None:
        full_name = descriptor.full_name
        if full_name in _PAYLOAD_TYPES:
            size = value.ByteSize()
            if size > self._config.max_payload_bytes:
                raise TooLargeError(
                    f"{name} is {size} bytes, over the limit of "
                    f"{self._config.max_payload_bytes} bytes"
                )
            if full_name == _SEARCH_ATTRIBUTES:
                assert isinstance(value, common_pb2.SearchAttributes)
                self._search_attributes(value, name)
            elif full_name == _FAILURE:
                assert isinstance(value, common_pb2.Failure)
                self._failure(value, name)
            # Payload contents are the application's bytes: nothing else to check.
        elif full_name == _DURATION:
            assert isinstance(value, Duration)
            self._duration(value, name)
        elif full_name == _TIMESTAMP:
            assert isinstance(value, Timestamp)
            if not (
                _MIN_TIMESTAMP_S <= value.seconds <= _MAX_TIMESTAMP_S
                and 0 <= value.nanos < 1_000_000_000
            ):
                raise InvalidArgumentError(f"{name} is not a time between 1970 and 9000")
        else:
            self._message(value, name, depth + 1)

    # ---------------------------------------------------------------- leaves

    def _string(self, field_name: str, value: str, name: str) -> None:
        if "\x00" in value and field_name not in _NUL_ALLOWED:
            raise InvalidArgumentError(f"{name} contains a NUL character")
        limit = _FIXED_LENGTHS.get(field_name)
        if field_name in _NUL_ALLOWED:
            # Bounded like the failure that comes with it.
            limit = self._config.max_payload_bytes
        if limit is None:
            limit = (
                self._config.max_text_length
                if field_name in _TEXT_FIELDS
                else self._config.max_id_length
            )
        if len(value) > limit:
            raise InvalidArgumentError(f"{name} is longer than {limit} characters")

    def _duration(self, value: Duration, name: str) -> None:
        # Checked on the raw fields: ToMicroseconds() of an out-of-range Duration is a
        # Python int that would only overflow later, in the store or a timer.
        if value.seconds < 0 or value.nanos < 0:
            raise InvalidArgumentError(f"{name} must not be negative")
        if value.nanos >= 1_000_000_000:
            raise InvalidArgumentError(f"{name} has nanos out of range (0..999,999,999)")
        limit = self._config.max_duration_s
        if value.seconds > limit or (value.seconds == limit and value.nanos):
            raise InvalidArgumentError(
                f"{name} is {value.seconds} s, over the maximum of {limit} s "
                f"({limit // (365 * 24 * 3600)} years)"
            )

    def _search_attributes(self, value: common_pb2.SearchAttributes, name: str) -> None:
        for key, payload in value.indexed_fields.items():
            self._string("name", key, f"{name} key {key!r}")
            # Values are JSON scalars (keyword, int, double, bool, datetime) or a flat list
            # of keywords, so any other array or object is refused before the JSON decoder
            # recurses through it.
            listed = payload.metadata.get("type") == b"KeywordList"
            if payload.data.lstrip(b" \t\r\n")[:1] in (b"[", b"{") and not listed:
                raise InvalidArgumentError(
                    f"{name}[{key!r}] is a JSON array or object: search attribute values "
                    "are scalars (keyword, int, double, bool, datetime) or KeywordList"
                )
            # A keyword is stored in a text column: "\u0000" in its JSON is a NUL there.
            try:
                value = json.loads(payload.data)
            except (ValueError, RecursionError):
                continue  # malformed: search_attributes_problem names the problem
            keywords = value if isinstance(value, list) else [value]
            if any(isinstance(item, str) and "\x00" in item for item in keywords):
                raise InvalidArgumentError(f"{name}[{key!r}] contains a NUL character")

    def _failure(self, value: common_pb2.Failure, name: str) -> None:
        depth = 0
        failure = value
        while failure.HasField("cause"):
            depth += 1
            if depth > self._config.max_nesting_depth:
                raise InvalidArgumentError(
                    f"{name} has a cause chain deeper than {self._config.max_nesting_depth}"
                )
            failure = failure.cause


def check_retry_policy(name: str, policy: common_pb2.RetryPolicy) -> None:
    """A workflow's retry policy (start, schedule action) must be one ``_retry`` accepts;
    an activity's is checked by the engine, which fails the workflow task instead."""
    problem = _retry.validate(policy)
    if problem:
        # The problem names the field from "retry_policy" on: prefix whose policy it is.
        raise InvalidArgumentError(name + problem.removeprefix("retry_policy"))


@functools.cache
def _facts_of(field: FieldDescriptor) -> tuple[str, bool, bool, int | None]:
    """A field's name, whether it is a map, whether it is repeated, and its item limit
    (``_MAX_REPEATED``): read from the descriptor once per field, not per request."""
    return field.name, _is_map(field), field.is_repeated, _MAX_REPEATED.get(field.name)


def _is_map(field: FieldDescriptor) -> bool:
    entry = field.message_type
    return field.is_repeated and entry is not None and bool(entry.GetOptions().map_entry)


def _check_enum(enum: EnumDescriptor, value: int, name: str) -> None:
    if value not in enum.values_by_number:
        raise InvalidArgumentError(f"{name} has unknown value {value} (not a {enum.name})")


def check_command_attributes(index: int, command: command_pb2.Command) -> None:
    """The attributes set must be the command type's own (the validator has already
    refused types the API does not define)."""
    if command.command_type == command_pb2.COMMAND_TYPE_UNSPECIFIED:
        raise InvalidArgumentError(f"commands[{index}].command_type is unspecified")
    type_name, expected = _attributes_of_type(command.command_type)
    which = command.WhichOneof("attributes")
    if which is not None and which != expected:
        raise InvalidArgumentError(
            f"commands[{index}] is a {type_name} but carries {which}, not {expected}"
        )


@functools.cache
def _attributes_of_type(command_type: int) -> tuple[str, str]:
    """A command type's name and the name of its attributes field (every completion
    checks each command: worked out once per type)."""
    type_name = command_pb2.CommandType.Name(command_type)
    return type_name, type_name.removeprefix("COMMAND_TYPE_").lower() + "_command_attributes"
