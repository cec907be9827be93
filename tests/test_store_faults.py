"""Faults of one request or of the database itself, on every store (issue 10's probe).

- A transition whose values the database refuses fails alone, with a clear
  INVALID_ARGUMENT, and never the other requests that shared its group-commit batch.
- Errors of the database layer never escape the store raw: they are classified
  (``history._dialects``) into the store's errors, which the frontend maps to statuses.

- The SDK retries UNAVAILABLE with the same request id, so the server de-duplicates a
  start or signal whose first attempt did commit.
- A commit whose answer was lost (the connection broke after the database committed)
  marks the store's writes in doubt, and the server then re-reads the backlog, so the
  task rows of that commit are dispatched although its caller saw an error.

The outage tests (the database going away under load) are in ``test_store_outage.py``.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest
from helpers_store import T0, RunnerWrapper, create, run_key, task, timer
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError

from tideflow.api.v1 import service_pb2, service_pb2_grpc
from tideflow.history import (
    ConditionFailedError,
    CurrentExecutionConflictError,
    HistoryStore,
    InvalidValueError,
    RetryableStoreError,
    StoreUnavailableError,
    TaskKind,
    TaskRow,
    TransactionConflictError,
    Transition,
)
from tideflow.history._dialects import Runner, is_retryable, open_runner, store_error_of
from tideflow.server import TideflowServer
from tideflow.server._config import SystemClock
from tideflow.server._matching import Matching
from tideflow.server._resync import resync_after_outages
from tideflow.server._timers import TimerQueue
from tideflow.server._transfer import TransferProcessor
from tideflow.worker_sdk import Client

T = TypeVar("T")

_GOOD, _BAD = 120, 12


def _create(
    workflow_id: str,
    *,
    fire_at: int = T0,
    workflow_type: str = "Wf",
    task_kinds: tuple[TaskKind, ...] = (),
) -> Transition:
    """A new run with one event and one timer (the timer's time is the value a test
    can push out of the database's integer range)."""
    key = run_key(workflow_id, str(uuid.uuid4()))
    return create(
        key,
        workflow_type=workflow_type,
        new_timers=[timer(key, 1, fire_at)],
        new_tasks=[task(key, 2, kind) for kind in task_kinds],
        start_request_id=f"req-{workflow_id}",
    )


async def test_refused_values_fail_only_their_own_transitions(store: HistoryStore) -> None:
    """Good and bad transitions submitted together (``gather`` enqueues all of them
    before the writer runs, so they share batches): every good one commits, each bad
    one fails alone with InvalidValueError naming its workflow and writes nothing.
    The bad value is one neither database can store (an integer beyond 64 bits), put
    straight into the transition, so no request validation stands in front of it."""
    good = [_create(f"good-{i}") for i in range(_GOOD)]
    bad = [_create(f"bad-{i}", fire_at=2**70) for i in range(_BAD)]
    if store.dialect.name == "postgresql":
        bad += [_create(f"bad-nul-{i}", workflow_type="W\x00") for i in range(_BAD)]
    mixed = good + bad
    random.Random(7).shuffle(mixed)
    results = await asyncio.gather(*(store.apply(t) for t in mixed), return_exceptions=True)
    outcome = dict(zip((t.key.workflow_id for t in mixed), results, strict=True))
    assert [outcome[t.key.workflow_id] for t in good] == [None] * len(good)
    for t in bad:
        error = outcome[t.key.workflow_id]
        assert isinstance(error, InvalidValueError), repr(error)
        assert repr(t.key.workflow_id) in str(error)
        assert "refused a value" in str(error)
    for t in good:
        assert await store.get_execution(t.key) is not None
        assert [e.event_id for e in await store.read_events(t.key)] == [1]
    for t in bad:
        assert await store.get_execution(t.key) is None
        assert await store.get_current("default", t.key.workflow_id) is None
    assert await store.count_rows("timers") == len(good)


async def test_failure_of_a_lone_transition_keeps_the_lane_working(store: HistoryStore) -> None:
    bad = _create("alone", fire_at=2**70)
    with pytest.raises(InvalidValueError, match="'alone'"):
        await store.apply(bad)
    after = _create("after")
    await store.apply(after)
    assert await store.get_execution(after.key) is not None


async def test_refused_value_in_a_read_is_invalid_value(store: HistoryStore) -> None:
    """A key the database cannot even compare (NUL on PostgreSQL) is the caller's
    fault; SQLite stores NUL, so there the run is simply not found."""
    if store.dialect.name == "postgresql":
        with pytest.raises(InvalidValueError):
            await store.get_current("default", "nul\x00id")
    else:
        assert await store.get_current("default", "nul\x00id") is None


def test_database_errors_are_classified() -> None:
    """How driver errors map to store errors (the real ones are provoked in the
    end-to-end tests here and in test_store_outage.py; these pin the edges)."""
    refused = ConnectionRefusedError(111, "Connect call failed")
    assert isinstance(store_error_of(refused), StoreUnavailableError)
    assert is_retryable(refused)

    class _PgError(Exception):
        def __init__(self, message: str, sqlstate: str) -> None:
            super().__init__(message)
            self.sqlstate = sqlstate

    def wrapped(message: str, sqlstate: str) -> DBAPIError:
        return DBAPIError("SELECT 1", {}, _PgError(message, sqlstate))

    # 40003: CockroachDB's ambiguous commit, in doubt like a connection lost at commit.
    for code in ("57P01", "57P02", "57P03", "08006", "53300", "40003"):
        error = store_error_of(wrapped("the database system is shutting down", code))
        assert isinstance(error, StoreUnavailableError), code
        assert "SELECT" not in str(error)  # the statement is not part of the message
    for code in ("22003", "22021", "22001", "54000"):
        assert isinstance(store_error_of(wrapped("out of range", code)), InvalidValueError)
    for code in ("40001", "40P01"):  # serialization failure, deadlock: nothing committed
        conflict = store_error_of(wrapped("could not serialize access", code))
        assert type(conflict) is TransactionConflictError
        assert isinstance(conflict, RetryableStoreError)
    assert isinstance(store_error_of(OverflowError("int too big")), InvalidValueError)
    # asyncpg still taking in a terminated connection's goodbye when the COMMIT came:
    # nothing was sent, the connection is lost (a write's outcome in doubt).
    busy = asyncpg.InternalClientError(
        "cannot switch to state 15; another operation (2) is in progress"
    )
    assert isinstance(store_error_of(busy), StoreUnavailableError)
    # A unique violation is the caller's to interpret; unknown failures stay as they are.
    assert store_error_of(IntegrityError("INSERT", {}, _PgError("dup", "23505"))) is None
    assert store_error_of(wrapped("syntax error", "42601")) is None
    assert store_error_of(ValueError("connection is closed")) is None  # not a database error
    # A request's values (in the statement's parameters) never make its failure an outage.
    sly = {"workflow_id": "terminating connection: the database system is shutting down"}
    too_long = DBAPIError("INSERT", sly, _PgError("value too long", "22001"))
    assert isinstance(store_error_of(too_long), InvalidValueError)
    assert store_error_of(DBAPIError("INSERT", sly, _PgError("syntax error", "42601"))) is None


# ----------------------------------------------------- through the public API


def _start_request(workflow_id: str) -> service_pb2.StartWorkflowRequest:
    request = service_pb2.StartWorkflowRequest(
        namespace="default", workflow_id=workflow_id, request_id=str(uuid.uuid4())
    )
    request.workflow_type.name = "Wf"
    request.task_queue.name = "tq"
    return request


def _bad_start_requests(store: str) -> list[service_pb2.StartWorkflowRequest]:
    """Starts whose values no database row can hold. (Request validation in the
    frontend may refuse some before the store sees them; the answer must be the same.)"""
    bad = []
    for i in range(_BAD):
        huge_timeout = _start_request(f"bad-timeout-{i}")
        huge_timeout.workflow_run_timeout.seconds = 2**62  # microseconds overflow int64
        bad.append(huge_timeout)
        if store == "postgresql":
            nul = _start_request(f"bad-nul-{i}")
            nul.workflow_type.name = "Wf\x00"  # PostgreSQL text cannot hold NUL
            bad.append(nul)
            # 1,000 characters (the id limit) of 4 bytes each: a key too large for the
            # primary key's index (SQLSTATE 54000).
            rnd = random.Random(i)
            wide = "".join(chr(rnd.randrange(0x10000, 0x10FFFF)) for _ in range(1000))
            bad.append(_start_request(wide))
    return bad


async def test_bad_starts_among_good_ones_fail_alone(server: TideflowServer) -> None:
    """The probe's input: many concurrent good starts and a few bad ones over raw gRPC.
    Every good start commits; each bad one gets INVALID_ARGUMENT and nothing else."""
    channel = grpc.aio.insecure_channel(server.address)
    stub = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
    good = [_start_request(f"good-{i}") for i in range(_GOOD * 2)]
    bad = _bad_start_requests(server.store.dialect.name)
    mixed = good + bad
    random.Random(11).shuffle(mixed)

    async def start(
        request: service_pb2.StartWorkflowRequest,
    ) -> service_pb2.StartWorkflowResponse | grpc.aio.AioRpcError:
        try:
            response: service_pb2.StartWorkflowResponse = await stub.StartWorkflow(request)
        except grpc.aio.AioRpcError as error:
            return error
        return response

    try:
        results = await asyncio.gather(*(start(r) for r in mixed))
    finally:
        await channel.close()
    outcome = dict(zip((r.workflow_id for r in mixed), results, strict=True))
    for request in good:
        response = outcome[request.workflow_id]
        assert isinstance(response, service_pb2.StartWorkflowResponse), response
        current = await server.store.get_current("default", request.workflow_id)
        assert current is not None and current.run_id == response.run_id
    for request in bad:
        error = outcome[request.workflow_id]
        assert isinstance(error, grpc.aio.AioRpcError), error
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert error.details()
        assert "internal error" not in (error.details() or "")
    assert await server.store.count_rows("executions") == len(good)


# ------------------------------------------------------- commits in doubt


class _LosesAnAnswer(RunnerWrapper):
    """A runner that, once armed, commits the next write and then fails it as a
    connection lost before the database's answer arrived."""

    def __init__(self, inner: Runner) -> None:
        super().__init__(inner)
        self.armed = False

    async def write(self, fn: Callable[[Connection], T]) -> T:
        result = await self._inner.write(fn)
        if self.armed:
            self.armed = False
            raise ConnectionResetError(104, "connection reset before the commit was answered")
        return result


async def test_a_commit_whose_answer_was_lost_is_in_doubt(store_url: str) -> None:
    """The store retries the transaction, which then meets its own commit: its caller
    hears of a conflict (the frontend answers UNAVAILABLE, the client retries with the
    same request id and finds its run), but the run is there, and the store says
    writes are in doubt."""
    runner = _LosesAnAnswer(open_runner(store_url))
    store = await HistoryStore.open_on(runner)
    try:
        lost = _create("lost-answer")
        runner.armed = True
        with pytest.raises((ConditionFailedError, CurrentExecutionConflictError)):
            await store.apply(lost)
        assert store.writes_in_doubt.is_set()
        assert await store.get_execution(lost.key) is not None
    finally:
        await store.close()


async def test_resync_dispatches_the_rows_of_commits_in_doubt(store: HistoryStore) -> None:
    """Rows committed without anyone dispatching them (the commit's caller saw an
    error) reach matching and the transfer processor once writes are in doubt."""
    doubtful = _create("doubtful", task_kinds=(TaskKind.WORKFLOW, TaskKind.TRANSFER))
    await store.apply(doubtful)  # nothing dispatches it: there is no engine here
    matching = Matching()
    transferred: asyncio.Queue[TaskRow] = asyncio.Queue()

    async def process(row: TaskRow) -> None:
        await transferred.put(row)

    transfers = TransferProcessor(store)
    background = [
        asyncio.ensure_future(transfers.run(process)),
        asyncio.ensure_future(
            resync_after_outages(
                store,
                lambda shards: matching.recover(store, shards),
                transfers,
                TimerQueue(store, SystemClock(), window_s=30.0),
            )
        ),
    ]
    try:
        assert await matching.poll("default", "q", TaskKind.WORKFLOW, 0) is None
        store.writes_in_doubt.set()
        polled = await matching.poll("default", "q", TaskKind.WORKFLOW, 30)
        assert isinstance(polled, TaskRow)
        assert polled.task_key == doubtful.new_tasks[0].task_key
        row = await asyncio.wait_for(transferred.get(), 30)
        assert row.task_key == doubtful.new_tasks[1].task_key
        assert not store.writes_in_doubt.is_set()
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)


