"""The task-queue RPCs: polls, queries and their answers, DescribeTaskQueue and
ShutdownWorker, wherever in the cluster the task queue is served.

A request for a task queue served by another node (server/_matching_routes.py) is
forwarded to that node as the caller's own request (its credentials travel with it, and
it is marked forwarded: the receiver serves it or refuses it, never forwards it again).
A poll is forwarded with what is left of its deadline; the queue's owner takes a task
from its backlog and has the run's owner record it started (locally when it owns the
run too: sync match within a node costs no RPC). A poll parked on a node that loses the
queue's shard is answered at once and routed again.

A query goes from the run's owner (which answers QueryWorkflow) to the owner of the
run's workflow task queue, which holds it until a worker answers; the query id in the
query task's token names the holding node before its ``/``, so the answer
(RespondQueryTaskCompleted, at any node) is forwarded there.

TLA+ (tla/History.tla): ``DispatchWorkflowTask`` / ``DispatchActivityTask`` (a poll
taking a backlog row) and ``RecordWorkflowTaskStartedA`` / ``RecordActivityStartedA``
(the start recorded on the run's owner; a stale row is dropped there).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
from google.rpc import status_pb2

from tideflow.api.v1 import common_pb2, errors_pb2, matching_pb2, service_pb2, state_pb2
from tideflow.history import RunKey, StoreError, TaskKind, TaskRow

from ._config import ServerConfig
from ._engine import HistoryEngine
from ._errors import (
    STATUS_DETAILS_KEY,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    QueryFailedError,
    Resource,
    ServiceError,
    UnavailableError,
)
from ._matching import Dispatchable, Matching, QueryTask, QueueMovedError, RemoteTaskRow
from ._matching_routes import DEFER_S, MatchingRoutes
from ._metrics import ServerMetrics
from ._peers import Peer, forwarding_metadata, is_forwarded
from ._placement import WorkerSite
from ._task_tokens import TaskTokenSigner

_Context = grpc.aio.ServicerContext[Any, Any]
R = TypeVar("R")
PollResponse = TypeVar(
    "PollResponse", service_pb2.PollWorkflowTaskResponse, service_pb2.PollActivityTaskResponse
)
# Pause before routing a request again whose queue has no reachable owner (it moves).
_REROUTE_DELAY_S = 0.2
# How long a non-poll task-queue request looks for the queue's owner at most.
_ROUTE_TIMEOUT_S = 10.0
# Trailing metadata of a forwarded poll's answer: the tasks still waiting in the
# queue's backlog on its owner (the forwarding node skips its local partition then).
_BACKLOG_KEY = "x-tideflow-backlog"
_QUEUE_TYPES = {
    service_pb2.TASK_QUEUE_TYPE_UNSPECIFIED: TaskKind.WORKFLOW,
    service_pb2.TASK_QUEUE_TYPE_WORKFLOW: TaskKind.WORKFLOW,
    service_pb2.TASK_QUEUE_TYPE_ACTIVITY: TaskKind.ACTIVITY,
}


class PollLimitError(ServiceError):
    """Too many long polls are parked on this server (``max_concurrent_polls``)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class RelayedError(ServiceError):
    """An error another node answered a forwarded request with: same status, same
    typed detail."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        super().__init__(error.details() or error.code().name)
        self.code = error.code()
        self._detail = errors_pb2.ErrorDetail(kind=errors_pb2.ERROR_KIND_UNSPECIFIED)
        for name, value in error.trailing_metadata() or ():
            if name == STATUS_DETAILS_KEY and isinstance(value, bytes):
                status = status_pb2.Status.FromString(value)
                if status.details:
                    status.details[0].Unpack(self._detail)

    def detail(self) -> errors_pb2.ErrorDetail:
        return self._detail


class _Reroute(Exception):
    """The node a request was routed to does not serve the queue (any more)."""


class TaskQueueService:
    """The task-queue RPCs of one node (the frontend's methods call these)."""

    def __init__(
        self,
        engine: HistoryEngine,
        matching: Matching,
        config: ServerConfig,
        tokens: TaskTokenSigner,
        routes: MatchingRoutes | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        """``routes``: where other nodes serve queues and runs; None: this node serves
        every queue and every run (tools, tests)."""
        self._metrics = metrics
        self._engine = engine
        self._matching = matching
        self._config = config
        self._tokens = tokens
        self._routes = routes
        self._node_id = routes.node_id if routes is not None else ""
        # (namespace, queue, kind) -> tasks its owner (another node) reported waiting
        # in the queue's backlog after the last forwarded poll: while some wait, polls
        # here go to the owner at once instead of parking in the local partition.
        self._owner_backlog: dict[tuple[str, str, TaskKind], int] = {}
        # Queries held here until a worker answers them, by query id.
        self._queries: dict[str, QueryTask] = {}
        self._parked_polls = 0
        # Longest hop of a forwarded long poll (see _at_queue_owner).
        self._hop_s = max(1.0, config.lease_s)
        # Has another site record one of its tasks started by a worker polling here
        # (server/_remote_tasks.py); None: this server is not a site.
        self.remote_start: (
            Callable[
                [RemoteTaskRow, WorkerSite], Awaitable[service_pb2.PollActivityTaskResponse | None]
            ]
            | None
        ) = None

    def memory_held(self) -> dict[str, int]:
        return {"polls_parked": self._parked_polls, "polls_queries_held": len(self._queries)}

    # ------------------------------------------------------------------ polls

    def poll_timeout(self, context: _Context) -> float:
        remaining = context.time_remaining()
        timeout = self._config.long_poll_timeout_s
        if remaining is not None:
            # Answer (empty) a little before the caller's deadline rather than after it.
            timeout = min(timeout, max(0.0, remaining - 0.5))
        return timeout

    async def poll_workflow_task(
        self, request: service_pb2.PollWorkflowTaskRequest, context: _Context
    ) -> service_pb2.PollWorkflowTaskResponse:
        return await self._poll(
            request, context, TaskKind.WORKFLOW, service_pb2.PollWorkflowTaskResponse
        )

    async def poll_activity_task(
        self, request: service_pb2.PollActivityTaskRequest, context: _Context
    ) -> service_pb2.PollActivityTaskResponse:
        return await self._poll(
            request, context, TaskKind.ACTIVITY, service_pb2.PollActivityTaskResponse
        )

    async def _poll(
        self, request: Any, context: _Context, kind: TaskKind, empty: type[PollResponse]
    ) -> PollResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.poll_timeout(context)
        rpc = "PollWorkflowTask" if kind == TaskKind.WORKFLOW else "PollActivityTask"

        async def here() -> PollResponse:
            return await self._poll_here(request, kind, deadline, empty, context)

        async def local(timeout: float) -> PollResponse | None:
            return cast(PollResponse | None, await self._poll_local(request, kind, timeout))

        try:
            return await self._at_queue_owner(
                request,
                request.namespace,
                request.task_queue.name,
                kind,
                context,
                deadline,
                here,
                rpc,
                local,
            )
        except TimeoutError:
            return empty()

    def worker_site(
        self, identity: str, advertised: common_pb2.WorkerPlacement | None
    ) -> WorkerSite:
        """Who polls: what the worker advertised, completed with this site's defaults."""
        return self._matching.policy.worker(identity, advertised)

    def _poller_site(self, request: Any, kind: TaskKind) -> WorkerSite | None:
        if kind != TaskKind.ACTIVITY:
            return None
        advertised = request.worker if request.HasField("worker") else None
        return self.worker_site(request.identity, advertised)

    async def _poll_here(
        self,
        request: Any,
        kind: TaskKind,
        deadline: float,
        empty: type[PollResponse],
        context: _Context,
    ) -> PollResponse:
        loop = asyncio.get_running_loop()
        worker = self._poller_site(request, kind)
        queue = request.task_queue.name
        response: Any = empty()
        while (remaining := deadline - loop.time()) > 0:
            task = await self._parked_poll(
                request.namespace, queue, kind, remaining, request.identity, worker
            )
            if task is None:
                break
            if isinstance(task, QueryTask):
                answer: Any = await self._query_task(task)
            else:
                answer = await self._start(task, request.identity, worker)
                if answer is not None and self._metrics is not None:
                    self._metrics.task_started(kind, answer)
            if answer is not None:
                if answer.task_token:
                    answer.task_token = await self._tokens.seal(answer.task_token)
                response = answer
                break
        if is_forwarded(context.invocation_metadata()):
            # What still waits here: the forwarding node skips its local partition
            # while the backlog has tasks, so they are not left to this node's pollers.
            waiting = self._matching.backlog_size(request.namespace, queue, kind)
            context.set_trailing_metadata(((_BACKLOG_KEY, str(waiting)),))
        return response  # type: ignore[no-any-return]

    async def _poll_local(
        self, request: Any, kind: TaskKind, timeout: float
    ) -> service_pb2.PollWorkflowTaskResponse | service_pb2.PollActivityTaskResponse | None:
        """A poll for a queue another node serves, parked in this node's local
        partition of the queue for up to ``timeout``: a task this node committed for
        the queue meanwhile, started here (this node owns its run); None if none came."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        worker = self._poller_site(request, kind)
        while (remaining := deadline - loop.time()) > 0:
            task = await self._parked_poll(
                request.namespace,
                request.task_queue.name,
                kind,
                remaining,
                request.identity,
                worker,
                local=True,
            )
            if task is None:
                return None
            assert isinstance(task, TaskRow)  # local partitions hold no queries
            response = await self._start_local(task, request.identity, worker)
            if response is not None:
                if self._metrics is not None:
                    self._metrics.task_started(kind, response)
                response.task_token = await self._tokens.seal(response.task_token)
                return response
        return None

    async def _start_local(
        self, task: TaskRow, identity: str, worker: WorkerSite | None
    ) -> service_pb2.PollWorkflowTaskResponse | service_pb2.PollActivityTaskResponse | None:
        """Record a locally dispatched task started in this node's store (tla/History.tla
        ``RecordWorkflowTaskStartedA`` / ``RecordActivityStartedA``, as on the queue's
        owner); None if it is stale. A task not started (the run moved, the store
        failed, the poller went away) is routed on, never left here."""
        assert self._routes is not None
        if not self._routes.owns_run(task.key):
            # This node lost the run's shard since: its new owner hands the row over
            # from the store (routing it again here would only bounce it between polls).
            return None
        try:
            return await self._record_started(task, identity, worker)
        except (StoreError, ServiceError, asyncio.CancelledError):
            # As in _start: a start that did commit finds the routed row stale.
            self._matching.local_fallback([task])
            raise

    async def _record_started(
        self, task: TaskRow, identity: str, worker: WorkerSite | None
    ) -> service_pb2.PollWorkflowTaskResponse | service_pb2.PollActivityTaskResponse | None:
        """The task recorded started by this node's engine (it owns the run)."""
        if task.kind == TaskKind.WORKFLOW:
            return await self._engine.record_workflow_task_started(task, identity)
        return await self._engine.record_activity_started(
            task, worker or self.worker_site(identity, None)
        )

    async def _parked_poll(
        self,
        namespace: str,
        task_queue: str,
        kind: TaskKind,
        timeout: float,
        identity: str,
        worker: WorkerSite | None,
        *,
        local: bool = False,
    ) -> Dispatchable | None:
        """``Matching.poll`` (``poll_local`` if ``local``) within
        ``max_concurrent_polls``: past it, a clear RESOURCE_EXHAUSTED (clients retry it
        with backoff) rather than an unbounded pile."""
        if self._parked_polls >= self._config.max_concurrent_polls:
            raise PollLimitError(
                f"{self._parked_polls} long polls are waiting on this server, its limit "
                f"(max_concurrent_polls); retry with backoff"
            )
        self._parked_polls += 1
        try:
            if local:
                return await self._matching.poll_local(namespace, task_queue, kind, timeout, worker)
            return await self._matching.poll(
                namespace, task_queue, kind, timeout, identity=identity, worker=worker
            )
        finally:
            self._parked_polls -= 1

    async def _query_task(self, task: QueryTask) -> service_pb2.PollWorkflowTaskResponse | None:
        """The poll response of a query task, or None if it cannot be built (the query's
        caller gets the error)."""
        if task.prepared is not None:
            response = service_pb2.PollWorkflowTaskResponse()
            response.CopyFrom(task.prepared)
            return response
        try:
            return await self._engine.query_task(task.key, task.query_id, task.query)
        except ServiceError as exc:
            if not task.result.done():
                task.result.set_exception(exc)
            return None

    async def _start(
        self, task: TaskRow, identity: str, worker: WorkerSite | None
    ) -> service_pb2.PollWorkflowTaskResponse | service_pb2.PollActivityTaskResponse | None:
        """Record a polled task started on the run's owner; None if the task is stale
        or waits (its run's owner cannot be reached now: handed out again later). A
        task another site offered is recorded started by that site, its home."""
        if isinstance(task, RemoteTaskRow):
            if self.remote_start is None or worker is None:
                return None
            return await self.remote_start(task, worker)
        if self._routes is not None and not self._routes.owns_run(task.key):
            advertised = worker.to_proto() if worker is not None else None
            try:
                started = await self._routes.record_started(task, identity, advertised)
            except BaseException:
                # Not delivered (see below).
                self._matching.give_back(task)
                raise
            if started is None:
                self._matching.defer(task, DEFER_S)
                return None
            return started.response
        try:
            return await self._record_started(task, identity, worker)
        except (StoreError, ServiceError, asyncio.CancelledError):
            # Not delivered. A poller that goes away (worker shutdown) cancels this
            # handler; the task must not vanish with it, or nothing would dispatch it
            # again until a server restart. If the start did commit before the
            # cancellation, the engine finds the given-back task stale and drops it.
            self._matching.give_back(task)
            raise

    # ---------------------------------------------------------------- routing

    async def _at_queue_owner(
        self,
        request: Any,
        namespace: str,
        task_queue: str,
        kind: TaskKind,
        context: _Context,
        deadline: float,
        here: Callable[[], Awaitable[R]],
        rpc: str,
        local: Callable[[float], Awaitable[R | None]] | None = None,
    ) -> R:
        """``here()`` if this node serves the queue, else the request forwarded to the
        node that does, routed again while the queue moves; TimeoutError past
        ``deadline`` (the loop's clock). A poll (``local``) waits in this node's local
        partition of the queue first, then is forwarded for as long (the owner's
        backlog), in turns, unless the owner reported a backlog last time."""
        loop = asyncio.get_running_loop()
        forwarded = is_forwarded(context.invocation_metadata())
        qid = (namespace, task_queue, kind)
        turn = self._config.local_poll_s
        if turn <= 0:
            local = None  # local dispatch off: forwarded at once
        local_turn = local is not None
        while (remaining := deadline - loop.time()) > 0:
            routes = self._routes
            owner = (
                Peer("", "") if routes is None else routes.queue_owner(namespace, task_queue, kind)
            )
            if owner is not None and (routes is None or routes.is_here(owner)):
                try:
                    return await here()
                except QueueMovedError:
                    if forwarded:
                        raise
                    continue
            if forwarded:
                # Never forwarded twice: the first node routes the request again.
                raise QueueMovedError(f"node {self._node_id} does not serve {task_queue!r}")
            assert routes is not None
            if (
                owner is not None
                and local_turn
                and not self._owner_backlog.get(qid)
                and self._matching.wants_local(*qid)
            ):
                assert local is not None
                local_turn = False
                answer = await local(min(remaining, turn))
                if answer is not None:
                    return answer
                if (remaining := deadline - loop.time()) <= 0:
                    break
                continue  # the turn ended: the owner is asked next (its backlog)
            if owner is not None:
                # A long poll is forwarded for at most a lease at a time: a node that
                # hangs (paused, not dead) holds the poll only that long, and a queue that
                # moved meanwhile is found by the next hop.
                hop = min(remaining, self._hop_s) if rpc.startswith("Poll") else remaining
                if local is not None and self._matching.wants_local(*qid):
                    # Back to the local partition after a turn at the owner.
                    hop = min(hop, turn)
                    local_turn = True
                try:
                    response = await self._forward(
                        owner, rpc, request, context, hop, qid if local is not None else None
                    )
                except _Reroute:
                    pass
                except TimeoutError:
                    if hop >= remaining:
                        raise
                else:
                    if hop >= remaining or bool(getattr(response, "task_token", None)):
                        return cast(R, response)
                    continue  # an empty answer to a shortened hop: ask again
            await routes.refresh()
            await asyncio.sleep(min(_REROUTE_DELAY_S, max(0.0, deadline - loop.time())))
        raise TimeoutError

    async def _forward(
        self,
        owner: Peer,
        rpc: str,
        request: Any,
        context: _Context,
        timeout: float,
        qid: tuple[str, str, TaskKind] | None = None,
    ) -> Any:
        """``request`` sent to ``owner`` as the caller's own, marked forwarded; for a
        poll (``qid``), the backlog the owner reports is noted (``_owner_backlog``)."""
        assert self._routes is not None
        method = getattr(self._routes.frontend_stub(owner), rpc)
        metadata = forwarding_metadata(context.invocation_metadata(), self._node_id)
        try:
            call = method(request, timeout=timeout, metadata=metadata)
            response = await call
            if qid is not None:
                trailer = dict(await call.trailing_metadata() or ())
                waiting = str(trailer.get(_BACKLOG_KEY, "0"))
                self._owner_backlog[qid] = int(waiting) if waiting.isdigit() else 0
                if not self._owner_backlog[qid]:
                    del self._owner_backlog[qid]
            return response
        except grpc.aio.AioRpcError as exc:
            # UNAVAILABLE: the node does not serve the queue (any more), or is down;
            # CANCELLED: it stopped while the call waited (our own caller going away
            # cancels this coroutine instead). Either way: route the request again.
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise _Reroute from exc
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and rpc.startswith("Poll"):
                raise TimeoutError from exc
            raise RelayedError(exc) from exc

    # ---------------------------------------------------------------- queries

    async def query(
        self, key: RunKey, task_queue: str, query: service_pb2.WorkflowQuery, timeout: float
    ) -> common_pb2.Payloads:
        """Answer a query of a run this node owns: hand it to the node serving the
        run's workflow task queue and wait for a worker's answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (remaining := deadline - loop.time()) > 0:
            routes = self._routes
            owner = (
                None
                if routes is None
                else routes.queue_owner(key.namespace, task_queue, TaskKind.WORKFLOW)
            )
            if routes is None or (owner is not None and routes.is_here(owner)):
                query_id = f"{self._node_id}/{uuid.uuid4()}"
                task = QueryTask(query_id, key, query, loop.create_future())
                return await self._hold_query(task, task_queue, remaining)
            if owner is not None:
                answer = await self._query_at(owner, key, task_queue, query, remaining)
                if answer is not None:
                    return answer
            await routes.refresh()
            await asyncio.sleep(min(_REROUTE_DELAY_S, max(0.0, deadline - loop.time())))
        raise DeadlineExceededError(
            f"no worker answered query {query.query_type!r} within {timeout:.0f} s: is a "
            f"worker polling task queue {task_queue!r}?"
        )

    async def _query_at(
        self,
        owner: Peer,
        key: RunKey,
        task_queue: str,
        query: service_pb2.WorkflowQuery,
        timeout: float,
    ) -> common_pb2.Payloads | None:
        """The query held by ``owner``: its answer, or None if ``owner`` does not serve
        the queue (any more) or cannot be reached."""
        assert self._routes is not None
        query_id = f"{owner.node_id}/{uuid.uuid4()}"
        request = matching_pb2.DispatchQueryRequest(
            namespace=key.namespace,
            task_queue=task_queue,
            query_id=query_id,
            workflow_id=key.workflow_id,
            run_id=key.run_id,
            prepared=await self._engine.query_task(key, query_id, query),
        )
        try:
            answer: matching_pb2.DispatchQueryResponse = await self._routes.matching_stub(
                owner
            ).DispatchQuery(request, timeout=timeout, metadata=await self._routes.node_metadata())
        except grpc.aio.AioRpcError:
            return None  # unreachable, or past the deadline (the caller's loop ends)
        outcome = answer.outcome
        if outcome == matching_pb2.DISPATCH_QUERY_OUTCOME_ANSWERED:
            return answer.result
        if outcome == matching_pb2.DISPATCH_QUERY_OUTCOME_FAILED:
            failure = answer.failure if answer.HasField("failure") else None
            raise QueryFailedError(
                answer.error_message, query_type=query.query_type, failure=failure
            )
        if outcome == matching_pb2.DISPATCH_QUERY_OUTCOME_TIMED_OUT:
            raise DeadlineExceededError(
                f"no worker answered query {query.query_type!r} in time: is a worker "
                f"polling task queue {task_queue!r}?"
            )
        return None

    async def hold_query(
        self, request: matching_pb2.DispatchQueryRequest, timeout: float
    ) -> matching_pb2.DispatchQueryResponse:
        """``DispatchQuery``: hold a query another node (the run's owner) prepared until
        a worker polling the queue here answers it."""
        outcome = matching_pb2.DispatchQueryResponse
        if not self._matching.serves(request.namespace, request.task_queue, TaskKind.WORKFLOW):
            return outcome(outcome=matching_pb2.DISPATCH_QUERY_OUTCOME_NOT_OWNER)
        key = RunKey(
            namespace=request.namespace, workflow_id=request.workflow_id, run_id=request.run_id
        )
        future: asyncio.Future[common_pb2.Payloads] = asyncio.get_running_loop().create_future()
        task = QueryTask(request.query_id, key, request.prepared.query, future, request.prepared)
        try:
            result = await self._hold_query(task, request.task_queue, timeout)
        except DeadlineExceededError:
            return outcome(outcome=matching_pb2.DISPATCH_QUERY_OUTCOME_TIMED_OUT)
        except QueryFailedError as exc:
            failed = outcome(
                outcome=matching_pb2.DISPATCH_QUERY_OUTCOME_FAILED, error_message=exc.message
            )
            if exc.failure is not None:
                failed.failure.CopyFrom(exc.failure)
            return failed
        except UnavailableError:  # the queue moved while the query waited
            return outcome(outcome=matching_pb2.DISPATCH_QUERY_OUTCOME_NOT_OWNER)
        return outcome(outcome=matching_pb2.DISPATCH_QUERY_OUTCOME_ANSWERED, result=result)

    async def _hold_query(
        self, task: QueryTask, task_queue: str, timeout: float
    ) -> common_pb2.Payloads:
        self._queries[task.query_id] = task
        try:
            self._matching.add_query(task.key.namespace, task_queue, task)
            try:
                async with asyncio.timeout(timeout):
                    return await task.result
            except TimeoutError:
                raise DeadlineExceededError(
                    f"no worker answered query {task.query.query_type!r} within "
                    f"{timeout:.0f} s: is a worker polling task queue {task_queue!r}?"
                ) from None
        finally:
            del self._queries[task.query_id]
            if not task.result.done():
                task.result.cancel()

    async def respond_query_task_completed(
        self,
        request: service_pb2.RespondQueryTaskCompletedRequest,
        token: state_pb2.TaskToken,
        context: _Context,
    ) -> service_pb2.RespondQueryTaskCompletedResponse:
        """The worker's answer to a query: to the query held here, or forwarded to the
        node its query id names."""
        holder = token.query_id.rpartition("/")[0]
        routes = self._routes
        if routes is not None and holder and holder != self._node_id:
            peer = routes.peer(holder)
            if peer is not None and not is_forwarded(context.invocation_metadata()):
                try:
                    answered = await self._forward(
                        peer, "RespondQueryTaskCompleted", request, context, _ROUTE_TIMEOUT_S
                    )
                    return cast(service_pb2.RespondQueryTaskCompletedResponse, answered)
                except _Reroute:
                    pass
        query = self._queries.get(token.query_id) if token.query_id else None
        if query is None:
            raise NotFoundError(
                "query not found: it was answered already or its caller gave up",
                resource=Resource.RESOURCE_TYPE_QUERY,
            )
        if not query.result.done():
            if request.completed_type == service_pb2.QUERY_RESULT_TYPE_ANSWERED:
                query.result.set_result(request.query_result)
            else:
                query.result.set_exception(
                    QueryFailedError(
                        f"query failed: {request.error_message or 'no message'}",
                        query_type=query.query.query_type,
                        failure=request.failure if request.HasField("failure") else None,
                    )
                )
        return service_pb2.RespondQueryTaskCompletedResponse()

    # -------------------------------------------------- describe and shutdown

    async def describe_task_queue(
        self, request: service_pb2.DescribeTaskQueueRequest, context: _Context
    ) -> service_pb2.DescribeTaskQueueResponse:
        """The queue's pollers and backlog, as its owner knows them."""
        kind = _QUEUE_TYPES.get(request.task_queue_type)
        if kind is None:
            raise InvalidArgumentError(f"unknown task_queue_type {request.task_queue_type}")
        name = request.task_queue.name

        async def here() -> service_pb2.DescribeTaskQueueResponse:
            response = service_pb2.DescribeTaskQueueResponse(
                backlog_count_hint=self._matching.backlog_size(request.namespace, name, kind)
            )
            for identity, seen_at, polling in self._matching.pollers(request.namespace, name, kind):
                poller = response.pollers.add(identity=identity, polling=polling)
                poller.last_access_time.FromNanoseconds(int(seen_at * 1e9))
            return response

        return await self._routed(request, name, kind, context, here, "DescribeTaskQueue")

    async def shutdown_worker(
        self, request: service_pb2.ShutdownWorkerRequest, context: _Context
    ) -> service_pb2.ShutdownWorkerResponse:
        """Retire the worker's sticky queue on its owner: its waiting tasks go to their
        runs' normal queues now, and so do tasks that reach it later."""
        queue = request.sticky_task_queue

        async def here() -> service_pb2.ShutdownWorkerResponse:
            for task in self._matching.retire(request.namespace, queue):
                await self.unstick(task.key, queue)
            return service_pb2.ShutdownWorkerResponse()

        return await self._routed(
            request, queue, TaskKind.WORKFLOW, context, here, "ShutdownWorker"
        )

    async def _routed(
        self,
        request: Any,
        task_queue: str,
        kind: TaskKind,
        context: _Context,
        here: Callable[[], Awaitable[R]],
        rpc: str,
    ) -> R:
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        deadline = loop.time() + min(_ROUTE_TIMEOUT_S, remaining or _ROUTE_TIMEOUT_S)
        try:
            return await self._at_queue_owner(
                request, request.namespace, task_queue, kind, context, deadline, here, rpc
            )
        except TimeoutError:
            raise UnavailableError(
                f"task queue {task_queue!r} is moving between nodes; retry"
            ) from None

    async def unstick(self, key: RunKey, sticky_queue: str) -> None:
        """Move the run's workflow task off ``sticky_queue`` (its worker left), on the
        run's owner; UnavailableError if that cannot be done now (retried by callers
        that must, else the sticky schedule-to-start timeout moves it)."""
        if self._routes is None or self._routes.owns_run(key):
            await self._engine.unstick(key, sticky_queue)
        elif not await self._routes.unstick(key, sticky_queue):
            raise UnavailableError(f"the owner of run {key} cannot be reached now; retry")
