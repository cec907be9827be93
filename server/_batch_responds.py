"""RespondTasksCompleted: several task completions in one call.

Most of a completion's server CPU is gRPC's own per-call cost, not the engine's work:
a worker that sends the completions piling up behind its previous call in one batch
(worker_sdk/_completions.py) pays it once for all of them. Each item is served by the
frontend handler of the RPC it stands for, through the same ``_rpc`` boundary
(bounds, task token, authorization on the token's namespace, routing to the run's
node, audit, error translation), under an ``ItemContext`` whose ``abort`` ends the
item, not the call. The items are served concurrently, so the engine's group commit
takes their transitions into the same store transactions, and each result is what
its own RPC would have answered: the response, or the status it would have ended
with (one bad item never fails the others).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any, NoReturn

import grpc

from tideflow.api.v1 import service_pb2

from ._auth import AuthGate, Principal
from ._errors import InvalidArgumentError

# A batch is served in one call: its size is bounded like a repeated field's.
MAX_ITEMS = 256
# The request fields a batch leaves to its items: each item's own RPC checks it.
ITEMS_FIELD = "items"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
# The RPC each kind of item (a field of RespondTaskItem's oneof) stands for.
RPC_OF_ITEM = {
    "workflow_task_completed": "RespondWorkflowTaskCompleted",
    "activity_task_completed": "RespondActivityTaskCompleted",
    "activity_task_failed": "RespondActivityTaskFailed",
}

# The principal that made the call being served: the batch hands it to its items, so a
# batch of N authenticates once, not N + 1 times (an API key is a store look-up).
_caller: ContextVar[Principal | None] = ContextVar("tideflow_batch_caller", default=None)

Handler = Callable[[Any, Any], Awaitable[Any]]


class ItemAborted(grpc.aio.AbortError):
    """The status one item of a batch ended with (raised by ``ItemContext.abort``)."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailing_metadata: Sequence[tuple[str, Any]]
    ) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing_metadata = tuple(trailing_metadata)


class ItemContext:
    """The servicer context of one item: the batch call's metadata, peer, credentials
    and deadline, its caller already authenticated; ``abort`` ends only the item.

    All of them are read from the call once, when the batch begins: an item may finish
    (its transition was committed, and it writes its audit line) after the batch call
    was cancelled, and asking gRPC for a cancelled call's peer reads freed memory (the
    server died of a SIGSEGV in ``peer()`` under test_chaos)."""

    __slots__ = ("_auth_context", "_deadline", "_metadata", "_peer", "principal")

    def __init__(self, call: grpc.aio.ServicerContext[Any, Any], principal: Principal | None):
        self._metadata = call.invocation_metadata()
        self._peer = call.peer()
        self._auth_context = call.auth_context()
        remaining = call.time_remaining()
        self._deadline = None if remaining is None else time.monotonic() + remaining
        self.principal = principal

    def invocation_metadata(self) -> Any:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> Any:
        return self._auth_context

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, Any]] = (),
    ) -> NoReturn:
        raise ItemAborted(code, details, trailing_metadata)


async def authenticated(gate: AuthGate, context: Any) -> Principal:
    """The caller of a call (a batch's item: the batch's caller), authenticated."""
    if isinstance(context, ItemContext) and context.principal is not None:
        return context.principal
    principal = await gate.authenticate(context.invocation_metadata())
    _caller.set(principal)
    return principal


class TaskBatches:
    """Serves RespondTasksCompleted with the frontend's own handlers of its items."""

    def __init__(self, service: object) -> None:
        """``service``: the frontend, whose ``_rpc``-wrapped handler of each item's RPC
        serves the item."""
        self._handlers: dict[str, Handler] = {
            kind: getattr(service, rpc) for kind, rpc in RPC_OF_ITEM.items()
        }

    async def serve(
        self,
        request: service_pb2.RespondTasksCompletedRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> service_pb2.RespondTasksCompletedResponse:
        items = request.items
        if len(items) > MAX_ITEMS:
            raise InvalidArgumentError(f"items has more than {MAX_ITEMS} items")
        item_context = ItemContext(context, _caller.get())
        if len(items) == 1:
            results = [await self._one(items[0], item_context)]
        else:
            # Concurrently: the group commit puts their transitions in one transaction.
            results = await asyncio.gather(*(self._one(item, item_context) for item in items))
        response = service_pb2.RespondTasksCompletedResponse()
        response.results.extend(results)
        return response

    async def _one(
        self, item: service_pb2.RespondTaskItem, context: ItemContext
    ) -> service_pb2.RespondTaskResult:
        result = service_pb2.RespondTaskResult()
        kind = item.WhichOneof("item")
        if kind is None:
            result.status_code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            result.status_message = "the item names no completion"
            return result
        try:
            response = await self._handlers[kind](getattr(item, kind), context)
        except ItemAborted as aborted:
            result.status_code = aborted.code.value[0]
            result.status_message = aborted.details
            for key, value in aborted.trailing_metadata:
                if key == _STATUS_DETAILS_KEY:
                    result.status_details = value
            return result
        answer = getattr(result, kind)
        answer.SetInParent()  # an empty response (a failed activity's) is an answer too
        answer.CopyFrom(response)
        return result
