"""Eager activity execution: a workflow task's completion asks to start activities it
schedules for the completing worker, and the server starts them in the same
transaction and returns them in the response (Temporal's ``request_eager_execution``
and ``activity_tasks``).

What must not change with it, checked here on SQLite and PostgreSQL against a real
server whose trace (server/_trace.py) shows which attempts were started eagerly and
which through a poll (scenarios in helpers_eager.py):

- the server starts at most three per completion; the rest are dispatched and polled;
- an eager attempt is attempt 1, its start-to-close and heartbeat timeouts armed by
  the completing transaction, no task row written; a failed eager attempt is retried
  through the normal path (attempt 2 dispatched and polled);
- a worker without a free activity slot does not ask; one with eager execution
  disabled never does (and takes no workflow task with an activity's completion);
- an eagerly started activity is cancelled as any other (heartbeat, then
  ActivityTaskCanceled);
- a workflow task's completion takes the run's next workflow task (events that arrived
  during it) when the run stays cached and a workflow task slot is free
  (``return_new_workflow_task``), and leaves it to matching when none is;
- a worker SIGKILLed with an eager activity in hand: the attempt times out
  (start-to-close) and attempt 2 runs on another worker process.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from helpers import ET, Processes, assert_well_formed, eventually, new_id, of_type, read_marker
from helpers_eager import (
    RELEASE,
    STARTED,
    WAIT_S,
    AwaitsSignal,
    CancelsItsActivity,
    EagerRetry,
    HeldThenQuick,
    HoldsFirstWorkflowTask,
    completed_activities,
    eager_flags,
    eager_request_for_another_queue,
    fails_first_attempt,
    five_eager_requests,
    heartbeats_until_cancelled,
    held,
    kill_worker_with_eager_activity,
    new_key,
    polled_attempts,
    quick,
    rows,
    run_lines,
    signal_during_first_task,
)

from tideflow.server import TideflowServer
from tideflow.worker_sdk import Client, Worker, WorkflowExecutionStatus, WorkflowHandle
from tideflow.worker_sdk.exceptions import CancelledError, WorkflowFailureError

pytestmark = pytest.mark.usefixtures("trace_dir")


async def test_server_starts_at_most_three_per_completion(client: Client, trace_dir: Path) -> None:
    run = await five_eager_requests(client)
    eager = list(run.response.activity_tasks)
    assert [t.activity_id for t in eager] == ["a1", "a2", "a3"]
    assert sorted(t.activity_id for t in run.polled) == ["a4", "a5"]
    for task in [*eager, *run.polled]:
        assert task.attempt == 1
        assert task.started_time.ToMicroseconds() >= task.scheduled_time.ToMicroseconds() > 0

    lines = run_lines(trace_dir, run.workflow_id)
    completion = next(line for line in lines if line["action"] == "CompleteWorkflowTask")
    assert eager_flags([completion]) == [[True] * 5]
    # Events 5..9 are the five ActivityTaskScheduled: the first three started in the
    # completing transaction (timeouts armed, no task row), the last two dispatched.
    assert sorted(rows(completion, "new_tasks")) == [("ACTIVITY", 8, 1), ("ACTIVITY", 9, 1)]
    armed = sorted(rows(completion, "new_timers"))
    assert [t for t in armed if t[0] == "ACTIVITY_START_TO_CLOSE"] == [
        ("ACTIVITY_START_TO_CLOSE", sid, 1) for sid in (5, 6, 7)
    ]
    assert [t for t in armed if t[0] == "ACTIVITY_HEARTBEAT"] == [
        ("ACTIVITY_HEARTBEAT", sid, 1) for sid in (5, 6, 7)
    ]
    assert sorted(polled_attempts(lines)) == [(8, 1), (9, 1)]

    handle = client.get_workflow_handle(run.workflow_id)
    events = list((await handle.fetch_history()).events)
    assert_well_formed(events)
    started = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_STARTED)
    assert len(started) == 5
    assert {e.activity_task_started_event_attributes.attempt for e in started} == {1}
    assert len(of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)) == 5


async def test_an_activity_of_another_task_queue_is_not_started_eagerly(
    client: Client, trace_dir: Path
) -> None:
    run = await eager_request_for_another_queue(client)
    assert [t.activity_id for t in run.response.activity_tasks] == ["own"]
    assert [(t.activity_id, t.attempt) for t in run.polled] == [("elsewhere", 1)]
    lines = run_lines(trace_dir, run.workflow_id)
    completion = next(line for line in lines if line["action"] == "CompleteWorkflowTask")
    # The request for the other queue's activity is recorded declined: event 5 (its
    # ActivityTaskScheduled) is dispatched, event 6 started in the completion.
    assert eager_flags([completion]) == [[False, True]]
    assert rows(completion, "new_tasks") == [("ACTIVITY", 5, 1)]
    assert polled_attempts(lines) == [(5, 1)]
    handle = client.get_workflow_handle(run.workflow_id)
    await handle.result()  # raises unless the run completed
    events = list((await handle.fetch_history()).events)
    assert_well_formed(events)
    assert len(of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)) == 2


async def _retried(client: Client, *, eager: bool) -> WorkflowHandle:
    """An EagerRetry run (attempt 1 fails, attempt 2 succeeds) on a worker with eager
    execution on or off."""
    queue, key = new_id("eager-retry"), new_key()
    async with Worker(
        client,
        task_queue=queue,
        workflows=[EagerRetry],
        activities=[fails_first_attempt],
        disable_eager_activity_execution=not eager,
        disable_eager_workflow_tasks=not eager,
    ):
        handle = await client.start_workflow(
            EagerRetry.run, key, id=new_id("eager-retry"), task_queue=queue
        )
        async with asyncio.timeout(WAIT_S):
            assert await handle.result() == f"{key}:attempt-2"
    return handle


async def test_failed_eager_attempt_is_retried_through_matching(
    client: Client, trace_dir: Path
) -> None:
    handle = await _retried(client, eager=True)
    lines = run_lines(trace_dir, handle.id)
    assert eager_flags(lines)[0] == [True]
    first = next(line for line in lines if line["action"] == "CompleteWorkflowTask")
    sid = first["events"][-1]["id"]
    assert first["events"][-1]["type"] == "ACTIVITY_TASK_SCHEDULED"
    assert rows(first, "new_tasks") == []
    assert {t for t in rows(first, "new_timers") if t[1] == sid} == {
        ("ACTIVITY_START_TO_CLOSE", sid, 1),
        ("ACTIVITY_HEARTBEAT", sid, 1),
    }
    assert polled_attempts(lines) == [(sid, 2)]
    # Attempt 2's completion took the workflow task it caused (eager workflow task):
    # only the run's first workflow task was polled.
    assert [
        line["args"]["eager_wft"] for line in lines if line["action"] == "CompleteActivity"
    ] == [True]
    assert [line["action"] for line in lines].count("RecordWorkflowTaskStarted") == 1
    # It asked for the next workflow task too (none came: nothing arrived meanwhile).
    completions = [line for line in lines if line["action"] == "CompleteWorkflowTask"]
    assert [line["args"]["return_new"] for line in completions] == [True, False]
    events = list((await handle.fetch_history()).events)
    (started,) = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_STARTED)
    assert started.activity_task_started_event_attributes.attempt == 2
    attempt_failure = started.activity_task_started_event_attributes.last_failure
    assert attempt_failure.message == "attempt 1 fails"


async def test_disabled_eager_execution_polls_every_task(client: Client, trace_dir: Path) -> None:
    handle = await _retried(client, eager=False)
    lines = run_lines(trace_dir, handle.id)
    assert eager_flags(lines) == [[False], []]
    sid = next(line for line in lines if line["action"] == "CompleteWorkflowTask")["events"][-1]
    assert polled_attempts(lines) == [(sid["id"], 1), (sid["id"], 2)]
    assert [
        line["args"]["eager_wft"] for line in lines if line["action"] == "CompleteActivity"
    ] == [False]
    assert [line["action"] for line in lines].count("RecordWorkflowTaskStarted") == 2
    completions = [line for line in lines if line["action"] == "CompleteWorkflowTask"]
    assert [line["args"]["return_new"] for line in completions] == [False, False]


async def test_no_free_activity_slot_means_no_eager_request(
    client: Client, trace_dir: Path
) -> None:
    # Two slots: the one poller holds one while it polls, ``held`` (eager) the other,
    # so ``quick``, scheduled while ``held`` runs, finds none and is polled.
    queue, key = new_id("eager-slots"), new_key()
    async with Worker(
        client,
        task_queue=queue,
        workflows=[HeldThenQuick],
        activities=[held, quick],
        max_concurrent_activities=2,
        activity_pollers=1,
    ):
        handle = await client.start_workflow(
            HeldThenQuick.run, key, id=new_id("eager-slots"), task_queue=queue
        )
        async with asyncio.timeout(WAIT_S):
            await STARTED[key].wait()
            await handle.signal(HeldThenQuick.proceed)
            await eventually(
                lambda: completed_activities(handle, 1), "quick to complete while held runs"
            )
            RELEASE[key].set()
            assert await handle.result() == ["held", "quick"]

    lines = run_lines(trace_dir, handle.id)
    flags = [f for f in eager_flags(lines) if f]
    assert flags == [[True], [False]]
    scheduled = [
        e["id"] for line in lines for e in line["events"] if e["type"] == "ACTIVITY_TASK_SCHEDULED"
    ]
    assert polled_attempts(lines) == [(scheduled[1], 1)]


async def test_eager_activity_is_cancelled_like_any_other(client: Client, trace_dir: Path) -> None:
    queue, key = new_id("eager-cancel"), new_key()
    async with Worker(
        client,
        task_queue=queue,
        workflows=[CancelsItsActivity],
        activities=[heartbeats_until_cancelled],
    ):
        handle = await client.start_workflow(
            CancelsItsActivity.run, key, id=new_id("eager-cancel"), task_queue=queue
        )
        async with asyncio.timeout(WAIT_S):
            await STARTED[key].wait()
            await handle.cancel()
            with pytest.raises(WorkflowFailureError) as failed:
                await handle.result()
    assert isinstance(failed.value.cause, CancelledError)
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED

    lines = run_lines(trace_dir, handle.id)
    assert eager_flags(lines)[0] == [True]
    assert polled_attempts(lines) == []
    events = list((await handle.fetch_history()).events)
    types = [e.event_type for e in events]
    requested = types.index(ET.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED)
    assert types.index(ET.EVENT_TYPE_ACTIVITY_TASK_CANCELED) > requested
    (started,) = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_STARTED)
    assert started.activity_task_started_event_attributes.attempt == 1


@pytest.mark.slow
async def test_worker_sigkill_with_an_eager_activity_in_hand(
    tmp_path: Path, server: TideflowServer, client: Client, procs: Processes, trace_dir: Path
) -> None:
    run = await kill_worker_with_eager_activity(tmp_path, server.address, client, procs)
    handle, marker = run.handle, run.marker
    assert read_marker(marker, 1) == {"pid": run.killed.pid, "attempt": 1, "workflow": handle.id}
    assert read_marker(marker, 2) == {"pid": run.survivor.pid, "attempt": 2, "workflow": handle.id}

    lines = run_lines(trace_dir, handle.id)
    assert eager_flags(lines)[0] == [True]
    first = next(line for line in lines if line["action"] == "CompleteWorkflowTask")
    sid = first["events"][-1]["id"]
    # Attempt 1 was started by worker-1's completion (no poll); nothing but its
    # start-to-close timeout ended it; attempt 2 went through matching.
    assert ("ACTIVITY_START_TO_CLOSE", sid, 1) in rows(first, "new_timers")
    fired = [
        (line["args"]["timer"]["ref"], line["args"]["timer"]["attempt"])
        for line in lines
        if line["action"] == "FireTimer:ACTIVITY_START_TO_CLOSE"
    ]
    assert fired == [(sid, 1)]
    assert polled_attempts(lines) == [(sid, 2)]
    events = list((await handle.fetch_history()).events)
    assert_well_formed(events)
    (started,) = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_STARTED)
    attrs = started.activity_task_started_event_attributes
    assert (attrs.attempt, attrs.identity) == (2, "worker-2")
    assert len(of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)) == 1


@pytest.mark.parametrize("slot_free", [True, False], ids=["slot-free", "no-slot"])
async def test_completion_takes_the_next_workflow_task_if_a_slot_is_free(
    client: Client, trace_dir: Path, slot_free: bool
) -> None:
    # One poller per queue (normal, sticky), each holding a slot while it polls (the
    # one that took the held task polls again on a slot of its own when there is one):
    # with four slots one is free while the held task runs, with two none is.
    queue, key = new_id("eager-next"), new_key()
    async with Worker(
        client,
        task_queue=queue,
        workflows=[AwaitsSignal],
        workflow_pollers=1,
        max_concurrent_workflow_tasks=4 if slot_free else 2,
        interceptors=[HoldsFirstWorkflowTask(key)],
    ):
        handle = await signal_during_first_task(client, queue, key)

    lines = run_lines(trace_dir, handle.id)
    completions = [line for line in lines if line["action"] == "CompleteWorkflowTask"]
    assert [line["args"]["return_new"] for line in completions] == [slot_free, False]
    polled = [line["action"] for line in lines].count("RecordWorkflowTaskStarted")
    assert polled == (1 if slot_free else 2)
    events = list((await handle.fetch_history()).events)
    assert_well_formed(events)
    assert len(of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_STARTED)) == 2
