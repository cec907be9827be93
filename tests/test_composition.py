"""Composition end to end: continue-as-new, child workflows, external handles, and the
workflow id reuse / conflict policies of a start.

Every test runs a real server on an ephemeral port over SQLite and over PostgreSQL
(conftest's ``server``), real workers and a real client; task queues and workflow ids
are uuids. Nothing waits with a sleep for synchronization: tests await results, or
poll a condition against a bounded deadline (``eventually``). One test
(``test_child_workflow_survives_sigkill_of_its_workers_process``) runs its workers as
real processes (tests/procs/worker_proc.py, flavour ``child``) and SIGKILLs the first
one while the child is mid-activity; processes are always killed and reaped in fixture
teardown.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    Processes,
    assert_well_formed,
    bounded,
    events_of,
    eventually,
    new_id,
    of_type,
    read_marker,
)

from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.api.v1.service_pb2 import PollWorkflowTaskResponse
from tideflow.server import TideflowServer
from tideflow.worker_sdk import (
    Client,
    Worker,
    WorkerInterceptor,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
    activity,
    workflow,
)
from tideflow.worker_sdk.exceptions import (
    ApplicationError,
    CancelledError,
    ChildWorkflowError,
    TerminatedError,
    TimeoutError,
    WorkflowAlreadyStartedError,
    WorkflowFailureError,
)
from tideflow.worker_sdk.interceptor import WorkflowTaskHandler

ET = EventType
Status = WorkflowExecutionStatus
_ACTIVITY_TIMEOUT = timedelta(seconds=30)

# --------------------------------------------------------------------- helpers


async def status_of(client: Client, workflow_id: str, run_id: str | None = None) -> Status:
    return (await client.get_workflow_handle(workflow_id, run_id=run_id).describe()).status


# -------------------------------------------------------------- continue-as-new


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


# ---------------------------------------------------------------- child workflows


@workflow.defn
class Kid:
    def __init__(self) -> None:
        self.gifts: list[str] = []

    @workflow.run
    async def run(self, job: dict[str, Any]) -> str:
        mode = job["mode"]
        if mode == "fail":
            raise ApplicationError("kid refused", "detail-1", type="KidError", non_retryable=True)
        if mode == "wait_gift":
            await workflow.wait_condition(lambda: bool(self.gifts))
        if mode == "forever":
            await workflow.wait_condition(lambda: False)  # cancellation ends it
        return f"{job['name']}@{workflow.info().task_queue}:{','.join(self.gifts)}"

    @workflow.signal
    def gift(self, gift: str) -> None:
        self.gifts.append(gift)


@workflow.defn
class Family:
    @workflow.run
    async def run(self, base: str, kid_queue: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        out["executed"] = await workflow.execute_child_workflow(
            Kid.run, {"mode": "plain", "name": "k1"}, id=f"{base}-k1"
        )
        # A child on another task queue, signalled through its handle, then awaited.
        h2 = await workflow.start_child_workflow(
            Kid.run, {"mode": "wait_gift", "name": "k2"}, id=f"{base}-k2", task_queue=kid_queue
        )
        out["k2_run_id"] = h2.first_execution_run_id
        await h2.signal(Kid.gift, "ball")
        out["signalled"] = await h2
        try:
            await workflow.execute_child_workflow(Kid.run, {"mode": "fail"}, id=f"{base}-k3")
            out["failed"] = "no error"
        except ChildWorkflowError as error:
            cause = error.cause
            assert isinstance(cause, ApplicationError)
            out["failed"] = [
                type(cause).__name__,
                cause.message,
                cause.type,
                list(cause.details),
                error.workflow_id,
                error.run_id != "",
            ]
        h4 = await workflow.start_child_workflow(Kid.run, {"mode": "forever"}, id=f"{base}-k4")
        await h4.cancel()
        try:
            await h4
            out["cancelled"] = "no error"
        except ChildWorkflowError as error:
            out["cancelled"] = [type(error.cause).__name__, isinstance(error.cause, CancelledError)]
        return out


async def test_child_results_failures_signals_and_cancellation(client: Client, queue: str) -> None:
    kid_queue = f"{queue}-kids"
    base = new_id("family")
    async with (
        Worker(client, task_queue=queue, workflows=[Family, Kid]),
        Worker(client, task_queue=kid_queue, workflows=[Kid]),
    ):
        handle = await client.start_workflow(
            Family.run, args=[base, kid_queue], id=base, task_queue=queue
        )
        result = await bounded(handle.result())
    assert result == {
        "executed": f"k1@{queue}:",
        "k2_run_id": result["k2_run_id"],
        "signalled": f"k2@{kid_queue}:ball",
        "failed": ["ApplicationError", "kid refused", "KidError", ["detail-1"], f"{base}-k3", True],
        "cancelled": ["CancelledError", True],
    }

    parent_events = await events_of(handle)
    assert_well_formed(parent_events)
    counts = {
        name: len(of_type(parent_events, getattr(ET, f"EVENT_TYPE_{name}")))
        for name in (
            "START_CHILD_WORKFLOW_EXECUTION_INITIATED",
            "CHILD_WORKFLOW_EXECUTION_STARTED",
            "CHILD_WORKFLOW_EXECUTION_COMPLETED",
            "CHILD_WORKFLOW_EXECUTION_FAILED",
            "CHILD_WORKFLOW_EXECUTION_CANCELED",
            "EXTERNAL_WORKFLOW_EXECUTION_SIGNALED",
            "EXTERNAL_WORKFLOW_EXECUTION_CANCEL_REQUESTED",
        )
    }
    assert counts == {
        "START_CHILD_WORKFLOW_EXECUTION_INITIATED": 4,
        "CHILD_WORKFLOW_EXECUTION_STARTED": 4,
        "CHILD_WORKFLOW_EXECUTION_COMPLETED": 2,
        "CHILD_WORKFLOW_EXECUTION_FAILED": 1,
        "CHILD_WORKFLOW_EXECUTION_CANCELED": 1,
        "EXTERNAL_WORKFLOW_EXECUTION_SIGNALED": 1,
        "EXTERNAL_WORKFLOW_EXECUTION_CANCEL_REQUESTED": 1,
    }
    initiated = {
        e.start_child_workflow_execution_initiated_event_attributes.workflow_id: e.event_id
        for e in of_type(parent_events, ET.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED)
    }
    started = {
        e.child_workflow_execution_started_event_attributes.workflow_execution.workflow_id: (
            e.child_workflow_execution_started_event_attributes.workflow_execution.run_id
        )
        for e in of_type(parent_events, ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED)
    }
    assert started[f"{base}-k2"] == result["k2_run_id"]

    # Each child is a run of its own, with its own history that names its parent.
    expected = {
        "k1": (Status.COMPLETED, queue),
        "k2": (Status.COMPLETED, kid_queue),
        "k3": (Status.FAILED, queue),
        "k4": (Status.CANCELED, queue),
    }
    for name, (status, task_queue) in expected.items():
        child_id = f"{base}-{name}"
        description = await client.get_workflow_handle(child_id).describe()
        assert (description.run_id, description.status, description.task_queue) == (
            started[child_id],
            status,
            task_queue,
        )
        child_events = await events_of(client.get_workflow_handle(child_id))
        assert_well_formed(child_events)
        attrs = child_events[0].workflow_execution_started_event_attributes
        assert attrs.parent_workflow_execution.workflow_id == base
        assert attrs.parent_workflow_execution.run_id == handle.run_id
        assert attrs.parent_initiated_event_id == initiated[child_id]
        assert attrs.original_execution_run_id == started[child_id]
        assert len(child_events) < len(parent_events)
    k2_events = await events_of(client.get_workflow_handle(f"{base}-k2"))
    [gift] = of_type(k2_events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)
    assert gift.workflow_execution_signaled_event_attributes.signal_name == "gift"
    k4_events = await events_of(client.get_workflow_handle(f"{base}-k4"))
    assert of_type(k4_events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED)


@workflow.defn
class Blocker:
    def __init__(self) -> None:
        self.released = False

    @workflow.run
    async def run(self) -> str:
        await workflow.wait_condition(lambda: self.released)
        return "released"

    @workflow.signal
    def release(self) -> None:
        self.released = True


@workflow.defn
class Clasher:
    @workflow.run
    async def run(self, target_id: str) -> list[Any]:
        try:
            await workflow.start_child_workflow(Blocker.run, id=target_id)
        except ChildWorkflowError as error:
            cause = error.cause
            assert isinstance(cause, ApplicationError)
            return [type(cause).__name__, cause.type, error.workflow_id]
        return ["started a second run"]


async def test_child_with_an_id_already_running_fails_to_start(client: Client, queue: str) -> None:
    target = new_id("taken")
    async with Worker(client, task_queue=queue, workflows=[Blocker, Clasher]):
        blocker = await client.start_workflow(Blocker.run, id=target, task_queue=queue)
        clasher = await client.start_workflow(
            Clasher.run, target, id=new_id("clasher"), task_queue=queue
        )
        assert await bounded(clasher.result()) == [
            "ApplicationError",
            "WorkflowAlreadyStartedError",
            target,
        ]
        # The run that held the id is untouched.
        description = await client.get_workflow_handle(target).describe()
        assert (description.run_id, description.status) == (blocker.run_id, Status.RUNNING)
        await blocker.signal(Blocker.release)
        assert await bounded(blocker.result()) == "released"

    events = await events_of(clasher)
    assert_well_formed(events)
    [failed] = of_type(events, ET.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_FAILED)
    assert failed.start_child_workflow_execution_failed_event_attributes.workflow_id == target
    assert not of_type(events, ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED)
    blocker_events = await events_of(blocker)
    assert not blocker_events[0].workflow_execution_started_event_attributes.HasField(
        "parent_workflow_execution"
    )


@workflow.defn
class Sleeper:
    """Waits for ``wake``; a cancellation request makes it return early (so the test
    can tell that it saw one)."""

    def __init__(self) -> None:
        self.woken = False

    @workflow.run
    async def run(self) -> str:
        try:
            await workflow.wait_condition(lambda: self.woken)
        except asyncio.CancelledError:
            return "saw cancellation"
        return "woken"

    @workflow.signal
    def wake(self) -> None:
        self.woken = True


@workflow.defn
class ShortLivedParent:
    """Starts three sleeping children, one per close policy, and then either
    completes at once or (``wait``) waits until terminated."""

    @workflow.run
    async def run(self, base: str, wait: bool) -> list[str]:
        policy = workflow.ParentClosePolicy
        await workflow.start_child_workflow(Sleeper.run, id=f"{base}-terminate")  # the default
        await workflow.start_child_workflow(
            Sleeper.run, id=f"{base}-cancel", parent_close_policy=policy.REQUEST_CANCEL
        )
        await workflow.start_child_workflow(
            Sleeper.run, id=f"{base}-abandon", parent_close_policy=policy.ABANDON
        )
        if wait:
            await workflow.wait_condition(lambda: False)
        return ["children started"]


@pytest.mark.parametrize("parent_closes_by", ["completing", "being_terminated"])
async def test_parent_close_policies(client: Client, queue: str, parent_closes_by: str) -> None:
    base = new_id("parent")
    async with Worker(client, task_queue=queue, workflows=[ShortLivedParent, Sleeper]):
        wait = parent_closes_by == "being_terminated"
        parent = await client.start_workflow(
            ShortLivedParent.run, args=[base, wait], id=base, task_queue=queue
        )
        if wait:

            async def all_started() -> bool:
                events = await events_of(parent)
                return len(of_type(events, ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED)) == 3

            await eventually(all_started, what="three children started")
            await parent.terminate("test ends the parent")
            with pytest.raises(WorkflowFailureError):
                await bounded(parent.result())
        else:
            assert await bounded(parent.result()) == ["children started"]

        # TERMINATE (the default): the child is terminated.
        terminated = client.get_workflow_handle(f"{base}-terminate")
        with pytest.raises(WorkflowFailureError) as failure:
            await bounded(terminated.result())
        assert isinstance(failure.value.cause, TerminatedError)
        assert await status_of(client, f"{base}-terminate") == Status.TERMINATED
        last = (await events_of(terminated))[-1]
        assert last.workflow_execution_terminated_event_attributes.reason == "parent closed"

        # REQUEST_CANCEL: the child sees asyncio.CancelledError and decides itself.
        cancelled = client.get_workflow_handle(f"{base}-cancel")
        assert await bounded(cancelled.result()) == "saw cancellation"
        assert of_type(
            await events_of(cancelled), ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED
        )

        # ABANDON: still running after the other two policies took effect; it completes
        # normally when woken (a cancelled one would say so, a terminated one raise).
        abandoned = client.get_workflow_handle(f"{base}-abandon")
        assert await status_of(client, f"{base}-abandon") == Status.RUNNING
        await abandoned.signal(Sleeper.wake)
        assert await bounded(abandoned.result()) == "woken"
        abandoned_events = await events_of(abandoned)
        assert not of_type(abandoned_events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED)

    # The parent heard of no child closing: it had closed first.
    parent_events = await events_of(parent)
    assert_well_formed(parent_events)
    assert len(of_type(parent_events, ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED)) == 3
    assert not of_type(parent_events, ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TERMINATED)
    assert not of_type(parent_events, ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED)


@workflow.defn
class OneChildParent:
    @workflow.run
    async def run(self, child_id: str, policy: int) -> str:
        await workflow.start_child_workflow(
            Sleeper.run, id=child_id, parent_close_policy=workflow.ParentClosePolicy(policy)
        )
        await workflow.wait_condition(lambda: False)
        return "unreachable"


@pytest.mark.parametrize("policy", ["TERMINATE", "REQUEST_CANCEL", "ABANDON"])
async def test_parent_closing_while_its_child_starts_still_applies_close_policy(
    client: Client, queue: str, policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent closes after the server started its child but before the child's
    start was recorded in the parent (the transfer of StartChild in flight): the close
    policy must still reach the child, which would otherwise run on orphaned."""
    from tideflow.server._engine import HistoryEngine

    parent_id, child_id = new_id("racing-parent"), new_id("racing-child")
    original = HistoryEngine.start_workflow
    closed_parent: list[str] = []

    async def start_then_close_parent(self: Any, req: Any, **kwargs: Any) -> Any:
        started = await original(self, req, **kwargs)
        if req.workflow_id == child_id and not closed_parent:
            closed_parent.append(started[0])
            await client.get_workflow_handle(parent_id).terminate("closed as its child starts")
        return started

    monkeypatch.setattr(HistoryEngine, "start_workflow", start_then_close_parent)
    async with Worker(client, task_queue=queue, workflows=[OneChildParent, Sleeper]):
        parent = await client.start_workflow(
            OneChildParent.run,
            args=[child_id, int(workflow.ParentClosePolicy[policy])],
            id=parent_id,
            task_queue=queue,
        )
        with pytest.raises(WorkflowFailureError):
            await bounded(parent.result())
        child = client.get_workflow_handle(child_id)
        await eventually(lambda: closed_parent, what="the child to start")
        if policy == "TERMINATE":
            with pytest.raises(WorkflowFailureError) as failure:
                await bounded(child.result())
            assert isinstance(failure.value.cause, TerminatedError)
        elif policy == "REQUEST_CANCEL":
            assert await bounded(child.result()) == "saw cancellation"
        else:
            assert await status_of(client, child_id) == Status.RUNNING
            await child.signal(Sleeper.wake)
            assert await bounded(child.result()) == "woken"
    assert (await child.describe()).run_id == closed_parent[0]
    parent_events = await events_of(parent)
    assert_well_formed(parent_events)
    assert not of_type(parent_events, ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED)


