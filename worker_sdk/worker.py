"""The worker: long-polls a task queue and runs workflow tasks and activities.

Workflow tasks run in the worker's event loop on cached ``WorkflowInstance`` objects
(a bounded LRU; an instance continues from the events it has already seen when the
server's ``previous_started_event_id`` shows nothing happened elsewhere meanwhile,
otherwise the run is replayed from scratch). Activities run as asyncio tasks, sync
ones in a thread pool. Concurrency is bounded by ``max_concurrent_activities`` and
``max_concurrent_workflow_tasks``; ``shutdown()`` stops polling, lets in-flight
activities finish within ``graceful_shutdown_timeout`` and is safe to call twice.
``interceptors`` (``WorkerInterceptor``, interceptor.py) wrap the handling of each
workflow task, a supported hook for tests and instrumentation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, timedelta
from types import TracebackType
from typing import Any

from tideflow.api.v1 import common_pb2, service_pb2
from tideflow.api.v1.command_pb2 import CommandType
from tideflow.api.v1.history_pb2 import WorkflowTaskFailedCause

from . import activity as activity_mod
from . import exceptions as exc
from ._workflow_instance import WorkflowInstance
from .client import Client
from .interceptor import WorkerInterceptor, WorkflowTaskHandler
from .workflow import WorkflowDefinition, definition_of

log = logging.getLogger("tideflow.worker")

_POLL_RPC_TIMEOUT_S = 70.0
_MAX_EAGER_ACTIVITIES = 3


class Worker:
    def __init__(
        self,
        client: Client,
        *,
        task_queue: str,
        workflows: Sequence[type] = (),
        activities: Sequence[Any] = (),
        max_concurrent_activities: int = 100,
        max_concurrent_workflow_tasks: int = 100,
        max_cached_workflows: int = 1000,
        workflow_pollers: int = 2,
        activity_pollers: int = 2,
        activity_executor: concurrent.futures.Executor | None = None,
        graceful_shutdown_timeout: timedelta = timedelta(0),
        sticky_queue_schedule_to_start_timeout: timedelta = timedelta(seconds=5),
        identity: str | None = None,
        interceptors: Sequence[WorkerInterceptor] = (),
    ) -> None:
        if not workflows and not activities:
            raise ValueError("a worker needs at least one workflow or activity")
        self._client = client
        self.task_queue = task_queue
        self._workflows: dict[str, WorkflowDefinition] = {}
        for wf in workflows:
            d = definition_of(wf)
            if d.name in self._workflows:
                raise ValueError(f"workflow type {d.name!r} registered twice")
            self._workflows[d.name] = d
        self._activities: dict[str, activity_mod.ActivityDefinition] = {}
        for fn in activities:
            a = activity_mod.definition_of(fn)
            if a.name in self._activities:
                raise ValueError(f"activity type {a.name!r} registered twice")
            self._activities[a.name] = a
        self._activity_slots = asyncio.Semaphore(max_concurrent_activities)
        self._workflow_slots = asyncio.Semaphore(max_concurrent_workflow_tasks)
        self._max_cached = max_cached_workflows
        # Sticky execution: while this worker caches a run, the server sends its next
        # workflow tasks here with only the new events (0 cached workflows: off).
        self._sticky_queue = (
            f"{task_queue}-sticky-{uuid.uuid4().hex}" if workflows and max_cached_workflows else ""
        )
        self._sticky_timeout = sticky_queue_schedule_to_start_timeout
        self._cache: OrderedDict[str, WorkflowInstance] = OrderedDict()
        self._workflow_pollers = workflow_pollers if workflows else 0
        self._activity_pollers = activity_pollers if activities else 0
        self._executor = activity_executor
        self._own_executor = False
        self._graceful = graceful_shutdown_timeout.total_seconds()
        self.identity = identity or client.identity
        self._pollers: list[asyncio.Task[None]] = []
        self._running_activities: set[asyncio.Task[None]] = set()
        self._running_workflow_tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._shutdown_started = False
        self._stopped = asyncio.Event()
        # The first interceptor is outermost: wrap from the innermost out.
        handler: WorkflowTaskHandler = self._handle_workflow_task
        for interceptor in reversed(interceptors):
            handler = interceptor.intercept_workflow_task(handler)
        self._workflow_task_handler = handler

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Worker:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        if (
            self._activities
            and self._executor is None
            and any(not a.is_async for a in self._activities.values())
        ):
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=32, thread_name_prefix="tideflow-activity"
            )
            self._own_executor = True
        for i in range(self._workflow_pollers):
            self._pollers.append(
                asyncio.create_task(
                    self._poll_workflow_tasks(self.task_queue), name=f"wf-poller-{i}"
                )
            )
            if self._sticky_queue:
                self._pollers.append(
                    asyncio.create_task(
                        self._poll_workflow_tasks(self._sticky_queue), name=f"sticky-poller-{i}"
                    )
                )
        for i in range(self._activity_pollers):
            self._pollers.append(
                asyncio.create_task(self._poll_activity_tasks(), name=f"act-poller-{i}")
            )

    async def run(self) -> None:
        """Run until ``shutdown()`` is called (from another task) or this is cancelled."""
        self.start()
        try:
            await self._stopped.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        if self._shutdown_started:
            await self._stopped.wait()
            return
        self._shutdown_started = True
        for task in self._pollers:
            task.cancel()
        await asyncio.gather(*self._pollers, return_exceptions=True)
        if self._sticky_queue:
            # Give back the sticky queue so cached runs move on without waiting out
            # the sticky timeout; best effort (the timeout covers a failure).
            request = service_pb2.ShutdownWorkerRequest(
                namespace=self._client.namespace,
                sticky_task_queue=self._sticky_queue,
                identity=self.identity,
            )
            try:
                await self._client.call(
                    self._client.service.ShutdownWorker, request, timeout=5, retry=False
                )
            except exc.RPCError as error:
                log.debug("could not give back sticky queue: %s", error)
        if self._running_workflow_tasks:
            await asyncio.gather(*self._running_workflow_tasks, return_exceptions=True)
        if self._running_activities:
            _, pending = (
                await asyncio.wait(self._running_activities, timeout=self._graceful or None)
                if self._graceful
                else (set(), set(self._running_activities))
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._running_activities, return_exceptions=True)
        for instance in self._cache.values():
            instance.dispose()
        self._cache.clear()
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()

    # -------------------------------------------------------- workflow tasks

    async def _poll_workflow_tasks(self, queue: str) -> None:
        client = self._client
        request = service_pb2.PollWorkflowTaskRequest(
            namespace=client.namespace, identity=self.identity
        )
        request.task_queue.name = queue
        while True:
            await self._workflow_slots.acquire()
            try:
                response = await client.call(
                    client.service.PollWorkflowTask, request, timeout=_POLL_RPC_TIMEOUT_S
                )
            except asyncio.CancelledError:
                self._workflow_slots.release()
                raise
            except exc.RPCError as error:
                self._workflow_slots.release()
                if error.status == "DEADLINE_EXCEEDED":
                    continue
                log.warning("workflow task poll failed: %s", error)
                await asyncio.sleep(1.0)
                continue
            if not response.task_token:
                self._workflow_slots.release()
                continue
            self._spawn_workflow_task(response)

    def _spawn_workflow_task(self, response: service_pb2.PollWorkflowTaskResponse) -> None:
        """Run a workflow task whose slot is already taken (released when it ends)."""
        task = asyncio.create_task(self._run_workflow_task(response))
        self._running_workflow_tasks.add(task)
        task.add_done_callback(self._running_workflow_tasks.discard)

    async def _run_workflow_task(self, task: service_pb2.PollWorkflowTaskResponse) -> None:
        try:
            await self._workflow_task_handler(task)
        except asyncio.CancelledError:
            raise
        except exc.RPCError as error:
            log.warning("workflow task of %s: %s", task.workflow_execution.workflow_id, error)
        except Exception:
            log.exception(
                "workflow task of %s crashed the handler", task.workflow_execution.workflow_id
            )
        finally:
            self._workflow_slots.release()

    def _instance_for(
        self, task: service_pb2.PollWorkflowTaskResponse, definition: WorkflowDefinition
    ) -> WorkflowInstance:
        run_id = task.workflow_execution.run_id
        instance = self._cache.pop(run_id, None)
        if (
            instance is not None
            and instance.last_started_event_id == task.previous_started_event_id != 0
        ):
            self._cache[run_id] = instance
            return instance
        if instance is not None:
            instance.dispose()
        instance = WorkflowInstance(  # type: ignore[abstract]
            definition,
            namespace=self._client.namespace,
            workflow_id=task.workflow_execution.workflow_id,
            run_id=run_id,
            task_queue=self.task_queue,
            converter=self._client.data_converter,
        )
        # Make room first, so the run being worked on is never the one evicted.
        while self._cache and len(self._cache) >= self._max_cached:
            _, evicted = self._cache.popitem(last=False)
            evicted.dispose()
        self._cache[run_id] = instance
        return instance

    def _evict(self, run_id: str) -> None:
        instance = self._cache.pop(run_id, None)
        if instance is not None:
            instance.dispose()

    async def _handle_workflow_task(self, task: service_pb2.PollWorkflowTaskResponse) -> None:
        client = self._client
        run_id = task.workflow_execution.run_id
        definition = self._workflows.get(task.workflow_type.name)
        if definition is None:
            await self._fail_workflow_task(
                task,
                WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_UNKNOWN_WORKFLOW_TYPE,
                exc.ApplicationError(
                    f"workflow type {task.workflow_type.name!r} is not registered on this worker "
                    f"(registered: {sorted(self._workflows)})"
                ),
            )
            return
        if task.HasField("query"):
            await self._answer_query(task, definition)
            return
        events = task.history.events
        cached = self._cache.get(run_id)
        if (
            events
            and events[0].event_id != 1
            and (cached is None or cached.last_started_event_id != task.previous_started_event_id)
        ):
            # A sticky task (new events only) for a run this worker no longer caches.
            await self._fail_workflow_task(
                task,
                WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_RESET_STICKY_TASK_QUEUE,
                exc.ApplicationError("run not in this worker's cache; resend the full history"),
            )
            return
        instance = self._instance_for(task, definition)
        try:
            commands = instance.process(events)
            if commands is None:
                raise RuntimeError("history ended without an open workflow task")
        except exc.NonDeterminismError as error:
            self._evict(run_id)
            log.warning("workflow %s: %s", task.workflow_execution.workflow_id, error)
            await self._fail_workflow_task(
                task,
                WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_NON_DETERMINISTIC_ERROR,
                error,
            )
            return
        except Exception as error:
            self._evict(run_id)
            log.warning(
                "workflow %s: workflow task failed: %r",
                task.workflow_execution.workflow_id,
                error,
                exc_info=True,
            )
            await self._fail_workflow_task(
                task,
                WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_WORKFLOW_WORKER_UNHANDLED_FAILURE,
                error,
            )
            return
        reserved = await self._reserve_eager_activities(commands)
        request = service_pb2.RespondWorkflowTaskCompletedRequest(
            task_token=task.task_token, commands=commands, identity=self.identity
        )
        if self._sticky_queue and not instance._completed:
            sticky = request.sticky_attributes
            sticky.worker_task_queue.name = self._sticky_queue
            sticky.worker_task_queue.kind = common_pb2.TASK_QUEUE_KIND_STICKY
            sticky.worker_task_queue.normal_name = self.task_queue
            sticky.schedule_to_start_timeout.FromTimedelta(self._sticky_timeout)
        try:
            response = await client.call(client.service.RespondWorkflowTaskCompleted, request)
        except BaseException:
            for _ in range(reserved):
                self._activity_slots.release()
            self._evict(run_id)  # our view may be ahead of what the server recorded
            raise
        for _ in range(reserved - len(response.activity_tasks)):
            self._activity_slots.release()
        for activity_task in response.activity_tasks:
            self._spawn_activity(activity_task)
        if instance._completed or not self._max_cached:
            self._evict(run_id)

    async def _answer_query(
        self, task: service_pb2.PollWorkflowTaskResponse, definition: WorkflowDefinition
    ) -> None:
        """Replay the run into a fresh instance (the cached one may be mid-task) and ask
        its query handler; nothing is written to history."""
        client = self._client
        request = service_pb2.RespondQueryTaskCompletedRequest(
            task_token=task.task_token, namespace=client.namespace
        )
        instance = WorkflowInstance(  # type: ignore[abstract]
            definition,
            namespace=client.namespace,
            workflow_id=task.workflow_execution.workflow_id,
            run_id=task.workflow_execution.run_id,
            task_queue=self.task_queue,
            converter=client.data_converter,
        )
        try:
            instance.process(task.history.events, replay_only=True)
            # Signals etc. recorded after the last completed task count too (a query
            # must see a signal that was accepted before it).
            instance.catch_up_for_query()
            query = task.query
            answer = instance.query(
                query.query_type, query.query_args if query.HasField("query_args") else None
            )
            request.completed_type = service_pb2.QUERY_RESULT_TYPE_ANSWERED
            request.query_result.CopyFrom(client.data_converter.to_payloads([answer]))
        except Exception as error:
            request.completed_type = service_pb2.QUERY_RESULT_TYPE_FAILED
            request.error_message = f"{type(error).__name__}: {error}"
            request.failure.CopyFrom(client.data_converter.to_failure(error))
        finally:
            instance.dispose()
        await client.call(client.service.RespondQueryTaskCompleted, request)

    async def _reserve_eager_activities(self, commands: list[Any]) -> int:
        """Ask the server to start activities this worker can run right away; each
        one takes an activity slot now, so the worker never over-commits."""
        if not self._activity_pollers or self._shutdown_started:
            return 0
        reserved = 0
        for command in commands:
            if command.command_type != CommandType.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK:
                continue
            attrs = command.schedule_activity_task_command_attributes
            if (
                reserved >= _MAX_EAGER_ACTIVITIES
                or attrs.task_queue.name != self.task_queue
                or attrs.activity_type.name not in self._activities
                or self._activity_slots.locked()
            ):
                continue
            await self._activity_slots.acquire()  # free slot: returns at once
            attrs.request_eager_execution = True
            reserved += 1
        return reserved

    async def _fail_workflow_task(
        self, task: service_pb2.PollWorkflowTaskResponse, cause: int, error: BaseException
    ) -> None:
        client = self._client
        request = service_pb2.RespondWorkflowTaskFailedRequest(
            task_token=task.task_token,
            cause=cause,  # type: ignore[arg-type]
            identity=self.identity,
        )
        request.failure.CopyFrom(client.data_converter.to_failure(error))
        await client.call(client.service.RespondWorkflowTaskFailed, request)

    # ------------------------------------------------------------ activities

    async def _poll_activity_tasks(self) -> None:
        client = self._client
        request = service_pb2.PollActivityTaskRequest(
            namespace=client.namespace, identity=self.identity
        )
        request.task_queue.name = self.task_queue
        while True:
            await self._activity_slots.acquire()
            try:
                response = await client.call(
                    client.service.PollActivityTask, request, timeout=_POLL_RPC_TIMEOUT_S
                )
            except asyncio.CancelledError:
                self._activity_slots.release()
                raise
            except exc.RPCError as error:
                self._activity_slots.release()
                if error.status == "DEADLINE_EXCEEDED":
                    continue
                log.warning("activity task poll failed: %s", error)
                await asyncio.sleep(1.0)
                continue
            if not response.task_token:
                self._activity_slots.release()
                continue
            self._spawn_activity(response)

    def _spawn_activity(self, response: service_pb2.PollActivityTaskResponse) -> None:
        """Run an activity task whose slot is already taken (released when it ends)."""
        task = asyncio.create_task(self._run_activity(response))
        self._running_activities.add(task)
        task.add_done_callback(self._running_activities.discard)

    async def _run_activity(self, task: service_pb2.PollActivityTaskResponse) -> None:
        try:
            await self._execute_activity(task)
        except asyncio.CancelledError:
            raise
        except exc.RPCError as error:
            log.warning("activity %s: could not report outcome: %s", task.activity_id, error)
        except Exception:
            log.exception("activity %s crashed the handler", task.activity_id)
        finally:
            self._activity_slots.release()

    async def _report_cancelled(
        self, task: service_pb2.PollActivityTaskResponse, heartbeater: _Heartbeater
    ) -> None:
        client = self._client
        request = service_pb2.RespondActivityTaskCanceledRequest(
            task_token=task.task_token, identity=self.identity
        )
        if heartbeater.last_details is not None:
            request.details.CopyFrom(
                client.data_converter.to_payloads(list(heartbeater.last_details))
            )
        await client.call(client.service.RespondActivityTaskCanceled, request)

    async def _execute_activity(self, task: service_pb2.PollActivityTaskResponse) -> None:
        client = self._client
        converter = client.data_converter
        definition = self._activities.get(task.activity_type.name)
        heartbeater = _Heartbeater(client, task, self.identity)
        try:
            if definition is None:
                raise exc.ApplicationError(
                    f"activity type {task.activity_type.name!r} is not registered on this worker "
                    f"(registered: {sorted(self._activities)})",
                    type="NotFoundError",
                )
            args = converter.from_payloads(
                task.input if task.HasField("input") else None, definition.arg_types
            )
            info = _activity_info(task, converter, self.task_queue)
            ctx = activity_mod._Context(info=info, heartbeat=heartbeater.record)
            heartbeater.context = ctx
            if definition.is_async:
                # The server's cancellation (seen through a heartbeat) cancels this task.
                heartbeater.activity_task = asyncio.current_task()
            token = activity_mod._current.set(ctx)
            try:
                if definition.is_async:
                    result = await definition.fn(*args)
                else:
                    loop = asyncio.get_running_loop()
                    context = contextvars.copy_context()
                    result = await loop.run_in_executor(
                        self._executor, lambda: context.run(definition.fn, *args)
                    )
            finally:
                activity_mod._current.reset(token)
        except asyncio.CancelledError:
            await heartbeater.stop()
            current = asyncio.current_task()
            if not heartbeater.cancelled_by_server or current is None:
                raise
            current.uncancel()  # our own cancellation, requested by the server: report it
            await self._report_cancelled(task, heartbeater)
            return
        except Exception as error:
            await heartbeater.stop()
            if heartbeater.cancelled_by_server and isinstance(
                error, (exc.CancelledError, asyncio.CancelledError)
            ):
                await self._report_cancelled(task, heartbeater)
                return
            request = service_pb2.RespondActivityTaskFailedRequest(
                task_token=task.task_token, identity=self.identity
            )
            request.failure.CopyFrom(converter.to_failure(error))
            if heartbeater.last_details is not None:
                request.last_heartbeat_details.CopyFrom(
                    converter.to_payloads(list(heartbeater.last_details))
                )
            await client.call(client.service.RespondActivityTaskFailed, request)
            return
        await heartbeater.stop()
        completed = service_pb2.RespondActivityTaskCompletedRequest(
            task_token=task.task_token, identity=self.identity
        )
        completed.result.CopyFrom(converter.to_payloads([result]))
        # Offer to run the workflow task this completion schedules (one slot reserved).
        eager = (
            self._workflow_pollers > 0
            and not self._shutdown_started
            and task.workflow_type.name in self._workflows
            and not self._workflow_slots.locked()
        )
        if eager:
            await self._workflow_slots.acquire()  # free slot: returns at once
            completed.eager_workflow_task_queue = self.task_queue
            completed.sticky_task_queue = self._sticky_queue
        try:
            response = await client.call(client.service.RespondActivityTaskCompleted, completed)
        except BaseException:
            if eager:
                self._workflow_slots.release()
            raise
        if response.workflow_task.task_token:
            self._spawn_workflow_task(response.workflow_task)
        elif eager:
            self._workflow_slots.release()


def _activity_info(
    task: service_pb2.PollActivityTaskResponse, converter: Any, task_queue: str
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
        heartbeat_details=converter.from_payloads(task.heartbeat_details)
        if task.HasField("heartbeat_details")
        else [],
        task_token=task.task_token,
    )


class _Heartbeater:
    """Sends an activity's heartbeats, at most one per throttle interval; the newest
    details always reach the server. Thread-safe: sync activities call ``record``."""

    def __init__(
        self, client: Client, task: service_pb2.PollActivityTaskResponse, identity: str
    ) -> None:
        self._client = client
        self._task = task
        self._identity = identity
        self._loop = asyncio.get_running_loop()
        hb = (
            task.heartbeat_timeout.ToMicroseconds() / 1_000_000
            if task.HasField("heartbeat_timeout")
            else 0
        )
        self._interval = min(max(hb * 0.8, 0.05), 30.0) if hb else 30.0
        self.last_details: tuple[Any, ...] | None = None
        self._pending = False
        self._sender: asyncio.Task[None] | None = None
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
        self.last_details = details
        self._pending = True
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_loop())

    async def _send_loop(self) -> None:
        client = self._client
        while self._pending:
            self._pending = False
            request = service_pb2.RecordActivityHeartbeatRequest(
                task_token=self._task.task_token, identity=self._identity
            )
            if self.last_details:
                request.details.CopyFrom(client.data_converter.to_payloads(list(self.last_details)))
            try:
                response = await client.call(
                    client.service.RecordActivityHeartbeat, request, retry=False
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

    async def stop(self) -> None:
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
