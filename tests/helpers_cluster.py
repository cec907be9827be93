"""Clients for tests of several nodes (not a test module).

``send_runs_to_their_owners(client, addresses)`` makes a ``Client`` (and the workers on
it) send the calls about one run to the node that owns the run: all of ``addresses``
at once, the first answer that is not UNAVAILABLE wins (the others refuse a run of a
shard they do not hold, naming its owner, or are down or paused). It stands in for
request forwarding between nodes, which another change adds to the nodes themselves.
Every other call (polls included: the nodes route task queues themselves,
docs/cluster.md) goes to the node the client connected to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from tideflow.api.v1 import service_pb2_grpc
from tideflow.worker_sdk import Client

#: The RPCs served by a run's owner alone (another node refuses them UNAVAILABLE,
#: naming the owner, before it does anything).
RUN_RPCS = frozenset(
    {
        "StartWorkflow",
        "GetHistory",
        "DescribeWorkflow",
        "TerminateWorkflow",
        "SignalWorkflow",
        "RequestCancelWorkflow",
        "QueryWorkflow",
        "RespondWorkflowTaskCompleted",
        "RespondWorkflowTaskFailed",
        "RespondActivityTaskCompleted",
        "RespondActivityTaskFailed",
        "RespondActivityTaskCanceled",
        "RecordActivityHeartbeat",
    }
)


class RunOwnerFirst:
    """A WorkflowService stub: the RPCs of ``RUN_RPCS`` on every node of ``addresses``
    at once, answered by the first node that does not answer UNAVAILABLE (the run's
    owner: the others refuse the call without doing anything, and a paused or dead
    node is not waited for); any other RPC on ``connected`` (the client's own stub)."""

    def __init__(self, connected: Any, addresses: Sequence[str]) -> None:
        self._connected = connected
        self._channels = [grpc.aio.insecure_channel(a) for a in addresses]
        self._stubs = [service_pb2_grpc.WorkflowServiceStub(c) for c in self._channels]  # type: ignore[no-untyped-call]

    def __getattr__(self, rpc: str) -> Callable[..., Awaitable[Any]]:
        if rpc not in RUN_RPCS:
            method: Callable[..., Awaitable[Any]] = getattr(self._connected, rpc)
            return method
        methods = [getattr(stub, rpc) for stub in self._stubs]

        async def call(request: Any, **kwargs: Any) -> Any:
            pending = {asyncio.ensure_future(method(request, **kwargs)) for method in methods}
            refused: BaseException | None = None
            try:
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for answer in done:
                        error = answer.exception()
                        unavailable = isinstance(error, grpc.aio.AioRpcError) and (
                            error.code() == grpc.StatusCode.UNAVAILABLE
                        )
                        if not unavailable:
                            return answer.result()
                        refused = error
            finally:
                for left in pending:
                    left.cancel()
            assert refused is not None
            raise refused

        return call

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


def send_runs_to_their_owners(client: Client, addresses: Sequence[str]) -> RunOwnerFirst:
    """Install a ``RunOwnerFirst`` over ``client``'s stub; close it after the client."""
    stub = RunOwnerFirst(client.service, addresses)
    client.service = stub  # type: ignore[assignment]
    return stub
