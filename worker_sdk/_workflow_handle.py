"""What a client says about one workflow: ``WorkflowHandle`` (result, describe, signal,
query, cancel, terminate, history) and the values it returns. Re-exported from
``tideflow.worker_sdk.client``, where ``Client`` hands handles out."""

from __future__ import annotations

import json
import typing
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Concatenate, Generic, cast, overload

from google.protobuf import json_format
from typing_extensions import TypeVar

from tideflow.api.v1 import common_pb2, replication_pb2, service_pb2
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent

from . import exceptions as exc
from ._types import (
    MethodSyncNoParam,
    MethodSyncSingleParam,
    MultiParamSpec,
    ParamType,
)
from .workflow import handler_name

if TYPE_CHECKING:
    from .client import Client

Result = TypeVar("Result", default=Any)
T = TypeVar("T")


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
    #: The run's home site, its only writer.
    home_cluster: str = ""
    #: On a site holding a read-only replica: events behind the home as of the last
    #: pull, and seconds since that pull (None on the home).
    replica_events_behind: int | None = None
    replica_seconds_since_sync: float | None = None


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


class WorkflowHandle(Generic[Result]):
    """A workflow (its newest run, or the run ``run_id``); ``result()`` returns
    ``Result``, the run method's return type when the handle came from
    ``start_workflow(MyWorkflow.run, ...)``."""

    def __init__(
        self, client: Client, workflow_id: str, *, run_id: str | None, result_type: Any = None
    ) -> None:
        self._client = client
        self.id = workflow_id
        self.run_id = run_id
        self._result_type = result_type

    def _execution(self) -> common_pb2.WorkflowExecution:
        return common_pb2.WorkflowExecution(workflow_id=self.id, run_id=self.run_id or "")

    async def result(self) -> Result:
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
            return cast(Result, self._outcome(close))

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
            home_cluster=response.home_cluster,
            replica_events_behind=response.replica.events_behind
            if response.HasField("replica")
            else None,
            replica_seconds_since_sync=response.replica.seconds_since_sync
            if response.HasField("replica")
            else None,
        )

    async def handoff(self, to_cluster: str) -> int:
        """Move the run's home to site ``to_cluster``: the old home writes a HANDOFF
        event as its last and the new home takes over once its replica has it (at
        once when the link is up, else when it returns). Refused
        (FAILED_PRECONDITION) while a workflow task or an activity is in flight.
        Returns the run's new ownership epoch."""
        client = self._client
        request = replication_pb2.HandoffWorkflowRequest(
            namespace=client.namespace, to_cluster=to_cluster, identity=client.identity
        )
        request.execution.CopyFrom(self._execution())
        response = await client.call(client.sites.HandoffWorkflow, request)
        return int(response.new_version)

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

    @overload
    async def query(self, query: MethodSyncNoParam[Any, T]) -> T: ...

    @overload
    async def query(self, query: MethodSyncSingleParam[Any, ParamType, T], arg: ParamType) -> T: ...

    @overload
    async def query(
        self,
        query: Callable[Concatenate[Any, MultiParamSpec], T],
        *,
        args: Sequence[Any],
    ) -> T: ...

    @overload
    async def query(
        self, query: str, arg: Any = None, *, args: Sequence[Any] = (), result_type: Any = None
    ) -> Any: ...

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
