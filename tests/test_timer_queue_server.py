"""A server whose timer queue may hold only a few rows still fires every timer.

Sixty workflows sleep to the same instant on a node limited to 16 timer rows in memory
(their workflow task timeouts are timer rows too): every run completes after exactly
one TimerFired, and the queue's stop line reports it never held more than its limit.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import pytest
from helpers import bounded, new_id, running_server

from tideflow.api.v1.history_pb2 import EventType
from tideflow.server import ServerConfig
from tideflow.worker_sdk import Client, Worker, workflow

_LIMIT = 16


@workflow.defn
class SleepUntil:
    @workflow.run
    async def run(self, due_s: float) -> str:
        await workflow.sleep(max(due_s - workflow.now().timestamp(), 0.001))
        return "woke"


async def test_sixty_sleepers_through_a_queue_of_sixteen_rows(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tideflow.server.timers")
    tq = new_id("tq")
    config = ServerConfig(max_timers_in_memory=_LIMIT)
    async with (
        running_server(store_url, config) as server,
        await Client.connect(server.address) as client,
        Worker(client, task_queue=tq, workflows=[SleepUntil]),
    ):
        due_s = time.time() + 2.0
        handles = await asyncio.gather(
            *(
                client.start_workflow(SleepUntil.run, due_s, id=new_id("sleeper"), task_queue=tq)
                for _ in range(60)
            )
        )
        results = await bounded(asyncio.gather(*(h.result() for h in handles)))
        assert results == ["woke"] * 60
        for handle in handles:
            types = [e.event_type for e in (await handle.fetch_history()).events]
            assert types.count(EventType.EVENT_TYPE_TIMER_FIRED) == 1
    peaks = [
        int(match.group(1))
        for record in caplog.records
        if (match := re.search(r"at most (\d+) timer rows", record.getMessage()))
    ]
    assert len(peaks) == 1
    assert 0 < peaks[0] <= _LIMIT
