"""The frontend: the gRPC WorkflowService.

It validates requests (namespace, ids, payload sizes, task tokens) before anything
reaches the engine, and it is the one place where errors become gRPC statuses: a
``ServiceError`` keeps its code and message, a store error becomes UNAVAILABLE, and
anything unexpected is logged and reported as INTERNAL without details leaking.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

import tideflow
from tideflow.api.v1 import common_pb2, service_pb2, service_pb2_grpc
from tideflow.history import (
    CLOSE_EVENTS,
    HistoryStore,
    InvalidValueError,
    RetryableStoreError,
    StoreError,
    TaskKind,
)

from ._config import ServerConfig
from ._engine import HistoryEngine, decode_token
from ._errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    InvalidArgumentError,
    NamespaceNotFoundError,
    NotFoundError,
    QueryFailedError,
    ServiceError,
)
from ._matching import Matching, QueryTask
from ._schedules import Scheduler, require_scheduler
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
_MAX_ID_LENGTH = 1000
_DEFAULT_PAGE_SIZE = 1000
_DEFAULT_STICKY_TIMEOUT_S = 5


def _rpc(
    method: Callable[[Any, Req, _Context], Awaitable[Resp]],
) -> Callable[[Any, Req, _Context], Awaitable[Resp]]:
    """Translate errors into statuses at this one boundary."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: _Context) -> Resp:
        try:
            return await method(self, request, context)
        except ServiceError as exc:
            await context.abort(exc.code, exc.message)
        except InvalidValueError as exc:
            # The database refused a value of this request (and of no other).
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (RetryableStoreError, StoreError) as exc:
            log.warning("%s: store unavailable: %s", method.__name__, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"history store unavailable: {exc}")
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}")
        raise AssertionError("unreachable")  # abort() always raises

    return wrapper


def _payloads_size(p: common_pb2.Payloads) -> int:
    return p.ByteSize()


