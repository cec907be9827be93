"""``tideflow.worker_sdk.testing`` (issue 15): ``WorkflowEnvironment.start_local`` and
``start_time_skipping`` with a real in-process server on a temporary SQLite file and a
real worker; ``ActivityEnvironment`` for activities.

- A workflow that sleeps 30 days, and an activity retried after a one-hour backoff,
  complete without anyone waiting for them: the server's clock jumped to the timers.
- Time never jumps while an activity is running: the activity is held until the
  skipper has looked at the store many times, and its 10-minute start-to-close
  timeout never fires.
- With automatic skipping off, ``env.sleep`` moves time by exactly what it is told,
  firing the timers due in between and no others.
- ``start_local`` runs in real time and deletes its files on shutdown.
- ``ActivityEnvironment``: ``activity.info()``, recorded heartbeats, cancellation of
  an async activity (CancelledError) and of a sync one (``is_cancelled()``).
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import bounded, eventually, new_id

from tideflow.worker_sdk import RetryPolicy, Worker, activity, workflow
from tideflow.worker_sdk.client import WorkflowExecutionStatus
from tideflow.worker_sdk.testing import ActivityEnvironment, WorkflowEnvironment

MONTH = timedelta(days=30)


@workflow.defn
class Reminder:
    @workflow.run
    async def run(self, what: str) -> list[Any]:
        before = workflow.now()
        await workflow.sleep(MONTH)
        return [what, (workflow.now() - before).total_seconds()]


_attempts: dict[str, int] = {}


@activity.defn
async def flaky(key: str) -> str:
    _attempts[key] = _attempts.get(key, 0) + 1
    if _attempts[key] == 1:
        raise RuntimeError("first attempt fails")
    return f"ok after {_attempts[key]}"


@workflow.defn
class RetriesAfterAnHour:
    @workflow.run
    async def run(self, key: str) -> str:
        return await workflow.execute_activity(
            flaky,
            key,
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=RetryPolicy(initial_interval=timedelta(hours=1), maximum_attempts=3),
        )


class Gate:
    """An activity the test holds until it opens the gate."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

        @activity.defn(name="held")
        async def held() -> str:
            self.started.set()
            await self.release.wait()
            return "released"

        self.held = held


@workflow.defn
class WaitsForHeld:
    @workflow.run
    async def run(self) -> str:
        result: str = await workflow.execute_activity(
            "held", start_to_close_timeout=timedelta(minutes=10)
        )
        return result


async def test_timers_and_backoffs_skip_ahead() -> None:
    queue = new_id("q")
    async with await WorkflowEnvironment.start_time_skipping() as env:
        assert env.supports_time_skipping
        start = await env.get_current_time()
        async with Worker(
            env.client,
            task_queue=queue,
            workflows=[Reminder, RetriesAfterAnHour],
            activities=[flaky],
        ):
            result = await bounded(
                env.client.execute_workflow(
                    Reminder.run, "pay rent", id=new_id("reminder"), task_queue=queue
                )
            )
            assert result[0] == "pay rent" and result[1] >= MONTH.total_seconds()
            assert await env.get_current_time() - start >= MONTH
            key = new_id("flaky")
            outcome = await bounded(
                env.client.execute_workflow(
                    RetriesAfterAnHour.run, key, id=new_id("retry"), task_queue=queue
                )
            )
            assert outcome == "ok after 2"
        assert await env.get_current_time() - start >= MONTH + timedelta(hours=1)
    # The wall clock moved by far less than a month: the server's own clock jumped.
    assert datetime.now(start.tzinfo) - start < timedelta(days=1)


