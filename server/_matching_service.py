"""The MatchingService: what the nodes of a cluster ask each other for matching
(proto/tideflow/api/v1/matching.proto; server/_matching_routes.py makes the calls).

Every call must carry the node credential (``require_node``), whatever the auth mode:
AddTasks or RecordTaskStarted from a client would let it mint task tokens.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from tideflow.api.v1 import matching_pb2, matching_pb2_grpc
from tideflow.history import RunKey, StoreError, TaskKind, TaskRow

from ._engine import HistoryEngine
from ._errors import ServiceError, UnavailableError, abort_with_detail
from ._matching_routes import MatchingRoutes, task_row
from ._peers import NodeCredential, require_node
from ._polls import TaskQueueService
from ._shards import ShardNotOwnedError

log = logging.getLogger("tideflow.server.matching")

_Context = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")

_STARTED = matching_pb2.RECORD_TASK_STARTED_OUTCOME_STARTED
_STALE = matching_pb2.RECORD_TASK_STARTED_OUTCOME_STALE
_NOT_OWNER = matching_pb2.RECORD_TASK_STARTED_OUTCOME_NOT_OWNER


def _internal(
    method: Callable[[Any, Req, _Context], Awaitable[Resp]],
) -> Callable[[Any, Req, _Context], Awaitable[Resp]]:
    """Refuse callers without the node credential; errors become statuses."""

    @functools.wraps(method)
    async def wrapper(self: MatchingServicer, request: Req, context: _Context) -> Resp:
        try:
            await require_node(self._credential, context.invocation_metadata())
            return await method(self, request, context)
        except ServiceError as exc:
            await abort_with_detail(context, exc)
        except StoreError as exc:
            await abort_with_detail(context, UnavailableError(f"history store unavailable: {exc}"))
        except Exception:
            log.exception("%s failed", method.__name__)
            await abort_with_detail(context, ServiceError(f"internal error in {method.__name__}"))
        raise AssertionError("unreachable")  # abort() always raises

    return wrapper


class MatchingServicer(matching_pb2_grpc.MatchingServiceServicer):
    def __init__(
        self,
        routes: MatchingRoutes,
        credential: NodeCredential,
        accept: Callable[[list[TaskRow]], None],
        engine: HistoryEngine,
        polls: TaskQueueService,
    ) -> None:
        """``accept`` takes task rows of queues this node serves (``_Dispatch.accept``)."""
        self._routes = routes
        self._credential = credential
        self._accept = accept
        self._engine = engine
        self._polls = polls

    @_internal
    async def AddTasks(
        self, request: matching_pb2.AddTasksRequest, context: _Context
    ) -> matching_pb2.AddTasksResponse:
        """Rows of queues served here, from the node that committed them; the rows of
        queues not served here (any more) are refused, for the sender to route again."""
        response = matching_pb2.AddTasksResponse()
        accepted = []
        for message in request.tasks:
            task = task_row(message)
            if self._routes.serves(task.key.namespace, task.task_queue, task.kind):
                accepted.append(task)
            else:
                response.refused_task_keys.append(task.task_key)
        self._accept(accepted)
        return response

    @_internal
    async def RecordTaskStarted(
        self, request: matching_pb2.RecordTaskStartedRequest, context: _Context
    ) -> matching_pb2.RecordTaskStartedResponse:
        """Record a task the queue's owner polled started, on this node (the run's
        owner): tla/History.tla ``RecordWorkflowTaskStartedA`` / ``RecordActivityStartedA``."""
        task = task_row(request.task)
        response = matching_pb2.RecordTaskStartedResponse(outcome=_NOT_OWNER)
        if not self._routes.owns_run(task.key):
            return response
        try:
            if task.kind == TaskKind.WORKFLOW:
                workflow_task = await self._engine.record_workflow_task_started(
                    task, request.identity
                )
                if workflow_task is not None:
                    response.workflow_task.CopyFrom(workflow_task)
                started = workflow_task is not None
            else:
                worker = self._polls.worker_site(request.identity, request.worker)
                activity_task = await self._engine.record_activity_started(task, worker)
                if activity_task is not None:
                    response.activity_task.CopyFrom(activity_task)
                started = activity_task is not None
        except ShardNotOwnedError:
            return response
        response.outcome = _STARTED if started else _STALE
        return response

    @_internal
    async def DispatchQuery(
        self, request: matching_pb2.DispatchQueryRequest, context: _Context
    ) -> matching_pb2.DispatchQueryResponse:
        return await self._polls.hold_query(request, self._polls.poll_timeout(context))

    @_internal
    async def Unstick(
        self, request: matching_pb2.UnstickRequest, context: _Context
    ) -> matching_pb2.UnstickResponse:
        key = RunKey(
            namespace=request.namespace, workflow_id=request.workflow_id, run_id=request.run_id
        )
        if not self._routes.owns_run(key):
            return matching_pb2.UnstickResponse(not_owner=True)
        try:
            await self._engine.unstick(key, request.sticky_task_queue)
        except ShardNotOwnedError:
            return matching_pb2.UnstickResponse(not_owner=True)
        return matching_pb2.UnstickResponse()
