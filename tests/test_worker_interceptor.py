"""``Worker(interceptors=[...])``: the chain wraps every workflow task, first
interceptor outermost, and an interceptor may act before and after the task.

The hook is store-agnostic, so one SQLite server (``running_server(tmp_path)``) is
enough; the engine suites use it on both stores (test_sticky.py, test_child_workflows.py).
"""

from __future__ import annotations

from pathlib import Path

from helpers import bounded, new_id, running_server

from tideflow.api.v1.service_pb2 import PollWorkflowTaskResponse
from tideflow.worker_sdk import Client, Worker, WorkerInterceptor, workflow
from tideflow.worker_sdk.interceptor import WorkflowTaskHandler


@workflow.defn
class Greet:
    @workflow.run
    async def run(self, name: str) -> str:
        return f"hello {name}"


class Trail(WorkerInterceptor):
    """Appends ``<name>:in`` before and ``<name>:out`` after each workflow task."""

    def __init__(self, name: str, trail: list[str]) -> None:
        self.name = name
        self.trail = trail

    def intercept_workflow_task(self, next: WorkflowTaskHandler) -> WorkflowTaskHandler:
        async def around(task: PollWorkflowTaskResponse) -> None:
            self.trail.append(f"{self.name}:in:{task.workflow_type.name}")
            await next(task)
            self.trail.append(f"{self.name}:out")

        return around


async def test_interceptors_wrap_each_workflow_task_first_outermost(tmp_path: Path) -> None:
    trail: list[str] = []
    queue = new_id("q")
    async with running_server(tmp_path) as server, await Client.connect(server.address) as client:
        worker = Worker(
            client,
            task_queue=queue,
            workflows=[Greet],
            interceptors=[Trail("outer", trail), Trail("inner", trail), WorkerInterceptor()],
        )
        async with worker:
            result = await bounded(
                client.execute_workflow(Greet.run, "you", id=new_id("greet"), task_queue=queue)
            )
    assert result == "hello you"
    # One workflow task ran the whole workflow; the base class passes it through.
    assert trail == ["outer:in:Greet", "inner:in:Greet", "inner:out", "outer:out"]