async def test_no_jump_while_an_activity_runs() -> None:
    queue = new_id("q")
    gate = Gate()
    async with await WorkflowEnvironment.start_time_skipping() as env:
        start = await env.get_current_time()
        async with Worker(
            env.client, task_queue=queue, workflows=[WaitsForHeld], activities=[gate.held]
        ):
            handle = await env.client.start_workflow(
                WaitsForHeld.run, id=new_id("held"), task_queue=queue
            )
            await bounded(gate.started.wait())
            skipper = env._skipper  # the environment's own skipper, read-only here
            assert skipper is not None
            seen = skipper.reads
            # Many looks at the store while the activity runs: had one of them judged the
            # system idle, the clock would have jumped to the start-to-close timeout.
            await eventually(lambda: skipper.reads >= seen + 10, "the skipper to look")
            assert await env.get_current_time() - start < timedelta(minutes=10)
            gate.release.set()
            assert await bounded(handle.result()) == "released"


@workflow.defn
class TwoHours:
    @workflow.run
    async def run(self) -> str:
        await workflow.sleep(timedelta(hours=2))
        return "done"


async def test_sleep_moves_time_by_what_it_is_told() -> None:
    queue = new_id("q")
    async with (
        await WorkflowEnvironment.start_time_skipping() as env,
        Worker(env.client, task_queue=queue, workflows=[TwoHours]),
    ):
        with env.auto_time_skipping_disabled():
            start = await env.get_current_time()
            handle = await env.client.start_workflow(
                TwoHours.run, id=new_id("two-hours"), task_queue=queue
            )
            await eventually(lambda: _history_length_at_least(handle, 4), "the timer")
            await env.sleep(timedelta(hours=1))
            now = await env.get_current_time()
            assert timedelta(hours=1) <= now - start < timedelta(hours=2)
            described = await handle.describe()
            assert described.status == WorkflowExecutionStatus.RUNNING
            await env.sleep(timedelta(hours=1, minutes=1))
            assert await bounded(handle.result()) == "done"
            assert await env.get_current_time() - start >= timedelta(hours=2, minutes=1)


async def _history_length_at_least(handle: object, count: int) -> bool:
    description = await handle.describe()  # type: ignore[attr-defined]
    return bool(description.history_length >= count)


async def test_start_local_runs_in_real_time() -> None:
    queue = new_id("q")
    env = await WorkflowEnvironment.start_local()
    server = env.server
    assert server is not None and not env.supports_time_skipping
    folder = Path(server.db_url.removeprefix("sqlite:///")).parent
    async with env, Worker(env.client, task_queue=queue, workflows=[Reminder]):
        before = await env.get_current_time()
        await env.sleep(0.01)
        assert await env.get_current_time() > before
        handle = await env.client.start_workflow(
            Reminder.run, "later", id=new_id("real"), task_queue=queue
        )
        await eventually(lambda: _history_length_at_least(handle, 4), "the timer")
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
        await handle.terminate("no need to wait a month")
    assert not folder.exists()


# ------------------------------------------------------------------ activities


@activity.defn
async def counts_down(start: int) -> list[str]:
    info = activity.info()
    seen = []
    try:
        for n in range(start, 0, -1):
            activity.heartbeat(n)
            seen.append(str(n))
            await asyncio.sleep(0)
        return [info.activity_id, *seen]
    except asyncio.CancelledError:
        return ["cancelled", *seen]


@activity.defn
def polls_until_cancelled() -> int:
    beats = 0
    while not activity.is_cancelled():
        beats += 1
        activity.heartbeat(beats)
        time.sleep(0.001)
    return beats


async def test_activity_environment() -> None:
    env = ActivityEnvironment()
    assert await env.run(counts_down, 3) == ["test-activity", "3", "2", "1"]
    assert env.heartbeats == [(3,), (2,), (1,)]

    # Cancelled from its heartbeat, as the server's answer to a heartbeat would.
    cancelling = ActivityEnvironment()
    cancelling.on_heartbeat = lambda n: cancelling.cancel() if n == 4 else None
    assert await cancelling.run(counts_down, 6) == ["cancelled", "6", "5", "4"]

    sync_env = ActivityEnvironment()
    sync_env.on_heartbeat = lambda n: sync_env.cancel() if n == 3 else None
    assert await bounded(sync_env.run(polls_until_cancelled)) == 3
    assert sync_env.heartbeats == [(1,), (2,), (3,)]

    with pytest.raises(RuntimeError, match="not in an activity"):
        activity.info()
