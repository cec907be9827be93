"""``workflow.logger``: each line once, however often the code is replayed, tagged with the run.

Workflow code runs again whenever a worker rebuilds a run from history: a worker that
caches nothing (every task replays), a second worker taking over, a query (answered
from a replay), the ``Replayer``. The logger drops records while the code re-runs
what already happened, and each record carries the run's ids in ``extra`` and in
its message.

Real server on an ephemeral port, once per store under test; uuid task queues and
ids. Steps are ordered by awaiting results and signals, never by sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta

import pytest
from helpers import eventually, log_handler

from tideflow.api.v1.history_pb2 import EventType as ET
from tideflow.worker_sdk import Client, Replayer, Worker, WorkflowHistory, activity, workflow
from tideflow.worker_sdk._workflow_instance import WorkflowInstanceImpl
from tideflow.worker_sdk.workflow import definition_of

LOGGER = "tideflow.workflow"


@activity.defn
async def echo(value: int) -> int:
    return value


@workflow.defn
class Chatty:
    """Logs around each activity (every activity result is a new workflow task, so
    without a cache every task replays the lines before it), then waits for a signal."""

    def __init__(self) -> None:
        self.released = False
        self.steps = 0

    @workflow.run
    async def run(self, rounds: int) -> int:
        for i in range(rounds):
            workflow.logger.info("step %d of %s", i, "run")
            self.steps += await workflow.execute_activity(
                echo, 1, start_to_close_timeout=timedelta(seconds=30)
            )
        workflow.logger.warning("waiting for release")
        try:
            await workflow.wait_condition(lambda: self.released)
        except asyncio.CancelledError:
            # Also runs when a worker tears its cached copy of the run down (shutdown,
            # eviction): that is not something that happened to the run.
            workflow.logger.info("cancelled while waiting")
            raise
        workflow.logger.info("released after %d steps", self.steps)
        return self.steps

    @workflow.signal
    def release(self) -> None:
        workflow.logger.info("release signal")
        self.released = True

    @workflow.query
    def progress(self) -> int:
        workflow.logger.info("progress asked")
        return self.steps


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def of(self, workflow_id: str) -> list[logging.LogRecord]:
        return [r for r in self.records if getattr(r, "workflow_id", None) == workflow_id]

    def lines(self, workflow_id: str) -> list[str]:
        """The messages as the caller wrote them (without the run tag)."""
        return [r.getMessage().rsplit(" (namespace=", 1)[0] for r in self.of(workflow_id)]


@pytest.fixture
def records() -> Iterator[_Records]:
    with log_handler(LOGGER, _Records()) as handler:
        yield handler


def _worker(client: Client, queue: str, *, cached: int) -> Worker:
    return Worker(
        client,
        task_queue=queue,
        workflows=[Chatty],
        activities=[echo],
        max_cached_workflows=cached,
    )


EXPECTED = [
    "step 0 of run",
    "step 1 of run",
    "step 2 of run",
    "waiting for release",
    "release signal",
    "released after 3 steps",
]


async def _chat(
    client: Client,
    workflow_id: str,
    *,
    cached: int,
    while_waiting: Callable[[], Awaitable[None]] | None = None,
) -> WorkflowHistory:
    """Run Chatty to the end on one worker; its final history."""
    queue = f"q-{uuid.uuid4()}"
    async with _worker(client, queue, cached=cached):
        handle = await client.start_workflow(Chatty.run, 3, id=workflow_id, task_queue=queue)
        await _until_waiting(client, workflow_id)
        if while_waiting is not None:
            await while_waiting()
        await handle.signal(Chatty.release)
        assert await handle.result() == 3
    return await handle.fetch_history()


async def test_a_worker_without_cache_logs_each_line_once(
    client: Client, records: _Records
) -> None:
    # No cache: every workflow task rebuilds the run from its full history, so the
    # code before the newest event runs again up to five times. A '%' in the id must
    # not disturb %-formatting of the message.
    wid = f"log-100%s-{uuid.uuid4()}"
    history = await _chat(client, wid, cached=0)
    assert records.lines(wid) == EXPECTED

    started = history.events[0].workflow_execution_started_event_attributes
    run_id = started.original_execution_run_id
    for record in records.of(wid):
        assert record.name == LOGGER
        assert record.__dict__["run_id"] == run_id
        assert record.__dict__["workflow_type"] == "Chatty"
        assert record.__dict__["tideflow_workflow"] == {
            "namespace": client.namespace,
            "workflow_id": wid,
            "run_id": run_id,
            "workflow_type": "Chatty",
            "task_queue": started.task_queue.name,
            "attempt": 1,
        }
        message = record.getMessage()
        assert f"workflow_id={wid}" in message and f"run_id={run_id}" in message, message
        assert "workflow_type=Chatty" in message, message
        # The record points at the workflow's line, not at the adapter.
        assert record.pathname == __file__, record.pathname

    # Replaying the closed history (as a test or a deployment check does) logs nothing.
    before = len(records.records)
    await Replayer(workflows=[Chatty]).replay(history)
    assert len(records.records) == before


async def test_a_second_worker_taking_over_does_not_repeat_the_first_ones_lines(
    client: Client, records: _Records
) -> None:
    queue, wid = f"q-{uuid.uuid4()}", f"log-{uuid.uuid4()}"
    async with _worker(client, queue, cached=10):
        handle = await client.start_workflow(Chatty.run, 3, id=wid, task_queue=queue)
        await _until_waiting(client, wid)
    # The first worker is gone (its sticky queue given back, its cached copy torn
    # down): the next task goes to a new worker, which replays the whole history.
    async with _worker(client, queue, cached=10):
        await handle.signal(Chatty.release)
        assert await handle.result() == 3
    assert records.lines(wid) == EXPECTED


async def test_queries_replay_silently_and_their_handler_logs_once_per_query(
    client: Client, records: _Records
) -> None:
    wid = f"log-{uuid.uuid4()}"

    async def ask_twice() -> None:
        # Each query replays the run into a fresh instance: its lines stay quiet, the
        # query handler's own line is new each time.
        for _ in range(2):
            assert await client.get_workflow_handle(wid).query(Chatty.progress) == 3

    await _chat(client, wid, cached=10, while_waiting=ask_twice)
    lines = records.lines(wid)
    assert lines.count("progress asked") == 2
    assert [line for line in lines if line != "progress asked"] == EXPECTED


async def test_a_query_catching_up_with_a_signal_logs_only_its_own_line(
    client: Client, records: _Records
) -> None:
    # A query that arrives while a signal's workflow task is pending is answered by
    # running that task's code ahead (its commands dropped); the task itself runs it
    # again for real. Rebuild that moment from the history of a finished run: its
    # events up to the signal, without the task that handled it.
    wid = f"log-{uuid.uuid4()}"
    events = (await _chat(client, wid, cached=10)).events
    signaled = next(
        i for i, e in enumerate(events) if e.event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    )
    before = len(records.records)
    started = events[0].workflow_execution_started_event_attributes
    instance = WorkflowInstanceImpl(  # type: ignore[abstract]
        definition_of(Chatty),
        namespace=client.namespace,
        workflow_id=wid,
        run_id=started.original_execution_run_id,
        task_queue=started.task_queue.name,
        converter=client.data_converter,
    )
    try:
        instance.process(events[: signaled + 1], replay_only=True)
        instance.catch_up_for_query()
        assert instance.query("progress", None) == 3
    finally:
        instance.dispose()
    assert [r.getMessage().split(" (")[0] for r in records.records[before:]] == ["progress asked"]


def test_outside_a_workflow_the_logger_logs_plainly(records: _Records) -> None:
    workflow.logger.info("plain %s", "line")
    [record] = records.records
    assert record.getMessage() == "plain line"
    assert not hasattr(record, "workflow_id")
    assert record.pathname == __file__


async def _until_waiting(client: Client, workflow_id: str) -> None:
    """Until the run waits for the signal: its three activities completed and the
    workflow task after them too (nothing is left for a worker to do). Polls history
    against a deadline: the condition is on the server."""
    handle = client.get_workflow_handle(workflow_id)

    async def waiting() -> bool:
        events = (await handle.fetch_history()).events
        done = [e for e in events if e.event_type == ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED]
        return len(done) == 3 and events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED

    await eventually(waiting, f"{workflow_id} to wait for the signal", timeout=60)
