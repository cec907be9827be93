"""The workflow id reuse and conflict policies of a start, on a running id and after the
run closed (each way it can close), and a start repeated with the same request id.

Real server on an ephemeral port over SQLite and over PostgreSQL (conftest's
``client``), real workers, uuid task queues and ids.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from typing import Any

import pytest
from helpers import (
    assert_well_formed,
    bounded,
    events_of,
    new_id,
    status_of,
)

from tideflow.worker_sdk import (
    Client,
    Worker,
    WorkflowHandle,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
    workflow,
)
from tideflow.worker_sdk import WorkflowExecutionStatus as Status
from tideflow.worker_sdk.exceptions import (
    ApplicationError,
    TerminatedError,
    WorkflowAlreadyStartedError,
    WorkflowFailureError,
)


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
