"""The database going away under load: the server rides it out, nothing is lost.

Each test runs its own PostgreSQL cluster (``pg_cluster.py``), never the shared
server, and restarts or stops it while a server with a worker is busy with starts,
signals, activities, timers and child workflows. While the database is away, the
frontend answers UNAVAILABLE (which the SDK retries with the same request id, so a
start or signal is applied once); the timer queue, the transfer processor and the
backlog keep going once it is back; every workflow then completes with the right
result, with each start and each signal in its history exactly once.

Nothing waits on wall-clock time: each step waits on a condition, with a bound.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers import eventually, log_handler, running_server
from pg_cluster import PrivatePostgres, private_postgres

from tideflow.api.v1 import service_pb2, service_pb2_grpc
from tideflow.api.v1.history_pb2 import EventType
from tideflow.history import HistoryStore, RunKey, StoreUnavailableError
from tideflow.server import ServerConfig, TideflowServer
from tideflow.worker_sdk import Client, RetryPolicy, Worker, WorkflowHandle, activity, workflow

_WORKFLOWS = 16
_SIGNALS = ("s0", "s1", "s2")
_BOUND_S = 120.0
# Past the sum of a few bounded waits: a phase that hangs fails with its own message
# (which condition, after _BOUND_S) instead of pytest-timeout ending the whole worker
# process at the default 120 s with nothing said (seen once under -n 4).
pytestmark = pytest.mark.timeout(600)
_PATIENT = RetryPolicy(
    initial_interval=timedelta(milliseconds=100),
    backoff_coefficient=2,
    maximum_interval=timedelta(seconds=1),
)


@activity.defn
async def shout(name: str) -> str:
    return name.upper()


@workflow.defn
class Child:
    @workflow.run
    async def run(self, name: str) -> str:
        await workflow.sleep(timedelta(milliseconds=100))
        return f"child of {name}"


@workflow.defn
class Busy:
    """An activity, timers, a child, and signals it waits for: a little of everything
    that crosses the store."""

    def __init__(self) -> None:
        self.signals: list[str] = []

    @workflow.signal
    def add(self, value: str) -> None:
        self.signals.append(value)

    @workflow.run
    async def run(self, name: str, expected: int) -> dict[str, Any]:
        shouted = await workflow.execute_activity(
            shout, name, start_to_close_timeout=timedelta(seconds=30), retry_policy=_PATIENT
        )
        await workflow.sleep(timedelta(milliseconds=200))
        child = await workflow.execute_child_workflow(
            Child.run, name, id=f"{workflow.info().workflow_id}-child"
        )
        await workflow.wait_condition(lambda: len(self.signals) >= expected)
        await workflow.sleep(timedelta(milliseconds=100))
        # A signal applied twice would show here (and in the history check).
        return {"shout": shouted, "child": child, "signals": sorted(self.signals)}


@pytest.mark.parametrize("ci", ["true", ""])
def test_missing_postgres_binaries_fail_under_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ci: str
) -> None:
    """Without initdb/pg_ctl these tests are skipped, but never under CI=true."""
    monkeypatch.setenv("TIDEFLOW_PG_BIN", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CI", ci)
    monkeypatch.delenv("TIDEFLOW_TEST_DB", raising=False)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected, match="binaries"):
        private_postgres()


@pytest.fixture
def cluster() -> Iterator[PrivatePostgres]:
    pg = private_postgres()
    try:
        yield pg
    finally:
        pg.destroy()


class _Counter(logging.Handler):
    """Counts the frontend's "store unavailable" lines: evidence that requests met
    the outage (a condition to wait on, instead of a sleep). Warnings are rate-limited,
    so the DEBUG copies of the ones left out count too."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.unavailable = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "store unavailable" in record.getMessage():
            self.unavailable += 1


@pytest.fixture
def unavailable_lines() -> Iterator[_Counter]:
    with log_handler("tideflow.server.frontend", _Counter()) as counter:
        yield counter


