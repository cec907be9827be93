"""Worker interceptors: supported hooks around what a worker does, Temporal-style.

A ``Worker(..., interceptors=[...])`` builds a chain at construction: the first
interceptor is outermost. Each hook receives the next handler of the chain and
returns the handler to use instead; the default passes ``next`` through, so a
subclass overrides only the hooks it needs.

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

from collections.abc import Awaitable, Callable

from tideflow.api.v1.service_pb2 import PollWorkflowTaskResponse

# Handles one polled workflow task (a real one or a query) to the end: runs the
# workflow code and answers the server. Exceptions it raises are logged by the worker.
WorkflowTaskHandler = Callable[[PollWorkflowTaskResponse], Awaitable[None]]


class WorkerInterceptor:
    """Base class of worker interceptors; see the module docstring."""

    def intercept_workflow_task(self, next: WorkflowTaskHandler) -> WorkflowTaskHandler:
        """Wrap the handling of each workflow task this worker polls (from its task
        queue or its sticky queue, queries included): the returned handler runs instead
        of ``next`` and decides whether, when and with what to call it."""
        return next
