"""The worker's workflow-task role: polls workflow tasks and runs them on cached runs.

Workflow tasks run in the worker's event loop on cached ``WorkflowInstanceImpl``
objects (a bounded LRU; an instance continues from the events it has already seen when
the server's ``previous_started_event_id`` shows nothing happened elsewhere meanwhile,
otherwise the run is replayed from scratch). While a run is cached its next tasks come
on this worker's sticky queue with only the new events; ``give_back_sticky_queue``
(ShutdownWorker) lets them move on at once when the worker stops. Activities a task
schedules on this worker's queue may start here at once (eager): their slots are taken
before the completion is sent and the tasks the server returns are handed over. So may
the run's next workflow task, when events arrived during this one and the run stays
cached here (``return_new_workflow_task``, a workflow task slot reserved for it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from tideflow.api.v1 import common_pb2, service_pb2
from tideflow.api.v1.command_pb2 import COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK, Command
from tideflow.api.v1.history_pb2 import HistoryEvent, WorkflowTaskFailedCause

from . import exceptions as exc
from ._local_activity_worker import LocalActivityConfig, LocalActivitySession, heartbeat_after_s
from ._poller import PollLoop, Slots, WorkerContext
from ._workflow_instance import WorkflowInstanceImpl
from .interceptor import WorkerInterceptor, WorkflowCommandsHandler, WorkflowTaskHandler
from .workflow import WorkflowDefinition

log = logging.getLogger("tideflow.worker")

_MAX_EAGER_ACTIVITIES = 3

Cause = WorkflowTaskFailedCause


@dataclass(frozen=True, slots=True, kw_only=True)
class EagerActivities:
    """Where activities a workflow task schedules may start at once: the activity
    role's slots, and the activity types it runs from the worker's task queue."""

    slots: Slots[service_pb2.PollActivityTaskResponse]
    activity_types: frozenset[str]


class WorkflowWorker:
    """Polls the task queue (and the sticky queue) and runs workflow tasks."""

    def __init__(
        self,
        context: WorkerContext,
        *,
        workflows: dict[str, WorkflowDefinition],
        slots: Slots[service_pb2.PollWorkflowTaskResponse],
        pollers: int,
        max_cached_workflows: int,
        sticky_queue: str,
        sticky_queue_schedule_to_start_timeout: timedelta,
        eager_activities: EagerActivities | None,
        local_activities: LocalActivityConfig,
        interceptors: Sequence[WorkerInterceptor],
        take_next_workflow_tasks: bool = True,
    ) -> None:
        self._client = context.client
        self._respond = context.respond
        self._task_queue = task_queue = context.task_queue
        self._metrics = context.metrics
        self._identity = context.identity
        self._workflows = workflows
        self._eager = eager_activities
        self._take_next = take_next_workflow_tasks
        self._max_cached = max_cached_workflows
        self._cache: OrderedDict[str, WorkflowInstanceImpl] = OrderedDict()
        self._local = local_activities
        # Runs whose task awaits local activities: their instances must stay (the
        # cache makes room by evicting others).
        self._busy: set[str] = set()
        self._slots = slots
        # Handlers of tasks running local activities (cancelled at shutdown past the
        # grace period), and whether that point has come.
        self._with_local_activities: set[asyncio.Task[Any]] = set()
        self._abandon_local_activities = False
        # Sticky execution: while this worker caches a run, the server sends its next
        # workflow tasks there with only the new events ("" when nothing is cached).
        self.sticky_queue = sticky_queue
        # What every completion of a run that stays cached carries (built once).
        self._sticky_attributes = sticky = service_pb2.StickyExecutionAttributes()
        sticky.worker_task_queue.name = sticky_queue
        sticky.worker_task_queue.kind = common_pb2.TASK_QUEUE_KIND_STICKY
        sticky.worker_task_queue.normal_name = task_queue
        sticky.schedule_to_start_timeout.FromTimedelta(sticky_queue_schedule_to_start_timeout)
        # The first interceptor is outermost: wrap from the innermost out.
        handler: WorkflowTaskHandler = self._handle_workflow_task
        outbound: WorkflowCommandsHandler = _send_as_they_are
        for interceptor in reversed(interceptors):
            handler = interceptor.intercept_workflow_task(handler)
            outbound = interceptor.intercept_workflow_commands(outbound)
        self._outbound = outbound
        queues = [task_queue, self.sticky_queue] if self.sticky_queue else [task_queue]
        self._loop = PollLoop(
            role="workflow task",
            queues=queues,
            pollers=pollers,
            slots=slots,
            poll=context.long_poll(
                self._client.service.PollWorkflowTask, service_pb2.PollWorkflowTaskRequest
            ),
            handle=context.timed("workflow", handler),
            describe=lambda task: f"workflow task of {task.workflow_execution.workflow_id}",
        )

    # ------------------------------------------------------------ lifecycle

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Poll and run workflow tasks while inside; the cache goes on the way out."""
        try:
            async with self._loop.running():
                yield
        finally:
            for instance in self._cache.values():
                instance.dispose()
            self._cache.clear()

    async def stop_polling(self) -> None:
        """Stop polling, then give back the sticky queue so cached runs move on
        without waiting out the sticky timeout; best effort (the timeout covers a
        failure)."""
        await self._loop.stop_polling()
        if not self.sticky_queue:
            return
        client = self._client
        request = service_pb2.ShutdownWorkerRequest(
            namespace=client.namespace, sticky_task_queue=self.sticky_queue, identity=self._identity
        )
        try:
            await client.call(client.service.ShutdownWorker, request, timeout=5, retry=False)
        except exc.RPCError as error:
            log.debug("could not give back sticky queue: %s", error)

    async def drain(self, grace: float) -> None:
        """Wait for in-flight workflow tasks. Those still running local activities
        after ``grace`` seconds are abandoned (the activities cancelled, nothing
        reported): the server's workflow task timeout gives the run to another worker."""
        try:
            async with asyncio.timeout(grace):
                await self._slots.idle()
            return
        except TimeoutError:
            pass
        self._abandon_local_activities = True
        for handler in self._with_local_activities:
            handler.cancel()
        await self._slots.idle()

    # -------------------------------------------------------- workflow tasks

    async def _full_history(
        self, task: service_pb2.PollWorkflowTaskResponse
    ) -> Sequence[HistoryEvent]:
        """The events of ``task`` (all of the run's, or a sticky task's new ones).

        The one place a task's history is assembled. A long history comes in pages:
        the task carries the first (it must fit one gRPC message), and its
        ``next_page_token`` fetches the rest, appended in place.
        """
        client = self._client
        token = task.next_page_token
        while token:
            request = service_pb2.GetHistoryRequest(
                namespace=client.namespace, next_page_token=token
            )
            request.execution.CopyFrom(task.workflow_execution)
            response = await client.call(client.service.GetHistory, request)
            task.history.events.extend(response.history.events)
            token = response.next_page_token
        task.next_page_token = b""
        # A list: a repeated field has no __iter__, and iterating it by index ends in
        # an IndexError that costs more than this slice.
        return task.history.events[:]

    async def _handle_workflow_task(self, task: service_pb2.PollWorkflowTaskResponse) -> None:
        """The innermost handler of the interceptor chain."""
        definition = self._workflows.get(task.workflow_type.name)
        if definition is None:
            await self._fail_workflow_task(
                task,
                Cause.WORKFLOW_TASK_FAILED_CAUSE_UNKNOWN_WORKFLOW_TYPE,
                exc.ApplicationError(
                    f"workflow type {task.workflow_type.name!r} is not registered on this worker "
                    f"(registered: {sorted(self._workflows)})"
                ),
            )
            return
        events = await self._full_history(task)
        if task.HasField("query"):
            await self._answer_query(task, definition, events)
            return
        cached = self._cache.get(task.workflow_execution.run_id)
        if (
            events
            and events[0].event_id != 1
            and (cached is None or cached.last_started_event_id != task.previous_started_event_id)
        ):
            # A sticky task (new events only) for a run this worker no longer caches.
            await self._fail_workflow_task(
                task,
                Cause.WORKFLOW_TASK_FAILED_CAUSE_RESET_STICKY_TASK_QUEUE,
                exc.ApplicationError("run not in this worker's cache; resend the full history"),
            )
            return
        instance = self._instance_for(task, definition)
        commands = await self._run_workflow_code(task, instance, lambda: instance.process(events))
        if commands is None:
            return
        if not instance.local_activities.pending:
            await self._complete_workflow_task(task, instance, commands)
            return
        run_id = task.workflow_execution.run_id
        handler = asyncio.current_task()
        if self._abandon_local_activities or handler is None:
            self._evict(run_id)  # shutting down: the task times out, another worker runs it
            return
        session = LocalActivitySession(self._local, instance.workflow_info())
        self._busy.add(run_id)
        self._with_local_activities.add(handler)
        try:
            await self._run_local_activities(task, instance, commands, session, events)
        except asyncio.CancelledError:
            self._evict(run_id)
            raise
        finally:
            self._with_local_activities.discard(handler)
            self._busy.discard(run_id)
            await session.close()

    async def _run_local_activities(
        self,
        task: service_pb2.PollWorkflowTaskResponse,
        instance: WorkflowInstanceImpl,
        commands: list[Command],
        session: LocalActivitySession,
        events: Sequence[HistoryEvent],
    ) -> None:
        """Run the local activities the code waits for, feeding each outcome back (its
        marker joins the task's commands), and complete the task once none is left.
        Near the task timeout, complete it as it stands and go on in a new task that
        the server starts for this worker at once (the task's heartbeat)."""
        local = instance.local_activities
        loop = asyncio.get_running_loop()
        while True:
            heartbeat_at = loop.time() + heartbeat_after_s(events)
            while local.pending and not instance._completed:
                try:
                    marker = await session.next_outcome(local.pending, heartbeat_at - loop.time())
                except exc.ApplicationError as error:  # an activity this worker lacks
                    self._evict(task.workflow_execution.run_id)
                    cause = Cause.WORKFLOW_TASK_FAILED_CAUSE_WORKFLOW_WORKER_UNHANDLED_FAILURE
                    await self._fail_workflow_task(task, cause, error)
                    return
                if marker is None:
                    break
                resolve = functools.partial(instance.resolve_local_activity, marker)
                if await self._run_workflow_code(task, instance, resolve) is None:
                    return
            commands = commands + instance.take_commands()
            if not local.pending or instance._completed:
                await self._complete_workflow_task(task, instance, commands)
                return
            task = await self._heartbeat(task, instance, commands)
            events = await self._full_history(task)
            step = functools.partial(instance.process, events)
            next_commands = await self._run_workflow_code(task, instance, step)
            if next_commands is None:
                return
            commands = next_commands

    async def _heartbeat(
        self,
        task: service_pb2.PollWorkflowTaskResponse,
        instance: WorkflowInstanceImpl,
        commands: list[Command],
    ) -> service_pb2.PollWorkflowTaskResponse:
        """Complete the task with the commands so far and take the next one, which the
        server schedules and starts for this worker in the same transaction."""
        response = await self._complete_workflow_task(task, instance, commands, heartbeat=True)
        if response is None or not response.workflow_task.task_token:
            raise RuntimeError("the server started no new workflow task for the heartbeat")
        log.debug(
            "workflow %s: local activities still run; workflow task heartbeat",
            task.workflow_execution.workflow_id,
        )
        return response.workflow_task

    async def _run_workflow_code(
        self,
        task: service_pb2.PollWorkflowTaskResponse,
        instance: WorkflowInstanceImpl,
        step: Callable[[], list[Command] | None],
    ) -> list[Command] | None:
        """The commands of this task (``step``: the instance processing its history,
        or a local activity's outcome), or None once the task was failed on the server."""
        run_id = task.workflow_execution.run_id
        try:
            commands = step()
            if commands is None:
                raise RuntimeError("history ended without an open workflow task")
            return commands
        except exc.NonDeterminismError as error:
            self._evict(run_id)
            log.warning("workflow %s: %s", task.workflow_execution.workflow_id, error)
            cause = Cause.WORKFLOW_TASK_FAILED_CAUSE_NON_DETERMINISTIC_ERROR
            await self._fail_workflow_task(task, cause, error)
        except Exception as error:
            self._evict(run_id)
            log.warning(
                "workflow %s: workflow task failed: %r",
                task.workflow_execution.workflow_id,
                error,
                exc_info=True,
            )
            cause = Cause.WORKFLOW_TASK_FAILED_CAUSE_WORKFLOW_WORKER_UNHANDLED_FAILURE
            await self._fail_workflow_task(task, cause, error)
        return None

    async def _complete_workflow_task(
        self,
        task: service_pb2.PollWorkflowTaskResponse,
        instance: WorkflowInstanceImpl,
        commands: list[Command],
        *,
        heartbeat: bool = False,
    ) -> service_pb2.RespondWorkflowTaskCompletedResponse:
        run_id = task.workflow_execution.run_id
        if commands:
            self._outbound(task, commands)
        reserved = await self._reserve_eager_activities(commands)
        stays_cached = bool(self.sticky_queue) and not instance._completed
        # A run that stays cached here may take its next workflow task (events that
        # arrived during this one) in the same commit, if a slot is free for it.
        take_next = (
            self._take_next and not heartbeat and stays_cached and await self._slots.try_reserve()
        )
        request = service_pb2.RespondWorkflowTaskCompletedRequest(
            task_token=task.task_token,
            identity=self._identity,
            force_create_new_workflow_task=heartbeat,
            return_new_workflow_task=heartbeat or take_next,
        )
        # extend: the constructor's ``commands=[...]`` takes a slower path to the same.
        request.commands.extend(commands)
        if stays_cached:
            request.sticky_attributes.CopyFrom(self._sticky_attributes)
        try:
            response: service_pb2.RespondWorkflowTaskCompletedResponse = await self._respond(
                request, task.run_owner
            )
        except BaseException:
            self._release(reserved, take_next)
            self._evict(run_id)  # our view may be ahead of what the server recorded
            raise
        self._release(reserved - len(response.activity_tasks), False)
        if self._eager is not None:
            for activity_task in response.activity_tasks[:]:  # [:]: see _full_history
                self._eager.slots.hand_over(activity_task)
        if take_next and response.workflow_task.task_token:
            # Its slot is the one reserved above; it runs once this handler yields.
            self._slots.hand_over(response.workflow_task)
        elif take_next:
            self._slots.release()
        if not heartbeat and (instance._completed or not self._max_cached):
            self._evict(run_id)
        return response

    def _instance_for(
        self, task: service_pb2.PollWorkflowTaskResponse, definition: WorkflowDefinition
    ) -> WorkflowInstanceImpl:
        run_id = task.workflow_execution.run_id
        instance = self._cache.pop(run_id, None)
        if (
            instance is not None
            and instance.last_started_event_id == task.previous_started_event_id != 0
        ):
            self._cache[run_id] = instance
            if self._metrics is not None:
                self._metrics.cache_lookup(self._task_queue, hit=True, size=len(self._cache))
            return instance
        if instance is not None:
            instance.dispose()
        instance = self._new_instance(task, definition)
        # Make room first, so the run being worked on is never the one evicted (nor
        # one whose task awaits local activities).
        for old_id in [r for r in self._cache if r not in self._busy]:
            if len(self._cache) < self._max_cached:
                break
            self._cache.pop(old_id).dispose()
        self._cache[run_id] = instance
        if self._metrics is not None:
            self._metrics.cache_lookup(self._task_queue, hit=False, size=len(self._cache))
        return instance

    def _new_instance(
        self, task: service_pb2.PollWorkflowTaskResponse, definition: WorkflowDefinition
    ) -> WorkflowInstanceImpl:
        return WorkflowInstanceImpl(  # type: ignore[abstract]
            definition,
            namespace=self._client.namespace,
            workflow_id=task.workflow_execution.workflow_id,
            run_id=task.workflow_execution.run_id,
            task_queue=self._task_queue,
            converter=self._client.data_converter,
        )

    def _evict(self, run_id: str) -> None:
        instance = self._cache.pop(run_id, None)
        if instance is not None:
            instance.dispose()
        if self._metrics is not None:
            self._metrics.cache_resized(self._task_queue, len(self._cache))

    async def _answer_query(
        self,
        task: service_pb2.PollWorkflowTaskResponse,
        definition: WorkflowDefinition,
        events: Sequence[HistoryEvent],
    ) -> None:
        """Replay the run into a fresh instance (the cached one may be mid-task) and ask
        its query handler; nothing is written to history."""
        client = self._client
        request = service_pb2.RespondQueryTaskCompletedRequest(
            task_token=task.task_token, namespace=client.namespace
        )
        instance = self._new_instance(task, definition)
        try:
            instance.process(events, replay_only=True)
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

    def _release(self, activity_slots: int, workflow_slot: bool) -> None:
        """Give back slots reserved for tasks a completion did not bring (or all of
        them, when it failed): ``activity_slots`` eager activities' and, with
        ``workflow_slot``, the next workflow task's."""
        if self._eager is not None:
            for _ in range(activity_slots):
                self._eager.slots.release()
        if workflow_slot:
            self._slots.release()

    async def _reserve_eager_activities(self, commands: list[Any]) -> int:
        """Ask the server to start activities this worker can run right away; each
        one takes an activity slot now, so the worker never over-commits."""
        eager = self._eager
        if eager is None:
            return 0
        reserved = 0
        for command in commands:
            if command.command_type != COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK:
                continue
            attrs = command.schedule_activity_task_command_attributes
            if (
                reserved >= _MAX_EAGER_ACTIVITIES
                or attrs.task_queue.name != self._task_queue
                or attrs.activity_type.name not in eager.activity_types
                # Only the server's matching knows whether this worker meets it.
                or attrs.placement
                or attrs.HasField("requirements")
                or not await eager.slots.try_reserve()
            ):
                continue
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
            identity=self._identity,
        )
        request.failure.CopyFrom(client.data_converter.to_failure(error))
        service = client.service_for(task.run_owner)
        await client.call(service.RespondWorkflowTaskFailed, request)


def _send_as_they_are(task: service_pb2.PollWorkflowTaskResponse, commands: list[Command]) -> None:
    """The innermost workflow-commands handler: nothing to change."""
