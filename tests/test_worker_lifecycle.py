"""Worker lifecycle: shutdown (twice, before start, with and without a grace period),
run() until shutdown or cancellation, and that no task the worker started outlives it.

Real server on port 0 over each selected store (``store_url``); uuid task queues.
Activities block on events the test releases; nothing waits on wall-clock time.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

from helpers import events_of

from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.worker_sdk import Client, RetryPolicy, Worker, WorkflowHandle, activity, workflow

ET = EventType

# Per test key: (activity started, release it), and the keys whose activity was cancelled.
_GATES: dict[str, tuple[asyncio.Event, asyncio.Event]] = {}
_CANCELLED: list[str] = []

# Names of the tasks a worker starts (supervisor, pollers, handover, in-flight tasks).
_WORKER_TASK_PREFIXES = ("tideflow worker", "workflow task", "activity")


@activity.defn
async def gated(key: str) -> str:
    started, release = _GATES[key]
    started.set()
    try:
        await release.wait()
    except asyncio.CancelledError:
        _CANCELLED.append(key)
        raise
    return "done"


@activity.defn
async def heartbeats_unencodable_details() -> str:
    activity.heartbeat(object())  # the JSON converter cannot encode this
    return "finished anyway"


@activity.defn
async def greet(name: str) -> str:
    return f"hello {name}"


@workflow.defn
class OneActivity:
    @workflow.run
    async def run(self, name: str, key: str) -> str:
        result: str = await workflow.execute_activity(
            name,
            args=[key] if key else [],
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=RetryPolicy(maximum_attempts=1),
        )
        return result


def _gate() -> tuple[str, asyncio.Event, asyncio.Event]:
    key = f"gate-{uuid.uuid4()}"
    started, release = asyncio.Event(), asyncio.Event()
    _GATES[key] = (started, release)
    return key, started, release


def _worker_tasks() -> set[asyncio.Task[Any]]:
    return {
        t
        for t in asyncio.all_tasks()
        if not t.done() and t.get_name().startswith(_WORKER_TASK_PREFIXES)
    }


def _types(events: list[HistoryEvent]) -> list[int]:
    return [e.event_type for e in events]


async def _start(client: Client, queue: str, activity_name: str, key: str = "") -> WorkflowHandle:
    return await client.start_workflow(
        OneActivity.run, args=[activity_name, key], id=f"wf-{uuid.uuid4()}", task_queue=queue
    )


def _worker(client: Client, queue: str, **kwargs: Any) -> Worker:
    return Worker(
        client,
        task_queue=queue,
        workflows=[OneActivity],
        activities=[gated, greet, heartbeats_unencodable_details],
        **kwargs,
    )


async def test_shutdown_before_start_and_twice_leaves_no_task(client: Client, queue: str) -> None:
    never_started = _worker(client, queue)
    await never_started.shutdown()
    await never_started.shutdown()

    assert not _worker_tasks()
    worker = _worker(client, queue)
    async with worker:
        handle = await _start(client, queue, "greet", "you")
        assert await asyncio.wait_for(handle.result(), 30) == "hello you"
        assert _worker_tasks()  # pollers are running
        await asyncio.gather(worker.shutdown(), worker.shutdown())
        assert not _worker_tasks()
    # __aexit__ shuts down a third time.
    assert not _worker_tasks()


async def test_graceful_shutdown_lets_a_running_activity_finish(client: Client, queue: str) -> None:
    key, started, release = _gate()
    worker = _worker(client, queue, graceful_shutdown_timeout=timedelta(minutes=5))
    worker.start()
    handle = await _start(client, queue, "gated", key)
    await asyncio.wait_for(started.wait(), 30)
    stopping = asyncio.create_task(worker.shutdown())
    await asyncio.sleep(0)  # let shutdown() begin before the activity may finish
    release.set()
    await asyncio.wait_for(stopping, 30)
    assert key not in _CANCELLED
    assert ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED in _types(await events_of(handle))
    assert not _worker_tasks()

    # The completion's workflow task waits on the task queue for the next worker.
    async with _worker(client, queue):
        assert await asyncio.wait_for(handle.result(), 30) == "done"


async def test_shutdown_without_grace_cancels_a_running_activity(
    client: Client, queue: str
) -> None:
    key, started, _ = _gate()
    worker = _worker(client, queue)
    worker.start()
    handle = await _start(client, queue, "gated", key)
    await asyncio.wait_for(started.wait(), 30)
    await asyncio.wait_for(worker.shutdown(), 30)
    assert key in _CANCELLED
    assert not _worker_tasks()
    # The worker's cancellation is not the server's: nothing is reported (the server
    # retries the attempt after its timeout).
    types = _types(await events_of(handle))
    for reported in (
        ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
        ET.EVENT_TYPE_ACTIVITY_TASK_FAILED,
        ET.EVENT_TYPE_ACTIVITY_TASK_CANCELED,
    ):
        assert reported not in types
    await handle.terminate(reason="test over")


async def test_run_returns_after_shutdown_and_stops_when_cancelled(
    client: Client, queue: str
) -> None:
    worker = _worker(client, queue)
    running = asyncio.create_task(worker.run())
    handle = await _start(client, queue, "greet", "a")
    assert await asyncio.wait_for(handle.result(), 30) == "hello a"
    await worker.shutdown()
    await asyncio.wait_for(running, 30)
    assert running.done() and not running.cancelled()

    worker = _worker(client, queue)
    running = asyncio.create_task(worker.run())
    handle = await _start(client, queue, "greet", "b")
    assert await asyncio.wait_for(handle.result(), 30) == "hello b"
    running.cancel()
    await asyncio.wait([running], timeout=30)
    # run() shut the worker down and let the cancellation through.
    assert running.cancelled()
    assert not _worker_tasks()


async def test_unencodable_heartbeat_details_do_not_stop_the_activity(
    client: Client, queue: str
) -> None:
    async with _worker(client, queue):
        handle = await _start(client, queue, "heartbeats_unencodable_details")
        assert await asyncio.wait_for(handle.result(), 30) == "finished anyway"
