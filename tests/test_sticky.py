"""Sticky execution end to end.

A worker caches the runs it works on (``max_cached_workflows``) and asks the server
for sticky execution: the run's next workflow tasks go to the worker's own sticky
queue with only the events it has not seen. On a cache miss the worker answers
RESET_STICKY and the task comes back through the normal queue with the full history;
if the sticky worker does not pick a task up within the sticky schedule-to-start
timeout (it died), the task moves to the normal queue; a worker shutting down gives
its sticky queue back at once.

Real server on an ephemeral port over SQLite and over PostgreSQL (conftest's
``server``); uuid task queues and ids. What a worker receives is observed by a
``WorkerInterceptor``. No sleeps synchronize: tests await results or poll a condition
against a deadline. The killed worker is a real process (tests/procs/worker_proc.py,
flavour ``sticky``), always reaped.
"""

from __future__ import annotations

import importlib.util
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from helpers import (
    WORKER_PROC,
    Processes,
    bounded,
    events_of,
    eventually,
    new_id,
    of_type,
)
from raw_workflow import RawWorkflows

from tideflow.api.v1.history_pb2 import EventType, HistoryEvent, WorkflowTaskFailedCause
from tideflow.api.v1.service_pb2 import PollWorkflowTaskResponse
from tideflow.server import TideflowServer
from tideflow.worker_sdk import (
    Client,
    Replayer,
    Worker,
    WorkerInterceptor,
    WorkflowHandle,
    activity,
    workflow,
)
from tideflow.worker_sdk.interceptor import WorkflowTaskHandler

ET = EventType
Cause = WorkflowTaskFailedCause

_spec = importlib.util.spec_from_file_location("worker_proc", WORKER_PROC)
assert _spec is not None and _spec.loader is not None
_proc_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_proc_module)
Tally = _proc_module.Tally  # the workflow the worker process runs, for in-test workers


# --------------------------------------------------------------------- helpers


def failure_causes(events: Sequence[HistoryEvent]) -> list[int]:
    return [
        e.workflow_task_failed_event_attributes.cause
        for e in of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED)
    ]


def completed_by(events: Sequence[HistoryEvent]) -> list[str]:
    return [
        e.workflow_task_completed_event_attributes.identity
        for e in of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
    ]


@dataclass(frozen=True)
class Seen:
    """One workflow task as a worker received it."""

    run_id: str
    first_event_id: int
    last_event_id: int
    events: int
    previous_started_event_id: int