class _HeldWrites(RunnerWrapper):
    """A runner whose writes wait for ``release`` (``entered``: a writer is waiting)."""

    def __init__(self, inner: Runner) -> None:
        super().__init__(inner)
        self.writer_lanes = 1  # one writer: a second commit queues behind the held one
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()  # opening the store writes (the schema)

    async def write(self, fn: Callable[[Connection], T]) -> T:
        self.entered.set()
        await self.release.wait()
        return await self._inner.write(fn)


async def test_a_cancelled_commit_is_withdrawn_or_lands_whole(store_url: str) -> None:
    """A commit whose caller went away is withdrawn while it waits for a writer (never
    written); once a writer has it, it lands after the caller has gone, and its future
    says so (the engine hands its rows on only then: a workflow task's timeout handed
    on earlier fired, found the start not yet landed, and was dropped for good)."""
    runner = _HeldWrites(open_runner(store_url))
    store = await HistoryStore.open_on(runner)
    runner.entered.clear()
    runner.release.clear()
    try:
        taken, waiting = _create("taken"), _create("waiting")
        caller = asyncio.ensure_future(store.apply(taken))
        await runner.entered.wait()  # the writer has it
        queued = store.submit(waiting)
        assert store.withdraw(queued)
        assert queued.cancelled()
        caller.cancel()
        await asyncio.wait([caller])
        landed = store.submit(_create("after"))
        runner.release.set()
        await landed
        assert await store.get_execution(taken.key) is not None
        assert await store.get_execution(waiting.key) is None
    finally:
        await store.close()


