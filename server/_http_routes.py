"""The routes of the HTTP API: which path calls which WorkflowService RPC, and where
the path's and query string's parameters go in the request message.

Paths follow Temporal's HTTP API where it has one (``/api/v1/namespaces/{namespace}/
workflows/{workflow_id}`` ...); the schedule actions ``pause``, ``unpause`` and
``trigger`` are shorthands for ``patch`` with a fixed body. Both the server
(server/_http_api.py) and the OpenAPI document (server/_http_openapi.py) are built from
this one table, so neither can list a route the other lacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from tideflow.api.v1 import service_pb2

_SERVICE = service_pb2.DESCRIPTOR.services_by_name["WorkflowService"]
_NS = "/api/v1/namespaces/{namespace}"
_WF = _NS + "/workflows/{workflow_id}"
_SCHEDULE = _NS + "/schedules/{schedule_id}"
# The workflow id of a call about one run, and its run id (optional, latest run).
_EXECUTION = {"workflow_id": "execution.workflowId"}
_WORKFLOW_EXECUTION = {"workflow_id": "workflowExecution.workflowId"}
_RUN_ID = {"runId": "execution.runId"}
_WORKFLOW_RUN_ID = {"runId": "workflowExecution.runId"}


@dataclass(frozen=True, slots=True)
class Route:
    """``method path`` calls ``rpc``. ``params`` maps each ``{name}`` of the path to a
    dotted field of the request (proto3 JSON names), ``query`` each query-string
    parameter; a route with ``body`` reads the request's other fields from a JSON body,
    and ``fixed`` (JSON) is merged in last (what a shorthand route does)."""

    method: str
    path: str
    rpc: str
    summary: str
    params: Mapping[str, str]
    query: Mapping[str, str] = field(default_factory=dict)
    body: bool = False
    fixed: Mapping[str, Any] = field(default_factory=dict)

    @property
    def request_class(self) -> type[Message]:
        return GetMessageClass(_SERVICE.methods_by_name[self.rpc].input_type)

    @property
    def response_class(self) -> type[Message]:
        return GetMessageClass(_SERVICE.methods_by_name[self.rpc].output_type)

    def request_json(
        self, path: Mapping[str, str], query: Mapping[str, str], body: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The request message's JSON: the body, then the path's and query string's
        parameters, then ``fixed`` (later ones win)."""
        merged: dict[str, Any] = dict(body)
        for name, dotted in self.params.items():
            _set(merged, dotted, path[name])
        for name, dotted in self.query.items():
            if name in query:
                _set(merged, dotted, _typed(self.request_class.DESCRIPTOR, dotted, query[name]))
        _merge(merged, self.fixed)
        return merged


def _typed(descriptor: Any, dotted: str, text: str) -> Any:
    """A query-string value as the JSON its field takes: proto3 JSON reads numbers from
    strings, but a bool only from ``true``/``false`` literals."""
    *parents, last = dotted.split(".")
    for name in parents:
        descriptor = _field(descriptor, name).message_type
    if _field(descriptor, last).type == FieldDescriptor.TYPE_BOOL:
        return text.strip().lower() in ("true", "1")
    return text


def _field(descriptor: Any, json_name: str) -> FieldDescriptor:
    field: FieldDescriptor = next(f for f in descriptor.fields if f.json_name == json_name)
    return field


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for name in parents:
        child = data.get(name)
        if not isinstance(child, dict):
            child = data[name] = {}
        data = child
    data[last] = value