@workflow.defn
class FireAndForgetParent:
    """Initiates a child and completes in the same workflow task (it does not wait for
    the child to start)."""

    @workflow.run
    async def run(self, child_id: str) -> str:
        self.starting = asyncio.ensure_future(
            workflow.start_child_workflow(Sleeper.run, id=child_id)
        )
        return "done without waiting"


async def test_parent_completing_in_the_task_that_initiates_a_child(
    client: Client, queue: str
) -> None:
    """StartChild and CompleteWorkflow in one completion: the run closes at once (the
    parent close policy and the child's start are two outbox rows of one transition,
    for the same child) and the child is not left running."""
    child_id = new_id("unborn")
    async with Worker(client, task_queue=queue, workflows=[FireAndForgetParent, Sleeper]):
        parent = await client.start_workflow(
            FireAndForgetParent.run, child_id, id=new_id("hasty"), task_queue=queue
        )
        assert await bounded(parent.result(), 15) == "done without waiting"
    events = await events_of(parent)
    assert_well_formed(events)
    assert [e.event_type for e in events[-2:]] == [
        ET.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED,
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
    ]
    assert not of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED)

    async def child_not_running() -> bool:
        try:
            return await status_of(client, child_id) != Status.RUNNING
        except Exception:  # never started: not found
            return True

    await eventually(child_not_running, what="the child not to be left running")


