"""Child and external workflows end to end: child results, failures, signals and
cancellation, a child id already running, parent close policies (also when the parent
closes while its child starts, or in the task that initiates it), a child that
continues as new, external handles that signal and cancel another workflow, and a
child that survives a SIGKILL of its workers' process.

Every test runs a real server on an ephemeral port over SQLite and over PostgreSQL
(conftest's ``client``), real workers and a real client; task queues and workflow ids
are uuids. Nothing waits with a sleep for synchronization: tests await results, or
poll a condition against a bounded deadline (``eventually``). The SIGKILL test runs
its workers as real processes (tests/procs/worker_proc.py, flavour ``child``);
processes are always killed and reaped in fixture teardown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    ET,
    Processes,
    assert_well_formed,
    bounded,
    events_of,
    eventually,
    new_id,
    of_type,
    read_marker,
    status_of,
)

from tideflow.api.v1.history_pb2 import HistoryEvent
from tideflow.server import TideflowServer
from tideflow.worker_sdk import (
    Client,
    Worker,
    workflow,
)
from tideflow.worker_sdk import WorkflowExecutionStatus as Status
from tideflow.worker_sdk.exceptions import (
    ApplicationError,
    CancelledError,
    ChildWorkflowError,
    TerminatedError,
    WorkflowFailureError,
)


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