class TaskRecorder(WorkerInterceptor):
    """Records what each workflow task the worker received carried."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []

    def intercept_workflow_task(self, next: WorkflowTaskHandler) -> WorkflowTaskHandler:
        async def record(task: PollWorkflowTaskResponse) -> None:
            events = task.history.events
            # Queries carry history too: record only real workflow tasks.
            if events and not task.HasField("query"):
                self.seen.append(
                    Seen(
                        run_id=task.workflow_execution.run_id,
                        first_event_id=events[0].event_id,
                        last_event_id=events[-1].event_id,
                        events=len(events),
                        previous_started_event_id=task.previous_started_event_id,
                    )
                )
            await next(task)

        return record


async def wait_idle(handle: WorkflowHandle, activities_done: int = -1) -> list[HistoryEvent]:
    """Until the run's last workflow task completed with nothing pending after it, or
    the run completed (and, if given, that many activities completed)."""

    async def idle() -> list[HistoryEvent] | None:
        events = await events_of(handle)
        if events[-1].event_type not in (
            ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
            ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
        ):
            return None
        done = len(of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED))
        if activities_done >= 0 and done != activities_done:
            return None
        return events

    result: list[HistoryEvent] = await eventually(idle, what=f"{handle.id} to be idle")
    return result


# ------------------------------------- (a) cache eviction resumes by full replay


@activity.defn
async def double(value: int) -> int:
    return value * 2


@workflow.defn
class Rounds:
    """Each round waits for a ``put`` signal, doubles it in an activity and draws a
    deterministic random number: a replay that went wrong changes the trace."""

    def __init__(self) -> None:
        self.inbox: list[int] = []

    @workflow.run
    async def run(self, rounds: int) -> dict[str, Any]:
        total = 0
        trace: list[str] = []
        for i in range(rounds):
            await workflow.wait_condition(self._has_more_than(i))
            doubled: int = await workflow.execute_activity(
                double, self.inbox[i], start_to_close_timeout=timedelta(seconds=30)
            )
            total += doubled
            trace.append(f"{i}:{doubled}:{workflow.random().randint(0, 999)}")
        return {"total": total, "trace": trace}

    def _has_more_than(self, count: int) -> Callable[[], bool]:
        return lambda: len(self.inbox) > count

    @workflow.signal
    def put(self, value: int) -> None:
        self.inbox.append(value)


ROUNDS = 6


async def test_cache_eviction_mid_workflow_resumes_by_full_replay(
    client: Client, queue: str
) -> None:
    """One cached workflow at most, two long workflows driven in turn: every task of
    one evicts the other, so each new round arrives on the sticky queue for a run the
    worker no longer has. It answers RESET_STICKY, gets the full history through the
    normal queue, replays it and carries on; both complete with the right results."""
    recorder = TaskRecorder()
    worker = Worker(
        client,
        task_queue=queue,
        workflows=[Rounds],
        activities=[double],
        max_cached_workflows=1,
        interceptors=[recorder],
    )
    async with worker:
        a = await client.start_workflow(Rounds.run, ROUNDS, id=new_id("a"), task_queue=queue)
        await wait_idle(a)
        b = await client.start_workflow(Rounds.run, ROUNDS, id=new_id("b"), task_queue=queue)
        await wait_idle(b)
        for i in range(ROUNDS):
            for handle, base in ((a, 100), (b, 200)):
                await handle.signal(Rounds.put, base + i)
                await wait_idle(handle, activities_done=i + 1)
        result_a = await bounded(a.result())
        result_b = await bounded(b.result())

    for handle, base, result in ((a, 100, result_a), (b, 200, result_b)):
        events = await events_of(handle)
        assert [e.event_id for e in events] == list(range(1, len(events) + 1))
        seed = events[0].workflow_execution_started_event_attributes.random_seed
        rng = random.Random(seed)
        expected_trace = [f"{i}:{2 * (base + i)}:{rng.randint(0, 999)}" for i in range(ROUNDS)]
        assert result == {
            "total": sum(2 * (base + i) for i in range(ROUNDS)),
            "trace": expected_trace,
        }
        causes = failure_causes(events)
        # Each round after the first found the run evicted by the other workflow.
        assert causes.count(Cause.WORKFLOW_TASK_FAILED_CAUSE_RESET_STICKY_TASK_QUEUE) >= ROUNDS - 1
        assert set(causes) == {Cause.WORKFLOW_TASK_FAILED_CAUSE_RESET_STICKY_TASK_QUEUE}, causes
        # Every one of those misses was followed by a full replay on this worker.
        assert handle.run_id is not None
        full = [s for s in recorder.seen if s.run_id == handle.run_id and s.first_event_id == 1]
        assert len(full) >= ROUNDS, full
        # The recorded history replays deterministically against the same code.
        Replayer(workflows=[Rounds]).replay(await handle.fetch_history())


# ------------------------------------------ (c) sticky tasks carry new events only


@activity.defn
async def step(n: int) -> int:
    return n + 1


@workflow.defn
class Steps:
    @workflow.run
    async def run(self, steps: int) -> int:
        n = 0
        for _ in range(steps):
            n = await workflow.execute_activity(
                step, n, start_to_close_timeout=timedelta(seconds=30)
            )
        return n


STEPS = 12


@pytest.mark.parametrize("cached", [True, False], ids=["sticky", "no-cache"])
async def test_sticky_tasks_carry_only_new_events(client: Client, queue: str, cached: bool) -> None:
    """With a cache, every task after the first carries only the events since the
    previous task the worker completed (a handful, however long the history grows);
    with ``max_cached_workflows=0`` there is no sticky queue and every task carries
    the whole history."""
    recorder = TaskRecorder()
    worker = Worker(
        client,
        task_queue=queue,
        workflows=[Steps],
        activities=[step],
        max_cached_workflows=100 if cached else 0,
        interceptors=[recorder],
    )
    async with worker:
        handle = await client.start_workflow(Steps.run, STEPS, id=new_id("steps"), task_queue=queue)
        assert await bounded(handle.result()) == STEPS

    events = await events_of(handle)
    assert not of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED)
    tasks = [s for s in recorder.seen if s.run_id == handle.run_id]
    assert len(tasks) == STEPS + 1, tasks  # one per activity result, plus the first
    assert tasks[0].first_event_id == 1
    if cached:
        for previous, task in itertools.pairwise(tasks):
            # Exactly the events after the task this worker completed last.
            assert task.previous_started_event_id == previous.last_event_id
            assert task.first_event_id == previous.last_event_id + 1
            assert task.events <= 6, task
        # The last task came late in a long history, yet carried a handful of events.
        assert tasks[-1].first_event_id > 5 * STEPS
    else:
        assert all(t.first_event_id == 1 for t in tasks), tasks
        assert [t.events for t in tasks] == sorted(t.events for t in tasks)
        assert tasks[-1].events > 5 * STEPS


# --------------------------------- (b) the sticky worker dies or shuts down


def _assert_moved_without_failures(events: Sequence[HistoryEvent]) -> None:
    """Moving a task off a sticky queue is not a failure: no failed or timed-out
    workflow task in history, and no workflow task was retried."""
    assert not of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED)
    assert not of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT)
    scheduled = of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED)
    assert all(e.workflow_task_scheduled_event_attributes.attempt == 1 for e in scheduled)


async def _finish_on_worker_2(
    client: Client, queue: str, handle: WorkflowHandle
) -> tuple[dict[str, Any], list[HistoryEvent], list[Seen]]:
    """Run an in-test worker ``worker-2`` until the run completes; check that the
    task moved off the sticky queue without failures. Returns the run's result, its
    history and what worker #2 received."""
    recorder = TaskRecorder()
    worker2 = Worker(
        client, task_queue=queue, workflows=[Tally], identity="worker-2", interceptors=[recorder]
    )
    async with worker2:
        result: dict[str, Any] = await bounded(handle.result())
    events = await events_of(handle)
    _assert_moved_without_failures(events)
    assert completed_by(events)[-1] == "worker-2"
    return result, events, recorder.seen


