"""Eager activity execution scenarios, shared by test_eager_activities.py (what the
runs did: histories and the server's trace) and test_tla_eager_traces.py (TLC decides
whether their traces are behaviours of tla/EngineCore.tla).

Every scenario runs against a real server started with ``TIDEFLOW_TRACE_DIR`` set
(conftest's ``trace_dir``), so each run's transitions can be read back: a
``CompleteWorkflowTask`` line lists its commands with the worker's eager flag and the
timer and task rows the transition wrote; an attempt a worker took through a poll is a
``RecordActivityStarted`` line, an eagerly started one has none.

Not a test module (no ``test_`` prefix): test modules import it by name.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from helpers import ET, Proc, Processes, eventually, new_id, read_marker
from helpers_tla import read_lines, trace_of
from raw_workflow import RawWorkflows, complete_workflow

from tideflow.api.v1 import command_pb2, common_pb2, service_pb2
from tideflow.worker_sdk import Client, RetryPolicy, WorkflowHandle, activity, workflow
from tideflow.worker_sdk.interceptor import WorkerInterceptor, WorkflowTaskHandler
from tideflow.worker_sdk.workflow import ActivityCancellationType

CommandType = command_pb2.CommandType

FAST_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=50), maximum_attempts=3)
# Long: no attempt of these scenarios times out unless a test kills its worker.
START_TO_CLOSE = timedelta(seconds=60)
HEARTBEAT = timedelta(seconds=30)
# How long a scenario may take to complete.
WAIT_S = 60.0
# A cancellation reaches a heartbeating activity with the answer to its next heartbeat,
# sent at most every 0.8 x this (the worker's throttle).
CANCEL_HEARTBEAT = timedelta(seconds=3)

# Per-key gates between the test and activities running in its worker.
STARTED: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
RELEASE: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)


# ------------------------------------------------------------------ the trace


def run_lines(trace_dir: Path, workflow_id: str) -> list[dict[str, Any]]:
    """The transitions of the workflow's one run, as the server traced them."""
    return read_lines(trace_of(trace_dir, workflow_id))


def eager_flags(lines: list[dict[str, Any]]) -> list[list[bool]]:
    """Per workflow task completion, its activity commands' request_eager_execution."""
    return [
        [
            bool(c["eager"])
            for c in line["args"]["commands"]
            if c["type"] == "SCHEDULE_ACTIVITY_TASK"
        ]
        for line in lines
        if line["action"] == "CompleteWorkflowTask"
    ]


