"""Visibility: list / count runs with the query language, memos and search attributes.

Two layers:

- Store level, on every database under test (``store`` fixture: SQLite and
  PostgreSQL): runs are written as transitions whose events carry search attributes,
  then every operator, typed comparison, ORDER BY and keyset pagination is checked
  against the expected set of workflow ids, so the SQL is exercised on each dialect.
- End to end, on a real server (port 0) over SQLite and PostgreSQL: search
  attributes and memo at start, ``workflow.upsert_search_attributes`` (recorded in
  history, applied in the same transaction, replayable), ``client.list_workflows``
  pagination and ``client.count_workflows``, and INVALID_ARGUMENT answers that name
  the offending token and its position.

No test sleeps for synchronization: results are awaited, conditions polled with a
bounded deadline.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from helpers import eventually

from tideflow.api.v1 import common_pb2, service_pb2
from tideflow.api.v1.history_pb2 import EventType
from tideflow.history import (
    CurrentWrite,
    ExecutionSummary,
    HistoryStore,
    RunKey,
    SearchAttributeValue,
    Transition,
    encode_search_attributes,
    make_event,
    micros_of,
)
from tideflow.server._visibility import QueryError, parse_query
from tideflow.worker_sdk import (
    Client,
    Replayer,
    Worker,
    WorkflowExecutionStatus,
    workflow,
)
from tideflow.worker_sdk.client import WorkflowExecution
from tideflow.worker_sdk.exceptions import InvalidArgumentError

ET = EventType
NS = "default"
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
D1 = datetime(2024, 6, 1, tzinfo=UTC)
D2 = datetime(2024, 7, 1, 8, 30, tzinfo=UTC)


def _us(moment: datetime) -> int:
    return micros_of(moment)


# ================================================================== store level


@dataclass(frozen=True)
class _Run:
    workflow_id: str
    workflow_type: str
    task_queue: str
    status: int
    start: datetime
    close: datetime | None
    length: int
    attributes: dict[str, SearchAttributeValue] = field(default_factory=dict)


S = common_pb2.WorkflowExecutionStatus
RUNS = [
    _Run(
        "a-1",
        "Billing",
        "q1",
        S.WORKFLOW_EXECUTION_STATUS_RUNNING,
        T0,
        None,
        3,
        {
            "Customer": "acme",
            "Amount": 10,
            "Region": "eu",
            "Vip": True,
            "Due": D1,
            "Score": 1.5,
            "Tags": ["red", "blue"],
        },
    ),
    _Run(
        "a-2",
        "Billing",
        "q1",
        S.WORKFLOW_EXECUTION_STATUS_COMPLETED,
        T0 + timedelta(seconds=1),
        T0 + timedelta(seconds=5),
        7,
        {"Customer": "acme", "Amount": 25, "Score": 2.5},
    ),
    _Run(
        "b-1",
        "Shipping",
        "q2",
        S.WORKFLOW_EXECUTION_STATUS_FAILED,
        T0 + timedelta(seconds=2),
        T0 + timedelta(seconds=3),
        5,
        {"Customer": "globex", "Amount": 5, "Region": "us", "Vip": False, "Tags": ["blue"]},
    ),
    _Run(
        "b-2",
        "Shipping",
        "q2",
        S.WORKFLOW_EXECUTION_STATUS_TERMINATED,
        T0 + timedelta(seconds=3),
        T0 + timedelta(seconds=4),
        2,
    ),
    _Run(
        "c-1",
        "Billing",
        "q2",
        S.WORKFLOW_EXECUTION_STATUS_TIMED_OUT,
        T0 + timedelta(seconds=4),
        T0 + timedelta(seconds=10),
        9,
        {"Customer": "it's", "Amount": -3, "Due": D2, "Score": -0.5, "Tags": ['"x",', "y]"]},
    ),
    _Run(
        "c-2",
        "Report",
        "q1",
        S.WORKFLOW_EXECUTION_STATUS_CONTINUED_AS_NEW,
        T0 + timedelta(seconds=5),
        T0 + timedelta(seconds=6),
        4,
        {"Customer": "acme-eu", "Score": 7.0},
    ),
]


def _summary(run: _Run, status: int | None = None) -> ExecutionSummary:
    return ExecutionSummary(
        workflow_type=run.workflow_type,
        task_queue=run.task_queue,
        status=run.status if status is None else status,
        start_time=_us(run.start),
        close_time=None if run.close is None else _us(run.close),
        history_length=run.length,
    )


def _start_transition(run: _Run) -> Transition:
    key = RunKey(namespace=NS, workflow_id=run.workflow_id, run_id=str(uuid.uuid4()))
    started = make_event(
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED,
        _us(run.start),
        workflow_type=common_pb2.WorkflowType(name=run.workflow_type),
        search_attributes=encode_search_attributes(run.attributes) if run.attributes else None,
        memo=common_pb2.Memo(fields={"owner": common_pb2.Payload(data=b'"' + b"x" * 3 + b'"')}),
    )
    started.event_id = 1
    return Transition(
        key=key,
        expected_version=0,
        new_version=1,
        state=b"state",
        summary=_summary(run),
        events=(started,),
        current=CurrentWrite.INSERT,
        start_request_id=f"req-{run.workflow_id}",
    )


async def _seed(store: HistoryStore) -> dict[str, RunKey]:
    keys = {}
    for run in RUNS:
        transition = _start_transition(run)
        await store.apply(transition)
        keys[run.workflow_id] = transition.key
    return keys


async def _ids(store: HistoryStore, query: str, page_size: int = 100) -> list[str]:
    parsed = parse_query(query)
    ids: list[str] = []
    cursor = None
    while True:
        records, cursor = await store.list_executions(
            NS, parsed, page_size=page_size, cursor=cursor
        )
        ids.extend(r.key.workflow_id for r in records)
        if cursor is None:
            return ids


FILTERS: list[tuple[str, set[str]]] = [
    ("", {"a-1", "a-2", "b-1", "b-2", "c-1", "c-2"}),
    # built-in fields
    ("WorkflowId = 'a-1'", {"a-1"}),
    ("WorkflowId != 'a-1'", {"a-2", "b-1", "b-2", "c-1", "c-2"}),
    ("WorkflowId > 'b-1'", {"b-2", "c-1", "c-2"}),
    ("WorkflowId >= 'b-1'", {"b-1", "b-2", "c-1", "c-2"}),
    ("WorkflowId < 'b-1'", {"a-1", "a-2"}),
    ("WorkflowId <= 'b-1'", {"a-1", "a-2", "b-1"}),
    ("WorkflowId IN ('a-2', 'c-2', 'zzz')", {"a-2", "c-2"}),
    ("WorkflowId NOT IN ('a-2', 'c-2')", {"a-1", "b-1", "b-2", "c-1"}),
    ("WorkflowId STARTS_WITH 'b-'", {"b-1", "b-2"}),
    ("workflowtype = 'Billing'", {"a-1", "a-2", "c-1"}),
    ("TaskQueue = 'q1' AND WorkflowType != 'Billing'", {"c-2"}),
    ("ExecutionStatus = 'Running'", {"a-1"}),
    ("ExecutionStatus != 'Running'", {"a-2", "b-1", "b-2", "c-1", "c-2"}),
    ("ExecutionStatus IN ('Failed', 'timed_out', 'TERMINATED')", {"b-1", "b-2", "c-1"}),
    ("ExecutionStatus = 'ContinuedAsNew' OR ExecutionStatus = 'Completed'", {"a-2", "c-2"}),
    ("StartTime >= '2024-05-01T12:00:03Z'", {"b-2", "c-1", "c-2"}),
    ("StartTime < '2024-05-01T14:00:01+02:00'", {"a-1"}),
    (
        "StartTime > '2024-05-01T12:00:01Z' AND StartTime <= '2024-05-01T12:00:04Z'",
        {"b-1", "b-2", "c-1"},
    ),
    ("CloseTime > '2024-05-01T12:00:04.5Z'", {"a-2", "c-1", "c-2"}),
    ("CloseTime < '2030-01-01T00:00:00Z'", {"a-2", "b-1", "b-2", "c-1", "c-2"}),
    ("HistoryLength > 4", {"a-2", "b-1", "c-1"}),
    ("HistoryLength <= 4.5", {"a-1", "b-2", "c-2"}),
    ("HistoryLength = 4.5", set()),
    # custom attributes: keyword
    ("Customer = 'acme'", {"a-1", "a-2"}),
    ("Customer = 'it''s'", {"c-1"}),
    ('Customer = "it\'s"', {"c-1"}),
    ("Customer != 'acme'", {"b-1", "c-1", "c-2"}),
    ("Customer STARTS_WITH 'acme'", {"a-1", "a-2", "c-2"}),
    ("Customer STARTS_WITH 'ACME'", set()),
    ("Customer IN ('globex', 'acme-eu')", {"b-1", "c-2"}),
    ("Customer NOT IN ('acme')", {"b-1", "c-1", "c-2"}),
    ("Customer > 'b'", {"b-1", "c-1"}),
    ("Region != 'eu'", {"b-1"}),
    # int and double attributes compare with numbers of either kind
    ("Amount = 10", {"a-1"}),
    ("Amount > 5", {"a-1", "a-2"}),
    ("Amount >= 5", {"a-1", "a-2", "b-1"}),
    ("Amount < 0", {"c-1"}),
    ("Amount <= 9.5", {"b-1", "c-1"}),
    ("Amount > 9.5", {"a-1", "a-2"}),
    ("Amount = 10.0", {"a-1"}),
    ("Amount != 25", {"a-1", "b-1", "c-1"}),
    ("Amount IN (5, 25, 100)", {"a-2", "b-1"}),
    ("Score > 1", {"a-1", "a-2", "c-2"}),
    ("Score <= -0.5", {"c-1"}),
    ("Score = 7", {"c-2"}),
    ("Score >= 2.5 AND Score < 7", {"a-2"}),
    # bool and datetime attributes
    ("Vip = true", {"a-1"}),
    ("Vip = FALSE", {"b-1"}),
    ("Vip != true", {"b-1"}),
    ("Due < '2024-06-15T00:00:00Z'", {"a-1"}),
    ("Due >= '2024-06-01T00:00:00Z'", {"a-1", "c-1"}),
    ("Due = '2024-07-01T08:30:00Z'", {"c-1"}),
    # keyword lists (Temporal's KeywordList): = and IN test for an item, != for its absence
    ("Tags = 'blue'", {"a-1", "b-1"}),
    ("Tags = 'red'", {"a-1"}),
    ("Tags = 'Red'", set()),
    ("Tags = 'x'", set()),
    ("Tags = 'y'", set()),
    ("Tags = 'y]'", {"c-1"}),
    ("Tags != 'red'", {"b-1", "c-1"}),
    ("Tags IN ('red', 'y]')", {"a-1", "c-1"}),
    ("Tags NOT IN ('blue')", {"c-1"}),
    # combinations
    ("Customer = 'acme' AND (Amount > 20 OR Region = 'eu')", {"a-1", "a-2"}),
    ("(Customer = 'acme' AND Amount > 20) OR Region = 'us'", {"a-2", "b-1"}),
    ("Customer = 'acme' AND Amount > 20 OR Region = 'us'", {"a-2", "b-1"}),
    ("Customer = 'acme' AND (Amount > 20 OR Region = 'us')", {"a-2"}),
    ("NoSuchAttribute = 'x' OR WorkflowId = 'b-2'", {"b-2"}),
    ("((WorkflowType = 'Billing')) AND NOT_SET != 1", set()),
]


async def test_filters_match_expected_runs(store: HistoryStore) -> None:
    await _seed(store)
    mismatches = []
    for query, expected in FILTERS:
        got = await _ids(store, query)
        count = await store.count_executions(NS, parse_query(query))
        if set(got) != expected or len(got) != len(expected) or count != len(expected):
            mismatches.append((query, sorted(got), count, sorted(expected)))
    assert not mismatches, "\n".join(map(str, mismatches))


async def test_order_by_and_keyset_pagination(store: HistoryStore) -> None:
    await _seed(store)
    by_id = {r.workflow_id: r for r in RUNS}
    open_close = datetime(9999, 1, 1, tzinfo=UTC)  # open runs sort as if closing last
    keys: dict[str, Callable[[_Run], Any]] = {
        "WorkflowId": lambda r: r.workflow_id,
        "WorkflowType": lambda r: r.workflow_type,
        "TaskQueue": lambda r: r.task_queue,
        "ExecutionStatus": lambda r: r.status,
        "StartTime": lambda r: r.start,
        "CloseTime": lambda r: r.close or open_close,
        "HistoryLength": lambda r: r.length,
    }
    for field_name, key in keys.items():
        for descending in (False, True):
            query = f"ORDER BY {field_name} {'DESC' if descending else 'ASC'}"
            # Ties broken by workflow id (ascending); run ids differ per workflow id here.
            ranked = sorted(RUNS, key=lambda r: r.workflow_id)
            ranked.sort(key=key, reverse=descending)
            expected = [r.workflow_id for r in ranked]
            for page_size in (1, 2, 4, 100):
                got = await _ids(store, query, page_size)
                assert got == expected, (query, page_size, got, expected)
    # Default order: newest start first; a filter combines with ORDER BY.
    assert await _ids(store, "", 2) == [r.workflow_id for r in reversed(RUNS)]
    got = await _ids(
        store, "Customer STARTS_WITH 'acme' ORDER BY WorkflowType DESC, HistoryLength", 1
    )
    assert got == ["c-2", "a-1", "a-2"]
    assert {by_id[w].workflow_type for w in got} == {"Report", "Billing"}


async def test_search_attributes_and_memo_are_listed_and_upserted(store: HistoryStore) -> None:
    keys = await _seed(store)
    records, _ = await store.list_executions(NS, parse_query("WorkflowId = 'a-1'"), page_size=10)
    (record,) = records
    assert record.search_attributes == RUNS[0].attributes
    assert record.memo is not None and set(record.memo.fields) == {"owner"}
    assert record.summary.close_time is None
    # An upsert (a later transition of the run) replaces, adds and removes values in
    # the same transaction as its event.
    upsert = make_event(
        ET.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES,
        _us(T0),
        search_attributes=encode_search_attributes(
            {"Amount": 99, "Region": None, "Stage": "shipped", "Score": 3}
        ),
    )
    upsert.event_id = 2
    a1 = RUNS[0]
    await store.apply(
        Transition(
            key=keys["a-1"],
            expected_version=1,
            new_version=2,
            state=b"state",
            summary=_summary(a1),
            events=(upsert,),
        )
    )
    attributes = await store.search_attributes_of(keys["a-1"])
    assert attributes == {
        "Customer": "acme",
        "Amount": 99,
        "Vip": True,
        "Due": D1,
        "Score": 3,
        "Stage": "shipped",
        "Tags": ["red", "blue"],
    }
    assert isinstance(attributes["Score"], int)  # upserted as an Int this time
    assert await _ids(store, "Region = 'eu'") == []
    assert await _ids(store, "Amount = 99 AND Stage = 'shipped'") == ["a-1"]


def test_parser_builds_the_expected_tree() -> None:
    q = parse_query(
        "WorkflowType = 'A' and (ExecutionStatus = 'Running' OR StartTime > '2024-05-01') "
        "ORDER BY StartTime DESC, WorkflowId"
    )
    assert q.where is not None and q.order_by[0].descending and not q.order_by[1].descending
    assert repr(parse_query("`odd name` >= -1.5e3").where) == (
        "Compare(field='odd name', op='>=', values=(-1500.0,))"
    )
    assert parse_query("X <> 1").where == parse_query("X != 1").where


INVALID: list[tuple[str, str, int]] = [
    # (query, the token the message must name, its 1-based position)
    ("WorkflowId = 5", "'5'", 14),
    ("WorkflowType == 'x'", "'='", 15),
    ("Amount >> 2", "'>'", 9),
    ("ExecutionStatus = 'Runing'", "'Runing'", 19),
    ("ExecutionStatus < 'Running'", "'<'", 17),
    ("StartTime > 'yesterday'", "'yesterday'", 13),
    ("A = 1 B = 2", "'B'", 7),
    ("A = 1 AND", "end of query", 10),
    ("(A = 1", "end of query", 7),
    ("A IN 1", "'1'", 6),
    ("A IN (1 2)", "'2'", 9),
    ("A NOT = 1", "'='", 7),
    ("ORDER BY Amount", "'Amount'", 10),
    ("ORDER StartTime", "'StartTime'", 7),
    ("ORDER BY StartTime DESC WorkflowId", "'WorkflowId'", 25),
    ("HistoryLength = 'long'", "'long'", 17),
    ("Flag = yes", "'yes'", 8),
    ("WorkflowId STARTS_WITH 5", "'5'", 24),
    ("StartTime STARTS_WITH '2024'", "'STARTS_WITH'", 11),
    ("AND = 1", "'AND'", 1),
]


@pytest.mark.parametrize(("query", "token", "position"), INVALID)
def test_parser_errors_name_token_and_position(query: str, token: str, position: int) -> None:
    with pytest.raises(QueryError) as info:
        parse_query(query)
    message = str(info.value)
    assert token in message and f"position {position}" in message, message


def test_lexical_errors() -> None:
    for query, text in (
        ("Customer = 'open", "unterminated string starting at position 12"),
        ("Customer = 1 # 2", "unexpected character '#' at position 14"),
        ("`odd = 1", "unterminated `name` starting at position 1"),
        ("X = 9223372036854775808", "out of the 64-bit range"),
    ):
        with pytest.raises(QueryError, match=text):
            parse_query(query)


# =================================================================== end to end


@workflow.defn
class Tagged:
    """Upserts search attributes across two workflow tasks (a timer between)."""

    @workflow.run
    async def run(self, order: str) -> str:
        workflow.upsert_search_attributes({"Stage": "started", "Temp": 1, "Order": order})
        await workflow.sleep(timedelta(milliseconds=10))
        workflow.upsert_search_attributes(
            {"Stage": "done", "Temp": None, "DoneAt": workflow.now(), "Ok": True}
        )
        return order


@workflow.defn
class Idle:
    @workflow.run
    async def run(self) -> None:
        await workflow.sleep(timedelta(hours=1))


@workflow.defn
class BadUpsert:
    @workflow.run
    async def run(self) -> None:
        workflow.upsert_search_attributes({"WorkflowId": "mine"})


async def _list(client: Client, query: str = "", page_size: int = 1000) -> list[WorkflowExecution]:
    return [wf async for wf in client.list_workflows(query, page_size=page_size)]


async def test_search_attributes_at_start_and_upserted_from_workflow(client: Client) -> None:
    queue = f"vis-{uuid.uuid4()}"
    prefix = f"tagged-{uuid.uuid4()}"
    started_at = datetime.now(UTC).replace(microsecond=0)
    async with Worker(client, task_queue=queue, workflows=[Tagged]):
        handles = []
        for i in range(3):
            handles.append(
                await client.start_workflow(
                    Tagged.run,
                    f"o-{i}",
                    id=f"{prefix}-{i}",
                    task_queue=queue,
                    memo={"owner": {"team": "billing", "n": i}},
                    search_attributes={
                        "Customer": f"cust-{i % 2}",
                        "Amount": 10 * i,
                        "Weight": 0.5 + i,
                        "Due": started_at + timedelta(days=i),
                        "Urgent": i == 2,
                    },
                )
            )
        assert [await h.result() for h in handles] == ["o-0", "o-1", "o-2"]

    listed = await _list(client, f"WorkflowId STARTS_WITH '{prefix}' ORDER BY WorkflowId")
    assert [wf.id for wf in listed] == [f"{prefix}-{i}" for i in range(3)]
    first = listed[0]
    assert first.run_id == handles[0].run_id
    assert first.workflow_type == "Tagged" and first.task_queue == queue
    assert first.status == WorkflowExecutionStatus.COMPLETED
    assert first.close_time is not None and first.close_time >= first.start_time
    assert first.memo == {"owner": {"team": "billing", "n": 0}}
    history = await handles[0].fetch_history()
    assert first.history_length == len(history.events)
    attributes = dict(first.search_attributes)
    done_at = attributes.pop("DoneAt")
    assert isinstance(done_at, datetime) and done_at >= first.start_time
    assert attributes == {
        "Customer": "cust-0",
        "Amount": 0,
        "Weight": 0.5,
        "Due": started_at,
        "Urgent": False,
        "Stage": "done",
        "Order": "o-0",
        "Ok": True,
    }
    # Both upserts are history events, and the history replays deterministically.
    upserts = [
        e.upsert_workflow_search_attributes_event_attributes
        for e in history.events
        if e.event_type == ET.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES
    ]
    assert [sorted(u.search_attributes.indexed_fields) for u in upserts] == [
        ["Order", "Stage", "Temp"],
        ["DoneAt", "Ok", "Stage", "Temp"],
    ]
    assert all(u.workflow_task_completed_event_id > 0 for u in upserts)
    Replayer(workflows=[Tagged]).replay(history)

    mine = f"WorkflowId STARTS_WITH '{prefix}'"
    assert await client.count_workflows(mine) == 3
    assert await client.count_workflows(f"{mine} AND Customer = 'cust-1'") == 1
    assert await client.count_workflows(f"{mine} AND Amount >= 10 AND Weight < 2") == 1
    assert await client.count_workflows(f"{mine} AND Urgent = true") == 1
    assert await client.count_workflows(f"{mine} AND Stage = 'done' AND Temp = 1") == 0
    after = (started_at + timedelta(hours=12)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert await client.count_workflows(f"{mine} AND Due > '{after}'") == 2
    assert await client.count_workflows(f"{mine} AND `Order` IN ('o-0', 'o-2')") == 2
    assert await client.count_workflows(f"{mine} AND ExecutionStatus = 'Completed'") == 3


async def test_list_pagination_ordering_and_status_filters(client: Client) -> None:
    """The client pages through the server's list."""
    queue = f"idle-{uuid.uuid4()}"  # no worker: the runs stay open
    prefix = f"page-{uuid.uuid4()}"
    ids = [f"{prefix}-{i:02d}" for i in range(7)]
    handles = {}
    for i, wid in enumerate(ids):
        handles[wid] = await client.start_workflow(
            Idle.run, id=wid, task_queue=queue, search_attributes={"Rank": i % 3}
        )
    for wid in ids[:2]:
        await handles[wid].terminate("done with it")
    mine = f"WorkflowId STARTS_WITH '{prefix}'"

    for page_size in (1, 2, 3, 7, 50):
        got = await _list(client, f"{mine} ORDER BY WorkflowId", page_size)
        assert [wf.id for wf in got] == ids, page_size
    got = await _list(client, f"{mine} ORDER BY WorkflowId DESC", 3)
    assert [wf.id for wf in got] == list(reversed(ids))
    # The default order is newest start first.
    newest_first = await _list(client, mine, 2)
    assert [wf.id for wf in newest_first] == list(reversed(ids))
    assert [wf.start_time for wf in newest_first] == sorted(
        (wf.start_time for wf in newest_first), reverse=True
    )

    running = await _list(client, f"{mine} AND ExecutionStatus = 'Running'", 2)
    assert sorted(wf.id for wf in running) == ids[2:]
    terminated = await _list(client, f"{mine} AND ExecutionStatus = 'Terminated'")
    assert sorted(wf.id for wf in terminated) == ids[:2]
    assert all(wf.close_time is not None for wf in terminated)
    assert await client.count_workflows(f"{mine} AND CloseTime > '2000-01-01T00:00:00Z'") == 2
    assert await client.count_workflows(f"{mine} AND Rank IN (0, 2)") == 5
    assert (
        await client.count_workflows(f"{mine} AND Rank != 1 AND ExecutionStatus != 'Running'") == 1
    )
    by_rank = await _list(client, f"{mine} AND Rank = 1 ORDER BY StartTime ASC", 1)
    assert [wf.id for wf in by_rank] == [ids[1], ids[4]]
    assert await client.count_workflows() >= 7


