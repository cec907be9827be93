"""``tideflow server start-dev`` as a real process, SIGKILLed while a run of the official
temporalio SDK is in flight: after a new process starts on the same database and port,
the temporalio client and worker reconnect by themselves and the run completes, its
history intact (it replays)."""

from __future__ import annotations

import uuid
from pathlib import Path

from helpers import Processes, ServerProcess, eventually
from temporal_door import replays, signals_handled
from temporal_workflows import ALL_ACTIVITIES, ALL_WORKFLOWS, InboxWorkflow
from temporalio.client import Client
from temporalio.worker import Worker


async def test_server_sigkill_mid_run(procs: Processes, tmp_path: Path) -> None:
    server = ServerProcess(procs, f"sqlite:///{tmp_path / 'tideflow.db'}")
    first = await server.start()
    assert "Temporal API (temporal.api.workflowservice.v1.WorkflowService) served" in (
        first.tail(20_000)
    )
    client = await Client.connect(server.address, namespace="default")
    queue = f"crash-{uuid.uuid4()}"
    async with Worker(client, task_queue=queue, workflows=ALL_WORKFLOWS, activities=ALL_ACTIVITIES):
        handle = await client.start_workflow(
            InboxWorkflow.run, "before", id=f"crash-{uuid.uuid4()}", task_queue=queue
        )
        await eventually(lambda: signals_handled(handle, 0), "the first workflow task")
        await handle.signal(InboxWorkflow.add, "signalled")

        async def seen(expected: list[str]) -> bool:
            return bool(await handle.query(InboxWorkflow.items) == expected)

        await eventually(lambda: signals_handled(handle, 1), "the signal handled")
        assert await seen(["before", "signalled"])
        await server.kill()
        await server.start()
        # The client's calls are retried until the new process answers.
        await handle.signal(InboxWorkflow.add, "after restart")
        await eventually(lambda: signals_handled(handle, 2), "the run going on")
        assert await seen(["before", "signalled", "after restart"])
        await handle.signal(InboxWorkflow.close)
        assert await handle.result() == ["before", "signalled", "after restart"]
    await replays(handle)
