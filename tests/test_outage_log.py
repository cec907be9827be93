"""During a store outage the frontend logs one line per interval, not one per request
(issue 10 follow-up): clients retry UNAVAILABLE as fast as their backoff lets them, so
a line each filled the log at that rate. The limiter is the one that paces the log of
undecodable bodies (server/_failures.py ``RateLimitedLog``)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import grpc
import pytest
from sqlalchemy import Connection

from tideflow.api.v1 import service_pb2, service_pb2_grpc
from tideflow.history import HistoryStore, TaskRow, TimerRow
from tideflow.history._dialects import Runner, open_runner
from tideflow.server import ServerConfig, SystemClock
from tideflow.server._engine import Dispatcher, HistoryEngine
from tideflow.server._frontend import WorkflowService
from tideflow.server._matching import Matching
from tideflow.server._registration import add_to_server

T = TypeVar("T")
_INTERVAL_S = 10.0  # the frontend's pace for store failures


class _CanGoDown:
    """A runner whose database can be switched off: every statement is refused."""

    def __init__(self, inner: Runner) -> None:
        self.name, self.writer_lanes = inner.name, inner.writer_lanes
        self.isolation = inner.isolation
        self.down = False
        self._inner = inner

    def _check(self) -> None:
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")

    async def write(self, fn: Callable[[Connection], T]) -> T:
        self._check()
        return await self._inner.write(fn)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        self._check()
        return await self._inner.read(fn)

    async def close(self) -> None:
        await self._inner.close()


class _Discard(Dispatcher):
    def add_tasks(self, tasks: list[TaskRow]) -> None:
        pass  # nothing commits while the database is down

    def add_timers(self, timers: list[TimerRow]) -> None:
        pass


class _ManualClock:
    def __init__(self) -> None:
        self.now_s = 1_000.0

    def __call__(self) -> float:
        return self.now_s


@asynccontextmanager
async def _frontend(
    store: HistoryStore, clock: _ManualClock
) -> AsyncIterator[service_pb2_grpc.WorkflowServiceStub]:
    config = ServerConfig()
    engine = HistoryEngine(store, _Discard(), SystemClock(), config)
    service = WorkflowService(store, engine, Matching(), config, log_clock=clock)
    server = grpc.aio.server()
    add_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
    finally:
        await server.stop(None)


async def _fail_requests(stub: service_pb2_grpc.WorkflowServiceStub, count: int) -> None:
    request = service_pb2.DescribeWorkflowRequest(namespace="default")
    request.execution.workflow_id = "w"
    calls = [stub.DescribeWorkflow(request, timeout=30) for _ in range(count)]
    for outcome in await asyncio.gather(*calls, return_exceptions=True):
        assert isinstance(outcome, grpc.aio.AioRpcError), outcome
        assert outcome.code() == grpc.StatusCode.UNAVAILABLE, outcome.details()


async def test_store_failures_log_one_line_per_interval(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tideflow.server.frontend")
    runner = _CanGoDown(open_runner(store_url))
    store = await HistoryStore.open_on(runner)
    clock = _ManualClock()
    try:
        async with _frontend(store, clock) as stub:
            runner.down = True

            def outage_lines() -> list[str]:
                return [
                    r.getMessage()
                    for r in caplog.records
                    if r.name == "tideflow.server.frontend"
                    and "store unavailable" in r.getMessage()
                ]

            await _fail_requests(stub, 30)
            (first,) = outage_lines()
            assert first.startswith("DescribeWorkflow: store unavailable")
            assert "(0 more left out before this one)" in first

            clock.now_s += _INTERVAL_S - 0.5  # still within the interval: silent
            await _fail_requests(stub, 5)
            assert len(outage_lines()) == 1

            clock.now_s += 1.0  # the interval has passed: one line, with the count
            await _fail_requests(stub, 1)
            assert len(outage_lines()) == 2
            found = re.search(r"\((\d+) more left out", outage_lines()[1])
            assert found is not None and int(found.group(1)) == 29 + 5

            runner.down = False  # the database is back: the run is looked up again
            request = service_pb2.DescribeWorkflowRequest(namespace="default")
            request.execution.workflow_id = "w"
            with pytest.raises(grpc.aio.AioRpcError) as absent:
                await stub.DescribeWorkflow(request, timeout=30)
            assert absent.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        runner.down = False
        await store.close()
