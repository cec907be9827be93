"""The client: start workflows, wait for their results, inspect and terminate them.

``Client`` is also the connection workers poll through. gRPC errors are translated
here, at one boundary, into the exceptions of ``tideflow.worker_sdk.exceptions``;
calls that are safe to repeat (all of them carry request ids or task tokens) are
retried while the server is unreachable, so a server restart is invisible to users.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import typing
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format

from tideflow.api.v1 import common_pb2, history_pb2, service_pb2, service_pb2_grpc
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.history import (
    SearchAttributeValue,
    decode_search_attributes,
    encode_search_attributes,
)

from . import exceptions as exc
from .common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from .converter import DataConverter, default_converter
from .schedules import (
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleHandle,
    ScheduleInfo,
    ScheduleListDescription,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
)
from .workflow import definition_of, handler_name

Req = TypeVar("Req")
Resp = TypeVar("Resp")

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
# How long calls keep retrying while the server is unreachable (a restart).
_RECONNECT_BUDGET_S = 120.0


def default_identity() -> str:
    import os

    return f"{os.getpid()}@{socket.gethostname()}"


def translate_rpc_error(error: grpc.aio.AioRpcError) -> exc.RPCError:
    code = error.code()
    message = error.details() or code.name
    if code == grpc.StatusCode.NOT_FOUND:
        return exc.NotFoundError(message, status=code.name)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return exc.InvalidArgumentError(message, status=code.name)
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return exc.WorkflowAlreadyStartedError(message, status=code.name)
    if code == grpc.StatusCode.FAILED_PRECONDITION and message.startswith("query failed"):
        return exc.WorkflowQueryFailedError(message, status=code.name)
    return exc.RPCError(message, status=code.name)


class WorkflowExecutionStatus(IntEnum):
    RUNNING = 1
    COMPLETED = 2
    FAILED = 3
    CANCELED = 4
    TERMINATED = 5
    CONTINUED_AS_NEW = 6
    TIMED_OUT = 7


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowExecutionDescription:
    id: str
    run_id: str
    workflow_type: str
    task_queue: str
    status: WorkflowExecutionStatus
    start_time: datetime
    close_time: datetime | None
    history_length: int
    raw: service_pb2.DescribeWorkflowResponse


class WorkflowHistory:
    """A run's history: ``events`` are the protobuf ``HistoryEvent`` messages."""

    def __init__(self, workflow_id: str, events: Sequence[HistoryEvent]) -> None:
        self.workflow_id = workflow_id
        self.events: list[HistoryEvent] = list(events)

    @property
    def run_id(self) -> str:
        return self._started_attr("original_execution_run_id")

    def _started_attr(self, name: str) -> str:
        for event in self.events:
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
                return str(getattr(event.workflow_execution_started_event_attributes, name))
        return ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "workflow_id": self.workflow_id,
                "events": [json_format.MessageToDict(e) for e in self.events],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str | bytes, workflow_id: str | None = None) -> WorkflowHistory:
        data = json.loads(text)
        if isinstance(data, list):
            raw_events, wid = data, workflow_id or ""
        else:
            raw_events, wid = data["events"], workflow_id or data.get("workflow_id", "")
        events = [json_format.ParseDict(e, HistoryEvent()) for e in raw_events]
        return cls(wid, events)