class WorkflowService(service_pb2_grpc.WorkflowServiceServicer):
    def __init__(
        self,
        store: HistoryStore,
        engine: HistoryEngine,
        matching: Matching,
        config: ServerConfig,
    ) -> None:
        self._store = store
        self._engine = engine
        self._matching = matching
        self._config = config
        self._namespaces: set[str] = set()
        self._queries: dict[str, QueryTask] = {}

    # ------------------------------------------------------------ validation

    async def _check_namespace(self, namespace: str) -> None:
        if not namespace:
            raise InvalidArgumentError("namespace is empty")
        if namespace in self._namespaces:
            return
        if not await self._store.namespace_exists(namespace):
            raise NamespaceNotFoundError(f"namespace not found: {namespace!r}")
        self._namespaces.add(namespace)

    def _check_payloads(self, what: str, payloads: common_pb2.Payloads) -> None:
        size = _payloads_size(payloads)
        if size > self._config.max_payload_bytes:
            raise InvalidArgumentError(
                f"{what} is {size} bytes, over the limit of {self._config.max_payload_bytes} bytes"
            )

    @staticmethod
    def _check_id(what: str, value: str) -> None:
        if not value:
            raise InvalidArgumentError(f"{what} is empty")
        if len(value) > _MAX_ID_LENGTH:
            raise InvalidArgumentError(f"{what} is longer than {_MAX_ID_LENGTH} characters")

    @staticmethod
    def _check_duration(what: str, value: Any) -> None:
        if value.ToMicroseconds() < 0:
            raise InvalidArgumentError(f"{what} must not be negative")

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
            raise AlreadyExistsError(f"namespace already exists: {request.namespace!r}")
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
        if request.HasField("input"):
            self._check_payloads("input", request.input)
        if request.HasField("signal_input"):
            self._check_payloads("signal_input", request.signal_input)
        for name in ("workflow_execution_timeout", "workflow_run_timeout", "workflow_task_timeout"):
            self._check_duration(name, getattr(request, name))
        if len(request.request_id) > 255:
            raise InvalidArgumentError("request_id is longer than 255 characters")
        if request.HasField("search_attributes"):
            check_search_attributes(request.search_attributes)
        run_id, started = await self._engine.start_workflow(request)
        return service_pb2.StartWorkflowResponse(run_id=run_id, started=started)

    @_rpc
    async def GetHistory(
        self, request: service_pb2.GetHistoryRequest, context: _Context
    ) -> service_pb2.GetHistoryResponse:
        await self._check_namespace(request.namespace)
        self._check_id("execution.workflow_id", request.execution.workflow_id)
        key = await self._engine.resolve_run_id(
            request.namespace, request.execution.workflow_id, request.execution.run_id
        )
        close_only = (
            request.history_event_filter_type == service_pb2.HISTORY_EVENT_FILTER_TYPE_CLOSE_EVENT
        )
        first = 1
        if request.next_page_token:
            try:
                first = int(request.next_page_token.decode())
            except ValueError as exc:
                raise InvalidArgumentError("next_page_token is malformed") from exc
        page_size = request.maximum_page_size or _DEFAULT_PAGE_SIZE
        deadline = context.time_remaining()
        wait_s = min(self._config.long_poll_timeout_s, deadline - 1.0 if deadline else 1e9)
        ms = await self._engine.state_of(key)
        response = service_pb2.GetHistoryResponse()
        if close_only:
            if request.wait_new_event and ms.status == common_pb2.WORKFLOW_EXECUTION_STATUS_RUNNING:
                await self._engine.wait_for_change(key, 1 << 62, max(0.0, wait_s))
                ms = await self._engine.state_of(key)
            if ms.status != common_pb2.WORKFLOW_EXECUTION_STATUS_RUNNING:
                events = await self._engine.read_events(key, ms.completion_event_id, 1)
                response.history.events.extend(e for e in events if e.event_type in CLOSE_EVENTS)
            return response
        if (
            request.wait_new_event
            and ms.next_event_id <= first
            and ms.status == common_pb2.WORKFLOW_EXECUTION_STATUS_RUNNING
        ):
            await self._engine.wait_for_change(key, first, max(0.0, wait_s))
        events = await self._engine.read_events(key, first, page_size)
        response.history.events.extend(events)
        if events:
            last = events[-1]
            more = len(events) == page_size or (
                request.wait_new_event and last.event_type not in CLOSE_EVENTS
            )
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
        response = service_pb2.DescribeWorkflowResponse()
        info = response.workflow_execution_info
        info.execution.workflow_id = ms.workflow_id
        info.execution.run_id = ms.run_id
        info.type.CopyFrom(ms.workflow_type)
        info.start_time.CopyFrom(ms.start_time)
        if ms.HasField("close_time"):
            info.close_time.CopyFrom(ms.close_time)
        info.status = ms.status
        info.history_length = ms.next_event_id - 1
        info.task_queue = ms.task_queue.name
        for act in sorted(ms.pending_activities.values(), key=lambda a: a.scheduled_event_id):
            pending = response.pending_activities.add(
                activity_id=act.activity_id,
                attempt=act.attempt,
                last_worker_identity=act.started_identity,
                scheduled_event_id=act.scheduled_event_id,
            )
            pending.activity_type.CopyFrom(act.activity_type)
            pending.scheduled_time.CopyFrom(act.scheduled_time)
            if act.HasField("started_time"):
                pending.last_started_time.CopyFrom(act.started_time)
            if act.HasField("last_heartbeat_time"):
                pending.last_heartbeat_time.CopyFrom(act.last_heartbeat_time)
            if act.HasField("heartbeat_details"):
                pending.heartbeat_details.CopyFrom(act.heartbeat_details)
            if act.HasField("last_failure"):
                pending.last_failure.CopyFrom(act.last_failure)
        if ms.HasField("workflow_task"):
            response.pending_workflow_task_attempt = ms.workflow_task.attempt
        return response

    @_rpc
    async def TerminateWorkflow(
        self, request: service_pb2.TerminateWorkflowRequest, context: _Context
    ) -> service_pb2.TerminateWorkflowResponse:
        await self._check_namespace(request.namespace)
        self._check_id("workflow_execution.workflow_id", request.workflow_execution.workflow_id)
        if request.HasField("details"):
            self._check_payloads("details", request.details)
        key = await self._engine.resolve_run_id(
            request.namespace,
            request.workflow_execution.workflow_id,
            request.workflow_execution.run_id,
        )
        await self._engine.terminate(
            key,
            request.reason,
            request.details if request.HasField("details") else None,
            request.identity,
            request.request_id,
        )
        return service_pb2.TerminateWorkflowResponse()

    @_rpc
    async def SignalWorkflow(
        self, request: service_pb2.SignalWorkflowRequest, context: _Context
    ) -> service_pb2.SignalWorkflowResponse:
        await self._check_namespace(request.namespace)
        self._check_id("workflow_execution.workflow_id", request.workflow_execution.workflow_id)
        self._check_id("signal_name", request.signal_name)
        if request.HasField("input"):
            self._check_payloads("input", request.input)
        key = await self._engine.resolve_run_id(
            request.namespace,
            request.workflow_execution.workflow_id,
            request.workflow_execution.run_id,
        )
        await self._engine.signal(
            key,
            request.signal_name,
            request.input if request.HasField("input") else None,
            request.identity,
            request.request_id,
            request.header if request.HasField("header") else None,
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
        await self._engine.request_cancel(key, request.identity, request.request_id, request.reason)
        return service_pb2.RequestCancelWorkflowResponse()

    @_rpc
    async def QueryWorkflow(
        self, request: service_pb2.QueryWorkflowRequest, context: _Context
    ) -> service_pb2.QueryWorkflowResponse:
        await self._check_namespace(request.namespace)
        self._check_id("execution.workflow_id", request.execution.workflow_id)
        self._check_id("query.query_type", request.query.query_type)
        if request.query.HasField("query_args"):
            self._check_payloads("query.query_args", request.query.query_args)
        key = await self._engine.resolve_run_id(
            request.namespace, request.execution.workflow_id, request.execution.run_id
        )
        ms = await self._engine.state_of(key)
        query = QueryTask(
            query_id=str(uuid.uuid4()),
            key=key,
            query=request.query,
            result=asyncio.get_running_loop().create_future(),
        )
        self._queries[query.query_id] = query
        try:
            self._matching.add_query(request.namespace, ms.task_queue.name, query)
            timeout = self._poll_timeout(context)
            try:
                async with asyncio.timeout(timeout):
                    result = await query.result
            except TimeoutError:
                raise DeadlineExceededError(
                    f"no worker answered query {request.query.query_type!r} within "
                    f"{timeout:.0f} s: is a worker polling task queue {ms.task_queue.name!r}?"
                ) from None
        finally:
            del self._queries[query.query_id]
            if not query.result.done():
                query.result.cancel()
        return service_pb2.QueryWorkflowResponse(query_result=result)

    @_rpc
    async def RespondQueryTaskCompleted(
        self, request: service_pb2.RespondQueryTaskCompletedRequest, context: _Context
    ) -> service_pb2.RespondQueryTaskCompletedResponse:
        token = decode_token(request.task_token, activity=False)
        query = self._queries.get(token.query_id) if token.query_id else None
        if query is None:
            raise NotFoundError("query not found: it was answered already or its caller gave up")
        if not query.result.done():
            if request.completed_type == service_pb2.QUERY_RESULT_TYPE_ANSWERED:
                self._check_payloads("query_result", request.query_result)
                query.result.set_result(request.query_result)
            else:
                query.result.set_exception(
                    QueryFailedError(f"query failed: {request.error_message or 'no message'}")
                )
        return service_pb2.RespondQueryTaskCompletedResponse()

    @_rpc
    async def ShutdownWorker(
        self, request: service_pb2.ShutdownWorkerRequest, context: _Context
    ) -> service_pb2.ShutdownWorkerResponse:
        await self._check_namespace(request.namespace)
        self._check_id("sticky_task_queue", request.sticky_task_queue)
        for task in self._matching.retire(request.namespace, request.sticky_task_queue):
            await self._engine.unstick(task.key, request.sticky_task_queue)
        return service_pb2.ShutdownWorkerResponse()

    # -------------------------------------------------------- workflow tasks

    def _poll_timeout(self, context: _Context) -> float:
        remaining = context.time_remaining()
        timeout = self._config.long_poll_timeout_s
        if remaining is not None:
            # Answer (empty) a little before the caller's deadline rather than after it.
            timeout = min(timeout, max(0.0, remaining - 0.5))
        return timeout

    @_rpc
    async def PollWorkflowTask(
        self, request: service_pb2.PollWorkflowTaskRequest, context: _Context
    ) -> service_pb2.PollWorkflowTaskResponse:
        await self._check_namespace(request.namespace)
        self._check_id("task_queue.name", request.task_queue.name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._poll_timeout(context)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return service_pb2.PollWorkflowTaskResponse()
            task = await self._matching.poll(
                request.namespace, request.task_queue.name, TaskKind.WORKFLOW, remaining
            )
            if task is None:
                return service_pb2.PollWorkflowTaskResponse()
            if isinstance(task, QueryTask):
                try:
                    return await self._engine.query_task(task.key, task.query_id, task.query)
                except ServiceError as exc:
                    if not task.result.done():
                        task.result.set_exception(exc)
                    continue
            try:
                response = await self._engine.record_workflow_task_started(task, request.identity)
            except (StoreError, ServiceError, asyncio.CancelledError):
                # Not delivered. A poller that goes away (worker shutdown) cancels this
                # handler; the task must not vanish with it, or nothing would dispatch it
                # again until a server restart. If the start did commit before the
                # cancellation, the engine finds the given-back task stale and drops it.
                self._matching.give_back(task)
                raise
            if response is not None:
                return response

    @_rpc
    async def RespondWorkflowTaskCompleted(
        self,
        request: service_pb2.RespondWorkflowTaskCompletedRequest,
        context: _Context,
    ) -> service_pb2.RespondWorkflowTaskCompletedResponse:
        token = decode_token(request.task_token, activity=False)
        await self._check_namespace(token.namespace)
        for index, command in enumerate(request.commands):
            for field, value in command.ListFields():
                if field.message_type is None:
                    continue
                for inner, inner_value in value.ListFields():
                    if inner.message_type is common_pb2.Payloads.DESCRIPTOR:
                        self._check_payloads(f"command {index} {inner.name}", inner_value)
        sticky = request.sticky_attributes if request.HasField("sticky_attributes") else None
        if sticky is not None and sticky.schedule_to_start_timeout.ToMicroseconds() <= 0:
            sticky.schedule_to_start_timeout.FromSeconds(_DEFAULT_STICKY_TIMEOUT_S)
        eager = await self._engine.complete_workflow_task(
            token, list(request.commands), request.identity, sticky
        )
        return service_pb2.RespondWorkflowTaskCompletedResponse(activity_tasks=eager)

    @_rpc
    async def RespondWorkflowTaskFailed(
        self,
        request: service_pb2.RespondWorkflowTaskFailedRequest,
        context: _Context,
    ) -> service_pb2.RespondWorkflowTaskFailedResponse:
        token = decode_token(request.task_token, activity=False)
        await self._check_namespace(token.namespace)
        failure = request.failure
        if failure.ByteSize() > self._config.max_payload_bytes:
            failure = common_pb2.Failure(message=failure.message[:4096], source=failure.source)
        await self._engine.fail_workflow_task(token, request.cause, failure, request.identity)
        return service_pb2.RespondWorkflowTaskFailedResponse()

    # ------------------------------------------------------------ activities

    @_rpc
    async def PollActivityTask(
        self, request: service_pb2.PollActivityTaskRequest, context: _Context
    ) -> service_pb2.PollActivityTaskResponse:
        await self._check_namespace(request.namespace)
        self._check_id("task_queue.name", request.task_queue.name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._poll_timeout(context)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return service_pb2.PollActivityTaskResponse()
            task = await self._matching.poll(
                request.namespace, request.task_queue.name, TaskKind.ACTIVITY, remaining
            )
            if task is None:
                return service_pb2.PollActivityTaskResponse()
            assert not isinstance(task, QueryTask)  # queries only go to workflow queues
            try:
                response = await self._engine.record_activity_started(task, request.identity)
            except (StoreError, ServiceError, asyncio.CancelledError):
                # Not delivered: dispatch it again (see PollWorkflowTask).
                self._matching.give_back(task)
                raise
            if response is not None:
                return response

    @_rpc
    async def RespondActivityTaskCompleted(
        self,
        request: service_pb2.RespondActivityTaskCompletedRequest,
        context: _Context,
    ) -> service_pb2.RespondActivityTaskCompletedResponse:
        token = decode_token(request.task_token, activity=True)
        await self._check_namespace(token.namespace)
        if request.HasField("result"):
            self._check_payloads("result", request.result)
        workflow_task = await self._engine.complete_activity(
            token,
            request.result if request.HasField("result") else None,
            request.identity,
            request.eager_workflow_task_queue,
            request.sticky_task_queue,
        )
        return service_pb2.RespondActivityTaskCompletedResponse(workflow_task=workflow_task)

    @_rpc
    async def RespondActivityTaskFailed(
        self,
        request: service_pb2.RespondActivityTaskFailedRequest,
        context: _Context,
    ) -> service_pb2.RespondActivityTaskFailedResponse:
        token = decode_token(request.task_token, activity=True)
        await self._check_namespace(token.namespace)
        if request.failure.ByteSize() > self._config.max_payload_bytes:
            raise InvalidArgumentError(
                f"failure is {request.failure.ByteSize()} bytes, over the limit of "
                f"{self._config.max_payload_bytes} bytes"
            )
        details = (
            request.last_heartbeat_details if request.HasField("last_heartbeat_details") else None
        )
        if details is not None:
            self._check_payloads("last_heartbeat_details", details)
        await self._engine.fail_activity(token, request.failure, request.identity, details)
        return service_pb2.RespondActivityTaskFailedResponse()

    @_rpc
    async def RecordActivityHeartbeat(
        self, request: service_pb2.RecordActivityHeartbeatRequest, context: _Context
    ) -> service_pb2.RecordActivityHeartbeatResponse:
        token = decode_token(request.task_token, activity=True)
        await self._check_namespace(token.namespace)
        details = request.details if request.HasField("details") else None
        if details is not None:
            self._check_payloads("details", details)
        cancel = await self._engine.record_heartbeat(token, details)
        return service_pb2.RecordActivityHeartbeatResponse(cancel_requested=cancel)

    @_rpc
    async def RespondActivityTaskCanceled(
        self, request: service_pb2.RespondActivityTaskCanceledRequest, context: _Context
    ) -> service_pb2.RespondActivityTaskCanceledResponse:
        token = decode_token(request.task_token, activity=True)
        await self._check_namespace(token.namespace)
        details = request.details if request.HasField("details") else None
        if details is not None:
            self._check_payloads("details", details)
        await self._engine.activity_canceled(token, details, request.identity)
        return service_pb2.RespondActivityTaskCanceledResponse()

    # ------------------------------------------------- visibility and schedules
    # List/count runs (query language: server/_visibility.py) and schedules
    # (server/_schedules.py). TideflowServer sets ``scheduler`` when it starts one.

    scheduler: Scheduler | None = None

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
        return response

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
        if len(request.request_id) > 255:
            raise InvalidArgumentError("request_id is longer than 255 characters")
        action = request.schedule.action.start_workflow
        if action.HasField("input"):
            self._check_payloads("schedule action input", action.input)
        await require_scheduler(self.scheduler).create(
            request.namespace, request.schedule_id, request.schedule, request.request_id
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
        if len(request.request_id) > 255:
            raise InvalidArgumentError("request_id is longer than 255 characters")
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
        return service_pb2.DeleteScheduleResponse()

    @_rpc
    async def ListSchedules(
        self, request: service_pb2.ListSchedulesRequest, context: _Context
    ) -> service_pb2.ListSchedulesResponse:
        await self._check_namespace(request.namespace)
        if request.maximum_page_size < 0:
            raise InvalidArgumentError("maximum_page_size must not be negative")
        page_size = min(request.maximum_page_size or _MAX_LIST_PAGE_SIZE, _MAX_LIST_PAGE_SIZE)
        return await require_scheduler(self.scheduler).list_schedules(
            request.namespace, page_size, request.next_page_token
        )


# Largest page of ListWorkflowExecutions / ListSchedules.
_MAX_LIST_PAGE_SIZE = 1000