@workflow.defn
class ChainedChild:
    """A child that continues as new twice; its parent gets the last run's result."""

    @workflow.run
    async def run(self, n: int) -> int:
        if n < 3:
            workflow.continue_as_new(n + 1)
        return n * 100


@workflow.defn
class ChainParent:
    @workflow.run
    async def run(self, child_id: str) -> int:
        result: int = await workflow.execute_child_workflow(ChainedChild.run, 1, id=child_id)
        return result


async def test_child_that_continues_as_new_reports_its_last_run(client: Client, queue: str) -> None:
    child_id = new_id("chained-child")
    async with Worker(client, task_queue=queue, workflows=[ChainParent, ChainedChild]):
        parent = await client.start_workflow(
            ChainParent.run, child_id, id=new_id("chain-parent"), task_queue=queue
        )
        assert await bounded(parent.result()) == 300
    events = await events_of(parent)
    [started] = of_type(events, ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED)
    first_child_run = started.child_workflow_execution_started_event_attributes.workflow_execution
    assert await status_of(client, child_id, first_child_run.run_id) == Status.CONTINUED_AS_NEW
    newest = await client.get_workflow_handle(child_id).describe()
    assert newest.status == Status.COMPLETED
    assert newest.run_id != first_child_run.run_id
    # Every run of the chain names the parent.
    last_events = await events_of(client.get_workflow_handle(child_id))
    last_started = last_events[0].workflow_execution_started_event_attributes
    assert last_started.parent_workflow_execution.run_id == parent.run_id


