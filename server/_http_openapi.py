"""The OpenAPI 3 document of the HTTP API (``/api/v1/openapi.json``), generated from
the route table (server/_http_routes.py) and the messages' descriptors, so that it
cannot drift from what the server serves."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

import tideflow
from tideflow.api.v1 import common_pb2

from ._http_json import is_repeated
from ._http_routes import Route

_REF = "#/components/schemas/"
_PAYLOAD = common_pb2.Payload.DESCRIPTOR.full_name
_PARAM = re.compile(r"\{(\w+)\}")
_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    # proto3 JSON writes 64-bit integers as strings (and reads either).
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_SINT64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FieldDescriptor.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "example": "1.5s"},
    "google.protobuf.Any": {"type": "object", "additionalProperties": True},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
}
_ERROR = {
    "type": "object",
    "required": ["code", "status", "message"],
    "properties": {
        "code": {"type": "integer", "description": "the gRPC status code"},
        "status": {"type": "string", "example": "NOT_FOUND"},
        "message": {"type": "string"},
        "kind": {"type": "string", "description": "ErrorDetail.kind (errors.proto)"},
        "details": {
            "type": "array",
            "description": "the typed ErrorDetail, with its @type",
            "items": {"type": "object", "additionalProperties": True},
        },
    },
}


def openapi_document(routes: Sequence[Route]) -> dict[str, Any]:
    """The OpenAPI 3.0 document of ``routes``."""
    schemas: dict[str, Any] = {"Error": _ERROR}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, schemas)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "tideflow HTTP API",
            "version": tideflow.__version__,
            "description": "JSON over HTTP; each operation calls the gRPC WorkflowService "
            "RPC of the same name (proto3 JSON mapping; json/plain payloads as their "
            "JSON value).",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-tideflow-api-key"},
            },
        },
        "security": [{}, {"bearer": []}, {"apiKey": []}],
    }


def _operation(route: Route, schemas: dict[str, Any]) -> dict[str, Any]:
    request = route.request_class.DESCRIPTOR
    response = route.response_class.DESCRIPTOR
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PARAM.findall(route.path)
    ]
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
        for name in route.query
    ]
    operation: dict[str, Any] = {
        "operationId": _operation_id(route),
        "summary": route.summary,
        "description": f"Calls WorkflowService.{route.rpc}.",
        "parameters": parameters,
        "responses": {
            "200": {
                "description": "OK",
                "content": {"application/json": {"schema": _message_ref(response, schemas)}},
            },
            "default": {
                "description": "An error status",
                "content": {"application/json": {"schema": {"$ref": _REF + "Error"}}},
            },
        },
    }
    if route.body:
        operation["requestBody"] = {
            "required": False,
            "content": {"application/json": {"schema": _message_ref(request, schemas)}},
        }
    return operation


def _operation_id(route: Route) -> str:
    # PatchSchedule serves several paths: the last path segment tells them apart.
    tail = route.path.rstrip("/").rsplit("/", 1)[-1]
    if route.rpc == "PatchSchedule" and not tail.startswith("{"):
        return f"{route.rpc}_{tail}"
    return route.rpc


def _message_ref(descriptor: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    name = descriptor.full_name
    if name in _WELL_KNOWN:
        return dict(_WELL_KNOWN[name])
    if name == _PAYLOAD:
        return {"description": "a JSON value (json/plain), or {metadata, data} in base64"}
    key = name.removeprefix("tideflow.api.v1.")
    if key not in schemas:
        schemas[key] = {}  # placed first: recursive messages refer to themselves
        schemas[key] = {
            "type": "object",
            "properties": {f.json_name: _field_schema(f, schemas) for f in descriptor.fields},
        }
    return {"$ref": _REF + key}


def _field_schema(field: FieldDescriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _single(value, schemas)}
    single = _single(field, schemas)
    if is_repeated(field):
        return {"type": "array", "items": single}
    return single


def _single(field: FieldDescriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    if field.message_type is not None:
        return _message_ref(field.message_type, schemas)
    if field.enum_type is not None:
        return {"type": "string", "enum": [v.name for v in field.enum_type.values]}
    return dict(_SCALARS[field.type])
