"""The worker's activity role: polls activity tasks and runs them.

Async activities run as tasks of the worker, sync ones in a thread pool. Each running
activity owns a ``TaskGroup`` for its heartbeat sender, which also carries the server's
cancellation back: a heartbeat answered with ``cancel_requested`` (or NOT_FOUND: the
attempt is over for the server) cancels an async activity's task and sets
``activity.is_cancelled()`` for a sync one. A completion may bring the run's next
workflow task to run here at once (eager): its slot is taken before the completion is
sent and the task the server returns is handed over to the workflow role.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any

from tideflow.api.v1 import service_pb2

from . import activity as activity_mod
from . import exceptions as exc
from ._poller import PollLoop, Slots, WorkerContext
from .client import Client
from .interceptor import ActivityHandler, WorkerInterceptor

log = logging.getLogger("tideflow.worker")


@dataclass(frozen=True, slots=True, kw_only=True)
class EagerWorkflowTasks:
    """Where the workflow task an activity completion schedules may run at once: the
    workflow role's slots and sticky queue, and the workflow types it runs."""

    slots: Slots[service_pb2.PollWorkflowTaskResponse]
    sticky_queue: str
    workflow_types: frozenset[str]


class ActivityWorker:
    """Polls the task queue for activity tasks and runs them."""

    def __init__(
        self,
        context: WorkerContext,
        *,
        activities: dict[str, activity_mod.ActivityDefinition],
        slots: Slots[service_pb2.PollActivityTaskResponse],
        pollers: int,
        executor: concurrent.futures.Executor | None,
        eager_workflow_tasks: EagerWorkflowTasks | None,
        interceptors: Sequence[WorkerInterceptor] = (),
    ) -> None:
        self._client = context.client
        self._respond = context.respond
        self._interceptors = tuple(reversed(interceptors))
        self._task_queue = task_queue = context.task_queue
        self._identity = context.identity
        self._activities = activities
        self._slots = slots
        self._executor = executor
        self._eager = eager_workflow_tasks
        self._loop = PollLoop(
            role="activity",
            queues=[task_queue],
            pollers=pollers,
            slots=slots,
            poll=context.long_poll(
                self._client.service.PollActivityTask, service_pb2.PollActivityTaskRequest
            ),
            handle=context.timed("activity", self._execute),
            describe=lambda task: f"activity {task.activity_id}",
        )

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Poll and run activities while inside."""
        return self._loop.running()

    async def stop_polling(self) -> None:
        await self._loop.stop_polling()

    async def drain(self, grace: float) -> None:
        """Let running activities finish for ``grace`` seconds, then cancel the rest
        and wait for them (they report nothing: the server retries them)."""
        if grace:
            try:
                async with asyncio.timeout(grace):
                    await self._slots.idle()
            except TimeoutError:
                pass
        self._loop.cancel_in_flight()
        await self._slots.idle()

    # ------------------------------------------------------------ execution

    async def _execute(self, task: service_pb2.PollActivityTaskResponse) -> None:
        """Run one activity task and report its outcome."""
        async with asyncio.TaskGroup() as heartbeats:
            heartbeater = _Heartbeater(self._client, task, self._identity, heartbeats)
            try:
                result = await self._intercepted(heartbeater)(task)
            except asyncio.CancelledError:
                heartbeater.stop()
                current = asyncio.current_task()
                # Cancelled by the server (through a heartbeat) and by no one else:
                # report it. Any other cancellation is the worker's and goes on.
                if not heartbeater.cancelled_by_server or current is None or current.uncancel():
                    raise
                await self._report_cancelled(task, heartbeater)
                return
            except Exception as error:
                heartbeater.stop()
                if heartbeater.cancelled_by_server and isinstance(error, exc.CancelledError):
                    await self._report_cancelled(task, heartbeater)
                else:
                    await self._report_failed(task, heartbeater, error)
                return
            heartbeater.stop()
        await self._report_completed(task, result)

    def _intercepted(self, heartbeater: _Heartbeater) -> ActivityHandler:
        """The activity's code for this attempt, inside the interceptors' chain (the
        first interceptor outermost)."""

        async def run(task: service_pb2.PollActivityTaskResponse) -> Any:
            return await self._run_activity_code(task, heartbeater)

        handler: ActivityHandler = run
        for interceptor in self._interceptors:
            handler = interceptor.intercept_activity(handler)
        return handler

    async def _run_activity_code(
        self, task: service_pb2.PollActivityTaskResponse, heartbeater: _Heartbeater
    ) -> Any:
        definition = self._activities.get(task.activity_type.name)
        if definition is None:
            raise exc.ApplicationError(
                f"activity type {task.activity_type.name!r} is not registered on this worker "
                f"(registered: {sorted(self._activities)})",
                type="NotFoundError",
            )
        converter = self._client.data_converter
        args = converter.from_payloads(
            task.input if task.HasField("input") else None, definition.arg_types
        )
        # Decoded now, so details this worker cannot decode fail the attempt up front.
        details = (
            converter.from_payloads(task.heartbeat_details)
            if task.HasField("heartbeat_details")
            else []
        )
        ctx = activity_mod._Context(
            make_info=functools.partial(_activity_info, task, self._task_queue, details),
            heartbeat=heartbeater.record,
        )
        heartbeater.context = ctx
        if definition.is_async:
            # The server's cancellation (seen through a heartbeat) cancels this task.
            heartbeater.activity_task = asyncio.current_task()
        token = activity_mod._current.set(ctx)
        try:
            if definition.is_async:
                return await definition.fn(*args)
            loop = asyncio.get_running_loop()
            context = contextvars.copy_context()
            return await loop.run_in_executor(
                self._executor, lambda: context.run(definition.fn, *args)
            )
        finally:
            activity_mod._current.reset(token)

    async def _report_completed(
        self, task: service_pb2.PollActivityTaskResponse, result: Any
    ) -> None:
        client = self._client
        completed = service_pb2.RespondActivityTaskCompletedRequest(
            task_token=task.task_token, identity=self._identity
        )
        completed.result.CopyFrom(client.data_converter.to_payloads([result]))
        # Offer to run the workflow task this completion schedules (one slot reserved).
        eager = self._eager
        reserved = (
            eager is not None
            and task.workflow_type.name in eager.workflow_types
            and await eager.slots.try_reserve()
        )
        if eager is not None and reserved:
            completed.eager_workflow_task_queue = self._task_queue
            completed.sticky_task_queue = eager.sticky_queue
        try:
            response = await self._respond(completed, task.run_owner)
        except BaseException:
            if eager is not None and reserved:
                eager.slots.release()
            raise
        if eager is not None and reserved:
            if response.workflow_task.task_token:
                eager.slots.hand_over(response.workflow_task)
            else:
                eager.slots.release()

    async def _report_failed(
        self,
        task: service_pb2.PollActivityTaskResponse,
        heartbeater: _Heartbeater,
        error: BaseException,
    ) -> None:
        client = self._client
        converter = client.data_converter
        request = service_pb2.RespondActivityTaskFailedRequest(
            task_token=task.task_token, identity=self._identity
        )
        request.failure.CopyFrom(converter.to_failure(error))
        if heartbeater.last_details is not None:
            request.last_heartbeat_details.CopyFrom(
                converter.to_payloads(list(heartbeater.last_details))
            )
        await self._respond(request, task.run_owner)

    async def _report_cancelled(
        self, task: service_pb2.PollActivityTaskResponse, heartbeater: _Heartbeater
    ) -> None:
        client = self._client
        request = service_pb2.RespondActivityTaskCanceledRequest(
            task_token=task.task_token, identity=self._identity
        )
        if heartbeater.last_details is not None:
            request.details.CopyFrom(
                client.data_converter.to_payloads(list(heartbeater.last_details))
            )
        service = client.service_for(task.run_owner)
        await client.call(service.RespondActivityTaskCanceled, request)


def _activity_info(
    task: service_pb2.PollActivityTaskResponse, task_queue: str, heartbeat_details: list[Any]
) -> activity_mod.Info:
    def optional(d: Any, field: str) -> timedelta | None:
        return d.ToTimedelta() if task.HasField(field) and d.ToMicroseconds() > 0 else None

    return activity_mod.Info(
        activity_id=task.activity_id,
        activity_type=task.activity_type.name,
        attempt=task.attempt,
        task_queue=task_queue,
        workflow_id=task.workflow_execution.workflow_id,
        workflow_run_id=task.workflow_execution.run_id,
        workflow_type=task.workflow_type.name,
        workflow_namespace=task.workflow_namespace,
        scheduled_time=task.scheduled_time.ToDatetime(tzinfo=UTC),
        current_attempt_scheduled_time=task.current_attempt_scheduled_time.ToDatetime(tzinfo=UTC),
        started_time=task.started_time.ToDatetime(tzinfo=UTC),
        start_to_close_timeout=optional(task.start_to_close_timeout, "start_to_close_timeout"),
        schedule_to_close_timeout=optional(
            task.schedule_to_close_timeout, "schedule_to_close_timeout"
        ),
        heartbeat_timeout=optional(task.heartbeat_timeout, "heartbeat_timeout"),
        heartbeat_details=heartbeat_details,
        task_token=task.task_token,
    )


class _Heartbeater:
    """Sends an activity's heartbeats, at most one per throttle interval; the newest
    details always reach the server. Thread-safe: sync activities call ``record``.
    The sender task belongs to the activity's ``TaskGroup``."""

    def __init__(
        self,
        client: Client,
        task: service_pb2.PollActivityTaskResponse,
        identity: str,
        tasks: asyncio.TaskGroup,
    ) -> None:
        self._client = client
        self._task = task
        self._identity = identity
        self._tasks = tasks
        self._loop = asyncio.get_running_loop()
        # Duration.ToMicroseconds without protobuf's pure-Python layer (an unset or
        # empty timeout, as the server sends it, is 0: no heartbeat timeout).
        timeout = task.heartbeat_timeout
        hb = (timeout.seconds * 1_000_000 + timeout.nanos // 1000) / 1_000_000
        self._interval = min(max(hb * 0.8, 0.05), 30.0) if hb else 30.0
        self.last_details: tuple[Any, ...] | None = None
        self._pending = False
        self._sender: asyncio.Task[None] | None = None
        self._stopped = False
        self.context: activity_mod._Context | None = None
        self.activity_task: asyncio.Task[Any] | None = None
        self.cancelled_by_server = False

    def record(self, details: tuple[Any, ...]) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._record(details)
        else:
            self._loop.call_soon_threadsafe(self._record, details)

    def _record(self, details: tuple[Any, ...]) -> None:
        if self._stopped:
            return  # the outcome is being reported (a sync activity's late heartbeat)
        self.last_details = details
        self._pending = True
        if self._sender is None or self._sender.done():
            self._sender = self._tasks.create_task(self._send_loop())

    async def _send_loop(self) -> None:
        client = self._client
        while self._pending:
            self._pending = False
            request = service_pb2.RecordActivityHeartbeatRequest(
                task_token=self._task.task_token, identity=self._identity
            )
            try:
                if self.last_details:
                    details = client.data_converter.to_payloads(list(self.last_details))
                    request.details.CopyFrom(details)
            except Exception:
                # The activity's bad details must not take its TaskGroup down; its
                # outcome report, which carries them too, fails the same way.
                log.warning(
                    "heartbeat details of activity %s cannot be encoded",
                    self._task.activity_id,
                    exc_info=True,
                )
                await asyncio.sleep(self._interval)
                continue
            try:
                response = await client.call(
                    client.service_for(self._task.run_owner).RecordActivityHeartbeat,
                    request,
                    retry=False,
                )
            except exc.NotFoundError:
                # The attempt is over for the server (run closed, timed out, retried
                # elsewhere): stop working on it, as a cancellation.
                self._cancel_activity()
            except exc.RPCError as error:
                log.debug("heartbeat of activity %s failed: %s", self._task.activity_id, error)
            else:
                if response.cancel_requested:
                    self._cancel_activity()
            await asyncio.sleep(self._interval)

    def _cancel_activity(self) -> None:
        if self.cancelled_by_server:
            return
        self.cancelled_by_server = True
        if self.context is not None:
            self.context.cancelled.set()
        if self.activity_task is not None and not self.activity_task.done():
            self.activity_task.cancel()

    def stop(self) -> None:
        """Stop sending (the outcome carries the last details); the TaskGroup that
        owns the sender awaits its cancellation."""
        self._stopped = True
        if self._sender is not None:
            self._sender.cancel()