# ---------------------------------------------------------- external workflows


@workflow.defn
class Mailbox:
    def __init__(self) -> None:
        self.letters: list[str] = []

    @workflow.run
    async def run(self) -> list[str]:
        try:
            await workflow.wait_condition(lambda: False)
        except asyncio.CancelledError:
            return ["cancelled after", *self.letters]
        return []

    @workflow.signal
    def post(self, letter: str) -> None:
        self.letters.append(letter)


@workflow.defn
class Postman:
    @workflow.run
    async def run(self, target: str, missing: str) -> list[Any]:
        mailbox = workflow.get_external_workflow_handle(target)
        await mailbox.signal(Mailbox.post, "hello")
        await mailbox.signal(Mailbox.post, args=["world"])
        await mailbox.cancel()
        out: list[Any] = ["delivered"]
        nowhere = workflow.get_external_workflow_handle(missing)
        try:
            await nowhere.signal(Mailbox.post, "lost")
            out.append("signal to a missing workflow succeeded")
        except ApplicationError as error:
            out.append(["signal", error.type])
        try:
            await nowhere.cancel()
            out.append("cancel of a missing workflow succeeded")
        except ApplicationError as error:
            out.append(["cancel", error.type])
        return out


async def test_external_handles_signal_and_cancel_another_workflow(
    client: Client, queue: str
) -> None:
    target, missing, postman_id = new_id("mailbox"), new_id("missing"), new_id("postman")
    async with Worker(client, task_queue=queue, workflows=[Mailbox, Postman]):
        mailbox = await client.start_workflow(Mailbox.run, id=target, task_queue=queue)
        postman = await client.start_workflow(
            Postman.run, args=[target, missing], id=postman_id, task_queue=queue
        )
        assert await bounded(postman.result()) == [
            "delivered",
            ["signal", "ExternalWorkflowExecutionNotFound"],
            ["cancel", "ExternalWorkflowExecutionNotFound"],
        ]
        assert await bounded(mailbox.result()) == ["cancelled after", "hello", "world"]

    mailbox_events = await events_of(mailbox)
    assert_well_formed(mailbox_events)
    signals = of_type(mailbox_events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)
    assert [s.workflow_execution_signaled_event_attributes.identity for s in signals] == [
        f"workflow:{postman_id}"
    ] * 2
    [cancel] = of_type(mailbox_events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED)
    assert cancel.event_id > signals[-1].event_id

    postman_events = await events_of(postman)
    assert_well_formed(postman_events)
    assert len(of_type(postman_events, ET.EVENT_TYPE_EXTERNAL_WORKFLOW_EXECUTION_SIGNALED)) == 2
    assert (
        len(of_type(postman_events, ET.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_FAILED)) == 1
    )
    assert of_type(postman_events, ET.EVENT_TYPE_EXTERNAL_WORKFLOW_EXECUTION_CANCEL_REQUESTED)
    assert of_type(postman_events, ET.EVENT_TYPE_REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION_FAILED)
    # Nothing was created under the missing id.
    with pytest.raises(Exception, match="not found"):
        await client.get_workflow_handle(missing).describe()


