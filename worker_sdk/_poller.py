"""The poll loop both worker roles share: slots, pollers, in-flight tasks, shutdown.

A role (workflow tasks, activities) has one ``Slots``: the bound on how many of its
tasks run at once. A poller takes a slot before it long-polls, so the worker never
accepts a task it has no room for; the slot stays with the task until its handler
returns. The other role may reserve a slot too (eager execution: a workflow task
completion that starts an activity here, an activity completion that brings the
next workflow task) and hands the task over through ``Slots.hand_over``; the
``PollLoop`` that owns the slots runs handed-over tasks like polled ones. That
handover is the only link between the roles, so neither needs the other object.

Every task has an owner: ``PollLoop.running()`` holds a ``TaskGroup`` with the
pollers (under one task that ``stop_polling`` cancels and awaits) and each in-flight
task, handed over ones included (``hand_over`` starts them in that group at once,
with no dispatcher task between the roles). Leaving ``running()`` waits for all of
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from tideflow.api.v1 import common_pb2, service_pb2

from . import exceptions as exc
from ._eager_start import let_started_task_send
from .client import Client
from .codec import PayloadCodecError
from .metrics import WorkerMetrics

log = logging.getLogger("tideflow.worker")

T = TypeVar("T")
R = TypeVar("R")

# A long poll's deadline; the server answers an empty poll before it (DEADLINE_EXCEEDED
# from the client side means the same: poll again).
POLL_RPC_TIMEOUT_S = 70.0

# After a failed poll (server down, bad request) wait this long before the next one,
# so a worker does not spin against an unavailable server.
POLL_ERROR_BACKOFF_S = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerContext:
    """What both roles of a worker share: its client, task queue and identity, and
    what its activity polls advertise (site, tier, capabilities: placement.py)."""

    client: Client
    task_queue: str
    identity: str
    placement: common_pb2.WorkerPlacement | None = None

    # The worker's Prometheus metrics (worker_sdk/metrics.py); None: not measured.
    metrics: WorkerMetrics | None = None
    # Task completions go through the client's batcher (worker_sdk/_completions.py);
    # False: each is its own RPC.
    batch_completions: bool = True

    async def respond(self, request: Any, run_owner: str = "") -> Any:
        """Send a task completion (a RespondWorkflowTaskCompleted, RespondActivity-
        TaskCompleted or RespondActivityTaskFailed request) to ``run_owner``, the node
        that owns the task's run, if the client is connected to it; its response."""
        if self.batch_completions:
            return await self.client.completions.send(request, run_owner)
        return await self.client.completions.send_alone(request, run_owner)

    def long_poll(
        self, method: Callable[..., Awaitable[R]], request_type: Callable[..., Any]
    ) -> Callable[[str], Awaitable[R | None]]:
        """A ``PollLoop.poll`` function: one long poll of a queue with ``method``."""

        async def poll(queue: str) -> R | None:
            request = request_type(namespace=self.client.namespace, identity=self.identity)
            request.task_queue.name = queue
            if self.placement is not None and isinstance(
                request, service_pb2.PollActivityTaskRequest
            ):
                request.worker.CopyFrom(self.placement)
            response = await self.client.call(method, request, timeout=POLL_RPC_TIMEOUT_S)
            return response if getattr(response, "task_token", b"") else None

        if self.metrics is None:
            return poll
        kind = "activity" if "Activity" in request_type.__name__ else "workflow"
        return self.metrics.timed_poll(self.task_queue, kind, poll)

    def timed(
        self, kind: str, handle: Callable[[T], Awaitable[None]]
    ) -> Callable[[T], Awaitable[None]]:
        """``handle`` measured as task execution time, if the worker has metrics."""
        if self.metrics is None:
            return handle
        return self.metrics.timed_handler(self.task_queue, kind, handle)


class Slots(Generic[T]):
    """Concurrency slots of one role, and the handover of tasks whose slot another
    role reserved. ``close()`` (at shutdown) refuses further reservations."""

    def __init__(self, limit: int) -> None:
        self._free = asyncio.Semaphore(limit)
        self._taken = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        # How the owning PollLoop starts a task (set while it runs); tasks handed over
        # while it does not wait here.
        self._start: Callable[[T], None] | None = None
        self._waiting: list[T] = []

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True

    async def acquire(self) -> None:
        """Wait for a free slot (pollers; they wait even after ``close()``)."""
        await self._free.acquire()
        self._take()

    async def try_reserve(self) -> bool:
        """Take a slot if one is free right now and the role is not shutting down."""
        if self._closed or self._free.locked():
            return False
        await self._free.acquire()  # unlocked: completes without suspending
        self._take()
        return True

    def release(self) -> None:
        self._taken -= 1
        if self._taken == 0:
            self._idle.set()
        self._free.release()

    def hand_over(self, task: T) -> None:
        """Run ``task`` on the role owning these slots; its slot is already taken."""
        if self._start is None:
            self._waiting.append(task)
        else:
            self._start(task)

    def receive(self, start: Callable[[T], None] | None) -> None:
        """Start handed-over tasks with ``start`` (the owning PollLoop, while it runs;
        None: they wait for the next one)."""
        self._start = start
        if start is not None:
            waiting, self._waiting = self._waiting, []
            for task in waiting:
                start(task)

    async def idle(self) -> None:
        """Until no slot is taken: nothing in flight, polling, reserved or handed over."""
        await self._idle.wait()

    def _take(self) -> None:
        self._taken += 1
        self._idle.clear()


