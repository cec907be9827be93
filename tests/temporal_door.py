"""A tideflow server on a real port with the official temporalio client and worker
attached through its Temporal door: the shared set-up of tests/test_temporal_*.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from helpers import running_server
from temporal_workflows import ALL_ACTIVITIES, ALL_WORKFLOWS
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.worker import Replayer, Worker

from tideflow.server import TideflowServer


class Door:
    """The server, its temporalio client and the task queue its worker serves."""

    def __init__(self, server: TideflowServer, client: Client, queue: str) -> None:
        self.server = server
        self.client = client
        self.queue = queue

    async def start(self, run: Any, *args: Any, **kwargs: Any) -> WorkflowHandle[Any, Any]:
        return await self.client.start_workflow(
            run, args=list(args), id=f"t-{uuid.uuid4()}", task_queue=self.queue, **kwargs
        )


@asynccontextmanager
async def open_door(folder: Path, **worker_options: Any) -> AsyncIterator[Door]:
    """A server on a fresh SQLite file in ``folder`` and a temporalio worker of every
    workflow and activity of tests/temporal_workflows.py (``worker_options`` go to
    ``temporalio.worker.Worker``)."""
    async with running_server(folder) as server:
        assert server.temporal_api, "the Temporal door is served when temporalio is installed"
        client = await Client.connect(server.address, namespace="default")
        queue = f"tq-{uuid.uuid4()}"
        async with Worker(
            client,
            task_queue=queue,
            workflows=ALL_WORKFLOWS,
            activities=ALL_ACTIVITIES,
            **worker_options,
        ):
            yield Door(server, client, queue)


async def replays(handle: WorkflowHandle[Any, Any]) -> None:
    """The run's whole history, fetched through the door, replays in temporalio's
    Replayer without a non-determinism error."""
    history = await handle.fetch_history()
    result = await Replayer(workflows=ALL_WORKFLOWS).replay_workflow(
        history, raise_on_replay_failure=True
    )
    assert result.replay_failure is None


async def signals_handled(handle: WorkflowHandle[Any, Any], signals: int) -> bool:
    """``signals`` signals are in the run's history and a workflow task completed after
    the last of them, with no newer event (no task in flight). With 0: the first
    workflow task completed, so a signal sent now runs after the workflow's first
    steps (one sent earlier is handled before the body, in the SDK's order, and the
    inbox's items would come in another order). With 1 or more: a query now sees them.
    """
    types = [event.event_type async for event in handle.fetch_history_events()]
    return (
        types.count(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED) == signals
        and types[-1] == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    )