# ------------------------------------------------------ id reuse and conflicts


@workflow.defn
class Gate:
    """Waits for ``open``: "complete" returns x, "fail" fails the workflow."""

    def __init__(self) -> None:
        self.outcome: str | None = None

    @workflow.run
    async def run(self, x: int) -> int:
        await workflow.wait_condition(lambda: self.outcome is not None)
        if self.outcome == "fail":
            raise ApplicationError("asked to fail", non_retryable=True)
        return x

    @workflow.signal
    def open(self, outcome: str) -> None:
        self.outcome = outcome


async def _refused(start: Awaitable[WorkflowHandle]) -> WorkflowAlreadyStartedError:
    with pytest.raises(WorkflowAlreadyStartedError) as refused:
        await start
    assert refused.value.status == "ALREADY_EXISTS"
    return refused.value


async def test_id_conflict_policies_on_a_running_id(client: Client, queue: str) -> None:
    wid = new_id("conflict")
    R, C = WorkflowIDReusePolicy, WorkflowIDConflictPolicy

    def start(x: int, **policies: Any) -> Awaitable[WorkflowHandle]:
        return client.start_workflow(Gate.run, x, id=wid, task_queue=queue, **policies)

    async with Worker(client, task_queue=queue, workflows=[Gate]):
        h1 = await start(1)
        # FAIL, the default: ALREADY_EXISTS, whatever the reuse policy for closed runs.
        await _refused(start(2))
        await _refused(start(2, id_conflict_policy=C.FAIL, id_reuse_policy=R.ALLOW_DUPLICATE))
        # USE_EXISTING: the running run, not a new one.
        h2 = await start(2, id_conflict_policy=C.USE_EXISTING)
        assert h2.run_id == h1.run_id
        assert await status_of(client, wid) == Status.RUNNING
        # TERMINATE_EXISTING: the running run is terminated and a new one starts.
        h3 = await start(3, id_conflict_policy=C.TERMINATE_EXISTING)
        assert h3.run_id != h1.run_id
        with pytest.raises(WorkflowFailureError) as failure:
            await bounded(h1.result())
        assert isinstance(failure.value.cause, TerminatedError)
        # The reuse policy TERMINATE_IF_RUNNING does the same.
        h4 = await start(4, id_reuse_policy=R.TERMINATE_IF_RUNNING)
        assert h4.run_id not in (h1.run_id, h3.run_id)
        assert await status_of(client, wid, h3.run_id) == Status.TERMINATED
        assert (await client.get_workflow_handle(wid).describe()).run_id == h4.run_id
        await h4.signal(Gate.open, "complete")
        assert await bounded(h4.result()) == 4

    for handle in (h1, h3, h4):
        events = await events_of(handle)
        assert_well_formed(events)
        # Every run got its own input: USE_EXISTING did not restart h1 with 2.
        started = events[0].workflow_execution_started_event_attributes
        assert client.data_converter.from_payloads(started.input) == [
            {h1.run_id: 1, h3.run_id: 3, h4.run_id: 4}[handle.run_id]
        ]


