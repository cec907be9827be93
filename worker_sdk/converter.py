"""Turning Python values into payloads and back, and exceptions into failures.

The default converter writes JSON (``json/plain``), ``None`` as ``binary/null`` and
``bytes`` as ``binary/plain``. Dataclasses are written as JSON objects and rebuilt
from type hints on the way in. Plug in another ``PayloadConverter`` through
``Client.connect(..., data_converter=DataConverter(payload_converter=...))``, and encrypt
or compress payloads on the wire with ``DataConverter(payload_codec=...)`` (see ``codec``).
"""

from __future__ import annotations

import dataclasses
import json
import traceback
import typing
from collections.abc import Sequence
from datetime import datetime
from enum import Enum
from typing import Any, Protocol
from uuid import UUID

from google.protobuf.message import Message

from tideflow.api.v1 import common_pb2
from tideflow.api.v1.common_pb2 import Failure, Payload, Payloads

from . import exceptions as exc
from .codec import PayloadCodec, as_codec
from .codec import decode_messages as _decode_messages
from .codec import encode_messages as _encode_messages

ENCODING = "encoding"

# ``json.dumps`` with these options builds a new encoder on every call; one is enough.
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)
# Values that are their own JSON form (``_to_jsonable`` returns them as they are).
_PLAIN_JSON = frozenset({int, float, str, bool})


def _payload_template(encoding: bytes) -> Payload:
    return Payload(metadata={ENCODING: encoding})


# A payload copies its metadata from one of these: a CopyFrom is several times cheaper
# than building the metadata map from a dict on every payload.
_NULL = _payload_template(b"binary/null")
_BINARY = _payload_template(b"binary/plain")
_JSON = _payload_template(b"json/plain")


class PayloadConverter(Protocol):
    def to_payload(self, value: Any) -> Payload: ...

    def from_payload(self, payload: Payload, type_hint: Any = None) -> Any: ...


def _to_jsonable(value: Any) -> Any:
    if type(value) in _PLAIN_JSON:
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return _to_jsonable(value.value)
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    return value


def _from_jsonable(value: Any, hint: Any) -> Any:
    """Rebuild ``hint`` (a dataclass, container of them, datetime, enum) from JSON data."""
    if hint is None or hint is Any or value is None or type(value) is hint:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or (
        origin is not None and str(origin) == "<class 'types.UnionType'>"
    ):
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _from_jsonable(value, arg)
            except (TypeError, ValueError, KeyError):
                continue
        return value
    if origin in (list, Sequence, typing.Sequence) or origin is list:
        inner = args[0] if args else None
        return [_from_jsonable(v, inner) for v in value]
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_jsonable(v, args[0]) for v in value)
        return tuple(_from_jsonable(v, a) for v, a in zip(value, args, strict=False))
    if origin is dict:
        vt = args[1] if len(args) == 2 else None
        return {k: _from_jsonable(v, vt) for k, v in value.items()}
    if isinstance(hint, type):
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            hints = typing.get_type_hints(hint)
            kwargs = {
                f.name: _from_jsonable(value[f.name], hints.get(f.name))
                for f in dataclasses.fields(hint)
                if f.name in value
            }
            return hint(**kwargs)
        if issubclass(hint, Enum):
            return hint(value)
        if hint is datetime and isinstance(value, str):
            return datetime.fromisoformat(value)
        if hint is UUID and isinstance(value, str):
            return UUID(value)
        if hint is float and isinstance(value, int):
            return float(value)
    return value