class PollLoop(Generic[T]):
    """Long-polls task queues and runs each task with ``handle`` in its own task.

    Args:
        role: names the role in task names and log lines ("workflow task", "activity").
        queues: the task queues to poll, each by ``pollers`` pollers.
        slots: the role's concurrency slots (shared with the role that hands over).
        poll: one long-poll of a queue; ``None`` when it ended without a task.
        handle: runs one task to the end. ``RPCError`` and other exceptions it raises
            are logged (the server retries the task after its timeout).
        describe: a task's name for log lines.
    """

    def __init__(
        self,
        *,
        role: str,
        queues: Sequence[str],
        pollers: int,
        slots: Slots[T],
        poll: Callable[[str], Awaitable[T | None]],
        handle: Callable[[T], Awaitable[None]],
        describe: Callable[[T], str],
    ) -> None:
        self._role = role
        self._queues = tuple(queues)
        self._pollers = pollers
        self._slots = slots
        self._poll = poll
        self._handle = handle
        self._describe = describe
        self._tasks: asyncio.TaskGroup | None = None
        self._polling: asyncio.Task[None] | None = None
        # An index of the in-flight tasks (the TaskGroup owns them), for cancel_in_flight.
        self._in_flight: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Poll and run tasks while inside; on the way out stop polling, stop taking
        handed-over tasks and wait for the in-flight ones (the caller drains first)."""
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            self._polling = tasks.create_task(self._poll_all(), name=f"{self._role} pollers")
            self._slots.receive(self._start)
            try:
                yield
            finally:
                await self.stop_polling()
                # Nothing is handed over once the slots are idle (the caller drained).
                self._slots.receive(None)

    async def stop_polling(self) -> None:
        """Cancel the pollers and wait until they are gone (a cancelled poll gives its
        slot back). Safe to call again."""
        polling = self._polling
        if polling is None or polling.done():
            return
        polling.cancel()
        # asyncio.wait: the pollers' cancellation is ours, so it must not end this task.
        await asyncio.wait([polling])

    def cancel_in_flight(self) -> None:
        """Cancel every running task (shutdown past its grace period)."""
        for task in self._in_flight:
            task.cancel()

    async def _poll_all(self) -> None:
        async with asyncio.TaskGroup() as pollers:
            for queue in self._queues:
                for i in range(self._pollers):
                    pollers.create_task(self._poll_queue(queue), name=f"{self._role} poller {i}")

    async def _poll_queue(self, queue: str) -> None:
        while True:
            await self._slots.acquire()
            try:
                task = await self._poll(queue)
            except exc.RPCError as error:
                self._slots.release()
                if error.status != "DEADLINE_EXCEEDED":  # an empty long poll: poll again
                    log.warning("%s poll on %s failed: %s", self._role, queue, error)
                    await asyncio.sleep(POLL_ERROR_BACKOFF_S)
                continue
            except PayloadCodecError as error:
                # A task this worker's codec cannot decode (a key it lacks): acting on it
                # without its payloads is impossible, so leave it to the server's retry
                # after the task timeout (a worker given the key then runs it).
                self._slots.release()
                log.error("%s poll on %s: undecodable task: %s", self._role, queue, error)
                await asyncio.sleep(POLL_ERROR_BACKOFF_S)
                continue
            except BaseException:
                self._slots.release()  # cancelled by stop_polling (or a bug): no task came
                raise
            if task is None:
                self._slots.release()
                continue
            self._start(task)
            # The other pollers of the queue are still polling: this one's next poll
            # can follow the task's completion.
            await let_started_task_send()

    def _start(self, task: T) -> None:
        """Run a task whose slot is taken; the slot is released when it ends."""
        assert self._tasks is not None, "tasks start only inside running()"
        running = self._tasks.create_task(self._run(task), name=self._describe(task))
        self._in_flight.add(running)

    async def _run(self, task: T) -> None:
        try:
            await self._handle(task)
        except exc.RPCError as error:
            log.warning("%s: could not report the outcome: %s", self._describe(task), error)
        except Exception:
            # A bug in the handler must not take the worker's other tasks down with it
            # (the TaskGroup would cancel them): log it; the server retries the task.
            log.exception("%s crashed the handler", self._describe(task))
        finally:
            # Here rather than in a done callback: one loop turn less per task.
            self._in_flight.discard(asyncio.current_task())
            self._slots.release()
