"""Workflows and activities written for the official Temporal Python SDK (temporalio), run
unchanged against tideflow's Temporal door by tests/test_temporal_sdk.py.

They live in a module of their own that imports only temporalio and the standard
library: the SDK's workflow sandbox re-imports a workflow's module, and the tests'
harness (server, database) is nothing a sandboxed workflow may import.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ApplicationErrorCategory,
    TimeoutError,
    WorkflowAlreadyStartedError,
)

# Attempts of ``flaky`` by key: the activity runs in the test's process.
ATTEMPTS: dict[str, int] = {}
FAST_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=50), maximum_attempts=5)


@activity.defn
async def greet(name: str) -> str:
    return f"hello {name}"


@activity.defn
async def flaky(key: str) -> str:
    """Fails its first two attempts, then succeeds."""
    ATTEMPTS[key] = ATTEMPTS.get(key, 0) + 1
    if ATTEMPTS[key] < 3:
        raise ApplicationError(f"attempt {ATTEMPTS[key]} of {key} failed")
    return f"{key} after {ATTEMPTS[key]} attempts"


@activity.defn
async def asks_for_a_quick_retry(key: str) -> str:
    """Fails its first attempt, naming its own retry delay (and as an expected error)."""
    ATTEMPTS[key] = ATTEMPTS.get(key, 0) + 1
    if ATTEMPTS[key] == 1:
        raise ApplicationError(
            "not yet",
            next_retry_delay=timedelta(milliseconds=50),
            category=ApplicationErrorCategory.BENIGN,
        )
    return f"{key} on attempt {ATTEMPTS[key]}"


@workflow.defn
class NextRetryDelayWorkflow:
    """The retry policy alone would wait an hour before the second attempt: the run
    completes within a test only if the failure's next_retry_delay is honoured."""

    @workflow.run
    async def run(self, key: str) -> str:
        return await workflow.execute_activity(
            asks_for_a_quick_retry,
            key,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(initial_interval=timedelta(hours=1)),
        )


@activity.defn
async def always_fails(key: str) -> str:
    raise ApplicationError(f"{key} cannot succeed", non_retryable=True, type="Broken")


@activity.defn
async def heartbeat_until_cancelled(key: str) -> str:
    """Heartbeats (its progress as details) until the workflow cancels it."""
    beat = 0
    while True:
        beat += 1
        activity.heartbeat(beat)
        await asyncio.sleep(0.05)


@activity.defn
async def completes_elsewhere() -> str:
    """Leaves its outcome to whoever holds its id (the test, by id)."""
    activity.raise_complete_async()


@workflow.defn
class AsyncCompletionWorkflow:
    @workflow.run
    async def run(self) -> str:
        return await workflow.execute_activity(
            completes_elsewhere, start_to_close_timeout=timedelta(seconds=60), activity_id="ext"
        )


@activity.defn
async def too_slow() -> str:
    await asyncio.sleep(30)
    return "never"


@workflow.defn
class TimeoutWorkflow:
    """An activity that outlives its start-to-close timeout, with no retries left."""

    @workflow.run
    async def run(self) -> str:
        try:
            await workflow.execute_activity(
                too_slow,
                start_to_close_timeout=timedelta(milliseconds=300),
                retry_policy=RetryPolicy(maximum_attempts=1),
            )
        except ActivityError as err:
            if not isinstance(err.cause, TimeoutError):
                return f"not a timeout: {type(err.cause).__name__} {err.cause}"
            kind = err.cause.type
            return f"timed out: {kind.name if kind is not None else 'of no type'}"
        raise AssertionError("too_slow finished in time")


@workflow.defn
class GreetWorkflow:
    @workflow.run
    async def run(self, name: str) -> str:
        greeting = await workflow.execute_activity(
            greet, name, start_to_close_timeout=timedelta(seconds=30)
        )
        await asyncio.sleep(0.05)  # a timer
        return greeting


@workflow.defn
class HistorySizeWorkflow:
    """The history size the SDK reports (from WorkflowTaskStarted) before and after an
    activity."""

    @workflow.run
    async def run(self) -> list[int]:
        before = workflow.info().get_current_history_size()
        await workflow.execute_activity(greet, "size", start_to_close_timeout=timedelta(seconds=30))
        return [before, workflow.info().get_current_history_size()]


@workflow.defn
class RetryWorkflow:
    @workflow.run
    async def run(self, key: str) -> list[str]:
        ok = await workflow.execute_activity(
            flaky, key, start_to_close_timeout=timedelta(seconds=30), retry_policy=FAST_RETRY
        )
        try:
            await workflow.execute_activity(
                always_fails, key, start_to_close_timeout=timedelta(seconds=30)
            )
        except ActivityError as err:
            assert isinstance(err.cause, ApplicationError)
            return [ok, f"{err.cause.type}: {err.cause.message}"]
        raise AssertionError("always_fails succeeded")


