"""OpenTelemetry tracing (``pip install 'tideflow[otel]'``), built on the public
interceptors (``tideflow.worker_sdk.interceptor``).

```python
from tideflow.worker_sdk.tracing import TracingInterceptor

tracing = TracingInterceptor()            # the global tracer provider, or tracer=...
client = await Client.connect(address, interceptors=[tracing])
worker = Worker(client, task_queue="q", workflows=[...], activities=[...],
                interceptors=[tracing])
```

Spans (all in one trace per started workflow, across processes):

- ``StartWorkflow:<type>``, ``SignalWorkflow``, ``QueryWorkflow``... (CLIENT): each
  call the client makes, except the workers' own polls and answers. The W3C trace
  context goes out in the call's gRPC metadata (``traceparent``) and, for a start, in
  the workflow's header, which the server keeps in its history.
- ``RunWorkflowTask:<type>`` (one per workflow task a worker handles; queries are
  ``HandleQuery:<name>``), child of the start's context read from the run's first
  event (remembered per run for sticky tasks, which carry only new events).
- ``StartActivity:<type>`` and ``StartChildWorkflow:<type>``, children of the
  workflow task that scheduled them; their context goes into the command's header.
- ``RunActivity:<type>`` (SERVER), child of its ``StartActivity``: each attempt.

Replay-safe: spans come from the hooks around real work (a task handled, a command
sent, an attempt run), never from workflow code, and the commands hook sees only new
commands, never what a replay re-derives, so replaying a run (a cache miss, a
worker restart) adds no span. The trace context travels as a JSON payload under the
header key ``_tracer-data`` (encoded by the payload codec like any header).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tideflow.api.v1.command_pb2 import Command
from tideflow.api.v1.common_pb2 import Header, Payload
from tideflow.api.v1.history_pb2 import EventType
from tideflow.api.v1.service_pb2 import PollActivityTaskResponse, PollWorkflowTaskResponse

from .interceptor import (
    ActivityHandler,
    ClientCallHandler,
    ClientCallInput,
    ClientInterceptor,
    WorkerInterceptor,
    WorkflowCommandsHandler,
    WorkflowTaskHandler,
)

HEADER_KEY = "_tracer-data"
# The worker's own calls: a span per long poll or answer says nothing a task span
# does not, and the task spans cover them.
_UNTRACED_PREFIXES = ("Poll", "Respond", "RecordActivityHeartbeat", "GetSystemInfo")
_UNTRACED = frozenset({"GetHistory", "ShutdownWorker"})
# Runs whose start context a worker remembers for their sticky tasks.
_REMEMBERED_RUNS = 10_000
_PROPAGATOR = TraceContextTextMapPropagator()


class TracingInterceptor(ClientInterceptor, WorkerInterceptor):
    """Client and worker interceptor that traces with OpenTelemetry; give the same
    object to ``Client.connect`` and to ``Worker`` (or either alone)."""

    def __init__(self, tracer: trace.Tracer | None = None) -> None:
        self._tracer = tracer or trace.get_tracer("tideflow")
        self._run_contexts: OrderedDict[str, otel_context.Context] = OrderedDict()

    # ----------------------------------------------------------------- client

    def intercept_call(self, next: ClientCallHandler) -> ClientCallHandler:
        async def call(input: ClientCallInput) -> Any:
            rpc = input.rpc
            if rpc.startswith(_UNTRACED_PREFIXES) or rpc in _UNTRACED:
                return await next(input)
            request: Any = input.request
            kind = getattr(getattr(request, "workflow_type", None), "name", "")
            name = f"{rpc}:{kind}" if kind else rpc
            attributes = {"tideflow.rpc": rpc}
            workflow_id = getattr(request, "workflow_id", "")
            if isinstance(workflow_id, str) and workflow_id:
                attributes["tideflow.workflow_id"] = workflow_id
            with self._tracer.start_as_current_span(
                name, kind=SpanKind.CLIENT, attributes=attributes
            ):
                carrier: dict[str, str] = {}
                _PROPAGATOR.inject(carrier)
                input.metadata.update(carrier)
                if rpc in ("StartWorkflow", "SignalWithStartWorkflow"):
                    _put(request.header, carrier)
                return await next(input)

        return call

    # ------------------------------------------------------- workflow inbound

    def intercept_workflow_task(self, next: WorkflowTaskHandler) -> WorkflowTaskHandler:
        async def handle(task: PollWorkflowTaskResponse) -> None:
            parent = self._start_context(task)
            execution = task.workflow_execution
            if task.HasField("query"):
                name = f"HandleQuery:{task.query.query_type}"
            else:
                name = f"RunWorkflowTask:{task.workflow_type.name}"
            attributes: dict[str, str | int] = {
                "tideflow.workflow_id": execution.workflow_id,
                "tideflow.run_id": execution.run_id,
                "tideflow.workflow_type": task.workflow_type.name,
                "tideflow.attempt": task.attempt,
            }
            with self._tracer.start_as_current_span(
                name, context=parent, kind=SpanKind.SERVER, attributes=attributes
            ) as span:
                try:
                    await next(task)
                except Exception as error:
                    span.record_exception(error)
                    span.set_status(Status(StatusCode.ERROR, str(error)))
                    raise

        return handle

    def _start_context(self, task: PollWorkflowTaskResponse) -> otel_context.Context | None:
        """The context the run was started in: from its first event when the task
        carries the whole history, else as remembered from an earlier task."""
        run_id = task.workflow_execution.run_id
        events = task.history.events
        if events and events[0].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            header = events[0].workflow_execution_started_event_attributes.header
            context = _get(header)
            if context is None:
                return None
            self._run_contexts[run_id] = context
            while len(self._run_contexts) > _REMEMBERED_RUNS:
                self._run_contexts.popitem(last=False)
            return context
        remembered = self._run_contexts.get(run_id)
        if remembered is not None:
            self._run_contexts.move_to_end(run_id)
        return remembered

    # ------------------------------------------------------ workflow outbound

    def intercept_workflow_commands(self, next: WorkflowCommandsHandler) -> WorkflowCommandsHandler:
        def send(task: PollWorkflowTaskResponse, commands: list[Command]) -> None:
            for command in commands:
                which = command.WhichOneof("attributes")
                if which == "schedule_activity_task_command_attributes":
                    attrs: Any = command.schedule_activity_task_command_attributes
                    self._mark(f"StartActivity:{attrs.activity_type.name}", attrs.header)
                elif which == "start_child_workflow_execution_command_attributes":
                    attrs = command.start_child_workflow_execution_command_attributes
                    self._mark(f"StartChildWorkflow:{attrs.workflow_type.name}", attrs.header)
            next(task, commands)

        return send

    def _mark(self, name: str, header: Header) -> None:
        """A span for a command sent, its context into the command's header."""
        with self._tracer.start_as_current_span(name, kind=SpanKind.CLIENT):
            carrier: dict[str, str] = {}
            _PROPAGATOR.inject(carrier)
            _put(header, carrier)

    # --------------------------------------------------------------- activity

    def intercept_activity(self, next: ActivityHandler) -> ActivityHandler:
        async def run(task: PollActivityTaskResponse) -> Any:
            attributes: dict[str, str | int] = {
                "tideflow.activity_id": task.activity_id,
                "tideflow.activity_type": task.activity_type.name,
                "tideflow.workflow_id": task.workflow_execution.workflow_id,
                "tideflow.attempt": task.attempt,
            }
            with self._tracer.start_as_current_span(
                f"RunActivity:{task.activity_type.name}",
                context=_get(task.header),
                kind=SpanKind.SERVER,
                attributes=attributes,
            ) as span:
                try:
                    return await next(task)
                except Exception as error:
                    span.record_exception(error)
                    span.set_status(Status(StatusCode.ERROR, str(error)))
                    raise

        return run


def _put(header: Header, carrier: Mapping[str, str]) -> None:
    if carrier:
        header.fields[HEADER_KEY].CopyFrom(
            Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(dict(carrier)).encode())
        )


def _get(header: Header) -> otel_context.Context | None:
    """The context a header carries (None: none, or not readable)."""
    payload = header.fields.get(HEADER_KEY)
    if payload is None:
        return None
    try:
        carrier = json.loads(payload.data)
    except ValueError:
        return None
    if not isinstance(carrier, dict):
        return None
    return _PROPAGATOR.extract(carrier)
