"""The shape both of the node's server interceptors share (metrics, tracing): wrap the
behaviour of each unary RPC, leave any other kind of call alone."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

# A unary RPC's behaviour: (request, context) -> response.
Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


class UnaryServerInterceptor(grpc.aio.ServerInterceptor):
    """Subclasses say how to wrap one RPC's behaviour (``wrap``)."""

    def __init__(self) -> None:
        # The wrapped handler of each method, with the handler it wraps: gRPC asks on
        # every call, and the handler it finds for a method stays the same object, so
        # the wrapper is built once (not a closure and a handler per call).
        self._wrapped: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}

    def wrap(self, service: str, method: str, behavior: Behavior) -> Behavior:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        cached = self._wrapped.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        # "/tideflow.api.v1.WorkflowService/StartWorkflow" -> WorkflowService, StartWorkflow
        service, _, method = handler_call_details.method.strip("/").rpartition("/")
        behavior: Behavior = handler.unary_unary  # type: ignore[assignment]
        wrapped = grpc.unary_unary_rpc_method_handler(
            self.wrap(service.rpartition(".")[2], method, behavior),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[handler_call_details.method] = (handler, wrapped)
        return wrapped
