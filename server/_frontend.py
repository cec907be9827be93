"""The frontend: the gRPC WorkflowService.

It validates requests (namespace, ids, payload sizes, task tokens) before anything
reaches the engine, and it is the one place where errors become gRPC statuses: a
``ServiceError`` keeps its code and message, a store error becomes UNAVAILABLE, and
anything unexpected is logged and reported as INTERNAL without details leaking. Each
status carries a typed ``ErrorDetail`` (``errors.proto``) in the standard
``grpc-status-details-bin`` trailer, which the client maps to its exception classes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

import tideflow
from tideflow.api.v1 import common_pb2, replication_pb2, service_pb2, service_pb2_grpc, state_pb2
from tideflow.api.v1.history_pb2 import WorkflowTaskFailedCause
from tideflow.history import (
    CLOSE_EVENTS,
    HistoryStore,
    InvalidValueError,
    RetryableStoreError,
    StoreError,
    TaskKind,
    home_of,
)

from ._audit import begin as begin_audit
from ._audit import note_principal, note_token
from ._auth import NAMESPACE_FREE_RPCS, TOKEN_RPCS, AuthGate
from ._batch_responds import ITEMS_FIELD, TaskBatches, authenticated
from ._cluster_info import describe_cluster
from ._config import ServerConfig
from ._engine import HistoryEngine, decode_token
from ._errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NamespaceNotFoundError,
    NotHomeError,
    Resource,
    ServiceError,
    UnavailableError,
    abort_with_detail,
)
from ._failures import RateLimitedLog
from ._history_pages import is_task_token
from ._matching import Matching
from ._metadata_sync import MetadataSync
from ._metrics import ServerMetrics
from ._polls import TaskQueueService
from ._remote_tasks import ActivityAnswer
from ._routing import ROUTED_RPCS, Router
from ._run_views import describe_response
from ._schedules import Scheduler, require_scheduler
from ._sites import Sites
from ._task_tokens import TaskTokenSigner
from ._validation import RequestValidator, TooLargeError, check_retry_policy
from ._visibility import (
    check_search_attributes,
    decode_page_token,
    encode_page_token,
    execution_info,
    parse_query,
)

log = logging.getLogger("tideflow.server.frontend")

_Context = grpc.aio.ServicerContext[Any, Any]

Req = TypeVar("Req")
Resp = TypeVar("Resp")
ResponseWithToken = TypeVar(
    "ResponseWithToken", service_pb2.PollWorkflowTaskResponse, service_pb2.PollActivityTaskResponse
)
_DEFAULT_PAGE_SIZE = 1000
# Events per GetHistory page at most (pages are bounded in bytes as well).
_MAX_HISTORY_PAGE_SIZE = 10_000
# Event ids are int64 in the store.
_MAX_EVENT_ID = 2**63
_DEFAULT_STICKY_TIMEOUT_S = 5
_OUTAGE_LOG_INTERVAL_S = 10.0
_NONE: frozenset[str] = frozenset()
# Request fields an RPC checks itself: a workflow task's commands out of bounds fail the
# task (recorded in history) instead of the request.
_CHECKED_BY_HANDLER = {
    "RespondWorkflowTaskCompleted": frozenset({"commands"}),
    "RespondTasksCompleted": frozenset({ITEMS_FIELD}),  # each item is checked as its RPC
}
# "-" + an RFC 3339 time with microseconds, as schedules suffix their runs' ids.
_SCHEDULE_SUFFIX_LENGTH = 32


def _rpc(
    method: Callable[[Any, Req, _Context], Awaitable[Resp]],
) -> Callable[[Any, Req, _Context], Awaitable[Resp]]:
    """Authenticate the caller, check the request's bounds (RequestValidator) before
    anything else reads it, authorize the call on its namespace (server/_auth.py), and
    translate errors into statuses at this one boundary. Every RPC goes through here,
    so no handler can forget the bounds or the grants, and every mutating one writes
    its audit line (server/_audit.py) whatever its outcome. A call about one run is
    served where the run's shard is held (server/_routing.py)."""

    name = method.__name__
    skip = _CHECKED_BY_HANDLER.get(name, _NONE)
    routed = name in ROUTED_RPCS

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: _Context) -> Resp:
        audit = begin_audit(name, request, context)

        def audited(outcome: grpc.StatusCode, response: Any = None) -> None:
            # Written before the status is sent: once a caller sees the outcome, the
            # line is in the log.
            if audit is not None:
                audit.done(outcome.name, response)

        try:
            gate: AuthGate | None = self._auth
            if gate is not None:
                principal = await authenticated(gate, context)
                note_principal(principal.name)
            self._validator.check(request, skip=skip)
            if gate is not None:
                namespace = await self._namespace_of(name, request)
                gate.authorize(principal, name, namespace)
            if self._router is not None and routed:
                local = functools.partial(method, self, request, context)
                response: Resp = await self._router.serve(
                    name, request, context, local, self._open_token
                )
            else:
                response = await method(self, request, context)
            audited(grpc.StatusCode.OK, response)
            return response
        except ServiceError as exc:
            audited(exc.code)
            await abort_with_detail(context, exc)
        except InvalidValueError as exc:
            # The database refused a value of this request (and of no other).
            audited(grpc.StatusCode.INVALID_ARGUMENT)
            await abort_with_detail(context, InvalidArgumentError(str(exc)))
        except (RetryableStoreError, StoreError) as exc:
            audited(grpc.StatusCode.UNAVAILABLE)
            self._outage_log.warning("%s: store unavailable: %s", method.__name__, exc)
            await abort_with_detail(context, UnavailableError(f"history store unavailable: {exc}"))
        except asyncio.CancelledError:
            audited(grpc.StatusCode.CANCELLED)
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            audited(grpc.StatusCode.INTERNAL)
            log.exception("%s failed", method.__name__)
            await abort_with_detail(context, ServiceError(f"internal error in {method.__name__}"))
        raise AssertionError("unreachable")  # abort() always raises

    return wrapper


