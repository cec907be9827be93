"""Interceptors: supported hooks around what a client and a worker do, Temporal-style.

A ``Worker(..., interceptors=[...])`` or ``Client.connect(..., interceptors=[...])``
builds a chain: the first interceptor is outermost. Each hook receives the next
handler of the chain and returns the handler to use instead; the default passes
``next`` through, so a subclass overrides only the hooks it needs.

- ``ClientInterceptor.intercept_call``: every RPC the client makes (the workers' polls
  and answers included), with the request and the gRPC metadata it will carry.
- ``WorkerInterceptor.intercept_workflow_task`` (workflow inbound): the handling of
  each workflow task.
- ``WorkerInterceptor.intercept_workflow_commands`` (workflow outbound): the commands
  the workflow code produced in a task, before they are sent. Only new work is here,
  never what a replay re-derives from history, so a hook here runs once per command
  (a replay-safe place to add headers, e.g. trace context on ScheduleActivityTask).
- ``WorkerInterceptor.intercept_activity``: the execution of each activity attempt.

``tideflow.worker_sdk.tracing.TracingInterceptor`` (OpenTelemetry) is built on these.

```python
class Recording(WorkerInterceptor):
    def __init__(self) -> None:
        self.runs: list[str] = []

    def intercept_workflow_task(self, next: WorkflowTaskHandler) -> WorkflowTaskHandler:
        async def handle(task: PollWorkflowTaskResponse) -> None:
            self.runs.append(task.workflow_execution.run_id)
            await next(task)

        return handle
```
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from tideflow.api.v1.command_pb2 import Command
from tideflow.api.v1.service_pb2 import PollActivityTaskResponse, PollWorkflowTaskResponse

# Handles one polled workflow task (a real one or a query) to the end: runs the
# workflow code and answers the server. Exceptions it raises are logged by the worker.
WorkflowTaskHandler = Callable[[PollWorkflowTaskResponse], Awaitable[None]]
# Receives the commands of a workflow task (new work only) before they are sent; may
# change them in place (headers), add or drop none.
WorkflowCommandsHandler = Callable[[PollWorkflowTaskResponse, list[Command]], None]
# Runs one activity attempt's code and returns its result (or raises its failure).
ActivityHandler = Callable[[PollActivityTaskResponse], Awaitable[Any]]


@dataclass(slots=True, kw_only=True)
class ClientCallInput:
    """One RPC: ``rpc`` its name (``StartWorkflow``), ``request`` the message (an
    interceptor may change it, e.g. its ``header``), ``metadata`` gRPC metadata sent
    with it (add entries to propagate context), ``timeout`` its deadline in seconds.
    ``target`` (the stub method) and ``retry_for`` (seconds the client retries while
    the server is unreachable) are the client's own."""

    rpc: str
    request: Message
    metadata: MutableMapping[str, str]
    timeout: float
    target: Any = field(default=None, repr=False)
    retry_for: float = field(default=0.0, repr=False)


ClientCallHandler = Callable[[ClientCallInput], Awaitable[Any]]


class ClientInterceptor:
    """Base class of client interceptors; see the module docstring."""

    def intercept_call(self, next: ClientCallHandler) -> ClientCallHandler:
        """Wrap every RPC of the client: the returned handler runs instead of
        ``next`` and returns its response (or raises its ``RPCError``)."""
        return next


class WorkerInterceptor:
    """Base class of worker interceptors; see the module docstring."""

    def intercept_workflow_task(self, next: WorkflowTaskHandler) -> WorkflowTaskHandler:
        """Wrap the handling of each workflow task this worker polls (from its task
        queue or its sticky queue, queries included): the returned handler runs instead
        of ``next`` and decides whether, when and with what to call it."""
        return next

    def intercept_workflow_commands(self, next: WorkflowCommandsHandler) -> WorkflowCommandsHandler:
        """Wrap the hand-off of a workflow task's new commands (workflow outbound)."""
        return next

    def intercept_activity(self, next: ActivityHandler) -> ActivityHandler:
        """Wrap the execution of each activity attempt: ``activity.info()`` works
        inside; the result returned is what the worker reports."""
        return next
