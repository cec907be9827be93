"""The two sites of the edge demo as real processes, and the network between them.

- ``Site``: ``tideflow server start-dev`` in its own process, on its own SQLite file
  and a free port (bound to port 0 first, so the demo never collides with anything);
  its output goes to a log file next to the database.
- ``LinkProxy``: a small TCP proxy the edge dials instead of the cloud. ``cut()``
  breaks every connection through it and refuses new ones until ``restore()``: for
  the two sites that is the network going down, and nothing else changes.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tideflow.api.v1 import replication_pb2
from tideflow.worker_sdk import Client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Site:
    """One tideflow server process: ``--cluster-name NAME`` on ``db``; an edge also
    names its ``upstream`` (host:port)."""

    def __init__(self, name: str, db: Path, *, upstream: str | None = None) -> None:
        self.name = name
        self.db = db
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = db.with_suffix(".log")
        flags = ["--cluster-name", name]
        if upstream is not None:
            flags += ["--upstream", upstream]
        self._argv = [
            *(sys.executable, "-m", "tideflow.cli", "server", "start-dev"),
            *("--db", str(db), "--port", str(self.port), *flags),
        ]
        self._popen: subprocess.Popen[bytes] | None = None

    async def start(self, timeout: float = 60.0) -> Client:
        """Start the process; a client once the site answers ``DescribeSite``."""
        self._popen = popen = self._spawn()
        deadline = time.monotonic() + timeout
        while True:
            if popen.poll() is not None:
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
    """Forwards connections on its own port to ``target_port`` while the link is up;
    each connection is one task, which ``cut()`` cancels."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.up = True
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", self.port)

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()

    def cut(self) -> None:
        self.up = False
        for connection in list(self._connections):
            connection.cancel()

    def restore(self) -> None:
        self.up = True

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        this = asyncio.current_task()
        if not self.up or this is None:
            writer.transport.abort()  # the network is down: the edge's dial fails
            return
        self._connections.add(this)
        upstream: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass  # cut (or a side closed): both ends are dropped below
        finally:
            self._connections.discard(this)
            for end in (writer, upstream):
                if end is not None:
                    end.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.transport.abort()
