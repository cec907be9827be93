"""Eager workflow start scenarios, shared by test_eager_start.py (what the runs did:
histories and the server's trace) and test_tla_eager_traces.py (TLC decides whether
their traces are behaviours of tla/EngineCore.tla).

A start with ``request_eager_start=True`` whose client has a worker of the task queue
with a free slot is started with its first workflow task in one commit: the trace's
``StartRun`` line appends WORKFLOW_TASK_STARTED and writes no workflow task row, and
no ``RecordWorkflowTaskStarted`` line follows for that task. A declined one is a plain
start, its task polled (a ``RecordWorkflowTaskStarted`` line).

Not a test module (no ``test_`` prefix): test modules import it by name.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from helpers import Proc, Processes, eventually, new_id
from helpers_tla import read_lines, trace_of

from tideflow.api.v1 import service_pb2
from tideflow.worker_sdk import Client, Worker, WorkflowHandle, activity, workflow
from tideflow.worker_sdk.interceptor import WorkerInterceptor, WorkflowTaskHandler

WAIT_S = 60.0
EAGER_STARTER = Path(__file__).parent / "procs" / "eager_starter.py"


@activity.defn
async def add_one(value: int) -> int:
    return value + 1


@workflow.defn
class OneStep:
    @workflow.run
    async def run(self, value: int) -> int:
        result: int = await workflow.execute_activity(
            add_one, value, start_to_close_timeout=timedelta(seconds=30)
        )
        return result


def start_lines(trace_dir: Path, workflow_id: str) -> list[dict[str, Any]]:
    return read_lines(trace_of(trace_dir, workflow_id))


def started_eagerly(lines: list[dict[str, Any]]) -> bool:
    """Whether the run's first workflow task started in its StartRun commit (and was
    never dispatched: no task row, no RecordWorkflowTaskStarted of attempt 1)."""
    start = lines[0]
    assert start["action"] == "StartRun", start
    types = [e["type"] for e in start["events"]]
    eager = bool(types[-1] == "WORKFLOW_TASK_STARTED")
    task_rows = [r for r in start["rows"]["new_tasks"] if r["kind"] == "WORKFLOW"]
    assert eager == (not task_rows), (types, task_rows)
    return eager


def polled_first_tasks(lines: list[dict[str, Any]]) -> list[int]:
    """The attempts of the run's first workflow task (before its first completion)
    that a worker took through a poll."""
    polled = []
    for line in lines:
        if line["action"] == "CompleteWorkflowTask":
            break
        if line["action"] == "RecordWorkflowTaskStarted":
            polled.append(line["args"]["task"]["attempt"])
    return polled


async def eager_run(client: Client, queue: str) -> WorkflowHandle[int]:
    """A OneStep run started eagerly by ``client``, whose worker runs it."""
    async with Worker(client, task_queue=queue, workflows=[OneStep], activities=[add_one]):
        handle = await client.start_workflow(
            OneStep.run, 1, id=new_id("eager-start"), task_queue=queue, request_eager_start=True
        )
        async with asyncio.timeout(WAIT_S):
            assert await handle.result() == 2
    return handle


class HoldsFirstTask(WorkerInterceptor):
    """Holds the worker's first workflow task until ``release`` is set."""

    def __init__(self) -> None:
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    def intercept_workflow_task(self, next: WorkflowTaskHandler) -> WorkflowTaskHandler:
        async def handle(task: service_pb2.PollWorkflowTaskResponse) -> None:
            if not self.holding.is_set():
                self.holding.set()
                await self.release.wait()
            await next(task)

        return handle


@dataclass
class Declined:
    no_local_worker: WorkflowHandle[int]
    no_free_slot: WorkflowHandle[int]
    holder: WorkflowHandle[int]


async def declined_runs(client: Client, server_address: str, queue: str) -> Declined:
    """Starts that ask for eager execution but get a plain start: the client has no
    worker of the queue (the worker runs on another client), and the client's worker
    has no free workflow task slot (its one slot holds another run's task)."""
    other = await Client.connect(server_address)
    async with other, Worker(other, task_queue=queue, workflows=[OneStep], activities=[add_one]):
        alone = await client.start_workflow(
            OneStep.run, 1, id=new_id("eager-none"), task_queue=queue, request_eager_start=True
        )
        async with asyncio.timeout(WAIT_S):
            assert await alone.result() == 2
    hold = HoldsFirstTask()
    async with Worker(
        client,
        task_queue=queue,
        workflows=[OneStep],
        activities=[add_one],
        max_concurrent_workflow_tasks=1,
        # No sticky queue: a task that finds the one slot taken is not parked there
        # until the sticky schedule-to-start timeout.
        max_cached_workflows=0,
        interceptors=[hold],
    ):
        holder = await client.start_workflow(
            OneStep.run, 1, id=new_id("eager-holder"), task_queue=queue, request_eager_start=True
        )
        async with asyncio.timeout(WAIT_S):
            await hold.holding.wait()
            busy = await client.start_workflow(
                OneStep.run, 1, id=new_id("eager-busy"), task_queue=queue, request_eager_start=True
            )
            hold.release.set()
            assert (await holder.result(), await busy.result()) == (2, 2)
    return Declined(alone, busy, holder)


@dataclass
class KilledStarter:
    workflow_id: str
    killed: Proc
    marker: Path


async def kill_eager_starter(
    tmp_path: Path, address: str, client: Client, procs: Processes
) -> KilledStarter:
    """procs/eager_starter.py starts a run eagerly and is SIGKILLed holding its first
    workflow task; a worker of this test then runs the task's retry (after the
    one-second workflow task timeout) to the run's result."""
    queue, workflow_id = new_id("eager-kill"), new_id("eager-kill")
    marker = tmp_path / "eager-marker"
    argv = [sys.executable, str(EAGER_STARTER), address, queue, workflow_id, str(marker)]
    killed = procs.spawn("eager-starter", argv)
    await procs.wait_for_line(killed, "started")
    await eventually(lambda: marker.exists(), "the eager starter to hold its task")
    await procs.sigkill(killed)
    async with Worker(client, task_queue=queue, workflows=[OneStep], activities=[add_one]):
        handle: WorkflowHandle[int] = client.get_workflow_handle(workflow_id)
        async with asyncio.timeout(WAIT_S):
            assert await handle.result() == 2
    return KilledStarter(workflow_id, killed, marker)
