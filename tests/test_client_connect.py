"""``Client.connect`` fails fast on a wrong address; a connected client (and the
workers polling through it) still rides out a server restart."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import free_port

from tideflow.api.v1.service_pb2 import GetSystemInfoRequest
from tideflow.server import TideflowServer
from tideflow.worker_sdk import Client, Worker, workflow
from tideflow.worker_sdk.client import DEFAULT_CONNECT_TIMEOUT
from tideflow.worker_sdk.exceptions import ConnectError, RPCError

# Far below the two minutes a connect took before: a test that waits this long for
# ConnectError fails instead of hanging (the timeouts asked for below are 1 s).
_BOUND_S = 30.0


@workflow.defn
class Echo:
    @workflow.run
    async def run(self, text: str) -> str:
        return text


async def test_connect_to_nothing_fails_fast_with_a_clear_error() -> None:
    target = f"127.0.0.1:{free_port()}"
    async with asyncio.timeout(_BOUND_S):
        with pytest.raises(ConnectError) as refused:
            await Client.connect(target, connect_timeout=1)
    assert refused.value.status == "UNAVAILABLE"
    assert f"cannot reach a tideflow server at {target} within 1 s" in str(refused.value)
    async with asyncio.timeout(_BOUND_S):
        with pytest.raises(ConnectError):
            await Client.connect(target, connect_timeout=timedelta(seconds=1))


async def test_connect_timeout_defaults_to_a_few_seconds() -> None:
    default = inspect.signature(Client.connect).parameters["connect_timeout"].default
    assert default is DEFAULT_CONNECT_TIMEOUT
    assert timedelta(0) < DEFAULT_CONNECT_TIMEOUT <= timedelta(seconds=10)
    with pytest.raises(ValueError, match="connect_timeout must be positive"):
        await Client.connect("127.0.0.1:1", connect_timeout=0)


async def test_a_connected_client_rides_out_a_server_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'history.db'}"
    queue = f"q-{uuid.uuid4()}"
    async with TideflowServer(url, port=0) as first:
        port = first.port
        client = await Client.connect(first.address, connect_timeout=1)
    try:
        with pytest.raises(RPCError) as down:
            await client.call(client.service.GetSystemInfo, GetSystemInfoRequest(), retry=False)
        assert down.value.status == "UNAVAILABLE"
        # The server is gone: this start retries (the connect timeout does not apply)
        # until the next server on the same port and database answers it.
        start = asyncio.create_task(
            client.execute_workflow(Echo.run, "hi", id="echo", task_queue=queue)
        )
        async with (
            TideflowServer(url, port=port),
            Worker(client, task_queue=queue, workflows=[Echo]),
        ):
            async with asyncio.timeout(_BOUND_S * 4):
                assert await start == "hi"
    finally:
        await client.close()
