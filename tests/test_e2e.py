"""End-to-end tests of a workflow's life: hello world, workflow failures and workflow
task failures, non-determinism that blocks a run until fixed code arrives, the
``Replayer``, and bad inputs that leave the store intact.

A real server on an ephemeral port over SQLite and over PostgreSQL (conftest's
``server`` / ``client``), real workers and a real client, all in the test's event
loop; every test has its own database, task queue and workflow ids (uuids). Nothing
waits with a sleep for synchronization: tests await results or poll a condition with
``eventually`` (bounded). (Activities: test_activities.py; races between a task and
the server: test_task_races.py.)
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from helpers import (
    ET,
    assert_gap_free,
    bounded,
    events_of,
    eventually,
    has_event,
    new_id,
    of_type,
    running_server,
)
from helpers_e2e import TIMEOUT, HelloWorkflow, compose_greeting

from tideflow.api.v1 import service_pb2, state_pb2
from tideflow.api.v1.history_pb2 import WorkflowTaskFailedCause
from tideflow.server import ServerConfig
from tideflow.worker_sdk import (
    Client,
    Replayer,
    Worker,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowHistory,
    activity,
    workflow,
)
from tideflow.worker_sdk.exceptions import (
    ApplicationError,
    InvalidArgumentError,
    NonDeterminismError,
    NotFoundError,
    RPCError,
    TerminatedError,
    WorkflowAlreadyStartedError,
    WorkflowFailureError,
)


@activity.defn(name="nd_a")
async def step_a(x: str) -> str:
    return f"a({x})"


@activity.defn(name="nd_b")
async def step_b(x: str) -> str:
    return f"b({x})"


@workflow.defn
class FailingWorkflow:
    @workflow.run
    async def run(self, kind: str) -> str:
        await workflow.sleep(0.01)
        if kind == "application":
            raise ApplicationError("workflow gave up", "some detail", type="GaveUp")
        raise RuntimeError("bug in workflow code")


@workflow.defn(name="NdWorkflow")
class NdOriginal:
    @workflow.run
    async def run(self, x: str, pause_s: float) -> str:
        a = await workflow.execute_activity(step_a, x, start_to_close_timeout=TIMEOUT)
        await workflow.sleep(pause_s)
        b = await workflow.execute_activity(step_b, x, start_to_close_timeout=TIMEOUT)
        return f"{a}+{b}"


@workflow.defn(name="NdWorkflow")
class NdChanged:
    """The same workflow type with its activities swapped: not replay-compatible."""

    @workflow.run
    async def run(self, x: str, pause_s: float) -> str:
        b = await workflow.execute_activity(step_b, x, start_to_close_timeout=TIMEOUT)
        await workflow.sleep(pause_s)
        a = await workflow.execute_activity(step_a, x, start_to_close_timeout=TIMEOUT)
        return f"{b}+{a}"


async def test_hello_workflow_end_to_end(client: Client) -> None:
    tq = new_id("tq")
    wid = new_id("hello")
    before = datetime.now(UTC)
    async with Worker(
        client, task_queue=tq, workflows=[HelloWorkflow], activities=[compose_greeting]
    ):
        handle = await client.start_workflow(HelloWorkflow.run, "World", id=wid, task_queue=tq)
        assert handle.run_id
        assert await bounded(handle.result()) == "Hello, World (attempt 1)"
        # A handle obtained by id alone finds the same (closed) run.
        assert await bounded(client.get_workflow_handle(wid).result()) == "Hello, World (attempt 1)"
        assert (
            await bounded(
                client.execute_workflow(
                    HelloWorkflow.run, "tideflow", id=new_id("hello"), task_queue=tq
                )
            )
            == "Hello, tideflow (attempt 1)"
        )
    after = datetime.now(UTC)

    desc = await handle.describe()
    history = await handle.fetch_history()
    events = history.events
    assert desc.status == WorkflowExecutionStatus.COMPLETED
    assert desc.id == wid
    assert desc.run_id == handle.run_id
    assert desc.workflow_type == "HelloWorkflow"
    assert desc.task_queue == tq
    assert desc.close_time is not None
    assert before - timedelta(seconds=1) <= desc.start_time <= desc.close_time
    assert desc.close_time <= after + timedelta(seconds=1)
    assert desc.history_length == len(events)
    assert_gap_free(events)
    assert history.run_id == handle.run_id

    types = [e.event_type for e in events]
    assert types[0] == ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED
    assert types[-1] == ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
    for expected in (
        ET.EVENT_TYPE_TIMER_STARTED,
        ET.EVENT_TYPE_TIMER_FIRED,
        ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
        ET.EVENT_TYPE_ACTIVITY_TASK_STARTED,
        ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
    ):
        assert types.count(expected) == 1, ET.Name(expected)
    # The timer fired before the activity was scheduled: the code's order is kept.
    assert types.index(ET.EVENT_TYPE_TIMER_FIRED) < types.index(
        ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    )


async def test_workflow_failure_and_workflow_task_failure(client: Client) -> None:
    tq = new_id("tq")
    async with Worker(client, task_queue=tq, workflows=[FailingWorkflow]):
        failed = await client.start_workflow(
            FailingWorkflow.run, "application", id=new_id("fails"), task_queue=tq
        )
        with pytest.raises(WorkflowFailureError) as info:
            await bounded(failed.result())
        cause = info.value.cause
        assert isinstance(cause, ApplicationError)
        assert cause.message == "workflow gave up"
        assert cause.type == "GaveUp"
        assert list(cause.details) == ["some detail"]
        desc = await failed.describe()
        assert desc.status == WorkflowExecutionStatus.FAILED
        assert desc.close_time is not None
        events = await events_of(failed)
        assert_gap_free(events)
        assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED

        # A plain exception is a bug: only the workflow task fails (and is retried).
        buggy = await client.start_workflow(
            FailingWorkflow.run, "bug", id=new_id("buggy"), task_queue=tq
        )
        await eventually(has_event(buggy, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED))
        events = await events_of(buggy)
        (task_failed,) = of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED)
        attrs = task_failed.workflow_task_failed_event_attributes
        assert "bug in workflow code" in attrs.failure.message
        assert attrs.failure.application_failure_info.type == "RuntimeError"
        assert (
            attrs.cause
            == WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_WORKFLOW_WORKER_UNHANDLED_FAILURE
        )
        assert not of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED)
        desc = await buggy.describe()
        assert desc.status == WorkflowExecutionStatus.RUNNING
        assert desc.close_time is None

        await buggy.terminate("giving up on the bug")
        desc = await buggy.describe()
        assert desc.status == WorkflowExecutionStatus.TERMINATED
        with pytest.raises(WorkflowFailureError) as info:
            await bounded(buggy.result())
        assert isinstance(info.value.cause, TerminatedError)
        assert "giving up on the bug" in str(info.value.cause)
        events = await events_of(buggy)
        assert_gap_free(events)
        assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED
        assert desc.history_length == len(events)
        # Terminating twice is refused; the run stays as it was.
        with pytest.raises(RPCError) as rpc:
            await buggy.terminate("again")
        assert rpc.value.status == "FAILED_PRECONDITION"
        assert len(await events_of(buggy)) == len(events)


async def test_non_determinism_blocks_run_until_fixed_code(client: Client) -> None:
    tq = new_id("tq")
    activities = [step_a, step_b]
    handle: WorkflowHandle

    # Worker A (original code) runs activity "a" and starts the 2 s durable timer.
    # A caches the run, so the server sends the run's next workflow task to A's sticky
    # queue; with A gone it moves back to the normal queue at the latest after this
    # timeout (5 s by default), so keep it short.
    worker_a = Worker(
        client,
        task_queue=tq,
        workflows=[NdOriginal],
        activities=activities,
        sticky_queue_schedule_to_start_timeout=timedelta(milliseconds=500),
    )
    worker_a.start()
    try:
        # A worker that shuts down may take a workflow task with it (a poll cancelled
        # just as its task was handed over: as in Temporal, only the workflow task
        # timeout gets it back). B is shut down while the run's workflow task is being
        # retried, so keep that timeout short: such a loss then costs 2 s, not 10 s.
        handle = await client.start_workflow(
            NdOriginal.run,
            args=["x", 2.0],
            id=new_id("nd"),
            task_queue=tq,
            task_timeout=timedelta(seconds=2),
        )
        await eventually(has_event(handle, ET.EVENT_TYPE_TIMER_STARTED))
    finally:
        await worker_a.shutdown()  # its cached instance goes with it
    events = await events_of(handle)
    assert not of_type(events, ET.EVENT_TYPE_TIMER_FIRED)
    assert len(of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)) == 1

    # Worker B has incompatible code under the same type name: replay must fail.
    worker_b = Worker(client, task_queue=tq, workflows=[NdChanged], activities=activities)
    worker_b.start()
    try:
        await eventually(has_event(handle, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED))
    finally:
        await worker_b.shutdown()
    events = await events_of(handle)
    (task_failed,) = of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED)
    attrs = task_failed.workflow_task_failed_event_attributes
    assert attrs.cause == WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_NON_DETERMINISTIC_ERROR
    assert attrs.failure.application_failure_info.type == "NonDeterminismError"
    assert "'nd_b'" in attrs.failure.message and "'nd_a'" in attrs.failure.message
    assert of_type(events, ET.EVENT_TYPE_TIMER_FIRED)
    # Nothing the changed code wanted was recorded, and the run is not failed.
    assert len(of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)) == 1
    assert not of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED)
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING

    # Worker C runs the original code again: it replays and completes the run.
    async with Worker(client, task_queue=tq, workflows=[NdOriginal], activities=activities):
        assert await bounded(handle.result()) == "a(x)+b(x)"
    events = await events_of(handle)
    assert_gap_free(events)
    assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED
    scheduled = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)
    assert [e.activity_task_scheduled_event_attributes.activity_type.name for e in scheduled] == [
        "nd_a",
        "nd_b",
    ]


async def test_replayer(client: Client) -> None:
    tq = new_id("tq")
    async with Worker(client, task_queue=tq, workflows=[NdOriginal], activities=[step_a, step_b]):
        handle = await client.start_workflow(
            NdOriginal.run, args=["y", 0.05], id=new_id("replay"), task_queue=tq
        )
        assert await bounded(handle.result()) == "a(y)+b(y)"
    history = await handle.fetch_history()

    replayer = Replayer(workflows=[NdOriginal])
    result = replayer.replay(history)
    assert result.events_replayed == len(history.events)
    assert result.workflow_id == handle.id
    assert (await replayer.replay(history)).events_replayed == len(history.events)

    text = history.to_json()
    restored = WorkflowHistory.from_json(text)
    assert restored.workflow_id == handle.id
    assert list(restored.events) == list(history.events)
    assert replayer.replay(restored).events_replayed == len(history.events)
    assert replayer.replay(text).events_replayed == len(history.events)

    changed = Replayer(workflows=[NdChanged])
    with pytest.raises(NonDeterminismError, match="nd_b"):
        changed.replay(history)
    with pytest.raises(NonDeterminismError):
        await changed.replay(text)


async def test_bad_inputs_leave_store_intact(store_url: str) -> None:
    async with running_server(store_url, ServerConfig(max_payload_bytes=1024)) as srv:
        client = await Client.connect(srv.address)
        try:
            tq = new_id("tq")
            # Started first; its worker comes only after all the bad requests.
            early = await client.start_workflow(
                HelloWorkflow.run, "early", id=new_id("early"), task_queue=tq
            )

            nope = await Client.connect(srv.address, namespace="nope")
            try:
                with pytest.raises(NotFoundError) as not_found:
                    await nope.start_workflow(
                        HelloWorkflow.run, "x", id=new_id("nope"), task_queue=tq
                    )
            finally:
                await nope.close()
            assert not_found.value.status == "NOT_FOUND"
            assert "nope" in not_found.value.message

            with pytest.raises(InvalidArgumentError) as invalid:
                await client.start_workflow(HelloWorkflow.run, "x", id="", task_queue=tq)
            assert invalid.value.status == "INVALID_ARGUMENT"
            assert "workflow_id" in invalid.value.message

            # Duplicate id: refused while running; the same request id is idempotent.
            dup_id = new_id("dup")
            request_id = str(uuid.uuid4())
            dup = await client.start_workflow(
                HelloWorkflow.run, "dup", id=dup_id, task_queue=tq, request_id=request_id
            )
            again = await client.start_workflow(
                HelloWorkflow.run, "dup", id=dup_id, task_queue=tq, request_id=request_id
            )
            assert again.run_id == dup.run_id
            with pytest.raises(WorkflowAlreadyStartedError) as already:
                await client.start_workflow(HelloWorkflow.run, "dup", id=dup_id, task_queue=tq)
            assert already.value.status == "ALREADY_EXISTS"
            assert dup.run_id is not None
            assert dup.run_id in already.value.message

            # Task tokens: garbage, a token of the wrong kind, and one for no such run.
            def completed(token: bytes) -> service_pb2.RespondActivityTaskCompletedRequest:
                return service_pb2.RespondActivityTaskCompletedRequest(
                    task_token=token, identity="test"
                )

            for token in (
                b"",
                b"not a token",
                state_pb2.TaskToken(
                    namespace="default", workflow_id="w", run_id="r", is_activity=False
                ).SerializeToString(),
            ):
                with pytest.raises(InvalidArgumentError) as invalid:
                    await client.call(client.service.RespondActivityTaskCompleted, completed(token))
                assert invalid.value.status == "INVALID_ARGUMENT"
                assert "task token" in invalid.value.message
            unknown = state_pb2.TaskToken(
                namespace="default",
                workflow_id=early.id,
                run_id=str(uuid.uuid4()),
                scheduled_event_id=5,
                attempt=1,
                is_activity=True,
            ).SerializeToString()
            # Tokens are signed (server/_task_tokens.py): one built by a client is refused
            # before the run is looked up (tests/test_security_tokens.py signs such tokens
            # with the server's key and checks the NOT_FOUND of unknown runs).
            with pytest.raises(InvalidArgumentError) as forged:
                await client.call(client.service.RespondActivityTaskCompleted, completed(unknown))
            assert forged.value.status == "INVALID_ARGUMENT"
            # A real run, but no such activity.
            no_activity = state_pb2.TaskToken(
                namespace="default",
                workflow_id=early.id,
                run_id=early.run_id,
                scheduled_event_id=999,
                attempt=1,
                is_activity=True,
            ).SerializeToString()
            with pytest.raises(InvalidArgumentError):
                await client.call(
                    client.service.RespondActivityTaskCompleted, completed(no_activity)
                )

            # A payload over the configured limit is refused and nothing is written.
            big_id = new_id("big")
            with pytest.raises(InvalidArgumentError) as too_big:
                await client.start_workflow(HelloWorkflow.run, "x" * 5000, id=big_id, task_queue=tq)
            assert too_big.value.status == "INVALID_ARGUMENT"
            assert "1024" in too_big.value.message
            with pytest.raises(NotFoundError):
                await client.get_workflow_handle(big_id).describe()

            # The store is intact: the earlier runs complete with gap-free histories.
            async with Worker(
                client, task_queue=tq, workflows=[HelloWorkflow], activities=[compose_greeting]
            ):
                assert await bounded(early.result()) == "Hello, early (attempt 1)"
                assert await bounded(dup.result()) == "Hello, dup (attempt 1)"
            for handle in (early, dup):
                events = await events_of(handle)
                assert_gap_free(events)
                assert of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED)[0].event_id == 1
                assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
                assert (await handle.describe()).history_length == len(events)
            # The id is free once the run closed.
            third = await client.start_workflow(HelloWorkflow.run, "x", id=dup_id, task_queue=tq)
            assert third.run_id != dup.run_id
            await third.terminate("done testing")
        finally:
            await client.close()
