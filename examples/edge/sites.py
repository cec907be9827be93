"""The two sites of the edge demo as real processes, and the network between them.

- ``Site``: ``tideflow server start-dev`` in its own process, on its own SQLite file
  and free ports for gRPC and the web UI (bound to port 0 first, so the demo never
  collides with anything);
  its output goes to a log file next to the database.
- ``LinkProxy``: a small TCP proxy the edge dials instead of the cloud. ``cut()``
  breaks every connection through it and refuses new ones until ``restore()``: for
  the two sites that is the network going down, and nothing else changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

from tideflow.api.v1 import replication_pb2
from tideflow.worker_sdk import Client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PortTaken(Exception):
    """The server could not listen: another program took the port meanwhile."""


class Site:
    """One tideflow server process: ``--cluster-name NAME`` on ``db``; an edge also
    names its ``upstream`` (host:port)."""

    def __init__(self, name: str, db: Path, *, upstream: str | None = None) -> None:
        self.name = name
        self.db = db
        self.log = db.with_suffix(".log")
        self._flags = ["--cluster-name", name]
        if upstream is not None:
            self._flags += ["--upstream", upstream]
        self._pick_ports()
        self._popen: subprocess.Popen[bytes] | None = None

    def _pick_ports(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.ui_port = free_port()  # the web UI's default port may be taken (or shared)
        self._argv = [
            *(sys.executable, "-m", "tideflow.cli", "server", "start-dev"),
            *("--db", str(self.db), "--port", str(self.port)),
            *("--ui-port", str(self.ui_port), *self._flags),
        ]

    async def start(self, timeout: float = 60.0) -> Client:
        """Start the process; a client once the site answers ``DescribeSite``. A port
        found free can be taken by another program before the server binds it: then
        the site starts again on other ports."""
        for _ in range(5):
            try:
                return await self._start(timeout)
            except PortTaken:
                self._pick_ports()
        raise RuntimeError(f"site {self.name}: no free port; see {self.log}")

    async def _start(self, timeout: float) -> Client:
        self._popen = popen = self._spawn()
        deadline = time.monotonic() + timeout
        while True:
            if popen.poll() is not None:
                self._popen = None
                if "the port is in use" in self.log.read_text(errors="replace"):
                    raise PortTaken(self.address)
                raise RuntimeError(f"site {self.name} exited; see {self.log}")
            try:
                client = await Client.connect(self.address)
                await status(client)
                return client
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"site {self.name} did not start; see {self.log}") from None
                await asyncio.sleep(0.2)

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log.open("wb") as log:
            return subprocess.Popen(self._argv, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 10 s (safe to call twice)."""
        popen, self._popen = self._popen, None
        if popen is None or popen.poll() is not None:
            return
        popen.terminate()
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


async def status(client: Client) -> replication_pb2.DescribeSiteResponse:
    """What ``tideflow site status`` shows: peers, link state, lag, inbox depth."""
    response: replication_pb2.DescribeSiteResponse = await client.call(
        client.sites.DescribeSite, replication_pb2.DescribeSiteRequest()
    )
    return response


class LinkProxy:
    """Forwards connections on its own port to ``target_port`` while the link is up.
    Each connection is two pump tasks (one per direction); ``cut()`` aborts every
    socket, which ends them."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.address = ""
        self.up = True
        self._server: asyncio.Server | None = None
        self._sockets: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    def cut(self) -> None:
        self.up = False
        for sock in list(self._sockets):
            sock.transport.abort()
        self._sockets.clear()

    def restore(self) -> None:
        self.up = True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()  # the network is down: the edge's dial fails
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._sockets |= {writer, up_writer}
        for pump in (self._pump(reader, up_writer), self._pump(up_reader, writer)):
            task = asyncio.create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while self.up and (data := await source.read(65536)):
                sink.write(data)
                await sink.drain()
        self._sockets.discard(sink)
        sink.transport.abort()
