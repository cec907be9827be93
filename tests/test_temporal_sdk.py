"""The official Temporal Python SDK (temporalio 1.35.0), unchanged, against tideflow's
Temporal door (server/_temporal_service.py): one server on a real port for the module,
one temporalio client and worker; every history is fetched afterwards through the same
door and replayed by ``temporalio.worker.Replayer``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
import pytest_asyncio
from helpers import eventually
from temporal_door import Door, open_door, replays, signals_handled
from temporal_workflows import (
    ALL_ACTIVITIES,
    ALL_WORKFLOWS,
    AbandonedChildWorkflow,
    CancellableWorkflow,
    CountdownWorkflow,
    DuplicateChildWorkflow,
    GreetWorkflow,
    HistorySizeWorkflow,
    InboxWorkflow,
    NextRetryDelayWorkflow,
    ParentWorkflow,
    PatchedWorkflow,
    RetryWorkflow,
    SleeperWorkflow,
    TimeoutWorkflow,
)
from temporalio.api.enums.v1 import EventType
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import (
    CancelledError,
    TerminatedError,
    WorkflowAlreadyStartedError,
)
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def door(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Door]:
    async with open_door(tmp_path_factory.mktemp("temporal")) as opened:
        yield opened


async def event_types(handle: WorkflowHandle[Any, Any]) -> list[int]:
    return [event.event_type async for event in handle.fetch_history_events()]


async def test_activity_and_timer(door: Door) -> None:
    handle = await door.start(GreetWorkflow.run, "temporal")
    assert await handle.result() == "hello temporal"
    types = await event_types(handle)
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED in types
    assert EventType.EVENT_TYPE_TIMER_FIRED in types
    assert types[-1] == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
    await replays(handle)


async def test_history_size_in_workflow_info(door: Door) -> None:
    """WorkflowTaskStarted carries the run's history size, which the SDK hands to
    workflow.info().get_current_history_size(): it grows with the history."""
    handle = await door.start(HistorySizeWorkflow.run)
    before, after = await handle.result()
    assert 0 < before < after
    await replays(handle)


async def test_activity_retries_and_failure(door: Door) -> None:
    key = str(uuid.uuid4())
    handle = await door.start(RetryWorkflow.run, key)
    assert await handle.result() == [
        f"{key} after 3 attempts",
        f"Broken: {key} cannot succeed",
    ]
    types = await event_types(handle)
    # Retries are the server's: one scheduled event per activity, the final outcome only.
    assert types.count(EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED) == 2
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED in types
    await replays(handle)


async def test_a_failure_names_its_retry_delay(door: Door) -> None:
    """ApplicationError(next_retry_delay=..., category=BENIGN): both fields are stored
    (not refused) and the server waits the failure's delay, not the policy's hour."""
    key = str(uuid.uuid4())
    handle = await door.start(NextRetryDelayWorkflow.run, key)
    assert await handle.result() == f"{key} on attempt 2"
    await replays(handle)


async def test_activity_timeout(door: Door) -> None:
    handle = await door.start(TimeoutWorkflow.run)
    assert await handle.result() == "timed out: START_TO_CLOSE"
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT in await event_types(handle)
    await replays(handle)


async def test_signals_and_queries(door: Door) -> None:
    handle = await door.start(InboxWorkflow.run, "a")
    await eventually(lambda: signals_handled(handle, 0), "the first workflow task")
    await handle.signal(InboxWorkflow.add, "b")
    await eventually(lambda: signals_handled(handle, 1), "the signal handled")
    assert await _queried(handle, ["a", "b"])
    await handle.signal(InboxWorkflow.close)
    assert await handle.result() == ["a", "b"]
    await replays(handle)


async def _queried(handle: WorkflowHandle[Any, Any], expected: list[str]) -> bool:
    return bool(await handle.query(InboxWorkflow.items) == expected)


async def test_signal_with_start(door: Door) -> None:
    workflow_id = f"sws-{uuid.uuid4()}"
    first = await door.client.start_workflow(
        InboxWorkflow.run,
        "first",
        id=workflow_id,
        task_queue=door.queue,
        start_signal="add",
        start_signal_args=["signalled"],
    )
    # Again: the run is there, so only the signal is delivered (to the same run).
    again = await door.client.start_workflow(
        InboxWorkflow.run,
        "ignored",
        id=workflow_id,
        task_queue=door.queue,
        start_signal="add",
        start_signal_args=["again"],
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )
    assert again.result_run_id == first.result_run_id
    await first.signal(InboxWorkflow.close)
    # The SDK runs the signal handler of the first task before the workflow's body.
    assert await first.result() == ["signalled", "first", "again"]
    await replays(first)


async def test_child_workflows(door: Door) -> None:
    handle = await door.start(ParentWorkflow.run, 2)
    assert await handle.result() == 20 + 30
    types = await event_types(handle)
    assert types.count(EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED) == 2
    await replays(handle)


async def test_a_child_id_already_running(door: Door) -> None:
    """StartChildWorkflowExecutionFailed (tideflow keeps its cause as text) reaches the
    SDK with Temporal's WORKFLOW_ALREADY_EXISTS cause: the parent sees the SDK's error."""
    handle = await door.start(DuplicateChildWorkflow.run)
    assert await handle.result() == "the second start was refused"
    assert EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_FAILED in await event_types(handle)
    await replays(handle)


async def test_continue_as_new(door: Door) -> None:
    handle = await door.start(CountdownWorkflow.run, 3)
    # The handle follows the chain of runs to the last one's result.
    assert await handle.result() == 4
    first_run = door.client.get_workflow_handle(handle.id, run_id=handle.result_run_id)
    types = await event_types(first_run)
    assert types[-1] == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
    await replays(first_run)


async def test_cancel_cancels_the_heartbeating_activity(door: Door) -> None:
    handle = await door.start(CancellableWorkflow.run, "beats")

    async def heartbeating() -> bool:
        described = await handle.describe()
        pending = described.raw_description.pending_activities
        return bool(pending) and pending[0].HasField("heartbeat_details")

    await eventually(heartbeating, "the activity's heartbeat details in describe")
    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()
    assert isinstance(failed.value.cause, CancelledError)
    types = await event_types(handle)
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED in types
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED in types
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    await replays(handle)


async def test_terminate_describe_and_list(door: Door) -> None:
    handle = await door.start(SleeperWorkflow.run)
    running = await handle.describe()
    assert running.status == WorkflowExecutionStatus.RUNNING
    assert running.workflow_type == "SleeperWorkflow"
    assert running.task_queue == door.queue
    await handle.terminate("enough")
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()
    assert isinstance(failed.value.cause, TerminatedError)
    assert (await handle.describe()).status == WorkflowExecutionStatus.TERMINATED
    query = f"WorkflowId = '{handle.id}' AND ExecutionStatus = 'Terminated'"
    listed = [run.id async for run in door.client.list_workflows(query)]
    assert listed == [handle.id]
    assert (await door.client.count_workflows(query)).count == 1


async def test_patched_marker_and_local_activity(door: Door) -> None:
    handle = await door.start(PatchedWorkflow.run, "local")
    assert await handle.result() == "hello local (patched)"
    events = [event async for event in handle.fetch_history_events()]
    markers = [
        e.marker_recorded_event_attributes.marker_name
        for e in events
        if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
    ]
    assert sorted(markers) == ["core_local_activity", "core_patch"]
    # With sdk_metadata the SDK also records the patches the run took as the
    # KeywordList search attribute TemporalChangeVersion, and a list query finds it.
    assert EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES in [e.event_type for e in events]
    query = f"WorkflowId = '{handle.id}' AND TemporalChangeVersion = 'greet-locally'"
    assert [run.id async for run in door.client.list_workflows(query)] == [handle.id]
    other = f"WorkflowId = '{handle.id}' AND TemporalChangeVersion = 'greet'"
    assert [run.id async for run in door.client.list_workflows(other)] == []
    await replays(handle)


async def test_a_child_cancelled_as_its_parent_completes(door: Door) -> None:
    """The SDK sends a command that its workflow issued after completing (here a child's
    cancel) before the completion, and on replay does so only if the run's history says
    it did (flag 3, MoveTerminalCommands, in a WorkflowTaskCompleted's sdk_metadata): the
    door advertises sdk_metadata and the engine keeps it, as a Temporal server does."""
    handle = await door.start(AbandonedChildWorkflow.run)
    assert await handle.result() == "left"
    events = [event async for event in handle.fetch_history_events()]
    assert [e.event_type for e in events[-2:]] == [
        EventType.EVENT_TYPE_REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED,
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
    ]
    flags = {
        flag
        for e in events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
        for flag in e.workflow_task_completed_event_attributes.sdk_metadata.core_used_flags
    }
    assert 3 in flags
    with pytest.raises(WorkflowFailureError):  # cancelled or terminated with its parent
        await door.client.get_workflow_handle(f"{handle.id}-child").result()
    await replays(handle)


async def test_errors_have_temporal_types(door: Door) -> None:
    handle = await door.start(SleeperWorkflow.run)
    with pytest.raises(WorkflowAlreadyStartedError):
        await door.client.start_workflow(SleeperWorkflow.run, id=handle.id, task_queue=door.queue)
    with pytest.raises(RPCError) as missing:
        await door.client.get_workflow_handle(f"none-{uuid.uuid4()}").describe()
    assert missing.value.status == RPCStatusCode.NOT_FOUND
    await handle.terminate("done")


async def test_unknown_namespace_is_refused(door: Door) -> None:
    other = await Client.connect(door.server.address, namespace=f"ns-{uuid.uuid4()}")
    with pytest.raises(RPCError) as refused:
        await other.start_workflow(GreetWorkflow.run, "x", id="x", task_queue=door.queue)
    assert refused.value.status == RPCStatusCode.NOT_FOUND
    assert "namespace" in refused.value.message


async def test_without_the_sticky_cache(door: Door) -> None:
    """A worker that caches no run replays each one from its whole history on every
    workflow task (no sticky queue): the histories the door serves replay alike."""
    queue = f"nosticky-{uuid.uuid4()}"
    async with Worker(
        door.client,
        task_queue=queue,
        workflows=ALL_WORKFLOWS,
        activities=ALL_ACTIVITIES,
        max_cached_workflows=0,
    ):
        greet = await door.client.start_workflow(
            GreetWorkflow.run, "uncached", id=f"t-{uuid.uuid4()}", task_queue=queue
        )
        assert await greet.result() == "hello uncached"
        inbox = await door.client.start_workflow(
            InboxWorkflow.run, "a", id=f"t-{uuid.uuid4()}", task_queue=queue
        )
        await eventually(lambda: signals_handled(inbox, 0), "the first workflow task")
        await inbox.signal(InboxWorkflow.add, "b")
        await inbox.signal(InboxWorkflow.close)
        assert await inbox.result() == ["a", "b"]
    await replays(greet)
    await replays(inbox)


async def test_what_tideflow_cannot_store_is_refused_by_name(door: Door) -> None:
    with pytest.raises(RPCError) as delayed:
        await door.client.start_workflow(
            GreetWorkflow.run,
            "x",
            id=f"t-{uuid.uuid4()}",
            task_queue=door.queue,
            start_delay=timedelta(seconds=5),
        )
    assert delayed.value.status == RPCStatusCode.UNIMPLEMENTED
    assert "workflow_start_delay" in delayed.value.message
    with pytest.raises(RPCError) as cron:
        await door.client.start_workflow(
            GreetWorkflow.run,
            "x",
            id=f"t-{uuid.uuid4()}",
            task_queue=door.queue,
            cron_schedule="* * * * *",
        )
    assert cron.value.status == RPCStatusCode.INVALID_ARGUMENT
    assert "cron_schedule" in cron.value.message
