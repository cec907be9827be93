"""A task of a long history reads one page from the store, not the whole history
(issue 10 follow-up).

The engine read a run's entire history for every workflow and query task (once it was
too long to keep in memory), and the frontend then cut the first page that fits a
message. Now the engine reads only what that page needs; the worker fetches the rest
with the page token, as before. What the worker ends up with is unchanged: the same
events in the same order, a transient attempt's unstored events and a query's buffered
events included.
"""

from __future__ import annotations

import uuid

from raw_workflow import start_request

from tideflow.api.v1 import command_pb2, common_pb2, service_pb2
from tideflow.api.v1.common_pb2 import Failure
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent, WorkflowTaskFailedCause
from tideflow.history import HistoryStore, RunKey, TaskKind, TaskRow, TimerRow
from tideflow.history._dialects import open_runner
from tideflow.server import ServerConfig, SystemClock
from tideflow.server._engine import Dispatcher, HistoryEngine, decode_token
from tideflow.server._history_pages import HistoryPager

# Small pages, so that a history of a few thousand small events spans many of them.
_PAGE_BYTES = 16 * 1024
_MARKERS = 2_500  # past the engine's in-memory history limit (2,000 events)


class _CountingStore(HistoryStore):
    """Counts the history rows each read returns."""

    rows_read = 0

    async def read_events(
        self, key: RunKey, *, first_event_id: int = 1, max_events: int | None = None
    ) -> list[HistoryEvent]:
        events = await super().read_events(
            key, first_event_id=first_event_id, max_events=max_events
        )
        self.rows_read += len(events)
        return events


class _Tasks(Dispatcher):
    def __init__(self) -> None:
        self.workflow_tasks: list[TaskRow] = []

    def add_tasks(self, tasks: list[TaskRow]) -> None:
        self.workflow_tasks.extend(t for t in tasks if t.kind == TaskKind.WORKFLOW)

    def add_timers(self, timers: list[TimerRow]) -> None:
        pass  # workflow task timeouts: the test completes or fails each task itself


def _marker(index: int) -> command_pb2.Command:
    details = common_pb2.Payloads(payloads=[common_pb2.Payload(data=b"%06d" % index * 10)])
    return command_pb2.Command(
        command_type=command_pb2.COMMAND_TYPE_RECORD_MARKER,
        record_marker_command_attributes=command_pb2.RecordMarkerCommandAttributes(
            marker_name="m", details={"d": details}
        ),
    )


async def _rest(
    pager: HistoryPager, key: RunKey, response: service_pb2.PollWorkflowTaskResponse
) -> list[HistoryEvent]:
    """The task's whole history: its first page, then every page of its token."""
    events = list(response.history.events)
    token = response.next_page_token
    while token:
        page, token = await pager.continue_task(key, token, 1000)
        events.extend(page)
    return events


async def test_a_task_of_a_long_history_reads_one_page(store_url: str) -> None:
    store = await _CountingStore.open_on(open_runner(store_url))
    assert isinstance(store, _CountingStore)
    try:
        tasks = _Tasks()
        config = ServerConfig(history_page_bytes=_PAGE_BYTES)
        engine = HistoryEngine(store, tasks, SystemClock(), config)
        pager = engine.pager  # seals and opens the tokens the engine's tasks carry
        request = start_request()
        run_id, _ = await engine.start_workflow(request)
        key = RunKey(namespace="default", workflow_id=request.workflow_id, run_id=run_id)

        async def started() -> service_pb2.PollWorkflowTaskResponse:
            response = await engine.record_workflow_task_started(tasks.workflow_tasks.pop(), "w")
            assert response is not None
            return response

        first = await started()
        await engine.complete_workflow_task(
            decode_token(first.task_token, activity=False),
            [_marker(i) for i in range(_MARKERS)],
            "w",
        )
        await engine.signal(key, "go", None, "test", str(uuid.uuid4()), None)
        stored = await store.read_events(key)
        assert len(stored) > _MARKERS

        # A full workflow task: one page read (a batch of slack), the rest by token.
        store.rows_read = 0
        task = await started()
        page = len(task.history.events)
        assert task.next_page_token and page < len(stored) // 10
        assert store.rows_read <= 2 * page + 64, (store.rows_read, page, len(stored))
        whole = await _rest(pager, key, task)
        assert whole == await store.read_events(key)  # up to its started event, all stored

        # A query while that task runs sees a signal buffered meanwhile, at the end.
        await engine.signal(key, "late", None, "test", str(uuid.uuid4()), None)
        ms = await engine.state_of(key)
        store.rows_read = 0
        query = await engine.query_task(key, "q1", service_pb2.WorkflowQuery(query_type="x"))
        assert query.next_page_token
        assert store.rows_read <= 2 * len(query.history.events) + 64
        seen = await _rest(pager, key, query)
        assert seen[:-1] == await store.read_events(key)
        assert seen[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
        assert seen[-1].event_id == ms.next_event_id

        # A failed task: its retry is transient, its last two events not stored. The
        # buffered signal makes the next attempt a fresh one, so fail that one too.
        token = decode_token(task.task_token, activity=False)
        cause = WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_WORKFLOW_WORKER_UNHANDLED_FAILURE
        await engine.fail_workflow_task(token, cause, Failure(message="boom"), "w")
        fresh = await started()
        await engine.fail_workflow_task(
            decode_token(fresh.task_token, activity=False), cause, Failure(message="boom"), "w"
        )
        store.rows_read = 0
        retry = await started()
        assert retry.attempt == 2 and retry.next_page_token
        assert store.rows_read <= 2 * len(retry.history.events) + 64
        whole = await _rest(pager, key, retry)
        assert whole[:-2] == await store.read_events(key)
        scheduled, started_event = whole[-2:]
        assert scheduled.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED
        assert scheduled.workflow_task_scheduled_event_attributes.attempt == 2
        assert started_event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED
        assert [e.event_id for e in whole] == list(range(1, len(whole) + 1))
    finally:
        await store.close()
