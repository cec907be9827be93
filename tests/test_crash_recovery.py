"""Crash recovery with real processes killed by SIGKILL.

Both on SQLite and on PostgreSQL (the ``store_url`` fixture; server processes get
its URL).

A. The server process dies (SIGKILL) while 30 workflows are mid-flight (sleeping on a
   durable timer, running activities, being started). A new server process on the
   same database and port recovers tasks and timers from the store; the in-test
   client and worker reconnect by themselves. Every workflow completes with the right
   result, every history is well formed, and nothing the first server acknowledged
   (every event a client had read from it) is lost.

B. A worker process dies (SIGKILL) in the middle of an activity attempt. The server
   times the attempt out (start-to-close), retries it, and a second worker process
   completes it: attempt 2, under the second worker's identity.

Processes are started by the ``procs`` fixture (helpers.Processes: stdout/stderr to
files in ``tmp_path``) and always killed and reaped at teardown, even on failure.
Waiting polls a condition against a bounded deadline; no fixed sleeps synchronize.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import Processes, ServerProcess, eventually, of_type, read_marker

from tideflow.api.v1.common_pb2 import TimeoutType
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.server import TideflowServer
from tideflow.worker_sdk import (
    Client,
    RetryPolicy,
    Worker,
    WorkflowExecutionStatus,
    WorkflowHandle,
    activity,
    workflow,
)

pytestmark = pytest.mark.slow

ET = EventType

# Generous for slow CI machines; a healthy run needs a fraction of it.
COMPLETION_TIMEOUT_S = 60.0


# ----------------------------------------------------------------------- history


def _check_history(events: Sequence[HistoryEvent], *, activities: int, timers: int) -> None:
    """A completed run's history: gap-free, closed once, every activity completed once."""
    ids = [e.event_id for e in events]
    assert ids == list(range(1, len(events) + 1)), f"event ids not 1..n: {ids}"
    assert events[0].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED
    assert len(of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED)) == 1
    assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED

    scheduled = [e.event_id for e in of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)]
    assert len(scheduled) == activities
    once_each = Counter(scheduled)
    started = Counter(
        e.activity_task_started_event_attributes.scheduled_event_id
        for e in of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_STARTED)
    )
    completed = Counter(
        e.activity_task_completed_event_attributes.scheduled_event_id
        for e in of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)
    )
    assert started == once_each, f"ActivityTaskStarted per scheduled id: {started}"
    assert completed == once_each, f"ActivityTaskCompleted per scheduled id: {completed}"
    for bad in (
        ET.EVENT_TYPE_ACTIVITY_TASK_FAILED,
        ET.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT,
        ET.EVENT_TYPE_ACTIVITY_TASK_CANCELED,
    ):
        assert not of_type(events, bad), ET.Name(bad)

    assert len(of_type(events, ET.EVENT_TYPE_TIMER_STARTED)) == timers
    assert len(of_type(events, ET.EVENT_TYPE_TIMER_FIRED)) == timers


# ------------------------------------------------- A: the server dies mid-flight

QUEUE_A = "crash-recovery-server"
WORKFLOWS_A = 30
# Short enough that a task lost in the crash (recorded started, response never
# delivered) is retried quickly; long enough not to fire on a loaded machine.
ACTIVITY_TIMEOUT_A = timedelta(seconds=5)
WORKFLOW_TASK_TIMEOUT_A = timedelta(seconds=5)
FAST_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=100))


@activity.defn
async def reserve_stock(n: int) -> int:
    return n * 10


@activity.defn
async def confirm_order(reserved: int) -> str:
    return f"confirmed-{reserved}"


@workflow.defn
class SleepyOrder:
    @workflow.run
    async def run(self, n: int) -> str:
        reserved: int = await workflow.execute_activity(
            reserve_stock, n, start_to_close_timeout=ACTIVITY_TIMEOUT_A, retry_policy=FAST_RETRY
        )
        await workflow.sleep(timedelta(seconds=1.0 + (n % 3) * 0.5))
        result: str = await workflow.execute_activity(
            confirm_order,
            reserved + 1,
            start_to_close_timeout=ACTIVITY_TIMEOUT_A,
            retry_policy=FAST_RETRY,
        )
        return result


def _expected_a(n: int) -> str:
    return f"confirmed-{n * 10 + 1}"


