"""A client and a worker in one process that starts a workflow eagerly and dies
holding its first workflow task, for tests/test_eager_start.py.

    python tests/procs/eager_starter.py HOST:PORT TASK_QUEUE WORKFLOW_ID MARKER

Runs a ``Worker`` on TASK_QUEUE (identity ``eager-starter``) and, through the same
client, starts ``helpers_eager_start.OneStep`` as WORKFLOW_ID with
``request_eager_start=True`` and a one-second workflow task timeout. The worker holds
every workflow task it is given: it writes MARKER (its pid, the task's attempt and
the workflow id; write-then-rename) and blocks, so only a SIGKILL and the server's
workflow task timeout end the task.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers_eager_start import OneStep, add_one

from tideflow.api.v1 import service_pb2
from tideflow.worker_sdk import Client, Worker
from tideflow.worker_sdk.interceptor import (
    WorkerInterceptor,
    WorkflowTaskHandler,
)


class HoldsEveryTask(WorkerInterceptor):
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def intercept_workflow_task(self, next: WorkflowTaskHandler) -> WorkflowTaskHandler:
        async def handle(task: service_pb2.PollWorkflowTaskResponse) -> None:
            note = {
                "pid": os.getpid(),
                "attempt": task.attempt,
                "workflow": task.workflow_execution.workflow_id,
            }
            partial = self.marker.with_suffix(".partial")
            partial.write_text(json.dumps(note))
            partial.rename(self.marker)
            await asyncio.Event().wait()

        return handle


async def main(address: str, queue: str, workflow_id: str, marker: str) -> None:
    client = await Client.connect(address, identity="eager-starter")
    worker = Worker(
        client,
        task_queue=queue,
        workflows=[OneStep],
        activities=[add_one],
        interceptors=[HoldsEveryTask(Path(marker))],
    )
    async with worker:
        await client.start_workflow(
            OneStep.run,
            1,
            id=workflow_id,
            task_queue=queue,
            task_timeout=timedelta(seconds=1),
            request_eager_start=True,
        )
        print("started", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
