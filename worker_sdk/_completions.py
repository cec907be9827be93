"""Task completions sent in batches, without a timer.

Each RPC costs the server (and the worker) more in gRPC's own per-call work than the
engine spends on the completion it carries. A completion that finds no call of this
client's completions in flight is sent at once, as its own RPC: an idle worker waits
for nothing. Completions that arrive while a call is in flight wait for it to end and
then go together in one RespondTasksCompleted (at most ``MAX_ITEMS`` a call), whose
server serves each as its own RPC would and answers each in order
(server/_batch_responds.py). Under load the batches grow with the load; when it
falls they shrink back to single RPCs (Nagle's algorithm, the in-flight call as its
clock).

A batch call that fails (the server unreachable past the client's retries) fails each
of its completions with that error, as their own calls would have failed; an item the
server answered with a retryable status is sent again on its own (the client's
retries). A server without the batch RPC (UNIMPLEMENTED) turns batching off.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc

from tideflow.api.v1 import service_pb2

from . import exceptions as exc

if TYPE_CHECKING:
    from .client import Client

# Items of one batch at most (the server takes up to 256), and its bytes at most: a
# batch stays well under gRPC's default 4 MiB message limit.
MAX_ITEMS = 64
MAX_BATCH_BYTES = 2 * 1024 * 1024

# A completion's request type -> (its RPC, its field of RespondTaskItem).
_KIND_OF: dict[type, tuple[str, str]] = {
    service_pb2.RespondWorkflowTaskCompletedRequest: (
        "RespondWorkflowTaskCompleted",
        "workflow_task_completed",
    ),
    service_pb2.RespondActivityTaskCompletedRequest: (
        "RespondActivityTaskCompleted",
        "activity_task_completed",
    ),
    service_pb2.RespondActivityTaskFailedRequest: (
        "RespondActivityTaskFailed",
        "activity_task_failed",
    ),
}
# Statuses the client retries on a single call: such an item is sent again alone.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE.value[0], grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class _SendAlone:
    """A batch's answer for an item to send again as its own call."""


_SEND_ALONE = _SendAlone()


class _Lane:
    """The completions bound for one node (or for the client's current address)."""

    __slots__ = ("in_flight", "queue", "run_owner")

    def __init__(self, run_owner: str) -> None:
        self.run_owner = run_owner  # a run_owner naming the node ("": current address)
        self.in_flight = False
        self.queue: list[tuple[Any, asyncio.Future[Any]]] = []


class CompletionBatcher:
    """One client's completions (module docstring): ``send`` one, get its response.

    A client connected to several nodes sends each completion to the node that owns
    its task's run (``run_owner``, worker_sdk/_failover.py); each node has its own
    lane (in-flight call and queue), so a batch holds one node's completions only."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._lanes: dict[int | None, _Lane] = {}
        self._batches: set[asyncio.Task[None]] = set()
        # False once the server answered UNIMPLEMENTED (a server older than the RPC).
        self.enabled = True

    async def send(self, request: Any, run_owner: str = "") -> Any:
        """The response of the completion ``request`` (a RespondWorkflowTaskCompleted,
        RespondActivityTaskCompleted or RespondActivityTaskFailed request) of a task
        whose run ``run_owner`` owns, or the SDK exception of its status, as
        ``Client.call`` would give."""
        node = self._client.node_of(run_owner)
        lane = self._lanes.get(node)
        if lane is None:
            lane = self._lanes[node] = _Lane(run_owner if node is not None else "")
        if lane.in_flight and self.enabled:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            lane.queue.append((request, future))
            answer = await future
            if answer is not _SEND_ALONE:
                return answer
            return await self.send_alone(request, run_owner)
        lane.in_flight = True
        try:
            return await self.send_alone(request, run_owner)
        finally:
            self._next_batch(lane)

    async def send_alone(self, request: Any, run_owner: str = "") -> Any:
        """``request`` as its own RPC, never batched."""
        client = self._client
        service = client.service_for(run_owner)
        return await client.call(getattr(service, _KIND_OF[type(request)][0]), request)

    def _next_batch(self, lane: _Lane) -> None:
        """Send what queued up while the lane's last call was in flight, or go idle."""
        batch: list[tuple[Any, asyncio.Future[Any]]] = []
        size = 0
        while lane.queue and len(batch) < MAX_ITEMS:
            request, future = lane.queue[0]
            if future.done():  # its sender was cancelled: it is not sent
                lane.queue.pop(0)
                continue
            size += request.ByteSize()
            if batch and size > MAX_BATCH_BYTES:
                break
            batch.append(lane.queue.pop(0))
        if not batch:
            lane.in_flight = False
            return
        task = asyncio.get_running_loop().create_task(self._send_batch(lane, batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _send_batch(self, lane: _Lane, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            if len(batch) == 1:  # sent here, so the next ones still wait for it
                ((alone, future),) = batch
                _resolve(future, await self.send_alone(alone, lane.run_owner))
                return
            if not self.enabled:
                for _, future in batch:
                    _resolve(future, _SEND_ALONE)
                return
            request = service_pb2.RespondTasksCompletedRequest(namespace=self._client.namespace)
            for item, _ in batch:
                getattr(request.items.add(), _KIND_OF[type(item)][1]).CopyFrom(item)
            client = self._client
            service = client.service_for(lane.run_owner)
            try:
                response = await client.call(service.RespondTasksCompleted, request)
            except exc.RPCError as error:
                if error.status == grpc.StatusCode.UNIMPLEMENTED.name:
                    self.enabled = False
                    for _, future in batch:
                        _resolve(future, _SEND_ALONE)
                    return
                raise
            for (item, future), result in zip(batch, response.results, strict=True):
                _resolve(future, _answer(item, result))
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as error:
            for _, future in batch:
                _resolve(future, error)
        finally:
            self._next_batch(lane)


def _resolve(future: asyncio.Future[Any], answer: Any) -> None:
    if future.done():
        return
    if isinstance(answer, BaseException):
        future.set_exception(answer)
    else:
        future.set_result(answer)


def _answer(request: Any, result: service_pb2.RespondTaskResult) -> Any:
    """The response to the item ``request``, the exception its own call would have
    raised, or ``_SEND_ALONE`` for a status its own call would have retried."""
    if result.status_code == 0:
        return getattr(result, _KIND_OF[type(request)][1])
    if result.status_code in _RETRYABLE:
        return _SEND_ALONE
    trailer = ((_STATUS_DETAILS_KEY, result.status_details),) if result.status_details else ()
    return exc.rpc_error_from_status(
        result.status_message or _CODE_NAMES.get(result.status_code, "UNKNOWN"),
        status=_CODE_NAMES.get(result.status_code, "UNKNOWN"),
        detail=exc.error_detail(trailer),
    )
