"""How the WorkflowService is registered with the gRPC server: like the generated
``add_WorkflowServiceServicer_to_server``, except that a request body which is not a
valid protobuf message is answered INVALID_ARGUMENT after one rate-limited log line.

gRPC itself logs a full traceback for each body its deserializer cannot decode, then
answers INTERNAL: a sender could fill the log at no cost to itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from tideflow.api.v1 import service_pb2

from ._failures import RateLimitedLog

log = logging.getLogger("tideflow.server.frontend")

_Context = grpc.aio.ServicerContext[Any, Any]


class _Undecodable:
    """What the deserializer hands on for a body that is not the method's message."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


_UNDECODABLE_LOG_INTERVAL_S = 10.0


def _lenient_deserializer(message_class: type[Message]) -> Callable[[bytes], object]:
    # gRPC logs a full traceback for a deserializer that raises, then answers INTERNAL;
    # handing on a marker lets the handler answer INVALID_ARGUMENT after one log line.
    def deserialize(raw: bytes) -> object:
        try:
            return message_class.FromString(raw)
        except DecodeError as exc:
            return _Undecodable(str(exc))

    return deserialize


def _guarded(
    method: Callable[[Any, _Context], Awaitable[Any]], input_type: str, undecodable: RateLimitedLog
) -> Callable[[Any, _Context], Awaitable[Any]]:
    async def handle(request: Any, context: _Context) -> Any:
        if isinstance(request, _Undecodable):
            undecodable.warning(
                "undecodable %s from %s: %s", input_type, context.peer(), request.error
            )
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request body is not a valid {input_type} message",
            )
        return await method(request, context)

    return handle


def add_to_server(
    service: object,
    server: grpc.aio.Server,
    descriptor: ServiceDescriptor = service_pb2.DESCRIPTOR.services_by_name["WorkflowService"],
) -> None:
    """Register the service (the WorkflowService unless ``descriptor`` names another,
    such as the cluster's internal MatchingService or Temporal's) like the generated
    ``add_*Servicer_to_server``, with deserializers that turn an undecodable body into
    INVALID_ARGUMENT. Methods ``service`` lacks stay unregistered (UNIMPLEMENTED)."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    # One limit per server: a flood on one node says nothing about another. An
    # undecodable body costs its sender nothing, so it must not cost a traceback each.
    undecodable = RateLimitedLog(log, _UNDECODABLE_LOG_INTERVAL_S)
    for method in descriptor.methods:
        handler = getattr(service, method.name, None)
        if handler is None:
            continue  # not served: gRPC answers UNIMPLEMENTED
        request_class = GetMessageClass(method.input_type)
        response_class = GetMessageClass(method.output_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _guarded(handler, method.input_type.full_name, undecodable),
            request_deserializer=_lenient_deserializer(request_class),
            response_serializer=response_class.SerializeToString,
        )
    generic = grpc.method_handlers_generic_handler(descriptor.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