async def _close(handle: WorkflowHandle, how: str) -> None:
    if how == "completed":
        await handle.signal(Gate.open, "complete")
        assert await bounded(handle.result()) == 1
        return
    if how == "failed":
        await handle.signal(Gate.open, "fail")
    elif how == "terminated":
        await handle.terminate("test")
    else:
        await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await bounded(handle.result())


_CLOSED_AS = {
    "completed": Status.COMPLETED,
    "failed": Status.FAILED,
    "terminated": Status.TERMINATED,
    "cancelled": Status.CANCELED,
}


@pytest.mark.parametrize("closed", list(_CLOSED_AS))
async def test_id_reuse_policies_after_the_run_closed(
    client: Client, queue: str, closed: str
) -> None:
    wid = new_id(f"reuse-{closed}")
    R = WorkflowIDReusePolicy

    def start(x: int, policy: WorkflowIDReusePolicy) -> Awaitable[WorkflowHandle]:
        return client.start_workflow(Gate.run, x, id=wid, task_queue=queue, id_reuse_policy=policy)

    async with Worker(client, task_queue=queue, workflows=[Gate]):
        first = await start(1, R.ALLOW_DUPLICATE)
        await _close(first, closed)
        assert await status_of(client, wid) == _CLOSED_AS[closed]

        # REJECT_DUPLICATE never reuses an id; ALLOW_DUPLICATE_FAILED_ONLY only after
        # a run that did not complete successfully.
        await _refused(start(2, R.REJECT_DUPLICATE))
        if closed == "completed":
            await _refused(start(2, R.ALLOW_DUPLICATE_FAILED_ONLY))
            second = await start(3, R.ALLOW_DUPLICATE)
        else:
            second = await start(3, R.ALLOW_DUPLICATE_FAILED_ONLY)
        assert second.run_id != first.run_id
        newest = await client.get_workflow_handle(wid).describe()
        assert (newest.run_id, newest.status) == (second.run_id, Status.RUNNING)
        # The refused starts left the closed run as it was.
        assert await status_of(client, wid, first.run_id) == _CLOSED_AS[closed]

        # TERMINATE_IF_RUNNING on a closed id behaves like ALLOW_DUPLICATE.
        await second.signal(Gate.open, "complete")
        assert await bounded(second.result()) == 3
        third = await start(4, R.TERMINATE_IF_RUNNING)
        assert third.run_id not in (first.run_id, second.run_id)
        await third.signal(Gate.open, "complete")
        assert await bounded(third.result()) == 4
        assert await status_of(client, wid, second.run_id) == Status.COMPLETED


