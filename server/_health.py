"""Health and metrics endpoints of one node (issue 15).

- ``grpc.health.v1.Health`` on the gRPC port (grpcio-health-checking): the overall
  status ("") and ``tideflow.api.v1.WorkflowService`` are SERVING from the moment the
  node accepts calls until ``stop()`` begins, NOT_SERVING after.
- An HTTP listener on ``--metrics-port``: ``GET /metrics`` (the node's own Prometheus
  registry, server/_metrics.py) and ``GET /healthz`` (200 ``ok`` while serving, 503
  otherwise). It is a few lines on ``asyncio.start_server`` rather than
  prometheus-client's threaded server so a scrape runs on the server's event loop and
  can read the store (the open-run count) without crossing threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ._metrics import ServerMetrics

log = logging.getLogger("tideflow.server.health")

WORKFLOW_SERVICE = "tideflow.api.v1.WorkflowService"
_SERVICES = ("", WORKFLOW_SERVICE)
# A request line and headers larger than this are refused (nobody scrapes with more).
_MAX_REQUEST_BYTES = 16 * 1024
_READ_TIMEOUT_S = 10.0


class Health:
    """The node's serving status, as gRPC health checks and ``/healthz`` see it."""

    def __init__(self) -> None:
        self.servicer = HealthServicer()
        self.serving = False

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)  # type: ignore[no-untyped-call]

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in _SERVICES:
            await self.servicer.set(service, status)


class MetricsEndpoint:
    """``/metrics`` and ``/healthz`` over HTTP/1.1 (one request per connection)."""

    def __init__(self, metrics: ServerMetrics, health: Health, host: str, port: int) -> None:
        self._metrics = metrics
        self._health = health
        self._host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen; returns the bound port (port 0 picks a free one)."""
        self._server = await asyncio.start_server(self._serve, self._host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("metrics on http://%s:%d/metrics", self._host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > _MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            status, content_type, body = await self._answer(method, path)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            status, content_type, body = "400 Bad Request", "text/plain", b"bad request\n"
        except Exception:  # a defect must not take the listener down
            log.exception("metrics endpoint failed")
            status, content_type, body = "500 Internal Server Error", "text/plain", b"error\n"
        try:
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _answer(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path == "/metrics":
            await self._metrics.refresh()
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._metrics.registry)
        if path == "/healthz":
            if self._health.serving:
                return "200 OK", "text/plain", b"ok\n"
            return "503 Service Unavailable", "text/plain", b"not serving\n"
        return "404 Not Found", "text/plain", b"not found: try /metrics or /healthz\n"
