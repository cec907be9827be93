"""Continue-as-new end to end: a chain of 50 runs, a new run of another type on another
task queue, a signal arriving during the continue-as-new task, and an execution
timeout that spans the chain.

Real server on an ephemeral port over SQLite and over PostgreSQL (conftest's
``client``), real workers, uuid task queues and ids; nothing waits on a sleep.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from helpers import (
    ET,
    assert_well_formed,
    bounded,
    events_of,
    new_id,
    of_type,
    status_of,
)

from tideflow.api.v1.service_pb2 import PollWorkflowTaskResponse
from tideflow.worker_sdk import (
    Client,
    Worker,
    WorkerInterceptor,
    activity,
    workflow,
)
from tideflow.worker_sdk import WorkflowExecutionStatus as Status
from tideflow.worker_sdk.exceptions import (
    TimeoutError,
    WorkflowFailureError,
)
from tideflow.worker_sdk.interceptor import WorkflowTaskHandler

_ACTIVITY_TIMEOUT = timedelta(seconds=30)


@activity.defn
async def increment(n: int) -> int:
    return n + 1


@workflow.defn
class CountingChain:
    """Adds one per run (in an activity) and continues as new until ``left`` is 0."""

    @workflow.run
    async def run(self, n: int, left: int) -> int:
        n = await workflow.execute_activity(increment, n, start_to_close_timeout=_ACTIVITY_TIMEOUT)
        if left > 0:
            workflow.continue_as_new(args=[n, left - 1])
        return n


CHAIN_RUNS = 50


async def test_continue_as_new_chain_of_50_runs(client: Client, queue: str) -> None:
    wid = new_id("chain")
    async with Worker(client, task_queue=queue, workflows=[CountingChain], activities=[increment]):
        handle = await client.start_workflow(
            CountingChain.run, args=[0, CHAIN_RUNS - 1], id=wid, task_queue=queue
        )
        first_run = handle.run_id
        assert first_run is not None
        # result() of the first run follows the chain to the run that completes.
        assert await bounded(handle.result(), 60) == CHAIN_RUNS

    # Walk the chain run by run: each run's history is its own, short and alike.
    run_ids = [first_run]
    lengths = []
    for index in range(CHAIN_RUNS):
        run_id = run_ids[-1]
        events = await events_of(client.get_workflow_handle(wid, run_id=run_id))
        assert_well_formed(events)
        lengths.append(len(events))
        started = events[0].workflow_execution_started_event_attributes
        assert started.original_execution_run_id == run_id
        assert started.first_execution_run_id == first_run
        assert started.continued_execution_run_id == (run_ids[-2] if index else "")
        assert client.data_converter.from_payloads(started.input) == [index, CHAIN_RUNS - 1 - index]
        assert len(of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)) == 1
        close = events[-1]
        if index < CHAIN_RUNS - 1:
            assert close.event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
            attrs = close.workflow_execution_continued_as_new_event_attributes
            assert attrs.workflow_type.name == "CountingChain"
            assert client.data_converter.from_payloads(attrs.input) == [
                index + 1,
                CHAIN_RUNS - 2 - index,
            ]
            assert attrs.new_execution_run_id not in run_ids
            run_ids.append(attrs.new_execution_run_id)
        else:
            assert close.event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
    assert len(run_ids) == CHAIN_RUNS
    # Independent of the chain's length: the 50th run's history is as short as the 1st.
    assert max(lengths) <= 11, lengths
    assert lengths[-1] <= lengths[0], lengths

    assert await status_of(client, wid, first_run) == Status.CONTINUED_AS_NEW
    assert await status_of(client, wid, run_ids[25]) == Status.CONTINUED_AS_NEW
    assert await status_of(client, wid, run_ids[-1]) == Status.COMPLETED
    newest = await client.get_workflow_handle(wid).describe()
    assert (newest.run_id, newest.status) == (run_ids[-1], Status.COMPLETED)
    # A handle on a run in the middle of the chain follows it too.
    assert await client.get_workflow_handle(wid, run_id=run_ids[30]).result() == CHAIN_RUNS


@workflow.defn
class Hopper:
    @workflow.run
    async def run(self, job: dict[str, Any]) -> str:
        workflow.continue_as_new(
            {**job, "path": [*job["path"], f"{workflow.info().workflow_type}@{job['q1']}"]},
            workflow=Landing,
            task_queue=job["q2"],
            run_timeout=timedelta(minutes=5),
            task_timeout=timedelta(seconds=7),
        )


@workflow.defn
class Landing:
    @workflow.run
    async def run(self, job: dict[str, Any]) -> str:
        info = workflow.info()
        return " > ".join([*job["path"], f"{info.workflow_type}@{info.task_queue}"])


async def test_continue_as_new_to_another_type_and_task_queue(client: Client, queue: str) -> None:
    queue2 = f"{queue}-landing"
    wid = new_id("hop")
    async with (
        Worker(client, task_queue=queue, workflows=[Hopper]),
        Worker(client, task_queue=queue2, workflows=[Landing]),
    ):
        handle = await client.start_workflow(
            Hopper.run, {"q1": queue, "q2": queue2, "path": []}, id=wid, task_queue=queue
        )
        assert await bounded(handle.result()) == f"Hopper@{queue} > Landing@{queue2}"

    first = await events_of(handle)
    can = first[-1].workflow_execution_continued_as_new_event_attributes
    assert first[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
    assert (can.workflow_type.name, can.task_queue.name) == ("Landing", queue2)

    newest = await client.get_workflow_handle(wid).describe()
    assert newest.run_id == can.new_execution_run_id
    assert (newest.workflow_type, newest.task_queue, newest.status) == (
        "Landing",
        queue2,
        Status.COMPLETED,
    )
    second = await events_of(client.get_workflow_handle(wid, run_id=newest.run_id))
    assert_well_formed(second)
    started = second[0].workflow_execution_started_event_attributes
    assert started.continued_execution_run_id == handle.run_id
    assert started.workflow_type.name == "Landing"
    assert started.task_queue.name == queue2
    assert started.workflow_run_timeout.ToTimedelta() == timedelta(minutes=5)
    assert started.workflow_task_timeout.ToTimedelta() == timedelta(seconds=7)


@workflow.defn
class Collector:
    """Collects ``add`` signals; each run continues as new once it has any."""

    def __init__(self) -> None:
        self.items: list[str] = []

    @workflow.run
    async def run(self, total: list[str], runs_left: int) -> list[str]:
        if runs_left == 0:
            return total
        await workflow.wait_condition(lambda: bool(self.items))
        workflow.continue_as_new(args=[total + self.items, runs_left - 1])

    @workflow.signal
    def add(self, item: str) -> None:
        self.items.append(item)


async def test_signal_arriving_during_continue_as_new_task_is_not_lost(
    client: Client, queue: str
) -> None:
    """A signal recorded while the workflow task that continues as new is running must
    reach workflow code (the server refuses to close the run over it), not vanish with
    the closed run."""
    wid = new_id("collector")
    handle = await client.start_workflow(Collector.run, args=[[], 1], id=wid, task_queue=queue)
    await handle.signal(Collector.add, "a")
    injected: list[int] = []

    class SignalWhileTaskRuns(WorkerInterceptor):
        def intercept_workflow_task(self, next: WorkflowTaskHandler) -> WorkflowTaskHandler:
            async def signal_first(task: PollWorkflowTaskResponse) -> None:
                # The first task of the first run sees "a" and continues as new: "b"
                # arrives after that task started and before it completes.
                if task.workflow_execution.run_id == handle.run_id and not injected:
                    injected.append(len(task.history.events))
                    await handle.signal(Collector.add, "b")
                await next(task)

            return signal_first

    worker = Worker(
        client,
        task_queue=queue,
        workflows=[Collector],
        max_cached_workflows=0,
        interceptors=[SignalWhileTaskRuns()],
    )
    async with worker:
        assert await bounded(handle.result()) == ["a", "b"]
    assert injected

    events = await events_of(handle)
    assert_well_formed(events)
    signals = of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)
    inputs = [s.workflow_execution_signaled_event_attributes.input for s in signals]
    assert [client.data_converter.from_payloads(i) for i in inputs] == [["a"], ["b"]]
    # The closing attempt was refused, so "b" was recorded before the run closed...
    assert of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED)
    assert signals[-1].event_id < events[-1].event_id
    # ...and the successor started with both.
    can = events[-1].workflow_execution_continued_as_new_event_attributes
    assert client.data_converter.from_payloads(can.input) == [["a", "b"], 0]


@workflow.defn
class Treadmill:
    """Continues as new three times at once, then sleeps for an hour."""

    @workflow.run
    async def run(self, laps: int) -> int:
        if laps < 3:
            workflow.continue_as_new(laps + 1)
        await workflow.sleep(timedelta(hours=1))
        return laps


async def test_execution_timeout_spans_the_continue_as_new_chain(
    client: Client, queue: str
) -> None:
    """The execution timeout bounds the whole chain (as in Temporal), not only the
    first run: a workflow cannot escape it by continuing as new."""
    wid = new_id("treadmill")
    timeout = timedelta(seconds=2)
    async with Worker(client, task_queue=queue, workflows=[Treadmill]):
        handle = await client.start_workflow(
            Treadmill.run, 0, id=wid, task_queue=queue, execution_timeout=timeout
        )
        with pytest.raises(WorkflowFailureError) as failure:
            await bounded(handle.result(), 20)
    assert isinstance(failure.value.cause, TimeoutError)
    newest = await client.get_workflow_handle(wid).describe()
    assert newest.status == Status.TIMED_OUT
    assert newest.run_id != handle.run_id
    assert await status_of(client, wid, handle.run_id) == Status.CONTINUED_AS_NEW

    first = (await events_of(handle))[0].workflow_execution_started_event_attributes
    last_events = await events_of(client.get_workflow_handle(wid))
    assert last_events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT
    last = last_events[0].workflow_execution_started_event_attributes
    assert client.data_converter.from_payloads(last.input) == [3]  # the fourth run
    # Every run of the chain shares the first run's deadline.
    assert first.workflow_execution_timeout.ToTimedelta() == timeout
    assert last.workflow_execution_timeout.ToTimedelta() == timeout
    expires = first.workflow_execution_expiration_time.ToMicroseconds()
    assert expires > 0
    assert last.workflow_execution_expiration_time.ToMicroseconds() == expires