def polled_attempts(lines: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(scheduled event id, attempt) of each activity attempt a worker polled."""
    return [
        (line["args"]["task"]["ref"], line["args"]["task"]["attempt"])
        for line in lines
        if line["action"] == "RecordActivityStarted"
    ]


async def completed_activities(handle: WorkflowHandle, count: int) -> bool:
    """Whether at least ``count`` activities of the run have completed."""
    events = (await handle.fetch_history()).events
    completed = [e for e in events if e.event_type == ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED]
    return len(completed) >= count


def rows(line: dict[str, Any], which: str) -> list[tuple[str, int, int]]:
    """A transition's task or timer rows (``new_tasks``, ``new_timers``, ...)."""
    return [(r["kind"], r["ref"], r["attempt"]) for r in line["rows"][which]]


# ---------------------------------------------------------- raw: the server cap


@dataclass
class CapRun:
    workflow_id: str
    response: service_pb2.RespondWorkflowTaskCompletedResponse
    polled: list[service_pb2.PollActivityTaskResponse]


def schedule(activity_id: str, queue: str, *, eager: bool) -> command_pb2.Command:
    attrs = command_pb2.ScheduleActivityTaskCommandAttributes(
        activity_id=activity_id,
        activity_type=common_pb2.ActivityType(name="raw_step"),
        task_queue=common_pb2.TaskQueue(name=queue),
        request_eager_execution=eager,
    )
    attrs.start_to_close_timeout.FromTimedelta(START_TO_CLOSE)
    attrs.heartbeat_timeout.FromTimedelta(HEARTBEAT)
    return command_pb2.Command(
        command_type=CommandType.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK,
        schedule_activity_task_command_attributes=attrs,
    )


async def poll_activity(client: Client, queue: str) -> service_pb2.PollActivityTaskResponse:
    request = service_pb2.PollActivityTaskRequest(
        namespace=client.namespace, task_queue=common_pb2.TaskQueue(name=queue), identity="raw"
    )
    while True:
        task: service_pb2.PollActivityTaskResponse = await client.call(
            client.service.PollActivityTask, request
        )
        if task.task_token:
            return task


async def complete_activity(client: Client, token: bytes, value: str) -> None:
    await client.call(
        client.service.RespondActivityTaskCompleted,
        service_pb2.RespondActivityTaskCompletedRequest(
            task_token=token, result=client.data_converter.to_payloads([value]), identity="raw"
        ),
    )


async def five_eager_requests(client: Client) -> CapRun:
    """One workflow task schedules five activities, each asking to start eagerly: the
    server starts three for the completing worker and dispatches two; the raw worker
    then polls those two, completes all five, and completes the run."""
    queue = new_id("eager-cap")
    raw = RawWorkflows(client, queue)
    workflow_id = new_id("eager-cap")
    await raw.start(workflow_id)
    task = await raw.poll()
    request = service_pb2.RespondWorkflowTaskCompletedRequest(
        task_token=task.task_token,
        identity="raw",
        commands=[schedule(f"a{i}", queue, eager=True) for i in range(1, 6)],
    )
    response: service_pb2.RespondWorkflowTaskCompletedResponse = await client.call(
        client.service.RespondWorkflowTaskCompleted, request
    )
    polled = [await poll_activity(client, queue) for _ in range(2)]
    for started in [*response.activity_tasks, *polled]:
        await complete_activity(client, started.task_token, started.activity_id)
    task = await raw.poll()
    await raw.complete(task.task_token, complete_workflow())
    return CapRun(workflow_id, response, polled)


async def eager_request_for_another_queue(client: Client) -> CapRun:
    """One workflow task schedules an activity on another task queue and one on the
    run's own, both asking to start eagerly: the server starts only the run's queue's
    for the completing worker; the other queue's is polled from that queue."""
    queue, other = new_id("eager-own"), new_id("eager-other")
    raw = RawWorkflows(client, queue)
    workflow_id = new_id("eager-other")
    await raw.start(workflow_id)
    task = await raw.poll()
    request = service_pb2.RespondWorkflowTaskCompletedRequest(
        task_token=task.task_token,
        identity="raw",
        commands=[schedule("elsewhere", other, eager=True), schedule("own", queue, eager=True)],
    )
    response: service_pb2.RespondWorkflowTaskCompletedResponse = await client.call(
        client.service.RespondWorkflowTaskCompleted, request
    )
    polled = [await poll_activity(client, other)]
    for started in [*response.activity_tasks, *polled]:
        await complete_activity(client, started.task_token, started.activity_id)
    task = await raw.poll()
    await raw.complete(task.task_token, complete_workflow())
    return CapRun(workflow_id, response, polled)


# --------------------------------------------------------- SDK worker scenarios


@dataclass
class KilledWorkerRun:
    handle: WorkflowHandle
    killed: Proc
    survivor: Proc
    marker: Path


async def kill_worker_with_eager_activity(
    tmp_path: Path, address: str, client: Client, procs: Processes
) -> KilledWorkerRun:
    """A worker process (procs/worker_proc.py, ``crashy``) takes attempt 1 of the
    run's activity eagerly and is SIGKILLed while it runs; a second worker process
    runs attempt 2 once attempt 1 timed out (start-to-close, 2 s)."""
    queue, marker = new_id("eager-crash"), tmp_path / "marker"
    killed = await procs.start_worker("worker-1", address, queue, "crashy")
    handle = await client.start_workflow(
        "CrashyWorkflow",
        {"marker": str(marker), "value": "job-7"},
        id=new_id("eager-crash"),
        task_queue=queue,
    )
    await eventually(lambda: read_marker(marker, 1) is not None, "attempt 1 to start")
    await procs.sigkill(killed)
    survivor = await procs.start_worker("worker-2", address, queue, "crashy")
    async with asyncio.timeout(WAIT_S):
        assert await handle.result() == "job-7:done-on-attempt-2"
    return KilledWorkerRun(handle, killed, survivor, marker)


@activity.defn
async def fails_first_attempt(key: str) -> str:
    attempt = activity.info().attempt
    if attempt == 1:
        raise RuntimeError("attempt 1 fails")
    return f"{key}:attempt-{attempt}"


@activity.defn
async def held(key: str) -> str:
    """Runs until the test releases it."""
    STARTED[key].set()
    await RELEASE[key].wait()
    return "held"


@activity.defn
async def quick(key: str) -> str:
    return "quick"


@activity.defn
async def heartbeats_until_cancelled(key: str) -> str:
    STARTED[key].set()
    while True:
        activity.heartbeat()
        await asyncio.sleep(0.02)


@workflow.defn
class EagerRetry:
    """One activity whose first attempt fails: retried through the normal path."""

    @workflow.run
    async def run(self, key: str) -> str:
        result: str = await workflow.execute_activity(
            fails_first_attempt,
            key,
            start_to_close_timeout=START_TO_CLOSE,
            heartbeat_timeout=HEARTBEAT,
            retry_policy=FAST_RETRY,
        )
        return result


@workflow.defn
class HeldThenQuick:
    """``held`` starts; on the ``go`` signal ``quick`` is scheduled while ``held``
    still runs; the result is both."""

    def __init__(self) -> None:
        self.go = False

    @workflow.run
    async def run(self, key: str) -> list[str]:
        first = workflow.start_activity(held, key, start_to_close_timeout=START_TO_CLOSE)
        await workflow.wait_condition(lambda: self.go)
        second: str = await workflow.execute_activity(
            quick, key, start_to_close_timeout=START_TO_CLOSE
        )
        return [await first, second]

    @workflow.signal
    def proceed(self) -> None:
        self.go = True


@workflow.defn
class CancelsItsActivity:
    """Waits for its heartbeating activity's cancellation to complete when cancelled."""

    @workflow.run
    async def run(self, key: str) -> str:
        result: str = await workflow.execute_activity(
            heartbeats_until_cancelled,
            key,
            start_to_close_timeout=START_TO_CLOSE,
            heartbeat_timeout=CANCEL_HEARTBEAT,
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )
        return result


@workflow.defn
class AwaitsSignal:
    """Waits for one ``hello`` signal and returns what it carried."""

    def __init__(self) -> None:
        self.said: list[str] = []

    @workflow.run
    async def run(self) -> list[str]:
        await workflow.wait_condition(lambda: bool(self.said))
        return self.said

    @workflow.signal
    def hello(self, value: str) -> None:
        self.said.append(value)


class HoldsFirstWorkflowTask(WorkerInterceptor):
    """Holds the worker's first workflow task (started on the server) until the test
    releases ``key``: what the test sends meanwhile arrives during the task."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.held = False

    def intercept_workflow_task(self, next: WorkflowTaskHandler) -> WorkflowTaskHandler:
        async def handle(task: service_pb2.PollWorkflowTaskResponse) -> None:
            if not self.held:
                self.held = True
                STARTED[self.key].set()
                await RELEASE[self.key].wait()
            await next(task)

        return handle


async def signal_during_first_task(client: Client, queue: str, key: str) -> WorkflowHandle:
    """An AwaitsSignal run on ``queue`` (its worker holding its first workflow task
    with ``HoldsFirstWorkflowTask(key)``), signalled while that task is held."""
    handle = await client.start_workflow(
        AwaitsSignal.run, id=new_id("eager-next"), task_queue=queue
    )
    async with asyncio.timeout(WAIT_S):
        await STARTED[key].wait()
        await handle.signal(AwaitsSignal.hello, "hi")
        RELEASE[key].set()
        assert await handle.result() == ["hi"]
    return handle


def new_key() -> str:
    return uuid.uuid4().hex