@workflow.defn
class InboxWorkflow:
    """Collects signals until ``close``; ``items`` answers a query."""

    def __init__(self) -> None:
        self._items: list[str] = []
        self._closed = False

    @workflow.run
    async def run(self, first: str) -> list[str]:
        self._items.append(first)
        await workflow.wait_condition(lambda: self._closed)
        return self._items

    @workflow.signal
    def add(self, item: str) -> None:
        self._items.append(item)

    @workflow.signal
    def close(self) -> None:
        self._closed = True

    @workflow.query
    def items(self) -> list[str]:
        return list(self._items)


@workflow.defn
class ChildWorkflow:
    @workflow.run
    async def run(self, n: int) -> int:
        return n * 10


@workflow.defn
class ParentWorkflow:
    @workflow.run
    async def run(self, n: int) -> int:
        first = await workflow.execute_child_workflow(
            ChildWorkflow.run, n, id=f"{workflow.info().workflow_id}-child-1"
        )
        second = await workflow.execute_child_workflow(
            ChildWorkflow.run, n + 1, id=f"{workflow.info().workflow_id}-child-2"
        )
        return first + second


@workflow.defn
class DuplicateChildWorkflow:
    """Starts a child, then another under the same id while the first runs."""

    @workflow.run
    async def run(self) -> str:
        child_id = f"{workflow.info().workflow_id}-child"
        # The first child is terminated when the parent closes (its close policy).
        await workflow.start_child_workflow(SleeperWorkflow.run, id=child_id)
        try:
            await workflow.start_child_workflow(SleeperWorkflow.run, id=child_id)
        except WorkflowAlreadyStartedError:
            return "the second start was refused"
        raise AssertionError("two children under one id")


@workflow.defn
class CountdownWorkflow:
    """Continues as new until ``left`` reaches 0; returns how many runs there were."""

    @workflow.run
    async def run(self, left: int, runs: int = 1) -> int:
        if left == 0:
            return runs
        workflow.continue_as_new(args=[left - 1, runs + 1])


@workflow.defn
class CancellableWorkflow:
    """Runs a heartbeating activity; cancelled, it waits for the activity to report its
    cancellation, then ends as cancelled."""

    @workflow.run
    async def run(self, key: str) -> str:
        return await workflow.execute_activity(
            heartbeat_until_cancelled,
            key,
            start_to_close_timeout=timedelta(seconds=60),
            # The SDK sends heartbeats at most every 80% of this: a cancel arrives with
            # the answer to one.
            heartbeat_timeout=timedelta(seconds=2),
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )


@workflow.defn
class SleeperWorkflow:
    """Sleeps far longer than any test: it ends by being terminated or cancelled."""

    @workflow.run
    async def run(self) -> None:
        await asyncio.sleep(3600)


@workflow.defn
class PatchedWorkflow:
    """A patch marker and a local activity (a marker of its own) in one history."""

    @workflow.run
    async def run(self, name: str) -> str:
        if workflow.patched("greet-locally"):
            greeting = await workflow.execute_local_activity(
                greet, name, start_to_close_timeout=timedelta(seconds=30)
            )
        else:
            greeting = "unpatched"
        return f"{greeting} (patched)"


@workflow.defn
class AbandonedChildWorkflow:
    """Starts a child and cancels it in the workflow task that completes the parent."""

    @workflow.run
    async def run(self) -> str:
        child = await workflow.start_child_workflow(
            SleeperWorkflow.run, id=f"{workflow.info().workflow_id}-child"
        )
        child.cancel()
        return "left"


ALL_WORKFLOWS = [
    HistorySizeWorkflow,
    NextRetryDelayWorkflow,
    AbandonedChildWorkflow,
    DuplicateChildWorkflow,
    TimeoutWorkflow,
    AsyncCompletionWorkflow,
    GreetWorkflow,
    RetryWorkflow,
    InboxWorkflow,
    ChildWorkflow,
    ParentWorkflow,
    CountdownWorkflow,
    CancellableWorkflow,
    SleeperWorkflow,
    PatchedWorkflow,
]
ALL_ACTIVITIES: list[Callable[..., Any]] = [
    greet,
    flaky,
    always_fails,
    asks_for_a_quick_retry,
    heartbeat_until_cancelled,
    completes_elsewhere,
    too_slow,
]
