"""Sites under test: a cloud process, an edge process with its own SQLite file, and
the link between them through a TCP proxy the test cuts and restores.

The edge dials the cloud (``--upstream``) at the proxy's address, so cutting the
proxy is losing the network between the sites: the streams through it break at
once and new connections are refused until ``restore()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from helpers import TIDEFLOW_CLI, Processes, ServerProcess, eventually, free_port

from tideflow.api.v1 import replication_pb2
from tideflow.api.v1.history_pb2 import HistoryEvent
from tideflow.worker_sdk import Client, WorkflowHandle
from tideflow.worker_sdk.exceptions import RPCError


class TcpProxy:
    """Forwards connections from its own port to ``target_port``; ``cut()`` drops
    every connection and refuses new ones until ``restore()``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.up = True
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0
        # Cleared by ``hold_replies()``: bytes from the target wait in the proxy.
        self._replies_flow = asyncio.Event()
        self._replies_flow.set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self) -> None:
        """The network between the sites goes down: every stream breaks now (what
        ``hold_replies`` held is lost)."""
        self.up = False
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        self._replies_flow.set()

    def restore(self) -> None:
        self.up = True

    def hold_replies(self) -> None:
        """Bytes from the target (the cloud) stop in the proxy until ``cut()``:
        calls reach the cloud, its answers and calls never reach the edge."""
        self._replies_flow.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer, self._replies_flow)),
        ]
        self._tasks.update(pumps)
        for pump in pumps:
            pump.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        flowing: asyncio.Event | None = None,
    ) -> None:
        try:
            while self.up:
                data = await reader.read(65536)
                if flowing is not None:
                    await flowing.wait()
                if not data or not self.up:
                    break
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


class SitePair:
    """A cloud (``--cluster-name cloud``) and an edge (``--cluster-name edge1``, its
    own SQLite file) whose link runs through ``proxy``."""

    def __init__(self, procs: Processes, cloud_url: str, edge_db: Path) -> None:
        self.cloud = ServerProcess(
            procs, cloud_url, name="cloud", flags=("--cluster-name", "cloud")
        )
        self.proxy = TcpProxy(self.cloud.port)
        self.edge = ServerProcess(
            procs,
            f"sqlite:///{edge_db}",
            name="edge",
            flags=("--cluster-name", "edge1", "--upstream", self.proxy.address),
        )

    async def start_edge(self) -> None:
        """The proxy and the edge: the edge runs (its cloud not started yet)."""
        await self.proxy.start()
        await self.edge.start()

    async def start_linked(self) -> tuple[Client, Client]:
        """Start the cloud (the edge runs already); clients of the cloud and the
        edge once the two sides are linked."""
        await self.cloud.start()
        cloud = await Client.connect(self.cloud.address)
        edge = await Client.connect(self.edge.address)
        await wait_linked(cloud, edge)
        return cloud, edge

    async def close(self) -> None:
        await self.proxy.close()


@contextlib.asynccontextmanager
async def edge_started(procs: Processes, cloud_url: str, edge_db: Path) -> AsyncIterator[SitePair]:
    """A SitePair whose proxy and edge run (the cloud not started yet), closed after."""
    pair = SitePair(procs, cloud_url, edge_db)
    await pair.start_edge()
    try:
        yield pair
    finally:
        await pair.close()


async def site_status(client: Client) -> replication_pb2.DescribeSiteResponse:
    response: replication_pb2.DescribeSiteResponse = await client.call(
        client.sites.DescribeSite, replication_pb2.DescribeSiteRequest()
    )
    return response


async def linked(client: Client, peer: str) -> bool:
    status = await site_status(client)
    return any(p.site == peer and p.connected for p in status.peers)


async def wait_linked(cloud: Client, edge: Client) -> None:
    await eventually(lambda: linked(edge, "cloud"), "the edge linked to the cloud")
    await eventually(lambda: linked(cloud, "edge1"), "the cloud sees the edge")


async def history_of(client: Client, workflow_id: str, run_id: str) -> list[HistoryEvent]:
    handle: WorkflowHandle[Any] = client.get_workflow_handle(workflow_id, run_id=run_id)
    return (await handle.fetch_history()).events


async def same_history(
    home: Client, replica: Client, workflow_id: str, run_id: str
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        theirs = await history_of(home, workflow_id, run_id)
        with contextlib.suppress(Exception):
            return await history_of(replica, workflow_id, run_id) == theirs
        return False

    return check


async def site_cli(*args: str) -> tuple[int, str, str]:
    """``tideflow ARGS`` in a subprocess (the site and workflow handoff commands)."""
    proc = await asyncio.create_subprocess_exec(
        *TIDEFLOW_CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def site_status_json(address: str) -> dict[str, Any]:
    """``tideflow site status -o json`` of the site at ``address``."""
    code, out, err = await site_cli("site", "status", "--address", address, "-o", "json")
    assert code == 0, err
    status: dict[str, Any] = json.loads(out)
    return status


def cli_handoff(address: str, workflow_id: str, to: str) -> Callable[[], Awaitable[bool]]:
    """``tideflow workflow handoff``, tried again while the run is busy."""

    async def attempt() -> bool:
        code, _, err = await site_cli(
            "workflow", "handoff", "--address", address, "--workflow-id", workflow_id, "--to", to
        )
        assert code == 0 or "cannot be handed off now" in err, err
        return code == 0

    return attempt


def handed(handle: WorkflowHandle[Any], to: str) -> Callable[[], Awaitable[bool]]:
    """Hand the run to ``to`` once it waits (a handoff is refused while a workflow
    task is in flight: FAILED_PRECONDITION, tried again)."""

    async def attempt() -> bool:
        try:
            await handle.handoff(to)
        except RPCError as error:
            if error.status != "FAILED_PRECONDITION":
                raise
            return False
        return True

    return attempt
