"""OpenTelemetry spans for the RPCs a node serves (optional: ``tideflow[otel]``).

A span per call (SERVER kind, named ``<Service>/<Method>``, with the status code),
child of the W3C trace context the caller sent in its gRPC metadata (``traceparent``,
as ``tideflow.worker_sdk.tracing.TracingInterceptor`` sends it), so a client's span,
the server's and the worker's are one trace. Off unless asked for
(``TideflowServer(tracer_provider=...)``, or ``--otel`` for the global provider): the
server runs without opentelemetry installed, and this module imports it only when
tracing is on.
"""

from __future__ import annotations

from typing import Any

import grpc

from ._unary_interceptor import Behavior, UnaryServerInterceptor


def tracing_interceptor(tracer_provider: Any) -> grpc.aio.ServerInterceptor:
    """The interceptor for ``tracer_provider`` (True: OpenTelemetry's global one)."""
    from opentelemetry import trace

    provider = None if tracer_provider is True else tracer_provider
    return _TracingInterceptor(trace.get_tracer("tideflow.server", tracer_provider=provider))


class _TracingInterceptor(UnaryServerInterceptor):
    def __init__(self, tracer: Any) -> None:
        super().__init__()
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._tracer = tracer
        self._propagator = TraceContextTextMapPropagator()

    def wrap(self, service: str, method: str, behavior: Behavior) -> Behavior:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        tracer, propagator, name = self._tracer, self._propagator, f"{service}/{method}"

        async def traced(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            metadata = context.invocation_metadata() or ()
            parent = propagator.extract({k: v for k, v in metadata if isinstance(v, str)})
            with tracer.start_as_current_span(
                name, context=parent, kind=SpanKind.SERVER, attributes={"rpc.method": method}
            ) as span:
                try:
                    return await behavior(request, context)
                finally:
                    code = context.code()
                    if isinstance(code, grpc.StatusCode):
                        span.set_attribute("rpc.grpc.status_code", code.name)
                        if code != grpc.StatusCode.OK:
                            span.set_status(Status(StatusCode.ERROR, code.name))

        return traced
