"""The worker SDK's own cost per activity, in-process, without a server or gRPC.

A real ``Worker`` (both roles, eager activities, sticky cache) runs
``throughput.py``'s ten-step workflow over a fake transport: ``client.service`` is
replaced by ``ScriptedService``, which answers each call from responses prebuilt for
a whole run (the history the server writes for it: a first task with the full
history, then per step the eager activity task returned with the workflow task
completion and the sticky workflow task returned with the activity completion, six
new events each). Requests are serialized and responses parsed from bytes as gRPC
does, so the figure is the SDK's share of an activity: the poll loop and handover,
activation and history folding, workflow code, command building, JSON and protobuf
conversion. What it leaves out is the gRPC call itself and the server.

    python bench/worker_cost.py                          # 2,000 workflows, 100 in flight
    python bench/worker_cost.py --concurrency 1 --workflows 500
    python bench/worker_cost.py --profile 30             # cProfile's top functions too

Prints one JSON line: CPU microseconds per activity (process time over the timed
runs, divided by their activities: each is one activity task and one workflow task
of a cached run, plus a tenth of the run's first task) and the wall-clock rate.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message
from throughput import TASK_QUEUE, TenActivities, step

from tideflow.api.v1 import common_pb2, service_pb2
from tideflow.api.v1.command_pb2 import COMMAND_TYPE_COMPLETE_WORKFLOW_EXECUTION
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.worker_sdk import Client, Worker
from tideflow.worker_sdk.converter import default_converter

STEPS = 10
ET = EventType
# History time of a run's first event (microseconds); each event is 1 ms later.
_T0_US = 1_796_552_036_000_000


def _retry_policy() -> common_pb2.RetryPolicy:
    """The server's default, which it writes into every scheduled activity."""
    policy = common_pb2.RetryPolicy(backoff_coefficient=2.0)
    policy.initial_interval.FromSeconds(1)
    policy.maximum_interval.FromSeconds(100)
    return policy


def _event(event_id: int, event_type: int) -> HistoryEvent:
    event = HistoryEvent(event_id=event_id, event_type=event_type, version=1)  # type: ignore[arg-type]
    event.event_time.FromMicroseconds(_T0_US + 1000 * event_id)
    return event


def _workflow_task_events(first: int) -> list[HistoryEvent]:
    scheduled = _event(first, ET.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED)
    attrs = scheduled.workflow_task_scheduled_event_attributes
    attrs.task_queue.name = TASK_QUEUE
    attrs.task_queue.kind = common_pb2.TASK_QUEUE_KIND_NORMAL
    attrs.start_to_close_timeout.FromSeconds(10)
    attrs.attempt = 1
    started = _event(first + 1, ET.EVENT_TYPE_WORKFLOW_TASK_STARTED)
    started.workflow_task_started_event_attributes.scheduled_event_id = first
    started.workflow_task_started_event_attributes.identity = "bench@worker"
    started.workflow_task_started_event_attributes.request_id = "556ebb2b-e833-4a56-98f6"
    return [scheduled, started]


