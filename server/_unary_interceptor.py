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
        # "/tideflow.api.v1.WorkflowService/StartWorkflow" -> WorkflowService, StartWorkflow
        service, _, method = handler_call_details.method.strip("/").rpartition("/")
        behavior: Behavior = handler.unary_unary  # type: ignore[assignment]
        return grpc.unary_unary_rpc_method_handler(
            self.wrap(service.rpartition(".")[2], method, behavior),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
