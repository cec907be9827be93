"""The JSON form of the API's messages on the HTTP API (server/_http_api.py).

Messages use the proto3 JSON mapping (camelCase names; ``snake_case`` is accepted on
input), with one change that makes payloads readable: a ``Payload`` whose encoding is
``json/plain`` is written as its JSON value itself (``binary/null`` as ``null``), and
any JSON value sent where a ``Payload`` goes is encoded as ``json/plain``. Payloads
of another encoding (bytes, encrypted by a codec) keep the proto3 form
``{"metadata": {"encoding": <base64>}, "data": <base64>}``, and an object of exactly
those keys is taken as such a payload on input.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from tideflow.api.v1 import common_pb2

from ._errors import InvalidArgumentError

M = TypeVar("M", bound=Message)

_PAYLOAD = common_pb2.Payload.DESCRIPTOR.full_name
_ENCODING = "encoding"
_JSON_PLAIN = b"json/plain"
_NULL = b"binary/null"
_RAW_KEYS = frozenset({"metadata", "data"})


def to_json(message: Message) -> dict[str, Any]:
    """``message`` as a JSON object, payloads decoded where they are JSON."""
    data = json_format.MessageToDict(message)
    _walk(message.DESCRIPTOR, data, _payload_out)
    return data


def from_json(data: Any, message_class: type[M]) -> M:
    """The ``message_class`` message ``data`` (a parsed JSON object) describes;
    INVALID_ARGUMENT naming the problem if it does not fit the message."""
    if not isinstance(data, dict):
        raise InvalidArgumentError("the request body must be a JSON object")
    message = message_class()
    try:
        _walk(message.DESCRIPTOR, data, _payload_in)
        json_format.ParseDict(data, message)
    except (json_format.ParseError, ValueError, TypeError) as error:
        raise InvalidArgumentError(f"request body: {error}") from None
    return message


def encode_value(value: Any) -> dict[str, Any]:
    """The proto3 JSON form of a ``json/plain`` payload holding ``value``."""
    raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    return {
        "metadata": {_ENCODING: base64.b64encode(_JSON_PLAIN).decode()},
        "data": base64.b64encode(raw).decode(),
    }


def _payload_out(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    try:
        encoding = base64.b64decode(value.get("metadata", {}).get(_ENCODING, ""))
        raw = base64.b64decode(value.get("data", ""))
        if encoding == _NULL:
            return None
        if encoding == _JSON_PLAIN:
            return json.loads(raw)
    except ValueError:
        pass  # not JSON after all: shown in its raw form
    return value


def _payload_in(value: Any) -> Any:
    if (
        isinstance(value, dict)
        and value
        and set(value) <= _RAW_KEYS
        and isinstance(value.get("metadata", {}), dict)
    ):
        return value
    return encode_value(value)


def _walk(descriptor: Any, data: dict[str, Any], convert: Callable[[Any], Any]) -> None:
    """Apply ``convert`` to every Payload in ``data`` (the JSON form of a
    ``descriptor`` message), in place. (Any: protobuf's pure-Python and upb
    descriptors are different classes to the type checker.)"""
    for field in descriptor.fields:
        if field.message_type is None:
            continue
        for key in {field.json_name, field.name}:
            if key in data:
                data[key] = _convert_field(field, data[key], convert)


def _convert_field(field: FieldDescriptor, value: Any, convert: Callable[[Any], Any]) -> Any:
    message_type = field.message_type
    assert message_type is not None  # only message fields are walked
    if message_type.GetOptions().map_entry:
        value_field = message_type.fields_by_name["value"]
        if value_field.message_type is None or not isinstance(value, dict):
            return value
        return {k: _convert_one(value_field, v, convert) for k, v in value.items()}
    if is_repeated(field) and isinstance(value, list):
        return [_convert_one(field, item, convert) for item in value]
    return _convert_one(field, value, convert)


def is_repeated(field: FieldDescriptor) -> bool:
    # ``label`` is gone from newer protobuf releases, ``is_repeated`` new in them.
    flag = getattr(field, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return bool(getattr(field, "label", 0) == FieldDescriptor.LABEL_REPEATED)


def _convert_one(field: FieldDescriptor, value: Any, convert: Callable[[Any], Any]) -> Any:
    message_type = field.message_type
    assert message_type is not None
    if message_type.full_name == _PAYLOAD:
        return convert(value)
    if message_type.full_name.startswith("google.protobuf.") or not isinstance(value, dict):
        return value  # well-known types have their own JSON forms
    _walk(message_type, value, convert)
    return value
