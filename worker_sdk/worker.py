"""The worker: long-polls a task queue and runs workflow tasks and activities.

``Worker`` is a thin front over two roles, as in the Temporal Python SDK: the
workflow-task role (``_workflow_worker``: cached runs, sticky queue, queries) and the
activity role (``_activity_worker``: execution, heartbeats, cancellation), each driven
by the shared poll loop of ``_poller``. Concurrency is bounded by
``max_concurrent_activities`` and ``max_concurrent_workflow_tasks``; ``shutdown()``
stops polling, gives back the sticky queue, lets in-flight workflow tasks finish and
in-flight activities and local activities finish within ``graceful_shutdown_timeout``
(the rest are cancelled), and is safe to call twice. Local activities
(``workflow.execute_local_activity``) run in the workflow-task role, with the
activities registered here (``_local_activities``). ``interceptors`` (``WorkerInterceptor``,
interceptor.py) wrap the handling of each workflow task, a supported hook for tests and
instrumentation.

Every task the worker starts has an owner: one supervisor task (started by ``start()``
and awaited by ``shutdown()``) holds each role's ``TaskGroup`` with its pollers and
in-flight tasks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import uuid
from collections.abc import Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any

from tideflow.api.v1 import common_pb2, service_pb2

from . import activity as activity_mod
from ._activity_worker import ActivityWorker, EagerWorkflowTasks
from ._eager_start import EagerStartTarget
from ._local_activity_worker import LocalActivityConfig
from ._poller import Slots, WorkerContext
from ._workflow_worker import EagerActivities, WorkflowWorker
from .client import Client
from .interceptor import WorkerInterceptor
from .metrics import WorkerMetrics
from .metrics import serve as serve_metrics
from .placement import Capabilities, Tier, check_tier, worker_placement
from .workflow import WorkflowDefinition, definition_of

_WorkflowTask = service_pb2.PollWorkflowTaskResponse
_ActivityTask = service_pb2.PollActivityTaskResponse


class Worker:
    """Polls ``task_queue`` and runs the given workflows and activities.

    Use it as ``async with Worker(...)``, or call ``run()`` until ``shutdown()``.

    ``tier`` (cloud / edge / device; default: the tier of the server's site),
    ``capabilities`` (``{"labels": [...], "memory_mb": n, "cores": n}``) and ``site``
    (default: the server's cluster name) are what its activity polls advertise: it
    gets only activities whose placement it meets (worker_sdk/placement.py).

    Eager execution (on unless disabled): a workflow task's completion asks the server
    to start up to three of the activities it schedules on this task queue for this
    worker, one free activity slot each, and gets them back in the response (no poll);
    an activity's completion offers to run the workflow task it causes, and a workflow
    task's completion to run the run's next one (events that arrived meanwhile), if a
    workflow task slot is free. ``disable_eager_activity_execution`` (Temporal's name)
    and ``disable_eager_workflow_tasks`` turn either off: the tasks then go through
    matching and a poll.

    Task completions that arrive while another of the client's is in flight go to the
    server together in one call when it returns (``batch_completions``, on by default;
    worker_sdk/_completions.py): no timer, so an idle worker's completion leaves at once.
    """

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
        tier: Tier | None = None,
        capabilities: Capabilities | Mapping[str, Any] | None = None,
        site: str | None = None,
        metrics: WorkerMetrics | None = None,
        metrics_port: int | None = None,
        disable_eager_activity_execution: bool = False,
        disable_eager_workflow_tasks: bool = False,
        batch_completions: bool = True,
    ) -> None:
        if not workflows and not activities:
            raise ValueError("a worker needs at least one workflow or activity")
        self.task_queue, self.identity = task_queue, identity or client.identity
        workflow_defs = _workflow_definitions(workflows)
        activity_defs = _activity_definitions(activities)
        self._graceful = graceful_shutdown_timeout.total_seconds()
        # A thread pool for sync activities unless given one; ours is shut down with us.
        self._own_executor = _default_executor(activity_defs) if activity_executor is None else None
        activity_executor = activity_executor or self._own_executor
        sticky_queue = _sticky_queue(task_queue, bool(workflows) and max_cached_workflows > 0)
        # Both roles' slots exist before either role: each may reserve the other's.
        self._workflow_slots: Slots[_WorkflowTask] = Slots(max_concurrent_workflow_tasks)
        self._activity_slots: Slots[_ActivityTask] = Slots(max_concurrent_activities)
        placement = _placement_of(tier, capabilities, site)
        context = self._context(client, metrics, metrics_port, placement, batch_completions)
        self._workflows: WorkflowWorker | None = None
        self._activities: ActivityWorker | None = None
        if workflows:
            self._workflows = WorkflowWorker(
                context,
                workflows=workflow_defs,
                slots=self._workflow_slots,
                pollers=workflow_pollers,
                max_cached_workflows=max_cached_workflows,
                sticky_queue=sticky_queue,
                sticky_queue_schedule_to_start_timeout=sticky_queue_schedule_to_start_timeout,
                eager_activities=EagerActivities(
                    slots=self._activity_slots, activity_types=frozenset(activity_defs)
                )
                if activities and activity_pollers and not disable_eager_activity_execution
                else None,
                local_activities=LocalActivityConfig(activity_defs, activity_executor, context),
                interceptors=interceptors,
                take_next_workflow_tasks=not disable_eager_workflow_tasks,
            )
        offer = bool(workflows) and workflow_pollers > 0 and not disable_eager_workflow_tasks
        types = frozenset(workflow_defs)
        self._eager_start = _eager_start_target(client, self._workflow_slots, types, offer)
        if activities:
            eager = EagerWorkflowTasks(
                slots=self._workflow_slots, sticky_queue=sticky_queue, workflow_types=types
            )
            self._activities = ActivityWorker(
                context,
                activities=activity_defs,
                slots=self._activity_slots,
                pollers=activity_pollers,
                executor=activity_executor,
                eager_workflow_tasks=eager if offer else None,
                interceptors=interceptors,
            )
        self._supervisor: asyncio.Task[None] | None = None
        self._shutdown_requested = asyncio.Event()
        self._stopped = asyncio.Event()

    def _context(
        self,
        client: Client,
        metrics: WorkerMetrics | None,
        metrics_port: int | None,
        placement: common_pb2.WorkerPlacement,
        batch_completions: bool,
    ) -> WorkerContext:
        """What both roles share. Prometheus metrics (worker_sdk/metrics.py) go into
        ``metrics``' registry, or into the worker's own, served on ``metrics_port``
        while it runs (0: any free port; the bound one is ``self.metrics_port``)."""
        if metrics is None and metrics_port is not None:
            metrics = WorkerMetrics()
        self.metrics, self.metrics_port = metrics, metrics_port
        self._metrics_server: Any = None
        return WorkerContext(
            client=client,
            task_queue=self.task_queue,
            identity=self.identity,
            metrics=metrics,
            placement=placement,
            batch_completions=batch_completions,
        )

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
        """Start polling in the background (``shutdown()`` stops it); idempotent."""
        if self._supervisor is not None or self._shutdown_requested.is_set():
            return
        if self.metrics is not None and self.metrics_port is not None:
            self._metrics_server, self.metrics_port = serve_metrics(self.metrics, self.metrics_port)
        if self._eager_start is not None:
            # At once, so a start right after this call can already be eager (a task
            # handed over before the workflow role polls waits for it in the slots).
            self._eager_start.starts.register(self.task_queue, self._eager_start)
        self._supervisor = asyncio.create_task(
            self._supervise(), name=f"tideflow worker {self.task_queue}"
        )

    async def run(self) -> None:
        """Run until ``shutdown()`` is called (from another task) or this is cancelled."""
        self.start()
        try:
            await self._stopped.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop gracefully (see the module docstring) and wait until the worker is
        stopped; safe to call twice. Raises what stopped the worker if it failed."""
        self._shutdown_requested.set()
        if self._supervisor is None:  # never started
            self._release_executor()
            self._stopped.set()
            return
        await self._supervisor

    async def _supervise(self) -> None:
        try:
            async with contextlib.AsyncExitStack() as roles:
                for role in (self._workflows, self._activities):
                    if role is not None:
                        await roles.enter_async_context(role.running())
                await self._shutdown_requested.wait()
                await self._drain()
        finally:
            if self._eager_start is not None:
                self._eager_start.starts.unregister(self.task_queue, self._eager_start)
            self._release_executor()
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
                self._metrics_server = None
            self._stopped.set()

    def _release_executor(self) -> None:
        if self._own_executor is not None:
            self._own_executor.shutdown(wait=False, cancel_futures=True)

    async def _drain(self) -> None:
        """Stop polling, give back the sticky queue, let in-flight workflow tasks
        finish (those running local activities within the grace period), then give
        in-flight activities the grace period and cancel the rest."""
        workflows, activities = self._workflows, self._activities
        # No eager reservations from here on.
        self._workflow_slots.close()
        self._activity_slots.close()
        if activities is not None:
            await activities.stop_polling()
        if workflows is not None:
            await workflows.stop_polling()
            await workflows.drain(self._graceful)
        if activities is not None:
            await activities.drain(self._graceful)
        # An activity that completed meanwhile may have handed over a workflow task
        # whose slot it reserved before the shutdown.
        await self._workflow_slots.idle()


def _eager_start_target(
    client: Client, slots: Slots[_WorkflowTask], types: frozenset[str], offer: bool
) -> EagerStartTarget | None:
    """Where the eagerly started workflow tasks of ``client``'s starts go
    (worker_sdk/_eager_start.py): this worker's workflow role, when workflow tasks may
    reach it other than by its polls (``offer``: as with an activity's completion)."""
    return EagerStartTarget(slots, types, client.eager_starts) if offer else None


def _sticky_queue(task_queue: str, caches_runs: bool) -> str:
    """Sticky execution: while this worker caches a run, the server sends its next
    workflow tasks here with only the new events (0 cached workflows: off, "")."""
    return f"{task_queue}-sticky-{uuid.uuid4().hex}" if caches_runs else ""


def _placement_of(
    tier: Tier | None,
    capabilities: Capabilities | Mapping[str, Any] | None,
    site: str | None,
) -> common_pb2.WorkerPlacement:
    """What the worker advertises with each activity poll (worker_sdk/placement.py)."""
    check_tier(tier)
    return worker_placement(tier, Capabilities.of(capabilities), site)


def _default_executor(
    activities: dict[str, activity_mod.ActivityDefinition],
) -> concurrent.futures.Executor | None:
    if all(a.is_async for a in activities.values()):
        return None
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=32, thread_name_prefix="tideflow-activity"
    )


def _workflow_definitions(workflows: Sequence[type]) -> dict[str, WorkflowDefinition]:
    definitions: dict[str, WorkflowDefinition] = {}
    for wf in workflows:
        d = definition_of(wf)
        if d.name in definitions:
            raise ValueError(f"workflow type {d.name!r} registered twice")
        definitions[d.name] = d
    return definitions


def _activity_definitions(activities: Sequence[Any]) -> dict[str, activity_mod.ActivityDefinition]:
    definitions: dict[str, activity_mod.ActivityDefinition] = {}
    for fn in activities:
        a = activity_mod.definition_of(fn)
        if a.name in definitions:
            raise ValueError(f"activity type {a.name!r} registered twice")
        definitions[a.name] = a
    return definitions