@pytest.mark.slow
async def test_killed_sticky_worker_task_moves_to_another_worker_after_timeout(
    server: TideflowServer, client: Client, queue: str, procs: Processes
) -> None:
    """Worker process #1 completes the first workflow task (the run is now sticky to
    it) and is SIGKILLed. The next task (a signal) waits on #1's sticky queue until
    the sticky schedule-to-start timeout moves it to the normal queue, where the
    in-test worker #2 takes it with the full history, replays and completes."""
    worker1 = await procs.start_worker(
        "worker-1", server.address, queue, "sticky", "--sticky-timeout-ms", "300"
    )
    handle = await client.start_workflow(Tally.run, 2, id=new_id("tally"), task_queue=queue)
    await handle.signal(Tally.add, 5)
    events = await wait_idle(handle)
    assert completed_by(events) == ["worker-1"] * len(completed_by(events))
    await procs.sigkill(worker1)

    await handle.signal(Tally.add, 7)
    result, events, seen = await _finish_on_worker_2(client, queue, handle)
    assert result["values"] == [5, 7]
    assert result["sum"] == 12
    assert completed_by(events)[0] == "worker-1"
    # Worker #2 had never seen the run: it got the whole history, not a sticky slice.
    assert seen and seen[0].first_event_id == 1
    seed = events[0].workflow_execution_started_event_attributes.random_seed
    assert result["draw"] == random.Random(seed).randint(0, 10**9)


async def test_sticky_worker_shutdown_gives_back_its_queue(client: Client, queue: str) -> None:
    """A worker that shuts down gives its sticky queue back: with a sticky timeout far
    longer than the test's bound, only that can move the run's next task to the
    normal queue, where another worker completes it."""
    worker1 = Worker(
        client,
        task_queue=queue,
        workflows=[Tally],
        identity="worker-1",
        sticky_queue_schedule_to_start_timeout=timedelta(minutes=10),
    )
    async with worker1:
        handle = await client.start_workflow(Tally.run, 2, id=new_id("tally"), task_queue=queue)
        await handle.signal(Tally.add, 1)
        await wait_idle(handle)
    await handle.signal(Tally.add, 2)  # scheduled after worker #1 left
    result, _, seen = await _finish_on_worker_2(client, queue, handle)
    assert (result["values"], result["sum"]) == ([1, 2], 3)
    assert seen and seen[0].first_event_id == 1


async def test_sticky_task_waiting_when_its_queue_is_given_back_moves_too(
    client: Client, queue: str
) -> None:
    """A task already waiting on a sticky queue when its worker gives the queue back
    moves to the normal queue as well. Worker #1 is played over raw gRPC: it completes
    the first task asking for sticky execution and never polls its sticky queue, so
    the signal's task waits there (the sticky timeout is 10 minutes) until the queue
    is given back; worker #2 then completes the run with the full history."""
    raw = RawWorkflows(client, queue, workflow_type="Tally")
    sticky = new_id("raw-sticky")
    workflow_id = new_id("tally")
    run_id = await raw.start(workflow_id, 2)
    # Tally's first task only waits for signals: no commands.
    await raw.complete((await raw.poll()).task_token, sticky_queue=sticky)
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    await handle.signal(Tally.add, 10)  # scheduled on the sticky queue
    await handle.signal(Tally.add, 20)
    await raw.give_back(sticky)
    result, events, seen = await _finish_on_worker_2(client, queue, handle)
    assert (result["values"], result["sum"]) == ([10, 20], 30)
    assert completed_by(events) == ["raw", "worker-2"]
    assert [s.first_event_id for s in seen] == [1]