async def test_invalid_queries_are_invalid_argument_naming_the_token(client: Client) -> None:
    for query, token, position in INVALID:
        with pytest.raises(InvalidArgumentError) as info:
            await _list(client, query)
        assert info.value.status == "INVALID_ARGUMENT"
        assert token in info.value.message and f"position {position}" in info.value.message
        with pytest.raises(InvalidArgumentError):
            await client.count_workflows(query)
    with pytest.raises(InvalidArgumentError, match="a count takes no ORDER BY"):
        await client.count_workflows("ORDER BY StartTime")
    # A page token only works with the query that produced it.
    request = service_pb2.ListWorkflowExecutionsRequest(
        namespace=client.namespace, query="", page_size=1, next_page_token=b"garbage"
    )
    with pytest.raises(InvalidArgumentError, match="next_page_token is malformed"):
        await client.call(client.service.ListWorkflowExecutions, request)


async def test_page_token_is_bound_to_its_query(client: Client) -> None:
    queue = f"idle-{uuid.uuid4()}"
    for i in range(3):
        await client.start_workflow(Idle.run, id=f"tok-{uuid.uuid4()}-{i}", task_queue=queue)
    first = await client.call(
        client.service.ListWorkflowExecutions,
        service_pb2.ListWorkflowExecutionsRequest(
            namespace=client.namespace, query="ORDER BY WorkflowId", page_size=1
        ),
    )
    assert first.next_page_token
    with pytest.raises(InvalidArgumentError, match="different query"):
        await client.call(
            client.service.ListWorkflowExecutions,
            service_pb2.ListWorkflowExecutionsRequest(
                namespace=client.namespace,
                query="ORDER BY RunId",
                page_size=1,
                next_page_token=first.next_page_token,
            ),
        )


