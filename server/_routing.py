"""Routing of run-keyed requests to the node that owns the run's shard (issue 11).

Any node answers any request. A request about one run (start, signal, cancel,
terminate, query, describe, history, and the task-token calls whose verified token
names the run) is served where the run's shard is held: by this node when it holds
the lease, else forwarded to the owner (``ShardController.owner``) over the peer
channel (server/_peers.py) with the same method path, the request as received, the
caller's remaining deadline and ``forwarding_metadata`` (the caller's credentials: the
owner authenticates and authorizes the caller as if it had called it directly). The
owner's answer goes back unchanged: its response, or its status code, message and
typed ``ErrorDetail`` (``RemoteStatusError``), so the SDK's typed errors still work.

A routing race (the shard moves between nodes) never reaches the caller as an error of
the run: when the owner is unknown (a lease lapsed, not yet taken), when the owner
refuses (UNAVAILABLE: it no longer holds the shard, or it is going away), when the
owner cancels the call (its graceful stop ended with the call in flight), when the
owner cannot be reached, or when this node loses the shard during its own attempt
(``ShardNotOwnedError`` before a write, ``ShardOwnershipLostError`` from the fence:
nothing was written), the router reads the shard rows again and retries with backoff
within the caller's deadline (and at most ``budget_s``: long enough for a killed
node's lease to lapse and another node to take the shard), then answers UNAVAILABLE,
which clients retry. Every retried request carries the same request id (one is filled
in first if the caller sent none), so a start or signal is applied once however often
it travels. A forwarded call is never forwarded again: a node that does not own the
shard answers it UNAVAILABLE naming the owner, and the forwarding node retries.

Audit (server/_audit.py): the node that serves a call writes its audit line, with
``forwarded_by=<node id>`` when another node forwarded it; the forwarding node writes
no line for a call the owner answered (``note_forwarded``), only for one it could not
hand to any owner (UNAVAILABLE) or refused itself (credentials, grants, bounds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import status_pb2

from tideflow.api.v1 import errors_pb2, service_pb2, state_pb2
from tideflow.history import RunKey, ShardOwnershipLostError, StoreError

from ._audit import note_forwarded
from ._auth import TOKEN_RPCS
from ._errors import _KIND_OF_CODE, STATUS_DETAILS_KEY, ServiceError, UnavailableError
from ._peers import Peer, PeerChannels, forwarding_metadata, is_forwarded
from ._shards import ShardController, ShardNotOwnedError

log = logging.getLogger("tideflow.server.routing")

Resp = TypeVar("Resp")
_WORKFLOW_SERVICE = service_pb2.DESCRIPTOR.services_by_name["WorkflowService"]

#: RPCs about one run, served by the owner of the run's shard. Polls, task queues,
#: worker shutdown and query answers are routed by task queue (matching), lists and
#: schedules are served by any node.
ROUTED_RPCS = frozenset(
    {
        "StartWorkflow",
        "SignalWorkflow",
        "RequestCancelWorkflow",
        "TerminateWorkflow",
        "QueryWorkflow",
        "DescribeWorkflow",
        "GetHistory",
        "RespondWorkflowTaskCompleted",
        "RespondWorkflowTaskFailed",
        "RespondActivityTaskCompleted",
        "RespondActivityTaskFailed",
        "RespondActivityTaskCanceled",
        "RecordActivityHeartbeat",
    }
)
# Mutating requests whose request id makes a retry (here, or on another node) act once.
_REQUEST_ID_RPCS = frozenset(
    {"StartWorkflow", "SignalWorkflow", "RequestCancelWorkflow", "TerminateWorkflow"}
)
# First pause before a routing attempt is made again, doubled up to the maximum.
_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 0.5
# The shard rows are read again at most this often, however many calls race.
_MIN_REFRESH_INTERVAL_S = 0.05
# Kept from the caller's deadline to send the final answer before it passes.
_DEADLINE_MARGIN_S = 0.1


class RemoteStatusError(ServiceError):
    """The owner's error status for a forwarded call, passed on as it was: its code,
    message and typed detail (the ``grpc-status-details-bin`` trailer)."""

    def __init__(self, code: grpc.StatusCode, message: str, trailer: bytes | None) -> None:
        super().__init__(message)
        self.code = code
        self._detail = _detail_of(code, trailer)

    def detail(self) -> errors_pb2.ErrorDetail:
        return self._detail


def _detail_of(code: grpc.StatusCode, trailer: bytes | None) -> errors_pb2.ErrorDetail:
    detail = errors_pb2.ErrorDetail(
        kind=_KIND_OF_CODE.get(code, errors_pb2.ErrorKind.ERROR_KIND_UNSPECIFIED)
    )
    if trailer is None:
        return detail
    try:
        status = status_pb2.Status.FromString(trailer)
        for packed in status.details:
            if packed.Unpack(detail):
                break
    except DecodeError:
        pass  # a peer of the cluster sent it: keep the generic kind of the code
    return detail


class _Reroute(Exception):
    """This attempt met a shard on the move: read the shard rows again, retry."""


def trailer_of(error: grpc.aio.AioRpcError) -> bytes | None:
    for name, value in error.trailing_metadata() or ():
        if name == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return value
    return None


async def run_of(
    rpc: str, request: Any, open_token: Callable[[Any, bool], Awaitable[state_pb2.TaskToken]]
) -> tuple[str, str]:
    """The (namespace, workflow id) whose shard serves ``request``: a task-token call's
    from its verified token, any other from the request."""
    activity = TOKEN_RPCS.get(rpc)
    if activity is not None:
        token = await open_token(request, activity)
        return token.namespace, token.workflow_id
    if rpc == "StartWorkflow":
        return request.namespace, request.workflow_id
    execution = request.workflow_execution if hasattr(request, "workflow_execution") else None
    if execution is None:
        execution = request.execution
    return request.namespace, execution.workflow_id


class Router:
    """Serves a run-keyed call here or on the owner of its shard (module docstring)."""

    def __init__(
        self,
        shards: ShardController,
        peers: PeerChannels,
        *,
        budget_s: float,
        unbounded_call_s: float,
    ) -> None:
        """``budget_s``: how long a call may wait for its shard to find an owner;
        ``unbounded_call_s``: the deadline of a forwarded call whose caller set none
        (a long poll's own bound plus slack)."""
        self._shards = shards
        self._peers = peers
        self._budget_s = budget_s
        self._unbounded_call_s = unbounded_call_s
        self._refreshing: asyncio.Future[None] | None = None
        self._refreshed_at = float("-inf")
        self._stubs: dict[tuple[str, str], grpc.aio.UnaryUnaryMultiCallable[Any, Any]] = {}
        self._responses: Mapping[str, type[Message]] = {
            m.name: GetMessageClass(m.output_type) for m in _WORKFLOW_SERVICE.methods
        }

    @property
    def node_id(self) -> str:
        return self._shards.node_id

    async def serve(
        self,
        rpc: str,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        local: Callable[[], Awaitable[Resp]],
        open_token: Callable[[Any, bool], Awaitable[state_pb2.TaskToken]],
    ) -> Resp:
        """The answer to a run-keyed call of a client: ``local()`` when this node holds
        the run's shard, else the owner's. A call another node forwarded is served
        here or refused UNAVAILABLE, never forwarded again."""
        namespace, workflow_id = await run_of(rpc, request, open_token)
        metadata = context.invocation_metadata()
        if is_forwarded(metadata):
            if not self._shards.owns(
                RunKey(namespace=namespace, workflow_id=workflow_id, run_id="")
            ):
                # The forwarder's view was stale: name the owner by a fresh read.
                await self.refresh()
                self._shards.check(namespace, workflow_id)
            return await local()
        if rpc in _REQUEST_ID_RPCS and not request.request_id:
            # Fixed before the first attempt, so that every retry acts once.
            request.request_id = str(uuid.uuid4())
        return await self.call(
            namespace,
            workflow_id,
            lambda: local(),
            lambda owner: self._forward(owner, rpc, request, context, metadata),
            context.time_remaining(),
        )

    async def call(
        self,
        namespace: str,
        workflow_id: str,
        local: Callable[[], Awaitable[Resp]],
        remote: Callable[[Peer], Awaitable[Resp]],
        time_remaining: float | None,
    ) -> Resp:
        """``local()`` while this node holds the shard of ``workflow_id``, else
        ``remote(owner)``; a routing race (``_Reroute``, a shard lost during a local
        attempt) is retried with backoff until ``time_remaining`` (or the budget) runs
        out, then UNAVAILABLE."""
        loop = asyncio.get_running_loop()
        budget = self._budget_s
        if time_remaining is not None:
            budget = min(budget, time_remaining - _DEADLINE_MARGIN_S)
        give_up = loop.time() + budget
        shard = self._shards.shard_of(
            RunKey(namespace=namespace, workflow_id=workflow_id, run_id="")
        )
        delay = _FIRST_BACKOFF_S
        while True:
            owner = self._shards.owner(shard)
            try:
                if owner is None:
                    raise _Reroute(f"shard {shard} is moving between nodes (no owner yet)")
                if owner.node_id == self._shards.node_id:
                    return await local()
                return await remote(owner)
            except (_Reroute, ShardNotOwnedError, ShardOwnershipLostError) as exc:
                why = str(exc)
            if loop.time() + delay > give_up:
                raise UnavailableError(
                    f"workflow {workflow_id!r} (shard {shard}) has no reachable owner: {why}; retry"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_BACKOFF_S)
            await self.refresh()

    async def refresh(self) -> None:
        """Read the shard rows and members again, once for all calls that race."""
        loop = asyncio.get_running_loop()
        if self._refreshing is None or self._refreshing.done():
            if loop.time() - self._refreshed_at < _MIN_REFRESH_INTERVAL_S:
                return
            self._refreshed_at = loop.time()
            self._refreshing = asyncio.ensure_future(self._shards.refresh())
        with contextlib.suppress(StoreError):
            # Shielded: a caller that goes away does not cancel the others' refresh.
            await asyncio.shield(self._refreshing)

    async def _forward(
        self,
        owner: Peer,
        rpc: str,
        request: Message,
        context: grpc.aio.ServicerContext[Any, Any],
        metadata: Any,
    ) -> Any:
        remaining = context.time_remaining()
        timeout = self._unbounded_call_s if remaining is None else remaining - _DEADLINE_MARGIN_S
        try:
            answer = await self.invoke(
                owner,
                f"/{_WORKFLOW_SERVICE.full_name}/{rpc}",
                request,
                self._responses[rpc],
                timeout=timeout,
                metadata=forwarding_metadata(metadata, self._shards.node_id),
            )
        except RemoteStatusError:
            note_forwarded(owner.node_id)  # the owner served it and wrote its audit line
            raise
        note_forwarded(owner.node_id)
        return answer

    async def invoke(
        self,
        owner: Peer,
        path: str,
        request: Message,
        response_type: type[Message],
        *,
        timeout: float,
        metadata: tuple[tuple[str, str], ...],
    ) -> Any:
        """One unary call on ``owner``: its response, or ``RemoteStatusError`` with its
        status; ``_Reroute`` when it is unreachable or refuses UNAVAILABLE (not the
        owner any more, or going away), or cancelled the call: a node that stops
        gracefully cancels what is still in flight when its grace ends, and the caller's
        own cancellation arrives here as ``CancelledError``, never as this status. Every
        routed call is safe to resend (request ids, task tokens, reads)."""
        stub = self._stubs.get((owner.address, path))
        if stub is None:
            stub = self._peers.channel(owner.address).unary_unary(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=response_type.FromString,
            )
            self._stubs[(owner.address, path)] = stub
        try:
            return await stub(request, timeout=max(timeout, 0.0), metadata=metadata)
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise _Reroute(
                    f"node {owner.node_id} at {owner.address}: {error.details()}"
                ) from None
            details = error.details() or ""
            raise RemoteStatusError(error.code(), details, trailer_of(error)) from None
