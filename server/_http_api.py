"""The HTTP API and the web UI's server: JSON over HTTP on the UI port.

Each route (server/_http_routes.py) builds the RPC's request message from the path,
the query string and the JSON body (server/_http_json.py), and calls the gRPC
WorkflowService's own method with a call context made from the HTTP request: the same
bounds checks, authentication (``Authorization: Bearer <API key or JWT>`` or
``x-tideflow-api-key``), authorization, routing to the run's node and audit line as
a gRPC call, because it is the same code. A status it ends with becomes an HTTP
status and a JSON body ``{"code", "status", "message", "kind", "details"}``
whose ``details`` hold the typed ``ErrorDetail`` (errors.proto) the gRPC trailer
carries.

It runs on the server's event loop, next to the grpc.aio server (aiohttp).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.rpc import status_pb2

from tideflow.api.v1 import errors_pb2

from ._errors import STATUS_DETAILS_KEY, InvalidArgumentError, ServiceError
from ._http_json import from_json, to_json
from ._http_openapi import openapi_document
from ._http_routes import ROUTES, Route
from ._web_ui import add_ui_routes

# How long stop() lets requests in progress finish before cancelling them. Short: a
# history long poll (a run page of the web UI, ``waitNewEvent``) may wait a minute
# for an event, and aiohttp's default (60 s) held the whole server's stop for it.
SHUTDOWN_GRACE_S = 1.0

log = logging.getLogger("tideflow.server.http")

# gRPC status -> HTTP status, as gRPC-gateway maps them (FAILED_PRECONDITION: 400).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
# Only the caller's credentials travel from HTTP headers into the call's metadata:
# a node credential or a forwarding mark sent by a browser must not reach the gate.
_CREDENTIAL_HEADERS = ("authorization", "x-tideflow-api-key")
# How long one HTTP call may take (a query waits this long for a worker) unless the
# request's ``X-Tideflow-Timeout`` header (seconds) asks for less or more.
_DEFAULT_TIMEOUT_S = 30.0
_MAX_TIMEOUT_S = 120.0
_TIMEOUT_HEADER = "X-Tideflow-Timeout"


class _Aborted(grpc.aio.AbortError):
    """How the service ends an HTTP call with a status: ``context.abort`` raises this
    (an AbortError, which the service's error boundary lets through unchanged)."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: Sequence[Any]) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = trailers


class HttpCallContext:
    """The part of ``grpc.aio.ServicerContext`` the WorkflowService reads, for a call
    that arrived over HTTP."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], peer: str, timeout_s: float):
        self._metadata = metadata
        self._peer = peer
        self._deadline = asyncio.get_running_loop().time() + timeout_s

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}  # no client certificate on the HTTP port

    def time_remaining(self) -> float:
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[Any] = ()
    ) -> None:
        raise _Aborted(code, details, trailing_metadata)


def error_body(code: grpc.StatusCode, message: str, detail: errors_pb2.ErrorDetail | None) -> Any:
    """The JSON body of an error: the gRPC status, its message and its typed detail."""
    body: dict[str, Any] = {"code": code.value[0], "status": code.name, "message": message}
    if detail is not None:
        body["kind"] = errors_pb2.ErrorKind.Name(detail.kind)
        packed = status_pb2.Status()
        packed.details.add().Pack(detail)
        body["details"] = json_format.MessageToDict(packed)["details"]
    return body


def _detail_of(trailers: Iterable[Any]) -> errors_pb2.ErrorDetail | None:
    for key, value in trailers or ():
        if key == STATUS_DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            for any_detail in status.details:
                detail = errors_pb2.ErrorDetail()
                if any_detail.Unpack(detail):
                    return detail
    return None


# What aiohttp itself refuses (no such route, method, a body past the limit), as the
# API's error body; the HTTP status stays aiohttp's.
_HTTP_REFUSALS = {
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    if _cross_site(request):
        denied = grpc.StatusCode.PERMISSION_DENIED
        message = f"{request.method} {request.path}: cross-origin request refused"
        return web.json_response(error_body(denied, message, None), status=HTTP_STATUS[denied])
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as refused:
        code = _HTTP_REFUSALS.get(refused.status)
        if code is None or not request.path.startswith("/api/"):
            raise
        message = f"{request.method} {request.path}: {refused.reason}"
        return web.json_response(error_body(code, message, None), status=refused.status)


def _cross_site(request: web.Request) -> bool:
    """A state-changing call a browser sent from another site's page: refused, or any
    web page could terminate runs on a development server without auth (a form post
    needs no CORS preflight). Browsers name the page's origin; curl and SDKs send none."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    return origin == "null" or urlsplit(origin).netloc != request.host


def _error_response(code: grpc.StatusCode, message: str, detail: Any) -> web.Response:
    return web.json_response(error_body(code, message, detail), status=HTTP_STATUS[code])


def _service_error_response(error: ServiceError) -> web.Response:
    return _error_response(error.code, error.message, error.detail())


class HttpFrontend:
    """The HTTP API, the OpenAPI document, ``/healthz`` and the web UI on one port.

    ``service`` is the node's WorkflowService; ``healthy()`` says whether the node
    still serves (its background loops run). ``start()`` binds ``host:port`` (0: a
    free port) and returns the bound port."""

    def __init__(
        self,
        service: Any,
        host: str,
        port: int,
        *,
        healthy: Callable[[], bool],
        max_body_bytes: int,
    ) -> None:
        self._service = service
        self._host = host
        self.port = port
        self._healthy = healthy
        self._runner: web.AppRunner | None = None
        self._openapi_json = openapi_document(ROUTES)
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[_json_errors])
        for route in ROUTES:
            self.app.router.add_route(route.method, route.path, self._handler(route))
        self.app.router.add_get("/api/v1/openapi.json", self._openapi)
        self.app.router.add_get("/healthz", self._health)
        add_ui_routes(self.app)

    async def start(self) -> int:
        runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_S
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        # The bound (host, port, ...) of the site: port 0 became a free port.
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        if self._healthy():
            return web.json_response({"status": "SERVING"})
        return web.json_response({"status": "NOT_SERVING"}, status=503)

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(self._openapi_json)

    def _handler(self, route: Route) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.Response:
            return await self._call(route, request)

        return handle

    async def _call(self, route: Route, request: web.Request) -> web.Response:
        try:
            body = await _body_of(route, request)
            data = route.request_json(request.match_info, request.query, body)
            message = from_json(data, route.request_class)
            context = HttpCallContext(
                _credentials(request.headers), _peer(request), _timeout_of(request.headers)
            )
        except ServiceError as error:
            return _service_error_response(error)
        method = getattr(self._service, route.rpc)
        try:
            response = await method(message, context)
        except _Aborted as aborted:
            return _error_response(aborted.code, aborted.message, _detail_of(aborted.trailers))
        return web.json_response(to_json(response))


async def _body_of(route: Route, request: web.Request) -> Mapping[str, Any]:
    if not route.body or not request.can_read_body:
        return {}
    text = await request.text()
    if not text.strip():
        return {}
    try:
        body = json.loads(text)
    except ValueError as error:
        raise InvalidArgumentError(f"the request body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise InvalidArgumentError("the request body must be a JSON object")
    return body


def _credentials(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple((name, headers[name]) for name in _CREDENTIAL_HEADERS if name in headers)


def _peer(request: web.Request) -> str:
    return f"http:{request.remote or 'unknown'}"


def _timeout_of(headers: Mapping[str, str]) -> float:
    raw = headers.get(_TIMEOUT_HEADER)
    if raw is None:
        return _DEFAULT_TIMEOUT_S
    try:
        timeout = float(raw)
    except ValueError:
        timeout = -1.0
    if not 0 < timeout <= _MAX_TIMEOUT_S:
        raise InvalidArgumentError(
            f"{_TIMEOUT_HEADER} {raw!r}: expected seconds, more than 0 and at most "
            f"{_MAX_TIMEOUT_S:g}"
        )
    return timeout
