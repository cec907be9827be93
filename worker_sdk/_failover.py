"""One WorkflowService over several server addresses (``Client.connect("h1:p1,h2:p2")``).

Every node of a cluster answers every call (it forwards a run's calls to the node
that owns the run), so a client needs any one live node. Calls go to the current
address; a call that fails UNAVAILABLE there (the node is down, unreachable, or going
away) moves the client to the next address in the list, round robin, and
``Client.call`` retries it there with the same request (the same request id or task
token, so it acts once). Concurrent calls that fail on the same address move the
client once, not once each. The client stays on an address while it answers: no
load spreading, no probing of the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from tideflow.api.v1 import service_pb2_grpc


def split_targets(target: str) -> list[str]:
    """The addresses of ``target``: one ``host:port``, or several separated by commas."""
    addresses = [part.strip() for part in target.split(",")]
    if not all(addresses):
        raise ValueError(f"empty address in {target!r}: expected host:port[,host:port...]")
    return addresses


class FailoverService:
    """A WorkflowService stub whose calls go to the current one of several channels
    (module docstring); ``service.StartWorkflow(request, timeout=...)`` as on a stub."""

    def __init__(self, addresses: Sequence[str], channels: Sequence[grpc.aio.Channel]) -> None:
        self.addresses = list(addresses)
        self._stubs = [
            service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            for channel in channels
        ]
        self._current = 0

    @property
    def current_address(self) -> str:
        return self.addresses[self._current]

    def __getattr__(self, name: str) -> _FailoverMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _FailoverMethod(self, name)

    async def call(self, name: str, request: Any, **kwargs: Any) -> Any:
        index = self._current
        try:
            return await getattr(self._stubs[index], name)(request, **kwargs)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE and self._current == index:
                # Compare-and-advance: the first failure on this address moves on.
                self._current = (index + 1) % len(self._stubs)
            raise


class _FailoverMethod:
    """One RPC of a ``FailoverService``, called like a stub's method."""

    def __init__(self, service: FailoverService, name: str) -> None:
        self._service = service
        self._name = name

    async def __call__(self, request: Any, **kwargs: Any) -> Any:
        return await self._service.call(self._name, request, **kwargs)