class WorkflowService(service_pb2_grpc.WorkflowServiceServicer):
    def __init__(
        self,
        store: HistoryStore,
        engine: HistoryEngine,
        matching: Matching,
        config: ServerConfig,
        *,
        scheduler: Scheduler | None = None,
        log_clock: Callable[[], float] = time.monotonic,
        tokens: TaskTokenSigner | None = None,
        auth: AuthGate | None = None,
        polls: TaskQueueService | None = None,
        router: Router | None = None,
        sites: Sites | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        """``log_clock`` paces the log of store failures (monotonic seconds); ``auth``
        authenticates and authorizes every call (None: auth is off); ``polls`` serves
        the task-queue RPCs (None: this node serves every queue and run); ``router``
        sends run-keyed calls to the owner of the run's shard (None: all served here)."""
        self._store = store
        self._auth = auth
        self._router = router
        # Runs homed at other sites (server/_sites.py); None: every run is homed here.
        self._sites = sites

        self._metrics = metrics
        # Seals every task token handed out and opens every one received
        # (server/_task_tokens.py): clients cannot forge them.
        self._tokens = tokens or TaskTokenSigner(
            store.token_keys, refresh_s=config.token_key_refresh_s
        )
        self._engine = engine
        self._matching = matching
        self._config = config
        # Serves the schedule RPCs (server/_schedules.py); None: UNAVAILABLE.
        self.scheduler = scheduler
        # Records namespaces and schedules in the shared metadata (None: not kept).
        self.metadata: MetadataSync | None = None
        self._namespaces: set[str] = set()
        # Polls, queries, DescribeTaskQueue, ShutdownWorker (server/_polls.py).
        self._polls = polls or TaskQueueService(engine, matching, config, self._tokens)
        self._validator = RequestValidator(config)
        # During an outage every request fails alike: one line per interval, not each.
        self._outage_log = RateLimitedLog(log, _OUTAGE_LOG_INTERVAL_S, now_s=log_clock)
        self._pager = engine.pager  # its continuation tokens are sealed (_history_pages)
        self._batches = TaskBatches(self)  # RespondTasksCompleted, by the handlers here

    # ------------------------------------------------------------ validation

    async def _check_namespace(self, namespace: str) -> None:
        if not namespace:
            raise InvalidArgumentError("namespace is empty")
        if namespace in self._namespaces:
            return
        if not await self._store.namespace_exists(namespace):
            raise NamespaceNotFoundError(f"namespace not found: {namespace!r}", namespace=namespace)
        self._namespaces.add(namespace)

    async def _open_token(self, request: Any, activity: bool) -> state_pb2.TaskToken:
        """The task token of ``request``, after its signature is checked: nothing reads
        a token's fields before that. A request that names a namespace must name the
        token's."""
        body = await self._tokens.open(request.task_token)
        token = decode_token(body, activity=activity)
        note_token(token)
        namespace = getattr(request, "namespace", "")
        if namespace and namespace != token.namespace:
            raise InvalidArgumentError(
                f"task token belongs to namespace {token.namespace!r}, not {namespace!r}"
            )
        return token

    def _answered(self, token: state_pb2.TaskToken) -> None:
        if self._metrics is not None:
            self._metrics.task_answered(token)

    def _started_eagerly(self, kind: TaskKind, task: Any) -> None:
        """A task handed out in a response, not through a poll (the metrics)."""
        if self._metrics is not None:
            self._metrics.task_started(kind, task)

    async def _namespace_of(self, rpc: str, request: Any) -> str:
        """The namespace a call acts on, for its authorization: a task-token call's is
        the verified token's (a worker of A holding a token of B acts on B, and is
        refused), any other call's the one its request names (NAMESPACE_FREE_RPCS: none)."""
        activity = TOKEN_RPCS.get(rpc)
        if activity is not None:
            return (await self._open_token(request, activity=activity)).namespace
        if rpc in NAMESPACE_FREE_RPCS:
            return NAMESPACE_FREE_RPCS[rpc]
        namespace: str = request.namespace
        if not namespace:
            raise InvalidArgumentError("namespace is empty")
        return namespace

    async def _sealed(self, response: ResponseWithToken) -> ResponseWithToken:
        """``response`` with its task token signed (in place), if it carries a task."""
        if response.task_token:
            response.task_token = await self._tokens.seal(response.task_token)
        return response

    @staticmethod
    def _check_id(what: str, value: str) -> None:
        # Lengths and characters: RequestValidator, which every RPC runs first.
        if not value:
            raise InvalidArgumentError(f"{what} is empty")

    # ------------------------------------------------------------------ misc

    @_rpc
    async def GetSystemInfo(
        self, request: service_pb2.GetSystemInfoRequest, context: _Context
    ) -> service_pb2.GetSystemInfoResponse:
        return service_pb2.GetSystemInfoResponse(
            server_version=tideflow.__version__,
            store=self._store.dialect.name,
            max_payload_bytes=self._config.max_payload_bytes,
            capabilities=[
                "transient-workflow-tasks",
                "activity-retries-without-events",
                "group-commit",
                "typed-error-details",
            ],
        )

    @_rpc
    async def RegisterNamespace(
        self, request: service_pb2.RegisterNamespaceRequest, context: _Context
    ) -> service_pb2.RegisterNamespaceResponse:
        self._check_id("namespace", request.namespace)
        retention = request.workflow_execution_retention_period.ToSeconds()
        if not await self._store.ensure_namespace(
            request.namespace, description=request.description, retention_seconds=retention
        ):
            raise AlreadyExistsError(
                f"namespace already exists: {request.namespace!r}",
                resource=Resource.RESOURCE_TYPE_NAMESPACE,
                id=request.namespace,
            )
        if self.metadata is not None:
            await self.metadata.namespace_registered(
                request.namespace, request.description, retention
            )
        return service_pb2.RegisterNamespaceResponse()

    # ------------------------------------------------------------- workflows

    @_rpc
    async def StartWorkflow(
        self, request: service_pb2.StartWorkflowRequest, context: _Context
    ) -> service_pb2.StartWorkflowResponse:
        await self._check_namespace(request.namespace)
        self._check_id("workflow_id", request.workflow_id)
        self._check_id("workflow_type.name", request.workflow_type.name)
        self._check_id("task_queue.name", request.task_queue.name)
        if request.cron_schedule:
            # Cron workflows (a chain of runs under one id) are not built; accepting the
            # field would start one plain run and silently never repeat it.
            raise InvalidArgumentError(
                "cron_schedule is not supported: create a Schedule (CreateSchedule, "
                "client.create_schedule) to start the workflow on a cron spec"
            )
        if request.HasField("search_attributes"):
            check_search_attributes(request.search_attributes)
        if request.HasField("retry_policy"):
            check_retry_policy("retry_policy", request.retry_policy)
        if self._sites is not None and request.home_cluster not in ("", self._sites.name):
            return await self._sites.start_at_home(request)
        if request.home_cluster and self._sites is None:
            raise InvalidArgumentError("home_cluster: this server is not a site")
        try:
            run_id, started, eager = await self._engine.start_workflow_eagerly(request)
        except NotHomeError as error:
            # Signal-with-start on a replica: the signal waits for the run's home.
            signal = service_pb2.SignalWorkflowRequest(
                namespace=request.namespace,
                signal_name=request.signal_name,
                input=request.signal_input,
                identity=request.identity,
                request_id=request.request_id,
                header=request.header,
            )
            signal.workflow_execution.workflow_id = request.workflow_id
            key = await self._engine.resolve_run_id(request.namespace, request.workflow_id, "")
            await self._redirect(replication_pb2.ForwardedRequest(signal=signal), key, error)
            return service_pb2.StartWorkflowResponse(run_id=key.run_id, started=False)
        response = service_pb2.StartWorkflowResponse(run_id=run_id, started=started)
        if eager is not None:
            self._started_eagerly(TaskKind.WORKFLOW, eager)
            await self._sealed(eager)
            response.eager_workflow_task.CopyFrom(eager)
        return response

    @_rpc
    async def GetHistory(
        self, request: service_pb2.GetHistoryRequest, context: _Context
    ) -> service_pb2.GetHistoryResponse:
        await self._check_namespace(request.namespace)
        self._check_id("execution.workflow_id", request.execution.workflow_id)
        token = request.next_page_token
        run_id = request.execution.run_id
        if not run_id and is_task_token(token):
            run_id = await self._pager.run_of(token)  # the rest of a task's history
        key = await self._engine.resolve_run_id(
            request.namespace, request.execution.workflow_id, run_id
        )
        if request.maximum_page_size < 0:
            raise InvalidArgumentError("maximum_page_size must not be negative")
        page_size = min(request.maximum_page_size or _DEFAULT_PAGE_SIZE, _MAX_HISTORY_PAGE_SIZE)
        response = service_pb2.GetHistoryResponse()
        if is_task_token(token):
            events, response.next_page_token = await self._pager.continue_task(
                key, token, page_size
            )
            response.history.events.extend(events)
            return response
        first = 1
        if token:
            try:
                first = int(token.decode())
            except ValueError as exc:
                raise InvalidArgumentError("next_page_token is malformed") from exc
            if not 1 <= first < _MAX_EVENT_ID:
                raise InvalidArgumentError("next_page_token is malformed")
        close_only = (
            request.history_event_filter_type == service_pb2.HISTORY_EVENT_FILTER_TYPE_CLOSE_EVENT
        )
        deadline = context.time_remaining()
        wait_s = min(self._config.long_poll_timeout_s, deadline - 1.0 if deadline else 1e9)
        ms = await self._engine.state_of(key)
        if close_only:
            if request.wait_new_event and ms.status == common_pb2.WORKFLOW_EXECUTION_STATUS_RUNNING:
                await self._engine.wait_for_change(key, 1 << 62, max(0.0, wait_s))
                ms = await self._engine.state_of(key)
            if ms.status != common_pb2.WORKFLOW_EXECUTION_STATUS_RUNNING and ms.completion_event_id:
                # From the cached run when it holds the event (the close just committed
                # here): the result wait answers without a store read.
                close = await self._engine.event(key, ms.completion_event_id)
                if close.event_type in CLOSE_EVENTS:
                    response.history.events.append(close)
            return response
        if (
            request.wait_new_event
            and ms.next_event_id <= first
            and ms.status == common_pb2.WORKFLOW_EXECUTION_STATUS_RUNNING
        ):
            await self._engine.wait_for_change(key, first, max(0.0, wait_s))
        events, at_end = await self._pager.read_page(key, first, page_size)
        response.history.events.extend(events)
        if events:
            last = events[-1]
            more = not at_end or (request.wait_new_event and last.event_type not in CLOSE_EVENTS)
            if more:
                response.next_page_token = str(last.event_id + 1).encode()
        elif request.wait_new_event:
            ms = await self._engine.state_of(key)
            if ms.status == common_pb2.WORKFLOW_EXECUTION_STATUS_RUNNING:
                response.next_page_token = str(first).encode()
        return response

    @_rpc
    async def DescribeWorkflow(
        self, request: service_pb2.DescribeWorkflowRequest, context: _Context
    ) -> service_pb2.DescribeWorkflowResponse:
        await self._check_namespace(request.namespace)
        self._check_id("execution.workflow_id", request.execution.workflow_id)
        key = await self._engine.resolve_run_id(
            request.namespace, request.execution.workflow_id, request.execution.run_id
        )
        ms = await self._engine.state_of(key)
        # Details past half the message limit are left out (see describe_response).
        response = describe_response(
            ms, self._config.grpc_max_message_bytes // 2, self._matching.waiting_reason
        )
        if self._sites is not None:
            await self._sites.annotate(key, ms, response)
        return response

    @_rpc
    async def TerminateWorkflow(
        self, request: service_pb2.TerminateWorkflowRequest, context: _Context
    ) -> service_pb2.TerminateWorkflowResponse:
        await self._check_namespace(request.namespace)
        self._check_id("workflow_execution.workflow_id", request.workflow_execution.workflow_id)
        key = await self._engine.resolve_run_id(
            request.namespace,
            request.workflow_execution.workflow_id,
            request.workflow_execution.run_id,
        )
        try:
            await self._engine.terminate(
                key,
                request.reason,
                request.details if request.HasField("details") else None,
                request.identity,
                request.request_id,
            )
        except NotHomeError as error:
            forwarded = replication_pb2.ForwardedRequest(terminate=request)
            pending = await self._redirect(forwarded, key, error)
            return service_pb2.TerminateWorkflowResponse(
                pending_delivery=pending, home_cluster=error.home
            )
        return service_pb2.TerminateWorkflowResponse()

    @_rpc
    async def SignalWorkflow(
        self, request: service_pb2.SignalWorkflowRequest, context: _Context
    ) -> service_pb2.SignalWorkflowResponse:
        await self._check_namespace(request.namespace)
        self._check_id("workflow_execution.workflow_id", request.workflow_execution.workflow_id)
        self._check_id("signal_name", request.signal_name)
        key = await self._engine.resolve_run_id(
            request.namespace,
            request.workflow_execution.workflow_id,
            request.workflow_execution.run_id,
        )
        try:
            await self._engine.signal(
                key,
                request.signal_name,
                request.input if request.HasField("input") else None,
                request.identity,
                request.request_id,
                request.header if request.HasField("header") else None,
            )
        except NotHomeError as error:
            forwarded = replication_pb2.ForwardedRequest(signal=request)
            pending = await self._redirect(forwarded, key, error)
            return service_pb2.SignalWorkflowResponse(
                pending_delivery=pending, home_cluster=error.home
            )
        return service_pb2.SignalWorkflowResponse()

    @_rpc
    async def RequestCancelWorkflow(
        self, request: service_pb2.RequestCancelWorkflowRequest, context: _Context
    ) -> service_pb2.RequestCancelWorkflowResponse:
        await self._check_namespace(request.namespace)
        self._check_id("workflow_execution.workflow_id", request.workflow_execution.workflow_id)
        key = await self._engine.resolve_run_id(
            request.namespace,
            request.workflow_execution.workflow_id,
            request.workflow_execution.run_id,
        )
        try:
            await self._engine.request_cancel(
                key, request.identity, request.request_id, request.reason
            )
        except NotHomeError as error:
            forwarded = replication_pb2.ForwardedRequest(cancel=request)
            pending = await self._redirect(forwarded, key, error)
            return service_pb2.RequestCancelWorkflowResponse(
                pending_delivery=pending, home_cluster=error.home
            )
        return service_pb2.RequestCancelWorkflowResponse()

    async def _redirect(
        self, request: replication_pb2.ForwardedRequest, key: Any, error: NotHomeError
    ) -> bool:
        """A request for a run homed at another site: into the site inbox (it is
        delivered to the home exactly once); True while delivery is pending."""
        if self._sites is None:
            raise error
        return await self._sites.redirect(request, key, error)

    @_rpc
    async def QueryWorkflow(
        self, request: service_pb2.QueryWorkflowRequest, context: _Context
    ) -> service_pb2.QueryWorkflowResponse:
        await self._check_namespace(request.namespace)
        self._check_id("execution.workflow_id", request.execution.workflow_id)
        self._check_id("query.query_type", request.query.query_type)
        key = await self._engine.resolve_run_id(
            request.namespace, request.execution.workflow_id, request.execution.run_id
        )
        ms = await self._engine.state_of(key)
        result = await self._polls.query(
            key, ms.task_queue.name, request.query, self._polls.poll_timeout(context)
        )
        stale = self._sites is not None and home_of(ms, self._sites.name) != self._sites.name
        return service_pb2.QueryWorkflowResponse(query_result=result, possibly_stale=stale)

    @_rpc
    async def RespondQueryTaskCompleted(
        self, request: service_pb2.RespondQueryTaskCompletedRequest, context: _Context
    ) -> service_pb2.RespondQueryTaskCompletedResponse:
        token = await self._open_token(request, activity=False)
        return await self._polls.respond_query_task_completed(request, token, context)

    @_rpc
    async def ShutdownWorker(
        self, request: service_pb2.ShutdownWorkerRequest, context: _Context
    ) -> service_pb2.ShutdownWorkerResponse:
        await self._check_namespace(request.namespace)
        self._check_id("sticky_task_queue", request.sticky_task_queue)
        return await self._polls.shutdown_worker(request, context)

    # -------------------------------------------------------- workflow tasks

    @_rpc
    async def PollWorkflowTask(
        self, request: service_pb2.PollWorkflowTaskRequest, context: _Context
    ) -> service_pb2.PollWorkflowTaskResponse:
        await self._check_namespace(request.namespace)
        self._check_id("task_queue.name", request.task_queue.name)
        return await self._polls.poll_workflow_task(request, context)

    @_rpc
    async def RespondWorkflowTaskCompleted(
        self,
        request: service_pb2.RespondWorkflowTaskCompletedRequest,
        context: _Context,
    ) -> service_pb2.RespondWorkflowTaskCompletedResponse:
        token = await self._open_token(request, activity=False)
        await self._check_namespace(token.namespace)
        await self._refuse_bad_commands(token, request)
        sticky = request.sticky_attributes if request.HasField("sticky_attributes") else None
        if sticky is not None and sticky.schedule_to_start_timeout.ToMicroseconds() <= 0:
            sticky.schedule_to_start_timeout.FromSeconds(_DEFAULT_STICKY_TIMEOUT_S)
        response = await self._engine.complete_workflow_task(
            token,
            list(request.commands),
            request.identity,
            sticky,
            force_new=request.force_create_new_workflow_task,
            return_new=request.return_new_workflow_task,
            # Recorded only when an SDK reported something (Temporal SDKs do).
            sdk_metadata=request.sdk_metadata if request.sdk_metadata.ByteSize() else None,
        )
        self._answered(token)
        for activity_task in response.activity_tasks:
            self._started_eagerly(TaskKind.ACTIVITY, activity_task)
            await self._sealed(activity_task)
        if response.workflow_task.task_token:
            self._started_eagerly(TaskKind.WORKFLOW, response.workflow_task)
        await self._sealed(response.workflow_task)
        return response

    async def _refuse_bad_commands(
        self, token: state_pb2.TaskToken, request: service_pb2.RespondWorkflowTaskCompletedRequest
    ) -> None:
        """A command out of bounds fails the workflow task, as the engine's own
        command validation does: a WorkflowTaskFailed event with the cause (retried
        like any failed task), then INVALID_ARGUMENT to the worker, which drops its
        cached run (it ran ahead of what history now holds)."""
        for index, command in enumerate(request.commands):
            try:
                self._validator.check_command(index, command)
            except InvalidArgumentError as exc:
                cause = (
                    WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_PAYLOAD_TOO_LARGE
                    if isinstance(exc, TooLargeError)
                    else WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_BAD_COMMAND_ATTRIBUTES
                )
                failure = common_pb2.Failure(message=exc.message, source="server")
                await self._engine.fail_workflow_task(token, cause, failure, request.identity)
                raise InvalidArgumentError(f"workflow task failed: {exc.message}") from exc

    @_rpc
    async def RespondWorkflowTaskFailed(
        self,
        request: service_pb2.RespondWorkflowTaskFailedRequest,
        context: _Context,
    ) -> service_pb2.RespondWorkflowTaskFailedResponse:
        # An oversized failure is cut down rather than refused: the task must fail.
        failure = request.failure
        if failure.ByteSize() > self._config.max_payload_bytes:
            failure = common_pb2.Failure(message=failure.message[:4096], source=failure.source)
            request.failure.CopyFrom(failure)
        token = await self._open_token(request, activity=False)
        await self._check_namespace(token.namespace)
        await self._engine.fail_workflow_task(token, request.cause, failure, request.identity)
        self._answered(token)
        return service_pb2.RespondWorkflowTaskFailedResponse()

    # ------------------------------------------------------------ activities

    @_rpc
    async def PollActivityTask(
        self, request: service_pb2.PollActivityTaskRequest, context: _Context
    ) -> service_pb2.PollActivityTaskResponse:
        await self._check_namespace(request.namespace)
        self._check_id("task_queue.name", request.task_queue.name)
        return await self._polls.poll_activity_task(request, context)

    @_rpc
    async def RespondActivityTaskCompleted(
        self,
        request: service_pb2.RespondActivityTaskCompletedRequest,
        context: _Context,
    ) -> service_pb2.RespondActivityTaskCompletedResponse:
        token = await self._open_token(request, activity=True)
        await self._check_namespace(token.namespace)
        if token.home_site:
            await self._at_home(token, request)
            return service_pb2.RespondActivityTaskCompletedResponse()
        try:
            workflow_task = await self._engine.complete_activity(
                token,
                request.result if request.HasField("result") else None,
                request.identity,
                request.eager_workflow_task_queue,
                request.sticky_task_queue,
            )
        except NotHomeError as error:  # the run was handed to another site since
            await self._at_home(token, request, error.home)
            return service_pb2.RespondActivityTaskCompletedResponse()
        self._answered(token)
        if workflow_task is not None:
            self._started_eagerly(TaskKind.WORKFLOW, workflow_task)
            await self._sealed(workflow_task)
        return service_pb2.RespondActivityTaskCompletedResponse(workflow_task=workflow_task)

    @_rpc
    async def RespondActivityTaskFailed(
        self,
        request: service_pb2.RespondActivityTaskFailedRequest,
        context: _Context,
    ) -> service_pb2.RespondActivityTaskFailedResponse:
        token = await self._open_token(request, activity=True)
        await self._check_namespace(token.namespace)
        if token.home_site:
            await self._at_home(token, request)
            return service_pb2.RespondActivityTaskFailedResponse()
        details = (
            request.last_heartbeat_details if request.HasField("last_heartbeat_details") else None
        )
        try:
            await self._engine.fail_activity(token, request.failure, request.identity, details)
        except NotHomeError as error:
            await self._at_home(token, request, error.home)
        self._answered(token)
        return service_pb2.RespondActivityTaskFailedResponse()

    @_rpc
    async def RespondTasksCompleted(
        self, request: service_pb2.RespondTasksCompletedRequest, context: _Context
    ) -> service_pb2.RespondTasksCompletedResponse:
        return await self._batches.serve(request, context)

    @_rpc
    async def RecordActivityHeartbeat(
        self, request: service_pb2.RecordActivityHeartbeatRequest, context: _Context
    ) -> service_pb2.RecordActivityHeartbeatResponse:
        token = await self._open_token(request, activity=True)
        await self._check_namespace(token.namespace)
        if token.home_site:
            reply = await self._at_home(token, request)
            return service_pb2.RecordActivityHeartbeatResponse(
                cancel_requested=reply.cancel_requested
            )
        details = request.details if request.HasField("details") else None
        try:
            cancel = await self._engine.record_heartbeat(token, details)
        except NotHomeError as error:
            cancel = (await self._at_home(token, request, error.home)).cancel_requested
        return service_pb2.RecordActivityHeartbeatResponse(cancel_requested=cancel)

    @_rpc
    async def RespondActivityTaskCanceled(
        self, request: service_pb2.RespondActivityTaskCanceledRequest, context: _Context
    ) -> service_pb2.RespondActivityTaskCanceledResponse:
        token = await self._open_token(request, activity=True)
        await self._check_namespace(token.namespace)
        if token.home_site:
            await self._at_home(token, request)
            return service_pb2.RespondActivityTaskCanceledResponse()
        details = request.details if request.HasField("details") else None
        try:
            await self._engine.activity_canceled(token, details, request.identity)
        except NotHomeError as error:
            await self._at_home(token, request, error.home)
        self._answered(token)
        return service_pb2.RespondActivityTaskCanceledResponse()

    async def _at_home(
        self, token: state_pb2.TaskToken, answer: ActivityAnswer, moved_to: str = ""
    ) -> replication_pb2.ForwardedActivityReply:
        """The answer to a task another site (the run's home) handed to this site's
        worker, or of a run handed to site ``moved_to`` since its task started here,
        forwarded there (server/_remote_tasks.py)."""
        remote = self._sites.remote_tasks if self._sites is not None else None
        if remote is None:
            raise InvalidArgumentError("the task token names another site; this is no site")
        return await remote.forward(token, answer, moved_to=moved_to)

    # ------------------------------------------------- visibility and schedules
    # List/count runs (query language: server/_visibility.py) and schedules
    # (server/_schedules.py), served by the ``scheduler`` given to the constructor.

    @_rpc
    async def ListWorkflowExecutions(
        self, request: service_pb2.ListWorkflowExecutionsRequest, context: _Context
    ) -> service_pb2.ListWorkflowExecutionsResponse:
        await self._check_namespace(request.namespace)
        if request.page_size < 0:
            raise InvalidArgumentError("page_size must not be negative")
        page_size = min(request.page_size or _MAX_LIST_PAGE_SIZE, _MAX_LIST_PAGE_SIZE)
        query = parse_query(request.query)
        cursor = None
        if request.next_page_token:
            cursor = decode_page_token(request.namespace, request.query, request.next_page_token)
        while True:
            records, next_cursor = await self._store.list_executions(
                request.namespace, query, page_size=page_size, cursor=cursor
            )
            response = service_pb2.ListWorkflowExecutionsResponse(
                executions=[execution_info(record) for record in records]
            )
            if next_cursor is not None:
                response.next_page_token = encode_page_token(
                    request.namespace, request.query, next_cursor
                )
            page_size = self._smaller_page(response, len(records))
            if not page_size:
                return response

    def _smaller_page(self, response: Message, items: int) -> int:
        """0 if a list response fits the message limit, else a page size to try instead.
        Each run or schedule is bounded (memo, search attributes, action...), but a page
        of them is not: without this, listing failed for ever past the limit."""
        if response.ByteSize() <= self._config.grpc_max_message_bytes // 2 or items <= 1:
            return 0
        return items // 2

    @_rpc
    async def CountWorkflowExecutions(
        self, request: service_pb2.CountWorkflowExecutionsRequest, context: _Context
    ) -> service_pb2.CountWorkflowExecutionsResponse:
        await self._check_namespace(request.namespace)
        query = parse_query(request.query)
        if query.order_by:
            raise InvalidArgumentError("invalid query: a count takes no ORDER BY")
        count = await self._store.count_executions(request.namespace, query)
        return service_pb2.CountWorkflowExecutionsResponse(count=count)

    @_rpc
    async def CreateSchedule(
        self, request: service_pb2.CreateScheduleRequest, context: _Context
    ) -> service_pb2.CreateScheduleResponse:
        await self._check_namespace(request.namespace)
        self._check_id("schedule_id", request.schedule_id)
        # Each run's id is `<workflow_id>-<slot time>`: the suffix must fit too.
        limit = self._config.max_id_length - _SCHEDULE_SUFFIX_LENGTH
        if len(request.schedule.action.start_workflow.workflow_id) > limit:
            raise InvalidArgumentError(
                f"schedule.action.start_workflow.workflow_id is longer than {limit} characters "
                "(each run's id appends the slot time)"
            )
        action = request.schedule.action.start_workflow
        if action.HasField("retry_policy"):
            check_retry_policy("schedule.action.start_workflow.retry_policy", action.retry_policy)
        await require_scheduler(self.scheduler).create(
            request.namespace, request.schedule_id, request.schedule, request.request_id
        )
        if self.metadata is not None:
            await self.metadata.schedule_created(
                request.namespace, request.schedule_id, request.schedule
            )
        return service_pb2.CreateScheduleResponse()

    @_rpc
    async def DescribeSchedule(
        self, request: service_pb2.DescribeScheduleRequest, context: _Context
    ) -> service_pb2.DescribeScheduleResponse:
        await self._check_namespace(request.namespace)
        self._check_id("schedule_id", request.schedule_id)
        return await require_scheduler(self.scheduler).describe(
            request.namespace, request.schedule_id
        )

    @_rpc
    async def PatchSchedule(
        self, request: service_pb2.PatchScheduleRequest, context: _Context
    ) -> service_pb2.PatchScheduleResponse:
        await self._check_namespace(request.namespace)
        self._check_id("schedule_id", request.schedule_id)
        await require_scheduler(self.scheduler).patch(
            request.namespace, request.schedule_id, request.patch, request.request_id
        )
        return service_pb2.PatchScheduleResponse()

    @_rpc
    async def DeleteSchedule(
        self, request: service_pb2.DeleteScheduleRequest, context: _Context
    ) -> service_pb2.DeleteScheduleResponse:
        await self._check_namespace(request.namespace)
        self._check_id("schedule_id", request.schedule_id)
        await require_scheduler(self.scheduler).delete(request.namespace, request.schedule_id)
        if self.metadata is not None:
            await self.metadata.schedule_deleted(request.namespace, request.schedule_id)
        return service_pb2.DeleteScheduleResponse()

    @_rpc
    async def ListSchedules(
        self, request: service_pb2.ListSchedulesRequest, context: _Context
    ) -> service_pb2.ListSchedulesResponse:
        await self._check_namespace(request.namespace)
        if request.maximum_page_size < 0:
            raise InvalidArgumentError("maximum_page_size must not be negative")
        page_size = min(request.maximum_page_size or _MAX_LIST_PAGE_SIZE, _MAX_LIST_PAGE_SIZE)
        while True:
            response = await require_scheduler(self.scheduler).list_schedules(
                request.namespace, page_size, request.next_page_token
            )
            page_size = self._smaller_page(response, len(response.schedules))
            if not page_size:
                return response

    # ----------------------------------------------------------- task queues

    @_rpc
    async def DescribeTaskQueue(
        self, request: service_pb2.DescribeTaskQueueRequest, context: _Context
    ) -> service_pb2.DescribeTaskQueueResponse:
        await self._check_namespace(request.namespace)
        self._check_id("task_queue.name", request.task_queue.name)
        return await self._polls.describe_task_queue(request, context)

    @_rpc
    async def DescribeCluster(
        self, request: service_pb2.DescribeClusterRequest, context: _Context
    ) -> service_pb2.DescribeClusterResponse:
        return await describe_cluster(self._store, self._config.lease_s)


# Largest page of ListWorkflowExecutions / ListSchedules.
_MAX_LIST_PAGE_SIZE = 1000