class Client:
    """A connection to a tideflow server in one namespace."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        namespace: str,
        data_converter: DataConverter,
        identity: str,
    ) -> None:
        self._channel = channel
        self.service = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        self.namespace = namespace
        self.data_converter = data_converter
        self.identity = identity

    @staticmethod
    async def connect(
        target: str,
        *,
        namespace: str = "default",
        data_converter: DataConverter = default_converter,
        identity: str | None = None,
    ) -> Client:
        """Connect to ``host:port`` and check the server answers."""
        channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 30_000),
            ],
        )
        client = Client(
            channel,
            namespace=namespace,
            data_converter=data_converter,
            identity=identity or default_identity(),
        )
        await client.call(
            client.service.GetSystemInfo, service_pb2.GetSystemInfoRequest(), timeout=10
        )
        return client

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def call(
        self,
        method: Callable[..., Awaitable[Resp]],
        request: Any,
        *,
        timeout: float = 30.0,
        retry: bool = True,
    ) -> Resp:
        """One RPC with status translation; retries while the server is unreachable."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + _RECONNECT_BUDGET_S
        delay = 0.05
        while True:
            try:
                return await method(request, timeout=timeout)
            except grpc.aio.AioRpcError as error:
                if retry and error.code() in _RETRYABLE and loop.time() < give_up:
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 2.0)
                    continue
                raise translate_rpc_error(error) from None

    # ------------------------------------------------------------- workflows

    async def start_workflow(
        self,
        workflow: Any,
        arg: Any = None,
        *,
        args: Sequence[Any] = (),
        id: str,
        task_queue: str,
        execution_timeout: timedelta | None = None,
        run_timeout: timedelta | None = None,
        task_timeout: timedelta | None = None,
        request_id: str | None = None,
        result_type: Any = None,
        start_signal: Any = None,
        start_signal_args: Sequence[Any] = (),
        memo: Mapping[str, Any] | None = None,
        search_attributes: Mapping[str, SearchAttributeValue] | None = None,
        id_reuse_policy: WorkflowIDReusePolicy = WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        id_conflict_policy: WorkflowIDConflictPolicy = WorkflowIDConflictPolicy.FAIL,
    ) -> WorkflowHandle:
        """Start a workflow run; ``workflow`` is the class, its run method, or a type name.

        Raises ``WorkflowAlreadyStartedError`` if the id is running. Retrying with the
        same ``request_id`` returns the run the first call started. With
        ``start_signal`` (a signal method or name) this is signal-with-start: a running
        run with this id gets the signal; otherwise a new run starts with it.
        ``id_reuse_policy`` decides whether the id of a closed run may be reused and
        ``id_conflict_policy`` what happens when a run with the id is running.
        """
        if isinstance(workflow, str):
            type_name = workflow
        else:
            definition = definition_of(workflow)
            type_name = definition.name
            if result_type is None:
                result_type = definition.return_type
        all_args = list(args) if args else ([] if arg is None else [arg])
        request = service_pb2.StartWorkflowRequest(
            namespace=self.namespace,
            workflow_id=id,
            identity=self.identity,
            request_id=request_id or str(uuid.uuid4()),
        )
        request.workflow_type.name = type_name
        request.task_queue.name = task_queue
        request.input.CopyFrom(self.data_converter.to_payloads(all_args))
        if execution_timeout is not None:
            request.workflow_execution_timeout.FromTimedelta(execution_timeout)
        if run_timeout is not None:
            request.workflow_run_timeout.FromTimedelta(run_timeout)
        if task_timeout is not None:
            request.workflow_task_timeout.FromTimedelta(task_timeout)
        request.workflow_id_reuse_policy = int(id_reuse_policy)  # type: ignore[assignment]
        request.workflow_id_conflict_policy = int(id_conflict_policy)  # type: ignore[assignment]
        if start_signal is not None:
            request.signal_name = handler_name(start_signal, "__tideflow_signal__")
            request.signal_input.CopyFrom(self.data_converter.to_payloads(list(start_signal_args)))
        # Visibility: ``memo`` values are any data the converter encodes, returned by
        # list_workflows; ``search_attributes`` (str/int/float/bool/datetime) are
        # indexed for list_workflows / count_workflows queries.
        if memo:
            request.memo.CopyFrom(_encode_memo(self.data_converter, memo))
        if search_attributes:
            request.search_attributes.CopyFrom(encode_search_attributes(search_attributes))
        response = await self.call(self.service.StartWorkflow, request)
        return WorkflowHandle(self, id, run_id=response.run_id, result_type=result_type)

    async def execute_workflow(
        self,
        workflow: Any,
        arg: Any = None,
        *,
        args: Sequence[Any] = (),
        id: str,
        task_queue: str,
        execution_timeout: timedelta | None = None,
        run_timeout: timedelta | None = None,
        task_timeout: timedelta | None = None,
        request_id: str | None = None,
        result_type: Any = None,
        memo: Mapping[str, Any] | None = None,
        search_attributes: Mapping[str, SearchAttributeValue] | None = None,
    ) -> Any:
        """Start a workflow and wait for its result."""
        handle = await self.start_workflow(
            workflow,
            arg,
            args=args,
            id=id,
            task_queue=task_queue,
            execution_timeout=execution_timeout,
            run_timeout=run_timeout,
            task_timeout=task_timeout,
            request_id=request_id,
            result_type=result_type,
            memo=memo,
            search_attributes=search_attributes,
        )
        return await handle.result()

    def get_workflow_handle(
        self, workflow_id: str, *, run_id: str | None = None, result_type: Any = None
    ) -> WorkflowHandle:
        """A handle to an existing workflow (its newest run unless run_id is given)."""
        return WorkflowHandle(self, workflow_id, run_id=run_id, result_type=result_type)

    # ---------------------------------------------------------- visibility

    async def list_workflows(
        self, query: str = "", *, page_size: int = 1000
    ) -> AsyncIterator[WorkflowExecution]:
        """Runs matching ``query``, fetched page by page (``page_size`` runs a call)::

            async for wf in client.list_workflows("WorkflowType = 'Billing' AND "
                                                  "ExecutionStatus = 'Running'"):
                print(wf.id, wf.status, wf.search_attributes)

        The query language (fields, operators, ORDER BY) is described in the README
        and ``tideflow.server._visibility``; an invalid query raises
        ``InvalidArgumentError`` naming the offending token.
        """
        token = b""
        while True:
            request = service_pb2.ListWorkflowExecutionsRequest(
                namespace=self.namespace, page_size=page_size, next_page_token=token, query=query
            )
            response = await self.call(self.service.ListWorkflowExecutions, request)
            for info in response.executions:
                yield WorkflowExecution.from_info(info, self.data_converter)
            token = response.next_page_token
            if not token:
                return

    async def count_workflows(self, query: str = "") -> int:
        """How many runs match ``query`` (no ORDER BY)."""
        request = service_pb2.CountWorkflowExecutionsRequest(namespace=self.namespace, query=query)
        response = await self.call(self.service.CountWorkflowExecutions, request)
        return int(response.count)

    # ----------------------------------------------------------- schedules

    async def create_schedule(
        self,
        id: str,
        schedule: Schedule | None = None,
        *,
        action: ScheduleActionStartWorkflow | None = None,
        spec: ScheduleSpec | None = None,
        policy: SchedulePolicy | None = None,
        state: ScheduleState | None = None,
        request_id: str | None = None,
    ) -> ScheduleHandle:
        """Create a schedule (see ``tideflow.worker_sdk.schedules``): pass a
        ``Schedule`` or its parts. Raises ``ScheduleAlreadyRunningError`` if the id is
        taken (unless this is a retry with the same ``request_id``)."""
        if schedule is None:
            if action is None or spec is None:
                raise TypeError("create_schedule needs a Schedule, or action= and spec=")
            schedule = Schedule(
                action=action,
                spec=spec,
                policy=policy or SchedulePolicy(),
                state=state or ScheduleState(),
            )
        request = service_pb2.CreateScheduleRequest(
            namespace=self.namespace,
            schedule_id=id,
            identity=self.identity,
            request_id=request_id or str(uuid.uuid4()),
        )
        request.schedule.CopyFrom(schedule.to_proto(self.data_converter))
        try:
            await self.call(self.service.CreateSchedule, request)
        except exc.WorkflowAlreadyStartedError as error:
            raise ScheduleAlreadyRunningError(error.message, status=error.status) from None
        return ScheduleHandle(self, id)

    def get_schedule_handle(self, id: str) -> ScheduleHandle:
        """A handle to an existing schedule."""
        return ScheduleHandle(self, id)

    async def list_schedules(
        self, *, page_size: int = 1000
    ) -> AsyncIterator[ScheduleListDescription]:
        """Every schedule of the namespace, in id order."""
        token = b""
        while True:
            request = service_pb2.ListSchedulesRequest(
                namespace=self.namespace, maximum_page_size=page_size, next_page_token=token
            )
            response = await self.call(self.service.ListSchedules, request)
            for entry in response.schedules:
                yield ScheduleListDescription(
                    id=entry.schedule_id,
                    schedule=Schedule.from_proto(entry.schedule, self.data_converter),
                    info=ScheduleInfo.from_proto(entry.info),
                )
            token = response.next_page_token
            if not token:
                return

    # ------------------------------------------------------------------ DAGs

    async def start_dag(self, definition: Any, input: Any = None, **options: Any) -> Any:
        """Alias of ``dag.start_dag(client, definition, input, ...)``, which is typed
        and documents the options; returns a ``dag.DagHandle``. The DAG layer sits on
        top of the client, so it is imported only when called."""
        from .dag import start_dag

        return await start_dag(self, definition, input, **options)

    def get_dag_handle(self, id: str, *, run_id: str | None = None) -> Any:
        """Alias of ``dag.DagHandle(client, id)``: a handle to an existing DAG run."""
        from .dag import DagHandle

        return DagHandle(self, id, run_id=run_id)


