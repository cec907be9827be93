"""Trace validation of activity attempts: TLC decides whether real runs are behaviours
of tla/EngineCore.tla (how: helpers_tla.py). Scenarios:

- activity retries: an activity failing twice then succeeding, one timing out
  (start-to-close) and retried, and a workflow task failing twice (transient attempts,
  then a backoff timer) before it succeeds; the first activity of a run retried;
- activity timeouts: schedule-to-start, schedule-to-close across retried attempts,
  heartbeat (with the timer re-arming itself).

Real traces corrupted on purpose must be rejected (TLC exit 0, the line and reason
printed).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import SteppedClock, eventually, running_server
from helpers_tla import (
    Corrupted,
    Gates,
    actions,
    assert_accepted,
    first_index,
    read_lines,
    real_accepted_all_corrupted_rejected,
    real_accepted_corrupted_rejected,
    trace_of,
    validate,
)

from tideflow.server import ServerConfig
from tideflow.worker_sdk import (
    Client,
    RetryPolicy,
    Worker,
    WorkflowHandle,
    activity,
    workflow,
)
from tideflow.worker_sdk.exceptions import (
    ActivityError,
    TimeoutError,
    TimeoutType,
)

# Trace mode on before any server of the test starts (conftest: trace_dir).
pytestmark = [pytest.mark.tla, pytest.mark.usefixtures("trace_dir")]


FAST_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=50), maximum_attempts=5)


_wft_failures: Counter[str] = Counter()


@activity.defn
async def fails_twice(key: str) -> str:
    attempt = activity.info().attempt
    if attempt < 3:
        raise RuntimeError(f"transient failure {attempt}")
    return f"ok on attempt {attempt}"


@activity.defn
async def stalls_on_first_attempt(key: str) -> str:
    attempt = activity.info().attempt
    if attempt == 1:
        activity.heartbeat("alive")  # sent at once (later ones would be throttled)
        # Held past its start-to-close timeout; released (and reported late) at the end.
        await Gates.stalled.wait()
    return f"ok on attempt {attempt}"


@workflow.defn
class Retries:
    @workflow.run
    async def run(self, key: str) -> list[str]:
        if _wft_failures[key] < 2:
            # A bug in the first two workflow task attempts: the task fails and the
            # server retries it (transient attempt 2 at once, attempt 3 after a backoff).
            _wft_failures[key] += 1
            raise RuntimeError("workflow task bug, fixed by attempt 3")
        results = await asyncio.gather(
            workflow.execute_activity(
                fails_twice, key, start_to_close_timeout=timedelta(seconds=10),
                retry_policy=FAST_RETRY,
            ),
            workflow.execute_activity(
                stalls_on_first_attempt, key, start_to_close_timeout=timedelta(seconds=1),
                retry_policy=FAST_RETRY,
            ),
        )  # fmt: skip
        return list(results)


async def test_activity_and_workflow_task_retries(
    jar: Path, trace_dir: Path, client: Client, tmp_path: Path
) -> None:
    Gates.reset()
    _wft_failures.clear()
    worker = Worker(
        client,
        task_queue="tla-retries",
        workflows=[Retries],
        activities=[fails_twice, stalls_on_first_attempt],
        graceful_shutdown_timeout=timedelta(seconds=10),
    )
    async with worker:
        handle = await client.start_workflow(
            Retries.run, "retries-1", id="retries-1", task_queue="tla-retries"
        )
        assert await handle.result() == ["ok on attempt 3", "ok on attempt 2"]
        # The stalled attempt 1 now reports, long after it timed out: the engine must
        # refuse it (stale attempt), so it adds nothing to the trace. The graceful
        # shutdown waits for that report.
        Gates.stalled.set()
    trace = trace_of(trace_dir, "retries-1")
    lines = read_lines(trace)
    seen = actions(trace)
    assert seen["FailWorkflowTask"] == 2 and seen["FireTimer:WORKFLOW_TASK_RETRY"] == 1
    assert seen["RecordHeartbeat"] == 1
    assert [ln["args"]["retry"] for ln in lines if ln["action"] == "FailActivity"] == [True] * 2
    assert seen["FireTimer:ACTIVITY_RETRY"] == 3
    [timeout] = [ln for ln in lines if ln["action"] == "FireTimer:ACTIVITY_START_TO_CLOSE"]
    assert timeout["args"]["retry"] is True and timeout["events"] == []

    # Corruptions of this real trace: the engine's retry decision flipped (it would
    # have recorded the failure), and an event id skipped.
    flipped = [dict(ln) for ln in lines]
    at = first_index(flipped, lambda ln: ln["action"] == "FailActivity")
    flipped[at] = {**flipped[at], "args": {**flipped[at]["args"], "retry": False}}
    skipped = json.loads(json.dumps(lines))
    gap = first_index(skipped, lambda ln: ln["action"] == "CompleteActivity")
    for line in skipped[gap:]:
        for event in line["events"]:
            event["id"] += 1
    differ = ("the appended events differ",)
    real_accepted_all_corrupted_rejected(
        jar,
        tmp_path,
        trace,
        [
            Corrupted("flipped-retry", flipped, at + 1, differ),
            Corrupted("skipped-id", skipped, gap + 1, differ),
        ],
    )


@activity.defn
async def fails_once(key: str) -> str:
    attempt = activity.info().attempt
    if attempt == 1:
        raise RuntimeError("transient failure")
    return f"ok on attempt {attempt}"


@workflow.defn
class FirstActivityRetried:
    @workflow.run
    async def run(self, key: str) -> str:
        result: str = await workflow.execute_activity(
            fails_once, key, start_to_close_timeout=timedelta(seconds=10), retry_policy=FAST_RETRY
        )
        return result


async def test_retry_of_the_first_activity_drops_the_failed_attempts_timer(
    jar: Path, trace_dir: Path, client: Client, tmp_path: Path
) -> None:
    async with Worker(
        client, task_queue="tla-first", workflows=[FirstActivityRetried], activities=[fails_once]
    ):
        handle = await client.start_workflow(
            FirstActivityRetried.run, "first", id="first-1", task_queue="tla-first"
        )
        assert await handle.result() == "ok on attempt 2"
    trace = trace_of(trace_dir, "first-1")
    lines = read_lines(trace)
    [failed] = [ln for ln in lines if ln["action"] == "FailActivity"]
    assert failed["args"]["token"]["scheduled"] == 5 and failed["args"]["retry"] is True
    [verdict] = validate(jar, tmp_path, [(trace, None)])
    assert_accepted(verdict, trace)


class Attempts:
    """What the timeout test's activities report to it (made anew by each run: an
    asyncio.Event must not outlive its loop): the attempts started so far, and the
    gate that lets attempt 1 of ``heartbeats_once_then_hangs`` heartbeat."""

    started: list[str] = []
    changed = asyncio.Event()
    beat = asyncio.Event()

    @classmethod
    def reset(cls) -> None:
        cls.started, cls.changed, cls.beat = [], asyncio.Event(), asyncio.Event()

    @classmethod
    def note(cls) -> None:
        info = activity.info()
        cls.started.append(f"{info.activity_type}#{info.attempt}")
        cls.changed.set()

    @classmethod
    async def until(cls, count: int) -> None:
        while len(cls.started) < count:
            cls.changed.clear()
            await asyncio.wait_for(cls.changed.wait(), 60)


@activity.defn
async def hangs_until_released(key: str) -> str:
    Attempts.note()
    await Gates.release.wait()
    return "too late"


@activity.defn
async def heartbeats_once_then_hangs(key: str) -> str:
    Attempts.note()
    attempt = activity.info().attempt
    if attempt == 1:
        await Attempts.beat.wait()
        activity.heartbeat("alive")  # the first heartbeat is sent at once
        await Gates.release.wait()
    return f"ok on attempt {attempt}"


def _timeout_of(error: ActivityError) -> str:
    cause = error.cause
    assert isinstance(cause, TimeoutError)
    return TimeoutType(cause.type or 0).name


#: Timers are read ahead a second at a time, so one the test's clock step makes due
#: fires within about half a second.
_STEPPED_TIMERS = ServerConfig(timer_window_s=1.0)
#: Every timeout of ActivityTimeouts is a multiple of this: the server's clock
#: (helpers.SteppedClock) only reaches one when the test advances it.
HOUR = timedelta(hours=1)
_MINUTE = timedelta(minutes=1)


@workflow.defn
class ActivityTimeouts:
    @workflow.run
    async def run(self, key: str) -> list[str]:
        outcomes: list[str] = []
        try:  # nobody polls this queue: the attempt never starts
            await workflow.execute_activity(
                hangs_until_released,
                key,
                task_queue="tla-nobody",
                schedule_to_start_timeout=HOUR,
                start_to_close_timeout=10 * HOUR,
            )
        except ActivityError as error:
            outcomes.append(_timeout_of(error))
        try:  # attempts time out and are retried until the overall deadline
            await workflow.execute_activity(
                hangs_until_released,
                key,
                start_to_close_timeout=HOUR,
                schedule_to_close_timeout=2.5 * HOUR,
                retry_policy=FAST_RETRY,
            )
        except ActivityError as error:
            outcomes.append(_timeout_of(error))
        # the heartbeat timer re-arms once (attempt 1 heartbeated half an hour in),
        # then the silent attempt 1 times out; attempt 2 completes
        outcomes.append(
            await workflow.execute_activity(
                heartbeats_once_then_hangs,
                key,
                start_to_close_timeout=30 * HOUR,
                heartbeat_timeout=HOUR,
                retry_policy=FAST_RETRY,
            )
        )
        return outcomes  # fmt: skip


async def _drive_timeouts(
    handle: WorkflowHandle[list[str]], clock: SteppedClock, trace_dir: Path
) -> None:
    """Moves the server's clock past each deadline of ActivityTimeouts once the step
    before it is done, so every timeout fires in a known order, whatever the load."""

    async def scheduled() -> bool:
        return bool((await handle.describe()).raw.pending_activities)

    await eventually(scheduled, "the first activity scheduled")
    clock.advance(HOUR + _MINUTE)  # schedule-to-start
    await Attempts.until(1)
    clock.advance(HOUR + _MINUTE)  # start-to-close of attempt 1, retried
    await Attempts.until(2)
    clock.advance(HOUR + _MINUTE)  # start-to-close of attempt 2, retried
    await Attempts.until(3)
    clock.advance(31 * _MINUTE)  # schedule-to-close (2.5 h) before attempt 3's 1 h
    await Attempts.until(4)  # heartbeats_once_then_hangs, attempt 1
    clock.advance(30 * _MINUTE)
    Attempts.beat.set()

    async def heartbeat_recorded() -> bool:
        [pending] = (await handle.describe()).raw.pending_activities
        return pending.HasField("last_heartbeat_time")

    await eventually(heartbeat_recorded, "the heartbeat recorded")
    clock.advance(31 * _MINUTE)  # the heartbeat timer fires, re-arms to beat + 1 h

    async def rearmed() -> bool:
        return actions(trace_of(trace_dir, "timeouts-1"))["FireTimer:ACTIVITY_HEARTBEAT"] == 1

    await eventually(rearmed, "the heartbeat timer re-armed")
    clock.advance(30 * _MINUTE)  # ... and fires again: attempt 1 timed out


async def test_activity_timeouts(
    jar: Path, trace_dir: Path, store_url: str, tmp_path: Path
) -> None:
    """Schedule-to-start, schedule-to-close across retried attempts, and heartbeat
    timeouts (with the heartbeat timer re-arming itself) are steps of EngineCore."""
    Gates.reset()
    Attempts.reset()
    clock = SteppedClock()
    async with (
        running_server(store_url, _STEPPED_TIMERS, clock=clock) as server,
        await Client.connect(server.address) as client,
        Worker(
            client,
            task_queue="tla-timeouts",
            workflows=[ActivityTimeouts],
            activities=[hangs_until_released, heartbeats_once_then_hangs],
            graceful_shutdown_timeout=timedelta(seconds=10),
        ),
    ):
        handle = await client.start_workflow(
            ActivityTimeouts.run, "t", id="timeouts-1", task_queue="tla-timeouts"
        )
        await _drive_timeouts(handle, clock, trace_dir)
        first, second, third = await handle.result()
        Gates.release.set()
    assert [first, second, third] == ["SCHEDULE_TO_START", "SCHEDULE_TO_CLOSE", "ok on attempt 2"]
    trace = trace_of(trace_dir, "timeouts-1")
    lines = read_lines(trace)
    seen = actions(trace)
    assert seen["FireTimer:ACTIVITY_SCHEDULE_TO_START"] == 1
    assert seen["FireTimer:ACTIVITY_START_TO_CLOSE"] == 2
    heartbeats = [ln for ln in lines if ln["action"] == "FireTimer:ACTIVITY_HEARTBEAT"]
    assert [bool(ln["args"].get("rearm")) for ln in heartbeats] == [True, False]

    # Corrupted: a retry drops the schedule-to-close timer as well (the deadline spans
    # all attempts, so the engine must keep it), as the '|5|' substring bug could.
    dropped = json.loads(json.dumps(lines))
    at = first_index(
        dropped,
        lambda ln: ln["action"] == "FireTimer:ACTIVITY_START_TO_CLOSE" and ln["args"]["retry"],
    )
    [s2c] = [
        row
        for ln in dropped[:at]
        for row in ln["rows"]["new_timers"]
        if row["kind"] == "ACTIVITY_SCHEDULE_TO_CLOSE"
    ]
    dropped[at]["rows"]["done_timers"].append(s2c)
    real_accepted_corrupted_rejected(
        jar, tmp_path, trace, dropped, "s2c-dropped", at + 1, "the timer rows differ"
    )