class JSONPayloadConverter:
    """The default: JSON for values, dedicated encodings for None and bytes."""

    def to_payload(self, value: Any) -> Payload:
        payload = Payload()
        if value is None:
            payload.CopyFrom(_NULL)
            return payload
        if isinstance(value, bytes):
            payload.CopyFrom(_BINARY)
            payload.data = value
            return payload
        try:
            data = _JSON_ENCODER.encode(_to_jsonable(value))
        except TypeError as e:
            raise TypeError(f"value of type {type(value).__name__} is not JSON serializable") from e
        payload.CopyFrom(_JSON)
        payload.data = data.encode()
        return payload

    def from_payload(self, payload: Payload, type_hint: Any = None) -> Any:
        encoding = payload.metadata.get(ENCODING, b"json/plain")
        if encoding == b"binary/null":
            return None
        if encoding == b"binary/plain":
            return payload.data
        if encoding == b"json/plain":
            return _from_jsonable(json.loads(payload.data), type_hint)
        hint = (
            " (an encoded payload: decode it with the codec that encoded it,"
            " DataConverter(payload_codec=...) on the client or decode_history() for a"
            " history read elsewhere)"
            if encoding.startswith(b"binary/")
            else ""
        )
        raise ValueError(f"unknown payload encoding {encoding.decode(errors='replace')!r}{hint}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DataConverter:
    """Values to payloads (``payload_converter``) and payloads to wire form
    (``payload_codec``: one ``PayloadCodec`` or a list of them, applied in order on
    encode and in reverse on decode; None sends payloads as the converter makes them).

    The client applies the codec to every request and response (``encode_messages`` /
    ``decode_messages``), so the conversion methods below always see decoded payloads.
    """

    payload_converter: PayloadConverter = dataclasses.field(default_factory=JSONPayloadConverter)
    payload_codec: PayloadCodec | Sequence[PayloadCodec] | None = None
    # ``payload_codec`` as one codec, read on every call the client makes.
    _codec: PayloadCodec | None = dataclasses.field(
        init=False, default=None, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # A list of codecs is accepted as a chain; stored as one codec so the boundary
        # has a single thing to call.
        codec = as_codec(self.payload_codec)
        object.__setattr__(self, "payload_codec", codec)
        object.__setattr__(self, "_codec", codec)

    @property
    def codec(self) -> PayloadCodec | None:
        """``payload_codec`` as one codec (a list given to the constructor is a chain)."""
        return self._codec

    async def encode_messages(self, messages: Sequence[Message]) -> None:
        """Encode every payload of ``messages`` in place, for sending (no-op without a
        codec). Search attribute values stay as they are: the server indexes them."""
        if self.codec is not None:
            await _encode_messages(messages, self.codec)

    async def decode_messages(self, messages: Sequence[Message]) -> None:
        """Decode every payload of ``messages`` in place, as received (no-op without a
        codec); payloads the codec did not encode pass through."""
        if self.codec is not None:
            await _decode_messages(messages, self.codec)

    def to_payloads(self, values: Sequence[Any]) -> Payloads:
        payloads = Payloads()
        # extend: the constructor's ``payloads=[...]`` takes a slower path to the same.
        payloads.payloads.extend([self.payload_converter.to_payload(v) for v in values])
        return payloads

    def from_payloads(
        self, payloads: Payloads | None, type_hints: Sequence[Any] | None = None
    ) -> list[Any]:
        if payloads is None:
            return []
        hints = list(type_hints or [])
        # [:]: a repeated field has no __iter__, and iterating it by index ends in an
        # IndexError that costs more than the slice.
        return [
            self.payload_converter.from_payload(p, hints[i] if i < len(hints) else None)
            for i, p in enumerate(payloads.payloads[:])
        ]

    # ------------------------------------------------------------ failures

    def to_failure(self, error: BaseException) -> Failure:
        failure = Failure(message=str(error) or type(error).__name__, source="tideflow-python")
        failure.stack_trace = "".join(
            traceback.format_exception(type(error), error, error.__traceback__)
        )[-8000:]
        if isinstance(error, exc.ApplicationError):
            failure.message = error.message
            info = failure.application_failure_info
            info.type = error.type or type(error).__name__
            info.non_retryable = error.non_retryable
            if error.details:
                info.details.CopyFrom(self.to_payloads(list(error.details)))
        elif isinstance(error, exc.ActivityError):
            failure.message = error.message
            ai = failure.activity_failure_info
            ai.scheduled_event_id = error.scheduled_event_id
            ai.started_event_id = error.started_event_id
            ai.identity = error.identity
            ai.activity_type.name = error.activity_type
            ai.activity_id = error.activity_id
            ai.retry_state = int(error.retry_state or 0)  # type: ignore[assignment]
        elif isinstance(error, exc.ChildWorkflowError):
            failure.message = error.message
            ci = failure.child_workflow_execution_failure_info
            ci.namespace = error.namespace
            ci.workflow_execution.workflow_id = error.workflow_id
            ci.workflow_execution.run_id = error.run_id
            ci.workflow_type.name = error.workflow_type
            ci.initiated_event_id = error.initiated_event_id
            ci.started_event_id = error.started_event_id
            ci.retry_state = int(error.retry_state or 0)  # type: ignore[assignment]
        elif isinstance(error, exc.TimeoutError):
            failure.message = error.message
            failure.timeout_failure_info.timeout_type = int(error.type or 0)  # type: ignore[assignment]
        elif isinstance(error, exc.CancelledError):
            failure.message = error.message
            failure.canceled_failure_info.SetInParent()
        elif isinstance(error, exc.TerminatedError):
            failure.terminated_failure_info.SetInParent()
        elif isinstance(error, exc.ServerError):
            failure.server_failure_info.non_retryable = error.non_retryable
        else:
            # Any other exception: an application failure named by its class.
            failure.application_failure_info.type = type(error).__name__
        cause = error.__cause__
        if cause is not None:
            failure.cause.CopyFrom(self.to_failure(cause))
        return failure

    def from_failure(self, failure: Failure) -> exc.FailureError:
        which = failure.WhichOneof("failure_info")
        error: exc.FailureError
        if which == "application_failure_info":
            info = failure.application_failure_info
            details = self.from_payloads(info.details) if info.HasField("details") else []
            error = exc.ApplicationError(
                failure.message, *details, type=info.type or None, non_retryable=info.non_retryable
            )
        elif which == "activity_failure_info":
            ai = failure.activity_failure_info
            error = exc.ActivityError(
                failure.message or "activity failed",
                scheduled_event_id=ai.scheduled_event_id,
                started_event_id=ai.started_event_id,
                identity=ai.identity,
                activity_type=ai.activity_type.name,
                activity_id=ai.activity_id,
                retry_state=exc.RetryState(ai.retry_state),
            )
        elif which == "child_workflow_execution_failure_info":
            ci = failure.child_workflow_execution_failure_info
            error = exc.ChildWorkflowError(
                failure.message or "child workflow failed",
                namespace=ci.namespace,
                workflow_id=ci.workflow_execution.workflow_id,
                run_id=ci.workflow_execution.run_id,
                workflow_type=ci.workflow_type.name,
                initiated_event_id=ci.initiated_event_id,
                started_event_id=ci.started_event_id,
                retry_state=exc.RetryState(ci.retry_state),
            )
        elif which == "timeout_failure_info":
            ti = failure.timeout_failure_info
            details = (
                self.from_payloads(ti.last_heartbeat_details)
                if ti.HasField("last_heartbeat_details")
                else []
            )
            error = exc.TimeoutError(
                failure.message,
                type=exc.TimeoutType(ti.timeout_type) if ti.timeout_type else None,
                last_heartbeat_details=details,
            )
        elif which == "canceled_failure_info":
            error = exc.CancelledError(failure.message)
        elif which == "terminated_failure_info":
            error = exc.TerminatedError(failure.message)
        elif which == "server_failure_info":
            error = exc.ServerError(
                failure.message, non_retryable=failure.server_failure_info.non_retryable
            )
        else:
            error = exc.ApplicationError(failure.message)
        if failure.HasField("cause"):
            error.__cause__ = self.from_failure(failure.cause)
        return error


default_converter = DataConverter()

_ = common_pb2