class WorkflowHandle:
    def __init__(
        self, client: Client, workflow_id: str, *, run_id: str | None, result_type: Any = None
    ) -> None:
        self._client = client
        self.id = workflow_id
        self.run_id = run_id
        self._result_type = result_type

    def _execution(self) -> common_pb2.WorkflowExecution:
        return common_pb2.WorkflowExecution(workflow_id=self.id, run_id=self.run_id or "")

    async def result(self) -> Any:
        """Wait for the run to close; its result, or ``WorkflowFailureError``."""
        client = self._client
        execution = self._execution()
        while True:
            request = service_pb2.GetHistoryRequest(
                namespace=client.namespace,
                wait_new_event=True,
                history_event_filter_type=service_pb2.HISTORY_EVENT_FILTER_TYPE_CLOSE_EVENT,
            )
            request.execution.CopyFrom(execution)
            response = await client.call(client.service.GetHistory, request, timeout=70)
            if not response.history.events:
                continue
            close = response.history.events[-1]
            if close.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
                # Follow the chain to the run that finally closes for good.
                execution = common_pb2.WorkflowExecution(
                    workflow_id=self.id,
                    run_id=close.workflow_execution_continued_as_new_event_attributes.new_execution_run_id,
                )
                continue
            return self._outcome(close)

    def _outcome(self, event: HistoryEvent) -> Any:
        converter = self._client.data_converter
        et = event.event_type
        if et == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
            a = event.workflow_execution_completed_event_attributes
            values = converter.from_payloads(
                a.result if a.HasField("result") else None, [self._result_type]
            )
            return values[0] if values else None
        if et == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED:
            cause: BaseException = converter.from_failure(
                event.workflow_execution_failed_event_attributes.failure
            )
        elif et == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED:
            reason = event.workflow_execution_terminated_event_attributes.reason
            cause = exc.TerminatedError(
                f"workflow terminated: {reason}" if reason else "workflow terminated"
            )
        elif et == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT:
            cause = exc.TimeoutError("workflow timed out", type=None)
        elif et == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED:
            cause = exc.CancelledError("workflow cancelled")
        else:
            cause = exc.ApplicationError(f"workflow closed with {EventType.Name(et)}")
        raise exc.WorkflowFailureError(cause=cause)

    async def describe(self) -> WorkflowExecutionDescription:
        client = self._client
        request = service_pb2.DescribeWorkflowRequest(namespace=client.namespace)
        request.execution.CopyFrom(self._execution())
        response = await client.call(client.service.DescribeWorkflow, request)
        info = response.workflow_execution_info
        return WorkflowExecutionDescription(
            id=info.execution.workflow_id,
            run_id=info.execution.run_id,
            workflow_type=info.type.name,
            task_queue=info.task_queue,
            status=WorkflowExecutionStatus(info.status),
            start_time=info.start_time.ToDatetime(tzinfo=UTC),
            close_time=info.close_time.ToDatetime(tzinfo=UTC)
            if info.HasField("close_time")
            else None,
            history_length=info.history_length,
            raw=response,
        )

    async def signal(
        self,
        signal: Any,
        arg: Any = None,
        *,
        args: Sequence[Any] = (),
        request_id: str | None = None,
    ) -> None:
        """Send a signal (a ``@workflow.signal`` method or its name). Retried calls with
        the same ``request_id`` (one is made up per call) are delivered once."""
        client = self._client
        all_args = list(args) if args else ([] if arg is None else [arg])
        request = service_pb2.SignalWorkflowRequest(
            namespace=client.namespace,
            signal_name=handler_name(signal, "__tideflow_signal__"),
            identity=client.identity,
            request_id=request_id or str(uuid.uuid4()),
        )
        request.workflow_execution.CopyFrom(self._execution())
        request.input.CopyFrom(client.data_converter.to_payloads(all_args))
        await client.call(client.service.SignalWorkflow, request)

    async def query(
        self, query: Any, arg: Any = None, *, args: Sequence[Any] = (), result_type: Any = None
    ) -> Any:
        """Ask a ``@workflow.query`` method (or a query name) of the run; works on closed
        runs too. Raises ``WorkflowQueryFailedError`` if the handler raised."""
        client = self._client
        all_args = list(args) if args else ([] if arg is None else [arg])
        name = handler_name(query, "__tideflow_query__")
        if result_type is None and not isinstance(query, str):
            result_type = typing.get_type_hints(query).get("return")
        request = service_pb2.QueryWorkflowRequest(namespace=client.namespace)
        request.execution.CopyFrom(self._execution())
        request.query.query_type = name
        request.query.query_args.CopyFrom(client.data_converter.to_payloads(all_args))
        response = await client.call(client.service.QueryWorkflow, request, timeout=70)
        values = client.data_converter.from_payloads(response.query_result, [result_type])
        return values[0] if values else None

    async def cancel(self, reason: str | None = None) -> None:
        """Request cancellation: the workflow sees ``asyncio.CancelledError`` where it
        waits, may clean up, and then decides how it closes (CANCELED by default)."""
        client = self._client
        request = service_pb2.RequestCancelWorkflowRequest(
            namespace=client.namespace,
            identity=client.identity,
            request_id=str(uuid.uuid4()),
            reason=reason or "",
        )
        request.workflow_execution.CopyFrom(self._execution())
        await client.call(client.service.RequestCancelWorkflow, request)

    async def terminate(self, reason: str | None = None) -> None:
        client = self._client
        request = service_pb2.TerminateWorkflowRequest(
            namespace=client.namespace,
            reason=reason or "",
            identity=client.identity,
            request_id=str(uuid.uuid4()),
        )
        request.workflow_execution.CopyFrom(self._execution())
        await client.call(client.service.TerminateWorkflow, request)

    async def fetch_history(self) -> WorkflowHistory:
        """The run's whole history so far."""
        client = self._client
        events: list[HistoryEvent] = []
        token = b""
        while True:
            request = service_pb2.GetHistoryRequest(
                namespace=client.namespace, next_page_token=token
            )
            request.execution.CopyFrom(self._execution())
            response = await client.call(client.service.GetHistory, request)
            events.extend(response.history.events)
            token = response.next_page_token
            if not token:
                return WorkflowHistory(self.id, events)