async def test_start_with_the_same_request_id_returns_the_same_run(
    client: Client, queue: str
) -> None:
    wid = new_id("idempotent")
    request_id = str(uuid.uuid4())

    def start(x: int, rid: str | None = None, **kw: Any) -> Awaitable[WorkflowHandle]:
        return client.start_workflow(Gate.run, x, id=wid, task_queue=queue, request_id=rid, **kw)

    async with Worker(client, task_queue=queue, workflows=[Gate]):
        # Concurrent retries of one start (same request id) on a fresh id: one run.
        handles = await asyncio.gather(*(start(1, request_id) for _ in range(8)))
        run_ids = {h.run_id for h in handles}
        assert len(run_ids) == 1, run_ids
        # A later retry, even with another conflict policy, returns that run too.
        again = await start(
            1, request_id, id_conflict_policy=WorkflowIDConflictPolicy.TERMINATE_EXISTING
        )
        assert again.run_id in run_ids
        assert await status_of(client, wid) == Status.RUNNING
        # Another request id is another start: ALREADY_EXISTS while the run runs.
        await _refused(start(1, str(uuid.uuid4())))
        await _refused(start(1))
        await handles[0].signal(Gate.open, "complete")
        assert await bounded(handles[0].result()) == 1
        # Retried after the run closed: still that run, no second one.
        late = await start(1, request_id)
        assert late.run_id in run_ids

    description = await client.get_workflow_handle(wid).describe()
    assert (description.run_id, description.status) == (handles[0].run_id, Status.COMPLETED)
    events = await events_of(handles[0])
    assert_well_formed(events)
    assert events[0].workflow_execution_started_event_attributes.request_id == request_id


