"""Queries of running and closed workflows: they write no history, see every signal
accepted before them, are answered before the first workflow task completed, and a
query that raises returns its error.

Real server on an ephemeral port over SQLite and over PostgreSQL (conftest's
``client``), real workers, uuid task queues and ids; nothing waits on a sleep.
"""

from __future__ import annotations

import asyncio

import pytest
from helpers import ET, events_of, eventually, has_event, new_id, of_type
from helpers_messages import OPEN_GATES, Inbox, expect_closed, is_idle, names, shout

from tideflow.worker_sdk import (
    Client,
    Worker,
    WorkflowExecutionStatus,
)
from tideflow.worker_sdk.exceptions import (
    WorkflowQueryFailedError,
)


async def test_queries_on_running_and_closed_workflow_write_no_history(client: Client) -> None:
    tq = new_id("tq")
    async with Worker(client, task_queue=tq, workflows=[Inbox], activities=[shout]):
        handle = await client.start_workflow(Inbox.run, id=new_id("query"), task_queue=tq)
        await handle.signal(Inbox.add, "a")
        await handle.signal(Inbox.add, "b")
        await eventually(is_idle(handle), what="signals processed")
        before = await events_of(handle)
        length_before = (await handle.describe()).history_length

        assert await handle.query(Inbox.snapshot) == {"phase": "waiting", "items": ["a", "b"]}
        assert await handle.query(Inbox.count) == 2
        assert await handle.query(Inbox.item_at, 1) == "b"
        assert await handle.query("item_at", -2) == "a"  # by name, with an argument
        assert await asyncio.gather(*(handle.query(Inbox.count) for _ in range(10))) == [2] * 10

        # Queries wrote nothing: not an event, not a workflow task.
        assert await events_of(handle) == before
        assert (await handle.describe()).history_length == length_before == len(before)
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING

        await handle.signal(Inbox.close_inbox)
        assert (await handle.result())["items"] == ["a", "b"]

        closed = await events_of(handle)
        # A closed run still answers, from its final state.
        assert await handle.query(Inbox.snapshot) == {"phase": "waiting", "items": ["a", "b"]}
        assert await handle.query(Inbox.item_at, 0) == "a"
        assert await events_of(handle) == closed
    await expect_closed(handle, WorkflowExecutionStatus.COMPLETED)


async def test_query_sees_every_signal_accepted_before_it(client: Client) -> None:
    """Read-your-writes: once ``signal()`` returned, a query reflects the signal, even
    though the workflow task that handles it may not have completed yet (queries are
    dispatched ahead of workflow tasks)."""
    tq = new_id("tq")
    async with Worker(client, task_queue=tq, workflows=[Inbox], activities=[shout]):
        handle = await client.start_workflow(Inbox.run, id=new_id("ryw"), task_queue=tq)
        # Some signals land while the previous one's workflow task runs (the server
        # buffers them until it completes); the query must see those too.
        for n in range(1, 51):
            await handle.signal(Inbox.add, f"item-{n}")
            assert await handle.query(Inbox.count) == n
        await handle.signal(Inbox.close_inbox)
        assert len((await handle.result())["items"]) == 50


async def test_query_before_first_workflow_task_completed(client: Client) -> None:
    tq = new_id("tq")
    key = new_id("gate")
    async with Worker(client, task_queue=tq, workflows=[Inbox], activities=[shout]):
        handle = await client.start_workflow(
            Inbox.run,
            key,
            id=new_id("early-query"),
            task_queue=tq,
            start_signal=Inbox.add,
            start_signal_args=["early"],
        )
        # The first workflow task fails (gate closed) and is retried; none completes.
        await eventually(has_event(handle, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED), what="task failed")
        await handle.signal(Inbox.add, "late")

        async def late_signal_settled() -> bool:
            # Retries of the failing task write no events. The late signal is recorded
            # right away, or (if it came while an attempt ran) when that attempt failed,
            # followed by one recorded attempt that fails too. Either way history then
            # stays as it is until something new arrives.
            events = await events_of(handle)
            signaled = of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)
            last = events[-1].event_type
            return len(signaled) == 2 and last in (
                ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
                ET.EVENT_TYPE_WORKFLOW_TASK_FAILED,
            )

        await eventually(late_signal_settled, what="late signal recorded")
        before = await events_of(handle)
        assert not of_type(before, ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED), names(before)

        # The query sees the start signal and the later one, and the body as far as it
        # got; the workflow task still fails, and the query changed nothing.
        assert await handle.query(Inbox.snapshot) == {
            "phase": "started",
            "items": ["early", "late"],
        }
        assert await handle.query(Inbox.count) == 2
        after = await events_of(handle)
        assert after == before
        assert not of_type(after, ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)

        OPEN_GATES.add(key)  # the "fix" is deployed: the retried task completes
        await handle.signal(Inbox.close_inbox)
        assert await handle.result() == {
            "items": ["early", "late"],
            "seen_at_start": ["early", "late"],
        }
    await expect_closed(handle, WorkflowExecutionStatus.COMPLETED)


async def test_query_that_raises_returns_the_error(client: Client) -> None:
    tq = new_id("tq")
    async with Worker(client, task_queue=tq, workflows=[Inbox], activities=[shout]):
        handle = await client.start_workflow(Inbox.run, id=new_id("bad-query"), task_queue=tq)
        await handle.signal(Inbox.add, "only")
        await eventually(is_idle(handle), what="signal processed")
        before = await events_of(handle)

        with pytest.raises(WorkflowQueryFailedError) as raised:
            await handle.query(Inbox.item_at, 99)
        assert raised.value.status == "FAILED_PRECONDITION"
        assert "IndexError" in raised.value.message
        assert "list index out of range" in raised.value.message

        with pytest.raises(WorkflowQueryFailedError) as unknown:
            await handle.query("no_such_query")
        assert "no_such_query" in unknown.value.message
        assert "snapshot" in unknown.value.message  # the known queries are listed

        # A failed query neither failed a workflow task nor changed the run.
        assert await events_of(handle) == before
        assert await handle.query(Inbox.item_at, 0) == "only"
        await handle.signal(Inbox.close_inbox)
        assert (await handle.result())["items"] == ["only"]
    events = await events_of(handle)
    assert not of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED)