def _merge(into: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


_NS_PARAM = {"namespace": "namespace"}
_LIST_QUERY = {"query": "query", "pageSize": "pageSize", "nextPageToken": "nextPageToken"}
_SCHEDULE_PARAMS = {**_NS_PARAM, "schedule_id": "scheduleId"}

ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/v1/system-info", "GetSystemInfo", "Server version and capabilities", {}),
    Route("GET", "/api/v1/cluster-info", "DescribeCluster", "The cluster's nodes and shards", {}),
    Route(
        "GET",
        _NS + "/workflows",
        "ListWorkflowExecutions",
        "List runs matching a visibility query",
        _NS_PARAM,
        query=_LIST_QUERY,
    ),
    Route(
        "GET",
        _NS + "/workflow-count",
        "CountWorkflowExecutions",
        "Count runs matching a visibility query",
        _NS_PARAM,
        query={"query": "query"},
    ),
    Route(
        "POST",
        _WF,
        "StartWorkflow",
        "Start a workflow run",
        {**_NS_PARAM, "workflow_id": "workflowId"},
        body=True,
    ),
    Route(
        "GET",
        _WF,
        "DescribeWorkflow",
        "Describe a run (latest run unless runId)",
        {**_NS_PARAM, **_EXECUTION},
        query=_RUN_ID,
    ),
    Route(
        "GET",
        _WF + "/history",
        "GetHistory",
        "A page of a run's history",
        {**_NS_PARAM, **_EXECUTION},
        query={
            **_RUN_ID,
            "nextPageToken": "nextPageToken",
            "maximumPageSize": "maximumPageSize",
            # Long poll: wait (up to the call's timeout) for events past the token.
            "waitNewEvent": "waitNewEvent",
        },
    ),
    Route(
        "POST",
        _WF + "/signal/{signal_name}",
        "SignalWorkflow",
        "Send a signal to a run",
        {**_NS_PARAM, **_WORKFLOW_EXECUTION, "signal_name": "signalName"},
        query=_WORKFLOW_RUN_ID,
        body=True,
    ),
    Route(
        "POST",
        _WF + "/query/{query_type}",
        "QueryWorkflow",
        "Query a run (a worker answers)",
        {**_NS_PARAM, **_EXECUTION, "query_type": "query.queryType"},
        query=_RUN_ID,
        body=True,
    ),
    Route(
        "POST",
        _WF + "/cancel",
        "RequestCancelWorkflow",
        "Request cancellation of a run",
        {**_NS_PARAM, **_WORKFLOW_EXECUTION},
        query=_WORKFLOW_RUN_ID,
        body=True,
    ),
    Route(
        "POST",
        _WF + "/terminate",
        "TerminateWorkflow",
        "Terminate a run at once",
        {**_NS_PARAM, **_WORKFLOW_EXECUTION},
        query=_WORKFLOW_RUN_ID,
        body=True,
    ),
    Route(
        "GET",
        _NS + "/task-queues/{task_queue}",
        "DescribeTaskQueue",
        "Pollers and backlog of a task queue",
        {**_NS_PARAM, "task_queue": "taskQueue.name"},
    ),
    Route(
        "GET",
        _NS + "/schedules",
        "ListSchedules",
        "List schedules",
        _NS_PARAM,
        query={"maximumPageSize": "maximumPageSize", "nextPageToken": "nextPageToken"},
    ),
    Route("POST", _SCHEDULE, "CreateSchedule", "Create a schedule", _SCHEDULE_PARAMS, body=True),
    Route("GET", _SCHEDULE, "DescribeSchedule", "Describe a schedule", _SCHEDULE_PARAMS),
    Route("DELETE", _SCHEDULE, "DeleteSchedule", "Delete a schedule", _SCHEDULE_PARAMS),
    Route(
        "POST",
        _SCHEDULE + "/patch",
        "PatchSchedule",
        "Pause, unpause or trigger a schedule",
        _SCHEDULE_PARAMS,
        body=True,
    ),
    Route(
        "POST",
        _SCHEDULE + "/pause",
        "PatchSchedule",
        "Pause a schedule (patch.pause)",
        _SCHEDULE_PARAMS,
        body=True,
        fixed={"patch": {"pause": True}},
    ),
    Route(
        "POST",
        _SCHEDULE + "/unpause",
        "PatchSchedule",
        "Unpause a schedule (patch.unpause)",
        _SCHEDULE_PARAMS,
        body=True,
        fixed={"patch": {"unpause": True}},
    ),
    Route(
        "POST",
        _SCHEDULE + "/trigger",
        "PatchSchedule",
        "Start the schedule's action now (patch.triggerImmediately)",
        _SCHEDULE_PARAMS,
        body=True,
        fixed={"patch": {"triggerImmediately": {}}},
    ),
)