_ = history_pb2


# ------------------------------------------------------------------ visibility


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowExecution:
    """One run as ``Client.list_workflows`` returns it."""

    id: str
    run_id: str
    workflow_type: str
    task_queue: str
    status: WorkflowExecutionStatus
    start_time: datetime
    close_time: datetime | None
    history_length: int
    memo: dict[str, Any]
    search_attributes: dict[str, SearchAttributeValue]
    raw_info: service_pb2.WorkflowExecutionInfo

    @staticmethod
    def from_info(
        info: service_pb2.WorkflowExecutionInfo, converter: DataConverter
    ) -> WorkflowExecution:
        return WorkflowExecution(
            id=info.execution.workflow_id,
            run_id=info.execution.run_id,
            workflow_type=info.type.name,
            task_queue=info.task_queue,
            status=WorkflowExecutionStatus(info.status),
            start_time=info.start_time.ToDatetime(tzinfo=UTC),
            close_time=info.close_time.ToDatetime(tzinfo=UTC)
            if info.HasField("close_time")
            else None,
            history_length=info.history_length,
            memo={
                key: converter.payload_converter.from_payload(payload)
                for key, payload in info.memo.fields.items()
            },
            search_attributes={
                key: value
                for key, value in sorted(decode_search_attributes(info.search_attributes).items())
                if value is not None
            },
            raw_info=info,
        )


def _encode_memo(converter: DataConverter, memo: Mapping[str, Any]) -> common_pb2.Memo:
    proto = common_pb2.Memo()
    for key, value in memo.items():
        proto.fields[key].CopyFrom(converter.payload_converter.to_payload(value))
    return proto
