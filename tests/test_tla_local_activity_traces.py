"""Trace validation of local activities: TLC decides whether real runs are behaviours
of tla/EngineCore.tla (how: helpers_tla.py). Scenarios:

- a local activity that outlasts 80 % of a short workflow task timeout: the worker's
  heartbeats complete the task with force_create_new_workflow_task and
  return_new_workflow_task (``CompleteWorkflowTaskWith(.., forceNew, returnNew)``),
  on a sticky worker and on one without a cache;
- local activities that finish inside their task (markers only, no heartbeat);
- a local activity whose retry backoff exceeds the local threshold: a marker, a
  durable timer, the next attempt after it fired.

A heartbeat line with its force flag cleared must be rejected.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import ET, bounded, events_of, eventually, new_id, of_type
from helpers_tla import (
    Gates,
    actions,
    assert_accepted,
    first_index,
    read_lines,
    real_accepted_corrupted_rejected,
    trace_of,
    validate,
)

from tideflow.worker_sdk import Client, RetryPolicy, Worker, activity, workflow
from tideflow.worker_sdk.exceptions import ApplicationError

# Trace mode on before any server of the test starts (conftest: trace_dir).
pytestmark = [pytest.mark.tla, pytest.mark.usefixtures("trace_dir")]

_STEP = timedelta(seconds=10)
# Heartbeats at 80 % of it (1.6 s); the rest is the margin a loaded machine has.
_HEARTBEAT_TASK_TIMEOUT = timedelta(seconds=2)
_ATTEMPTS: dict[str, list[int]] = {}


@activity.defn
async def held_until_released(key: str) -> str:
    """Runs until the test has seen the heartbeats it waits for."""
    await Gates.release.wait()
    return f"{key}:released"


@activity.defn
async def doubled(n: int) -> int:
    return 2 * n


@activity.defn
async def fails_first_two(key: str) -> int:
    attempt = activity.info().attempt
    _ATTEMPTS.setdefault(key, []).append(attempt)
    if attempt <= 2:
        raise ApplicationError(f"attempt {attempt} failed", type="Flaky")
    return attempt


@workflow.defn
class HeldLocalActivity:
    @workflow.run
    async def run(self, key: str) -> str:
        result: str = await workflow.execute_local_activity(
            held_until_released, key, start_to_close_timeout=timedelta(minutes=5)
        )
        return result


@workflow.defn
class QuickLocalActivities:
    @workflow.run
    async def run(self, n: int) -> list[int]:
        first: int = await workflow.execute_local_activity(doubled, n, start_to_close_timeout=_STEP)
        both = await asyncio.gather(
            workflow.execute_local_activity(doubled, first, start_to_close_timeout=_STEP),
            workflow.execute_local_activity(doubled, first + 1, start_to_close_timeout=_STEP),
        )
        return [first, *both]


@workflow.defn
class BackingOffLocalActivity:
    @workflow.run
    async def run(self, key: str) -> int:
        result: int = await workflow.execute_local_activity(
            fails_first_two,
            key,
            start_to_close_timeout=_STEP,
            # 10 ms backoff stays in the worker; 100 ms exceeds the 50 ms threshold
            retry_policy=RetryPolicy(
                initial_interval=timedelta(milliseconds=10), backoff_coefficient=10.0
            ),
            local_retry_threshold=timedelta(milliseconds=50),
        )
        return result


def _heartbeats(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        ln for ln in lines if ln["action"] == "CompleteWorkflowTask" and ln["args"].get("force_new")
    ]


@pytest.mark.parametrize("cache", [10, 0], ids=["sticky", "no-cache"])
async def test_workflow_task_heartbeat(
    jar: Path, trace_dir: Path, client: Client, queue: str, tmp_path: Path, cache: int
) -> None:
    """Two heartbeats while the local activity runs, each returning the next task to
    the worker in the same transaction; the run then completes with one marker."""
    Gates.reset()
    key = new_id("la-heartbeat")
    async with Worker(
        client,
        task_queue=queue,
        workflows=[HeldLocalActivity],
        activities=[held_until_released],
        max_cached_workflows=cache,
    ):
        handle = await client.start_workflow(
            HeldLocalActivity.run,
            key,
            id=key,
            task_queue=queue,
            task_timeout=_HEARTBEAT_TASK_TIMEOUT,
        )

        async def two_heartbeats() -> bool:
            events = await events_of(handle)
            return len(of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)) >= 2

        await eventually(two_heartbeats, "two workflow task heartbeats")
        Gates.release.set()
        assert await bounded(handle.result()) == f"{key}:released"
    trace = trace_of(trace_dir, key)
    lines = read_lines(trace)
    beats = _heartbeats(lines)
    assert len(beats) >= 2
    assert all(ln["args"]["return_new"] for ln in beats)
    assert all(ln["args"]["sticky"] == (cache > 0) for ln in beats)
    # the returned task is started in the heartbeat's own transition: no poll takes it
    started = [e["type"] for e in beats[0]["events"]]
    assert started == [
        "WORKFLOW_TASK_COMPLETED",
        "WORKFLOW_TASK_SCHEDULED",
        "WORKFLOW_TASK_STARTED",
    ]
    assert actions(trace)["FireTimer:WORKFLOW_TASK_TIMEOUT"] == 0

    # Corruption: the first heartbeat's force flag cleared; the engine would then have
    # scheduled nothing, yet the line shows a new task.
    unforced = [dict(ln) for ln in lines]
    at = first_index(
        unforced, lambda ln: ln["action"] == "CompleteWorkflowTask" and ln["args"].get("force_new")
    )
    unforced[at] = {**unforced[at], "args": {**unforced[at]["args"], "force_new": False}}
    real_accepted_corrupted_rejected(
        jar, tmp_path, trace, unforced, "unforced-heartbeat", at + 1, "the appended events differ"
    )


async def test_local_activities_without_heartbeat_and_with_a_durable_backoff(
    jar: Path, trace_dir: Path, client: Client, queue: str, tmp_path: Path
) -> None:
    """Local activities finishing inside their workflow task (markers, no forced
    task), and one whose second backoff (100 ms) exceeds the local threshold: a
    marker, a durable timer, the next attempt after it fired."""
    quick = new_id("la-quick")
    backoff = new_id("la-backoff")
    async with Worker(
        client,
        task_queue=queue,
        workflows=[QuickLocalActivities, BackingOffLocalActivity],
        activities=[doubled, fails_first_two],
    ):
        first = await client.start_workflow(QuickLocalActivities.run, 3, id=quick, task_queue=queue)
        second = await client.start_workflow(
            BackingOffLocalActivity.run, backoff, id=backoff, task_queue=queue
        )
        assert await bounded(first.result()) == [6, 12, 14]
        assert await bounded(second.result()) == 3
    assert _ATTEMPTS[backoff] == [1, 2, 3]
    quick_trace = trace_of(trace_dir, quick)
    backoff_trace = trace_of(trace_dir, backoff)
    for trace in (quick_trace, backoff_trace):
        assert not _heartbeats(read_lines(trace))
    backoff_actions = actions(backoff_trace)
    assert backoff_actions["FireTimer:USER_TIMER"] == 1
    markers = [
        e
        for ln in read_lines(backoff_trace)
        for e in ln["events"]
        if e["type"] == "MARKER_RECORDED"
    ]
    assert len(markers) == 2  # attempt 2's failure (with the backoff), then the result
    verdicts = validate(jar, tmp_path, [(quick_trace, None), (backoff_trace, None)])
    assert_accepted(verdicts[0], quick_trace)
    assert_accepted(verdicts[1], backoff_trace)