async def test_invalid_search_attributes_are_refused(client: Client) -> None:
    queue = f"idle-{uuid.uuid4()}"
    with pytest.raises(InvalidArgumentError, match="reserved for a built-in field"):
        await client.start_workflow(
            Idle.run,
            id=f"bad-{uuid.uuid4()}",
            task_queue=queue,
            search_attributes={"WorkflowId": "x"},
        )
    with pytest.raises(InvalidArgumentError, match="name 'has space' is invalid"):
        await client.start_workflow(
            Idle.run,
            id=f"bad-{uuid.uuid4()}",
            task_queue=queue,
            search_attributes={"has space": "x"},
        )
    # A payload that is not a typed search attribute (sent raw, bypassing the SDK).
    request = service_pb2.StartWorkflowRequest(
        namespace=client.namespace, workflow_id=f"bad-{uuid.uuid4()}", request_id="r1"
    )
    request.workflow_type.name = "Idle"
    request.task_queue.name = queue
    request.search_attributes.indexed_fields["Color"].CopyFrom(
        common_pb2.Payload(metadata={"encoding": b"json/plain", "type": b"Color"}, data=b'"red"')
    )
    with pytest.raises(InvalidArgumentError, match="search attribute 'Color': type must be"):
        await client.call(client.service.StartWorkflow, request)
    # Values the SDK cannot encode fail before anything is sent.
    with pytest.raises(TypeError, match="not list"):
        await client.start_workflow(
            Idle.run,
            id=f"bad-{uuid.uuid4()}",
            task_queue=queue,
            search_attributes={"Tags": [1]},  # type: ignore[list-item]
        )
    assert await client.count_workflows("WorkflowId STARTS_WITH 'bad-'") == 0


async def test_invalid_upsert_fails_the_workflow_task(client: Client) -> None:
    """The server refuses an upsert it cannot index: the workflow task fails with
    BAD_COMMAND_ATTRIBUTES (and is retried); the run stays open, nothing is indexed."""
    queue = f"bad-upsert-{uuid.uuid4()}"
    async with Worker(client, task_queue=queue, workflows=[BadUpsert]):
        handle = await client.start_workflow(
            BadUpsert.run, id=f"bad-upsert-{uuid.uuid4()}", task_queue=queue
        )

        async def failed_task() -> Any:
            history = await handle.fetch_history()
            return [
                e.workflow_task_failed_event_attributes
                for e in history.events
                if e.event_type == ET.EVENT_TYPE_WORKFLOW_TASK_FAILED
            ]

        (failed, *_) = await eventually(failed_task, what="a failed workflow task")
        assert "reserved for a built-in field" in failed.failure.message
        history = await handle.fetch_history()
        assert not [
            e
            for e in history.events
            if e.event_type == ET.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES
        ]
        (listed,) = await _list(client, f"WorkflowId = '{handle.id}'")
        assert listed.status == WorkflowExecutionStatus.RUNNING and listed.search_attributes == {}
        await handle.terminate("test over")