# ---------------------------------------- child workflow when its worker is killed


def _identities(events: Sequence[HistoryEvent]) -> list[str]:
    return [
        e.workflow_task_completed_event_attributes.identity
        for e in of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
    ]


@pytest.mark.slow
async def test_child_workflow_survives_sigkill_of_its_workers_process(
    tmp_path: Path, server: TideflowServer, client: Client, queue: str, procs: Processes
) -> None:
    """Worker process #1 serves the parent and the child (one task queue). It is
    SIGKILLed while the child runs its activity and the parent waits for the child;
    worker process #2 takes over: the activity is retried there, the child's and the
    parent's next workflow tasks leave #1's sticky queue for the normal one, and both
    complete. The child was started exactly once."""

    worker1 = await procs.start_worker("worker-1", server.address, queue, "child")
    parent_id, child_id = new_id("crash-parent"), new_id("crash-child")
    marker = tmp_path / "child-step"
    parent = await client.start_workflow(
        "CrashParent",
        {"marker": str(marker), "value": "job-7", "child_id": child_id},
        id=parent_id,
        task_queue=queue,
        task_timeout=timedelta(seconds=5),
    )

    attempt1 = await eventually(
        lambda: read_marker(marker, 1), what="the child's activity, attempt 1"
    )
    assert attempt1 == {"pid": worker1.pid, "attempt": 1, "workflow": child_id}

    async def parent_waits_for_child() -> bool:
        # The parent's task that saw the child start completed: it now awaits the child.
        events = await events_of(parent)
        started = of_type(events, ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED)
        return bool(started) and events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED

    await eventually(parent_waits_for_child, what="the parent to wait for its child")
    await procs.sigkill(worker1)

    worker2 = await procs.start_worker("worker-2", server.address, queue, "child")
    result = await bounded(parent.result(), 45)
    assert result == "child(job-7:step-on-attempt-2):parent-step"
    assert read_marker(marker, 2) == {"pid": worker2.pid, "attempt": 2, "workflow": child_id}
    assert read_marker(marker, 3) is None

    parent_events = await events_of(parent)
    assert_well_formed(parent_events)
    [initiated] = of_type(parent_events, ET.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED)
    [started] = of_type(parent_events, ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED)
    [completed] = of_type(parent_events, ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED)
    child_run = started.child_workflow_execution_started_event_attributes.workflow_execution
    assert child_run.workflow_id == child_id
    assert (
        completed.child_workflow_execution_completed_event_attributes.workflow_execution.run_id
        == child_run.run_id
    )
    identities = _identities(parent_events)
    assert identities[0] == "worker-1" and identities[-1] == "worker-2", identities

    # No second child run: the id's newest run is the one the parent recorded, and its
    # history starts once, naming the parent.
    child = await client.get_workflow_handle(child_id).describe()
    assert (child.run_id, child.status) == (child_run.run_id, Status.COMPLETED)
    child_events = await events_of(client.get_workflow_handle(child_id))
    assert_well_formed(child_events)
    child_started = child_events[0].workflow_execution_started_event_attributes
    assert child_started.original_execution_run_id == child_run.run_id
    assert child_started.first_execution_run_id == child_run.run_id
    assert child_started.parent_workflow_execution.workflow_id == parent_id
    assert child_started.parent_workflow_execution.run_id == parent.run_id
    assert child_started.parent_initiated_event_id == initiated.event_id
    [activity_started] = of_type(child_events, ET.EVENT_TYPE_ACTIVITY_TASK_STARTED)
    attrs = activity_started.activity_task_started_event_attributes
    assert (attrs.attempt, attrs.identity) == (2, "worker-2")
    identities = _identities(child_events)
    assert identities[0] == "worker-1" and identities[-1] == "worker-2", identities