# ------------------------------------------------------------- SDK retries


class _UnavailableOnce(service_pb2_grpc.WorkflowServiceServicer):
    """Answers each start and signal UNAVAILABLE once, then OK; records request ids."""

    def __init__(self) -> None:
        self.request_ids: dict[str, list[str]] = {"start": [], "signal": []}

    async def GetSystemInfo(
        self, request: service_pb2.GetSystemInfoRequest, context: Any
    ) -> service_pb2.GetSystemInfoResponse:
        return service_pb2.GetSystemInfoResponse(server_version="test")

    async def _once(self, kind: str, request_id: str, context: Any) -> None:
        self.request_ids[kind].append(request_id)
        if len(self.request_ids[kind]) == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "history store unavailable")

    async def StartWorkflow(
        self, request: service_pb2.StartWorkflowRequest, context: Any
    ) -> service_pb2.StartWorkflowResponse:
        await self._once("start", request.request_id, context)
        return service_pb2.StartWorkflowResponse(run_id="run-1", started=True)

    async def SignalWorkflow(
        self, request: service_pb2.SignalWorkflowRequest, context: Any
    ) -> service_pb2.SignalWorkflowResponse:
        await self._once("signal", request.request_id, context)
        return service_pb2.SignalWorkflowResponse()


async def test_sdk_retries_unavailable_with_the_same_request_id() -> None:
    servicer = _UnavailableOnce()
    grpc_server = grpc.aio.server()
    service_pb2_grpc.add_WorkflowServiceServicer_to_server(  # type: ignore[no-untyped-call]
        servicer, grpc_server
    )
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        client = await Client.connect(f"127.0.0.1:{port}")
        try:
            handle = await client.start_workflow("Wf", id="wf", task_queue="q")
            await handle.signal("go")
        finally:
            await client.close()
    finally:
        await grpc_server.stop(None)
    assert handle.run_id == "run-1"
    for kind in ("start", "signal"):
        first, retry = servicer.request_ids[kind]
        assert first and retry == first, kind