async def test_server_sigkill_mid_flight_recovers_every_workflow(
    server_process: ServerProcess,
) -> None:
    client = await Client.connect(server_process.address)
    worker = Worker(
        client,
        task_queue=QUEUE_A,
        workflows=[SleepyOrder],
        activities=[reserve_stock, confirm_order],
    )
    worker.start()
    starter: asyncio.Task[None] | None = None
    try:

        async def start(n: int) -> WorkflowHandle:
            return await client.start_workflow(
                SleepyOrder.run,
                n,
                id=f"order-{n}",
                task_queue=QUEUE_A,
                task_timeout=WORKFLOW_TASK_TIMEOUT_A,
            )

        # Two thirds start before the crash; the rest are started one after another
        # from a background task that the crash interrupts (the StartWorkflow call
        # in flight is retried against the new server with the same request id).
        early = WORKFLOWS_A * 2 // 3
        handles = list(await asyncio.gather(*(start(n) for n in range(early))))

        async def some_sleeping() -> list[list[HistoryEvent]] | None:
            histories = await asyncio.gather(*(h.fetch_history() for h in handles))
            sleeping = sum(
                1
                for h in histories
                if of_type(h.events, ET.EVENT_TYPE_TIMER_STARTED)
                and not of_type(h.events, ET.EVENT_TYPE_TIMER_FIRED)
            )
            return [h.events for h in histories] if sleeping >= 5 else None

        acknowledged: list[list[HistoryEvent]] = await eventually(
            some_sleeping, "5 workflows sleeping on their timer"
        )
        late: list[WorkflowHandle] = []

        async def start_late() -> None:
            for n in range(early, WORKFLOWS_A):
                late.append(await start(n))

        starter = asyncio.create_task(start_late())
        await eventually(lambda: late, "a late workflow to start")
        await server_process.kill()
        killed_at_us = time.time_ns() // 1000

        await server_process.start()
        async with asyncio.timeout(COMPLETION_TIMEOUT_S):
            await starter
            handles += late
            results = await asyncio.gather(*(h.result() for h in handles))
        assert results == [_expected_a(n) for n in range(WORKFLOWS_A)]
        assert len(late) == WORKFLOWS_A - early

        fired_after_crash = 0
        for n, handle in enumerate(handles):
            assert handle.id == f"order-{n}"
            history = (await handle.fetch_history()).events
            _check_history(history, activities=2, timers=1)
            if n < early:
                # Everything a client read from the first server survived its death.
                before = acknowledged[n]
                assert history[: len(before)] == before, f"order-{n}: acknowledged events lost"
            [fired] = of_type(history, ET.EVENT_TYPE_TIMER_FIRED)
            fired_after_crash += fired.event_time.ToMicroseconds() > killed_at_us
            description = await handle.describe()
            assert description.status == WorkflowExecutionStatus.COMPLETED
            assert description.run_id == handle.run_id
        # The workflows sleeping at the crash were woken by the second server, from
        # the timer rows the first one had committed.
        assert fired_after_crash >= 5, fired_after_crash
        await worker.shutdown()
    finally:
        # On failure a server may be gone: closing the channel first ends the calls
        # that would otherwise keep retrying for minutes, so shutdown returns at once.
        await client.close()
        await worker.shutdown()
        if starter is not None:
            starter.cancel()
            await asyncio.gather(starter, return_exceptions=True)


# ------------------------------------------- B: a worker dies mid-activity attempt

QUEUE_B = "crash-recovery-worker"


async def test_worker_sigkill_mid_activity_is_retried_on_another_worker(
    tmp_path: Path, server: TideflowServer, client: Client, procs: Processes
) -> None:
    worker1 = await procs.start_worker("worker-1", server.address, QUEUE_B, "crashy")
    marker = tmp_path / "activity-marker"
    handle = await client.start_workflow(
        "CrashyWorkflow",
        {"marker": str(marker), "value": "job-7"},
        id="crashy-1",
        task_queue=QUEUE_B,
    )

    attempt1 = await eventually(lambda: read_marker(marker, 1), "attempt 1 to start")
    assert attempt1 == {"pid": worker1.pid, "attempt": 1, "workflow": "crashy-1"}
    pending = (await handle.describe()).raw.pending_activities
    assert [(p.attempt, p.last_worker_identity) for p in pending] == [(1, "worker-1")]

    await procs.sigkill(worker1)
    worker2 = await procs.start_worker("worker-2", server.address, QUEUE_B, "crashy")

    async with asyncio.timeout(COMPLETION_TIMEOUT_S):
        result = await handle.result()
    assert result == "job-7:done-on-attempt-2"
    assert read_marker(marker, 2) == {"pid": worker2.pid, "attempt": 2, "workflow": "crashy-1"}
    assert read_marker(marker, 3) is None

    events = (await handle.fetch_history()).events
    _check_history(events, activities=1, timers=0)
    [started] = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_STARTED)
    [completed] = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)
    started_attrs = started.activity_task_started_event_attributes
    assert started_attrs.attempt == 2
    assert started_attrs.identity == "worker-2"
    # Attempt 1 ended by the server's start-to-close timeout, not by a report.
    timeout_info = started_attrs.last_failure.timeout_failure_info
    assert timeout_info.timeout_type == TimeoutType.TIMEOUT_TYPE_START_TO_CLOSE
    completed_attrs = completed.activity_task_completed_event_attributes
    assert completed_attrs.identity == "worker-2"
    assert completed_attrs.identity != "worker-1"
    wft_identities = [
        e.workflow_task_completed_event_attributes.identity
        for e in of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
    ]
    assert wft_identities == ["worker-1", "worker-2"]
