"""One WorkflowService over several server addresses (``Client.connect("h1:p1,h2:p2")``).

Every node of a cluster answers every call (it forwards a run's calls to the node
that owns the run), so a client needs any one live node. Calls go to the current
address; a call that fails UNAVAILABLE there (the node is down, unreachable, or going
away) moves the client to the next address in the list, round robin, and
``Client.call`` retries it there with the same request (the same request id or task
token, so it acts once). Concurrent calls that fail on the same address move the
client once, not once each. The client stays on an address while it answers: no
load spreading, no probing of the others.

A task's completion and heartbeats go to the node that owns the task's run instead,
when the server named it (``run_owner`` of the task: issue 13) and it is one of the
client's addresses (``to``): any other node would forward them there, an extra hop
and the CPU of two calls. An owner that answers UNAVAILABLE (down, or going away) is
skipped for ``OWNER_DOWN_S``: the call's retry, and the completions after it, go to
the current address as above, whose node forwards them to the run's new owner.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from tideflow.api.v1 import service_pb2_grpc

# How long a run owner that answered UNAVAILABLE is passed over for the current address.
OWNER_DOWN_S = 5.0
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def normalise_address(address: str) -> str:
    """``host:port`` compared as the same node whichever way it is spelled: host in
    lower case, IPv6 brackets dropped, the loopback names as one."""
    host, _, port = address.strip().rpartition(":")
    host = host.strip("[]").lower()
    if host in _LOOPBACK:
        host = "127.0.0.1"
    return f"{host}:{port}"


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
        self._index = {normalise_address(a): i for i, a in enumerate(self.addresses)}
        # Index of an owner that answered UNAVAILABLE -> until when it is passed over.
        self._down_until: dict[int, float] = {}

    @property
    def current_address(self) -> str:
        return self.addresses[self._current]

    def owner_index(self, owner: str) -> int | None:
        """Which of the addresses ``owner`` (a task's ``run_owner``) is, if any."""
        return self._index.get(normalise_address(owner)) if owner else None

    def to(self, owner: str) -> Any:
        """A stub-like service whose calls go to the node ``owner`` if it is one of
        the addresses and not passed over, else to the current address."""
        index = self.owner_index(owner)
        return self if index is None else _OwnerService(self, index)

    async def call_at(self, index: int, name: str, request: Any, **kwargs: Any) -> Any:
        """Call ``name`` on the node at ``index`` (a run's owner): on the current
        address (failing over) if that is the node or it is passed over."""
        if index == self._current or self._down_until.get(index, 0.0) > time.monotonic():
            return await self.call(name, request, **kwargs)
        try:
            return await getattr(self._stubs[index], name)(request, **kwargs)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                self._down_until[index] = time.monotonic() + OWNER_DOWN_S
            raise

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self.call, name)

    async def call(self, name: str, request: Any, **kwargs: Any) -> Any:
        index = self._current
        try:
            return await getattr(self._stubs[index], name)(request, **kwargs)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE and self._current == index:
                # Compare-and-advance: the first failure on this address moves on.
                self._current = (index + 1) % len(self._stubs)
            raise


class _Method:
    """One RPC, called like a stub's method: ``call(name, request, ...)`` of the service
    it came from (``FailoverService.call``, or ``call_at`` one node)."""

    def __init__(self, call: Callable[..., Awaitable[Any]], name: str) -> None:
        self._call = call
        self._name = name

    async def __call__(self, request: Any, **kwargs: Any) -> Any:
        return await self._call(self._name, request, **kwargs)


class _OwnerService:
    """``FailoverService.to(owner)``: its methods call the owner's node."""

    def __init__(self, service: FailoverService, index: int) -> None:
        self._call_there = functools.partial(service.call_at, index)

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self._call_there, name)