async def _until(cond: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    await eventually(cond, what, timeout=_BOUND_S)


@pytest.fixture
async def server(cluster: PrivatePostgres) -> AsyncIterator[TideflowServer]:
    # A short timer window: the queue re-reads its window from the store often, so the
    # outage hits its refills too.
    async with running_server(cluster.url, ServerConfig(timer_window_s=1.0)) as srv:
        yield srv


async def _raw_start_code(address: str, workflow_id: str) -> grpc.StatusCode:
    """A start without the SDK's retries: the status the frontend answers now."""
    channel = grpc.aio.insecure_channel(address)
    try:
        stub = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        request = service_pb2.StartWorkflowRequest(
            namespace="default", workflow_id=workflow_id, request_id=str(uuid.uuid4())
        )
        request.workflow_type.name = "Busy"
        request.task_queue.name = "nobody-polls-this"
        try:
            await stub.StartWorkflow(request, timeout=30)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK
    finally:
        await channel.close()


@pytest.mark.postgres
async def test_unreachable_database_is_unavailable_not_internal(
    cluster: PrivatePostgres, server: TideflowServer, unavailable_lines: _Counter
) -> None:
    await asyncio.to_thread(cluster.stop)
    with pytest.raises(StoreUnavailableError):
        await server.store.get_current("default", "any")
    assert await _raw_start_code(server.address, "while-down") == grpc.StatusCode.UNAVAILABLE
    assert unavailable_lines.unavailable >= 1
    await asyncio.to_thread(cluster.start)
    assert await _raw_start_code(server.address, "after") == grpc.StatusCode.OK


@pytest.mark.postgres
@pytest.mark.parametrize("stop_mode", ["fast", "immediate"])
async def test_store_rides_out_a_restart_and_a_stop(
    cluster: PrivatePostgres, server: TideflowServer, unavailable_lines: _Counter, stop_mode: str
) -> None:
    """The probe's scenario: load, a restart (SQLSTATE 57P01 for every session), more
    load, the database stopped (cleanly, or crashed: ``immediate``) until requests met
    the outage, then started again."""
    client = await Client.connect(server.address)
    tq = f"outage-{uuid.uuid4()}"
    ids = [f"busy-{i}-{uuid.uuid4()}" for i in range(_WORKFLOWS)]
    handles: dict[str, WorkflowHandle] = {}

    async def start(workflow_id: str) -> None:
        handles[workflow_id] = await client.start_workflow(
            Busy.run, args=[workflow_id, len(_SIGNALS)], id=workflow_id, task_queue=tq
        )

    async def signal_all(value: str, of: list[str]) -> None:
        await asyncio.gather(*(handles[i].signal(Busy.add, value) for i in of))

    churned: dict[str, WorkflowHandle] = {}

    async def churn(until: asyncio.Future[None]) -> None:
        """Start short workflows one after the other until ``until`` is done, so that
        requests, workflow tasks and timers are in flight when the database goes."""
        while not until.done():
            workflow_id = f"churn-{len(churned)}-{uuid.uuid4()}"
            churned[workflow_id] = await client.start_workflow(
                Child.run, workflow_id, id=workflow_id, task_queue=tq
            )

    loads: list[asyncio.Future[None]] = []

    async def under_load(action: Callable[[], None]) -> None:
        """Run a blocking cluster action while starts keep coming. The load is awaited
        at the end: its last start may be held up by the outage the action began."""
        done = asyncio.ensure_future(asyncio.to_thread(action))
        loads.append(asyncio.ensure_future(churn(done)))
        await done

    try:
        async with Worker(client, task_queue=tq, workflows=[Busy, Child], activities=[shout]):
            first, second = ids[: _WORKFLOWS // 2], ids[_WORKFLOWS // 2 :]
            await asyncio.gather(*(start(i) for i in first))
            # Restart while the first half runs and the second half starts.
            await asyncio.gather(
                under_load(cluster.restart),
                asyncio.gather(*(start(i) for i in second)),
                signal_all(_SIGNALS[0], first),
            )
            await signal_all(_SIGNALS[0], second)
            # Stop; signals sent meanwhile must get through once it is back.
            await under_load(lambda: cluster.stop(stop_mode))
            seen = unavailable_lines.unavailable
            pending = asyncio.ensure_future(signal_all(_SIGNALS[1], ids))
            await _until(
                lambda: unavailable_lines.unavailable >= seen + 3,
                "requests meet the stopped database",
            )
            assert not pending.done()
            await asyncio.gather(under_load(cluster.start), asyncio.wait_for(pending, _BOUND_S))
            await signal_all(_SIGNALS[2], ids)
            results = await asyncio.wait_for(
                asyncio.gather(*(handles[i].result() for i in ids)), _BOUND_S
            )
            await asyncio.wait_for(asyncio.gather(*loads), _BOUND_S)
            churn_results = await asyncio.wait_for(
                asyncio.gather(*(h.result() for h in churned.values())), _BOUND_S
            )
    finally:
        await client.close()

    assert churn_results == [f"child of {i}" for i in churned]

    for workflow_id, result in zip(ids, results, strict=True):
        assert result == {
            "shout": workflow_id.upper(),
            "child": f"child of {workflow_id}",
            "signals": list(_SIGNALS),
        }
    await _assert_applied_once(server.store, handles, churned)
    # Nothing left behind: no backlog row, no transfer row, no timer.
    await _until(lambda: _empty(server.store, "tasks"), "the backlog drains")
    await _until(lambda: _empty(server.store, "timers"), "no timer is left")


async def _empty(store: HistoryStore, table: str) -> bool:
    return await store.count_rows(table) == 0


async def _assert_applied_once(
    store: HistoryStore, handles: dict[str, WorkflowHandle], churned: dict[str, WorkflowHandle]
) -> None:
    """One run per workflow id (a start retried after an ambiguous commit found its
    run), and each signal once in its history."""
    for workflow_id, handle in {**handles, **churned}.items():
        current = await store.get_current("default", workflow_id)
        assert current is not None and current.run_id == handle.run_id
    for workflow_id, handle in handles.items():
        assert handle.run_id is not None
        key = RunKey(namespace="default", workflow_id=workflow_id, run_id=handle.run_id)
        events = await store.read_events(key)
        types = [e.event_type for e in events]
        assert types.count(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED) == 1
        signaled = [
            e.workflow_execution_signaled_event_attributes
            for e in events
            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
        ]
        assert len(signaled) == len(_SIGNALS), [s.signal_name for s in signaled]
    # Parents, their children and the churn: nothing more.
    assert await store.count_rows("executions") == 2 * len(handles) + len(churned)