def _step_events(first: int, value: int) -> list[HistoryEvent]:
    """What the server records after workflow task ``first - 1`` started and the step
    it scheduled (eager) completed with ``value + 1``: events ``first`` to ``first + 5``."""
    completed = _event(first, ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
    completed.workflow_task_completed_event_attributes.scheduled_event_id = first - 2
    completed.workflow_task_completed_event_attributes.started_event_id = first - 1
    scheduled = _event(first + 1, ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)
    a = scheduled.activity_task_scheduled_event_attributes
    a.activity_id = str((first + 3) // 6)
    a.activity_type.name = "step"
    a.task_queue.name = TASK_QUEUE
    a.task_queue.kind = common_pb2.TASK_QUEUE_KIND_NORMAL
    a.input.CopyFrom(default_converter.to_payloads([value]))
    a.start_to_close_timeout.FromSeconds(30)
    a.workflow_task_completed_event_id = first
    a.retry_policy.CopyFrom(_retry_policy())
    started = _event(first + 2, ET.EVENT_TYPE_ACTIVITY_TASK_STARTED)
    s = started.activity_task_started_event_attributes
    s.scheduled_event_id = first + 1
    s.attempt = 1
    s.identity = "bench@worker"
    s.request_id = "32603ce1-6617-40bd-b721-67edec8a9004"
    s.site = "cloud"
    s.tier = common_pb2.EXECUTION_SITE_CLOUD
    done = _event(first + 3, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)
    d = done.activity_task_completed_event_attributes
    d.result.CopyFrom(default_converter.to_payloads([value + 1]))
    d.scheduled_event_id = first + 1
    d.started_event_id = first + 2
    d.identity = "bench@worker"
    d.site = "cloud"
    d.executed_at = common_pb2.EXECUTION_SITE_CLOUD
    return [completed, scheduled, started, done, *_workflow_task_events(first + 4)]


def _started_event() -> HistoryEvent:
    started = _event(1, ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED)
    a = started.workflow_execution_started_event_attributes
    a.workflow_type.name = "TenActivities"
    a.task_queue.name = TASK_QUEUE
    a.input.CopyFrom(default_converter.to_payloads([0]))
    a.workflow_task_timeout.FromSeconds(10)
    a.attempt = 1
    a.random_seed = 4550912792330102253
    return started


@dataclass(slots=True)
class RunScript:
    """The server's side of one run (run ``index``), prebuilt as bytes: the first
    workflow task, and per task token what its completion brings (``eager``: the
    response when the worker asked to take the next task at once; ``queued``: that
    task, for a poll, when it did not)."""

    index: int
    first_task: bytes = b""
    eager: dict[bytes, bytes] = field(default_factory=dict)
    queued: dict[bytes, bytes] = field(default_factory=dict)

    def build(self) -> RunScript:
        tasks = [self._workflow_task(k) for k in range(STEPS + 1)]
        self.first_task = tasks[0].SerializeToString()
        for k in range(STEPS):
            # Completing workflow task k schedules step k, which starts at once.
            activity = self._activity_task(k)
            completion = service_pb2.RespondWorkflowTaskCompletedResponse()
            completion.activity_tasks.append(activity)
            self.eager[tasks[k].task_token] = completion.SerializeToString()
            self.queued[tasks[k].task_token] = activity.SerializeToString()
            # Completing step k brings workflow task k + 1 (sticky).
            answer = service_pb2.RespondActivityTaskCompletedResponse()
            answer.workflow_task.CopyFrom(tasks[k + 1])
            self.eager[activity.task_token] = answer.SerializeToString()
            self.queued[activity.task_token] = tasks[k + 1].SerializeToString()
        return self

    def _workflow_task(self, k: int) -> service_pb2.PollWorkflowTaskResponse:
        task = service_pb2.PollWorkflowTaskResponse(task_token=_token(self.index, "wf", k))
        task.workflow_execution.workflow_id = f"bench-{self.index}"
        task.workflow_execution.run_id = f"bench-run-{self.index}"
        task.workflow_type.name = "TenActivities"
        task.attempt = 1
        for stamp in (task.scheduled_time, task.started_time):
            stamp.FromMicroseconds(_T0_US + 1000 * (6 * k + 3))
        # Task 0 has events 1-3, task k events 6k-2 to 6k+3.
        if k == 0:
            task.history.events.extend([_started_event(), *_workflow_task_events(2)])
        else:
            task.history.events.extend(_step_events(6 * k - 2, k - 1))
            task.previous_started_event_id = 6 * k - 3
        task.started_event_id = 6 * k + 3
        return task

    def _activity_task(self, k: int) -> service_pb2.PollActivityTaskResponse:
        activity = service_pb2.PollActivityTaskResponse(
            task_token=_token(self.index, "act", k),
            workflow_namespace="default",
            activity_id=str(k + 1),
            attempt=1,
        )
        activity.workflow_type.name = "TenActivities"
        activity.workflow_execution.workflow_id = f"bench-{self.index}"
        activity.workflow_execution.run_id = f"bench-run-{self.index}"
        activity.activity_type.name = "step"
        activity.input.CopyFrom(default_converter.to_payloads([k]))
        for stamp in (
            activity.scheduled_time,
            activity.current_attempt_scheduled_time,
            activity.started_time,
        ):
            stamp.FromMicroseconds(_T0_US)
        activity.start_to_close_timeout.FromSeconds(30)
        # Set but zero, as the server sends them.
        activity.schedule_to_close_timeout.SetInParent()
        activity.heartbeat_timeout.SetInParent()
        activity.retry_policy.CopyFrom(_retry_policy())
        return activity


def _token(run: int, kind: str, k: int) -> bytes:
    return f"{kind}-{run}-{k}".encode()


class ScriptedService:
    """What the worker calls on ``client.service``: each request serialized, each
    response parsed from prebuilt bytes (gRPC's work on either side). A task the
    worker did not take eagerly waits for its pollers, as on the server."""

    def __init__(self, scripts: list[RunScript]) -> None:
        self._eager = {t: a for s in scripts for t, a in s.eager.items()}
        self._queued = {t: a for s in scripts for t, a in s.queued.items()}
        self.new_tasks: asyncio.Queue[bytes] = asyncio.Queue()
        self._sticky_tasks: asyncio.Queue[bytes] = asyncio.Queue()
        self._activity_tasks: asyncio.Queue[bytes] = asyncio.Queue()
        self.finished: dict[str, asyncio.Future[int]] = {}
        self.polled = 0  # tasks that went through a poll instead of eagerly

    async def PollWorkflowTask(
        self, request: service_pb2.PollWorkflowTaskRequest, **_: Any
    ) -> service_pb2.PollWorkflowTaskResponse:
        request.SerializeToString()
        if request.task_queue.name == TASK_QUEUE:
            task = await self.new_tasks.get()
        else:
            task = await self._sticky_tasks.get()
            self.polled += 1
        return service_pb2.PollWorkflowTaskResponse.FromString(task)

    async def PollActivityTask(
        self, request: service_pb2.PollActivityTaskRequest, **_: Any
    ) -> service_pb2.PollActivityTaskResponse:
        request.SerializeToString()
        task = await self._activity_tasks.get()
        self.polled += 1
        return service_pb2.PollActivityTaskResponse.FromString(task)

    async def RespondWorkflowTaskCompleted(
        self, request: service_pb2.RespondWorkflowTaskCompletedRequest, **_: Any
    ) -> service_pb2.RespondWorkflowTaskCompletedResponse:
        request.SerializeToString()
        command = request.commands[0]
        if command.command_type == COMMAND_TYPE_COMPLETE_WORKFLOW_EXECUTION:
            result = command.complete_workflow_execution_command_attributes.result
            run = request.task_token.decode().split("-")[1]
            self.finished[run].set_result(int(result.payloads[0].data))
            return service_pb2.RespondWorkflowTaskCompletedResponse()
        if command.schedule_activity_task_command_attributes.request_eager_execution:
            answer = self._eager[request.task_token]
            return service_pb2.RespondWorkflowTaskCompletedResponse.FromString(answer)
        self._activity_tasks.put_nowait(self._queued[request.task_token])
        return service_pb2.RespondWorkflowTaskCompletedResponse()

    async def RespondActivityTaskCompleted(
        self, request: service_pb2.RespondActivityTaskCompletedRequest, **_: Any
    ) -> service_pb2.RespondActivityTaskCompletedResponse:
        request.SerializeToString()
        if request.eager_workflow_task_queue:
            answer = self._eager[request.task_token]
            return service_pb2.RespondActivityTaskCompletedResponse.FromString(answer)
        self._sticky_tasks.put_nowait(self._queued[request.task_token])
        return service_pb2.RespondActivityTaskCompletedResponse()

    async def ShutdownWorker(self, request: Message, **_: Any) -> Message:
        return service_pb2.ShutdownWorkerResponse()


async def _run_workflows(
    service: ScriptedService, scripts: list[RunScript], count: int, concurrency: int
) -> None:
    """``count`` runs, ``concurrency`` at once (script ``i`` serves one at a time)."""
    free: asyncio.Queue[RunScript] = asyncio.Queue()
    for script in scripts[:concurrency]:
        free.put_nowait(script)

    async def one() -> None:
        script = await free.get()
        done = service.finished[str(script.index)] = asyncio.get_running_loop().create_future()
        service.new_tasks.put_nowait(script.first_task)
        if await done != STEPS:
            raise AssertionError(f"run {script.index} returned {done.result()}, expected {STEPS}")
        free.put_nowait(script)

    await asyncio.gather(*(one() for _ in range(count)))


async def measure(args: argparse.Namespace) -> dict[str, object]:
    scripts = [RunScript(i).build() for i in range(args.concurrency)]
    service = ScriptedService(scripts)
    # A channel that never connects: every call goes to ``service``.
    channel = grpc.aio.insecure_channel("127.0.0.1:9")
    client = Client(
        channel, namespace="default", data_converter=default_converter, identity="bench@worker"
    )
    client.service = service
    worker = Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=[TenActivities],
        activities=[step],
        workflow_pollers=4,
        activity_pollers=4,
    )
    profile = cProfile.Profile() if args.profile else None
    async with worker:
        await _run_workflows(service, scripts, min(args.workflows, 100), args.concurrency)  # warm
        cpu0, wall0 = time.process_time(), time.perf_counter()
        run: Callable[[], Any] = lambda: _run_workflows(  # noqa: E731
            service, scripts, args.workflows, args.concurrency
        )
        if profile is not None:
            profile.enable()
        await run()
        if profile is not None:
            profile.disable()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await channel.close()
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile)
    activities = args.workflows * STEPS
    return {
        "workflows": args.workflows,
        "concurrency": args.concurrency,
        "profiled": bool(profile),
        "cpu_us_per_activity": round(cpu * 1e6 / activities, 1),
        "activities_per_s": round(activities / wall, 1),
        "tasks_polled_not_eager": service.polled,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workflows", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=100, help="runs in flight at once")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print cProfile's top N functions"
    )
    print(json.dumps(asyncio.run(measure(parser.parse_args()))), flush=True)
