"""The DAG interpreter: a workflow (type ``tideflow.dag``) that runs a DAG definition.

Import it as ``tideflow.worker_sdk.dag.DagWorkflow`` and register it on a worker with
the executor activities. Its start input is ``{"definition": <Workflow.to_dict()>,
"input": {...}}`` (what ``dag.start_dag`` sends), so every run carries the
definition it started with.

It is ordinary workflow code, replayed deterministically: tasks are visited in
topological order (ties in definition order), every decision depends only on the
definition, the input and results recorded in history, and times come from
``workflow.now()``. How it works:

- A task whose dependencies all COMPLETED gets its own coroutine, which resolves the
  task's parameters and runs attempts: each attempt is one activity (id
  ``<task>#<n>``, ``maximum_attempts=1``, start-to-close = the task's timeout); a
  failed attempt goes FAILED -> RETRY, waits out the backoff on a durable timer
  (cut short if the run stops) and is scheduled again, up to ``max_attempts``.
- The main coroutine only waits on conditions (never on the task coroutines), so a
  cancellation request reaches it alone; it then cancels the running tasks itself.
- ``pause`` / ``resume`` are signals; while paused no task or attempt is scheduled.
- When the run fails or is cancelled, compensations of completed tasks run in
  reverse dependency order, each with its own retry policy (ids
  ``<task>#compensation#<n>``).
- The ``status`` query returns the ``WorkflowInstance`` as a dict; the
  ``DagStatus`` search attribute follows the run's state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from .. import exceptions as exc
from .. import workflow
from ..common import RetryPolicy as ActivityRetryPolicy
from ..placement import ExecutedAt, Placement, Requirements
from . import _graph
from ._durations import format_duration
from ._errors import DagValidationError, ExpressionError
from ._executors import unwrap_result
from ._expressions import resolve, schema_problem
from ._model import (
    DAG_WORKFLOW_TYPE,
    DEFAULT_TASK_TIMEOUT,
    TERMINAL_TASK_STATES,
    TERMINAL_WORKFLOW_STATES,
    FailurePolicy,
    RetryPolicy,
    Task,
    TaskStatus,
    WorkflowStatus,
)
from ._state import (
    CompensationState,
    ErrorInfo,
    StepState,
    TaskState,
    Transition,
    WorkflowInstance,
    failure_summary,
)
from ._workflow import Workflow

# One activity call is one attempt: the interpreter does the retrying.
_ONE_ATTEMPT = ActivityRetryPolicy(maximum_attempts=1)
_UNREGISTERED = "is not registered on this worker"


def _cancel_requested() -> bool:
    """Whether the run got a cancellation request. A CancelledError without one is
    the worker tearing the instance down (eviction), which must not be swallowed."""
    return workflow.is_cancel_requested()


class _StopAttempts(Exception):
    """The run stopped (a failure elsewhere) before the next attempt could start."""


@workflow.defn(name=DAG_WORKFLOW_TYPE)
class DagWorkflow:
    """Runs one DAG definition; see the module docstring."""

    def __init__(self) -> None:
        self._status = WorkflowStatus.CREATED
        self._transitions: list[Transition] = []
        self._paused = False
        self._definition: Workflow | None = None
        self._order: list[str] = []
        self._dependents: dict[str, list[str]] = {}  # reverse edges, for compensation
        self._specs: dict[str, Task] = {}  # the definition's tasks by id
        self._tasks: dict[str, TaskState] = {}
        self._input: Any = None
        self._output: Any = None
        self._error: ErrorInfo | None = None
        self._start_time: datetime | None = None
        self._end_time: datetime | None = None
        self._phase = "executing"
        self._failing = False  # a task failed for good under fail_workflow
        self._cancelled = False
        self._dirty = False
        self._running: dict[str, asyncio.Task[None]] = {}
        self._internal_error: BaseException | None = None
        self._queue = ""
        self._seq = 0  # numbers every transition, for ordering across tasks

    # ------------------------------------------------------------ messages

    @workflow.signal
    def pause(self, reason: str | None = None) -> None:
        """Stop scheduling new tasks and attempts (running ones finish)."""
        if self._paused or self._status in TERMINAL_WORKFLOW_STATES:
            return
        self._paused = True
        self._set_status(WorkflowStatus.PAUSED, note=reason)
        self._dirty = True

    @workflow.signal
    def resume(self) -> None:
        """Continue scheduling."""
        if not self._paused:
            return
        self._paused = False
        if self._status is WorkflowStatus.PAUSED:
            self._set_status(WorkflowStatus.RUNNING, note="resumed")
        self._dirty = True

    @workflow.query
    def status(self) -> dict[str, Any]:
        """The WorkflowInstance (``dag.WorkflowInstance.to_dict()``)."""
        return self._instance().to_dict()

    # ------------------------------------------------------------------ run

    @workflow.run
    async def run(self, request: dict[str, Any]) -> Any:
        info = workflow.info()
        self._queue = info.task_queue
        self._start_time = info.start_time
        if not self._transitions or self._transitions[0].status != WorkflowStatus.CREATED:
            self._transitions.insert(
                0, Transition(WorkflowStatus.CREATED.value, info.start_time, seq=0)
            )
        setup_error = self._setup(request)
        if setup_error is not None:
            self._error = setup_error
            return await self._finish()
        if self._status is WorkflowStatus.CREATED:
            self._set_status(WorkflowStatus.RUNNING)
        try:
            await self._execute()
        except asyncio.CancelledError:
            if not _cancel_requested():
                raise
            self._cancelled = True
            # Cancelling ends a paused run too: its compensations must not wait.
            self._paused = False
            await self._stop_running()
        if not self._cancelled and not self._failed_tasks():
            self._compute_output()
        if self._cancelled or self._failed_tasks() or self._error is not None:
            await self._compensate()
        return await self._finish()

    def _setup(self, request: Any) -> ErrorInfo | None:
        now = workflow.now()
        if not isinstance(request, dict) or "definition" not in request:
            return ErrorInfo("DagValidationError", "start input has no 'definition'", time=now)
        try:
            wf = Workflow.from_dict(request["definition"])
            wf.validate()
            self._order = wf.topological_order()
            self._dependents = _graph.dependents({t.id: t.dependencies for t in wf.tasks})
        except DagValidationError as error:
            return ErrorInfo("DagValidationError", str(error), time=now, non_retryable=True)
        self._definition = wf
        self._specs = {task.id: task for task in wf.tasks}
        self._input = request.get("input") or {}
        for task in wf.tasks:
            state = TaskState(
                task_id=task.id,
                name=task.name,
                dependencies=list(task.dependencies),
                executor=task.executor,
                max_attempts=task.retry_policy.max_attempts,
            )
            state.transitions.append(Transition(TaskStatus.PENDING.value, now, seq=self._next()))
            self._tasks[task.id] = state
        workflow.upsert_search_attributes({"DagId": wf.id, "DagVersion": wf.version})
        problem = schema_problem(wf.input_schema, self._input)
        if problem is not None:
            return ErrorInfo(
                "DagInputSchemaError",
                f"input does not match input_schema: {problem}",
                time=now,
                non_retryable=True,
            )
        return None

    # -------------------------------------------------------- forward phase

    async def _execute(self) -> None:
        while True:
            self._dirty = False
            self._raise_internal_error()
            self._schedule_ready()
            if not self._running and self._forward_done():
                return
            await workflow.wait_condition(lambda: self._dirty)

    def _forward_done(self) -> bool:
        pending = [tid for tid in self._order if self._tasks[tid].status is TaskStatus.PENDING]
        if not pending:
            return True
        if self._failing:
            for tid in pending:
                self._finish_step(
                    self._tasks[tid], TaskStatus.SKIPPED, note="not started: the run failed"
                )
            return True
        return False

    def _schedule_ready(self) -> None:
        assert self._definition is not None
        for tid in self._order:
            state = self._tasks[tid]
            if state.status is not TaskStatus.PENDING:
                continue
            blocked = [
                d
                for d in state.dependencies
                if self._tasks[d].status
                in (TaskStatus.FAILED, TaskStatus.SKIPPED, TaskStatus.CANCELLED)
            ]
            if blocked:
                dep = blocked[0]
                self._finish_step(
                    state,
                    TaskStatus.SKIPPED,
                    note=f"dependency {dep!r} {self._tasks[dep].status.value}",
                )
                continue
            if self._paused or self._failing or self._cancelled:
                continue
            if all(self._tasks[d].status is TaskStatus.COMPLETED for d in state.dependencies):
                self._running[tid] = asyncio.create_task(self._run_task(tid))

    async def _run_task(self, tid: str) -> None:
        assert self._definition is not None
        task = self._specs[tid]
        state = self._tasks[tid]
        try:
            ok = await self._attempts(
                state,
                activity_prefix=tid,
                executor=task.executor,
                parameters=lambda: resolve(task.parameters, self._context()),
                policy=task.retry_policy,
                timeout=task.timeout,
                stoppable=True,
                placement=task.placement,
                requirements=task.requirements,
            )
            if (
                not ok
                and state.status is TaskStatus.FAILED
                and self._definition.failure_policy is FailurePolicy.FAIL_WORKFLOW
            ):
                self._failing = True
        except asyncio.CancelledError:
            pass
        except Exception as error:  # a bug in the interpreter: fail the workflow task
            self._internal_error = self._internal_error or error
        finally:
            self._running.pop(tid, None)
            self._dirty = True

    async def _attempts(
        self,
        step: StepState,
        *,
        activity_prefix: str,
        executor: str,
        parameters: Callable[[], Any],
        policy: RetryPolicy,
        timeout: timedelta | None,
        stoppable: bool,
        placement: Placement | None = None,
        requirements: Requirements | None = None,
    ) -> bool:
        """Run attempts of one task or compensation; True if one completed."""
        assert self._definition is not None
        mapping = self._definition.executor_for(executor)
        step.activity_type = mapping.activity or executor
        step.task_queue = mapping.task_queue or self._queue
        step.executed_at = mapping.executed_at
        step.max_attempts = policy.max_attempts
        timeout = timeout or DEFAULT_TASK_TIMEOUT
        try:
            params = parameters()
        except ExpressionError as error:
            step.error = ErrorInfo(
                "ExpressionError", str(error), time=workflow.now(), non_retryable=True
            )
            step.errors.append(step.error)
            self._finish_step(step, TaskStatus.FAILED, note=str(error))
            return False
        step.parameters = params

        def stop() -> bool:
            return stoppable and (self._failing or self._cancelled)

        attempt = 0
        try:
            while True:
                if self._paused and not stop():
                    await workflow.wait_condition(lambda: not self._paused or stop())
                if stop():
                    raise _StopAttempts
                attempt += 1
                step.attempts = attempt
                step.next_retry_time = None
                if step.start_time is None:
                    step.start_time = workflow.now()
                self._enter(step, TaskStatus.SCHEDULED, attempt)
                handle = workflow.start_activity(
                    step.activity_type,
                    params,
                    activity_id=f"{activity_prefix}#{attempt}",
                    task_queue=step.task_queue,
                    start_to_close_timeout=timeout,
                    retry_policy=_ONE_ATTEMPT,
                    placement=placement,
                    requirements=requirements,
                )
                try:
                    raw = await handle
                except exc.ActivityError as error:
                    failure = self._error_info(error, step, policy, attempt, timeout)
                    delay = self._record_failure(step, failure, attempt, policy, stop())
                    if delay is None:
                        return False
                    if delay > timedelta(0):
                        # A durable timer, cut short if the run stops meanwhile.
                        with contextlib.suppress(TimeoutError):
                            await workflow.wait_condition(stop, timeout=delay)
                    continue
                self._record_completion(step, raw, attempt, handle.executed_at)
                return True
        except _StopAttempts:
            self._finish_step(
                step, TaskStatus.CANCELLED, attempt or None, note="not retried: the run stopped"
            )
            return False
        except asyncio.CancelledError:
            self._finish_step(step, TaskStatus.CANCELLED, attempt or None, note="cancelled")
            raise

    def _record_failure(
        self, step: StepState, failure: ErrorInfo, attempt: int, policy: RetryPolicy, stop: bool
    ) -> timedelta | None:
        """Record a failed attempt; the backoff before the next one, or None if the
        step failed for good."""
        step.error = failure
        step.errors.append(failure)
        self._enter(step, TaskStatus.RUNNING, attempt)
        last = failure.non_retryable or attempt >= policy.max_attempts
        if last or stop:
            self._finish_step(step, TaskStatus.FAILED, attempt, note=str(failure))
            return None
        self._enter(step, TaskStatus.FAILED, attempt, note=str(failure))
        delay = policy.delay(attempt)
        step.next_retry_time = workflow.now() + delay
        self._enter(step, TaskStatus.RETRY, attempt, note=f"backoff {format_duration(delay)}")
        return delay

    def _record_completion(
        self, step: StepState, raw: Any, attempt: int, where: ExecutedAt | None
    ) -> None:
        result, meta = unwrap_result(raw)
        started = meta.get("started_at")
        self._enter(
            step,
            TaskStatus.RUNNING,
            attempt,
            at=datetime.fromisoformat(started) if started else None,
        )
        if where is not None:
            # The server's record of the poll that took the attempt: the truth, whatever
            # the executor claims (an executor's own report counts only without it).
            step.executed_at, step.site, step.worker = where.tier or None, where.site, where.worker
        else:
            step.executed_at = meta.get("executed_at") or step.executed_at
            step.worker = meta.get("worker") or step.worker
        step.result = result
        step.error = None
        self._finish_step(step, TaskStatus.COMPLETED, attempt)

    def _error_info(
        self,
        error: exc.ActivityError,
        step: StepState,
        policy: RetryPolicy,
        attempt: int,
        timeout: timedelta,
    ) -> ErrorInfo:
        cause = error.cause
        non_retryable = False
        if isinstance(cause, exc.ApplicationError):
            kind, message = cause.type or "ApplicationError", cause.message
            non_retryable = cause.non_retryable
            if kind == "NotFoundError" and _UNREGISTERED in message:
                kind = "UnknownExecutorError"
                message = (
                    f"unknown executor {step.executor!r}: no worker on task queue "
                    f"{step.task_queue!r} registers activity type {step.activity_type!r}"
                )
                non_retryable = True
        elif isinstance(cause, exc.TimeoutError):
            kind = "TimeoutError"
            what = cause.type.name if cause.type is not None else "START_TO_CLOSE"
            message = f"attempt {attempt} timed out ({what}, timeout {format_duration(timeout)})"
        elif isinstance(cause, exc.CancelledError):
            kind, message = "CancelledError", "the attempt was cancelled"
        elif cause is not None:
            kind, message = type(cause).__name__, str(cause)
        else:
            kind, message = "ActivityError", str(error)
        if kind in policy.non_retryable_errors:
            non_retryable = True
        return ErrorInfo(
            kind, message, attempt=attempt, time=workflow.now(), non_retryable=non_retryable
        )

    async def _stop_running(self) -> None:
        """After a cancellation request: cancel running tasks and wait until they
        recorded how they ended."""
        for running in list(self._running.values()):
            running.cancel()
        while self._running:
            try:
                await workflow.wait_condition(lambda: not self._running)
            except asyncio.CancelledError:
                if not _cancel_requested():
                    raise
        for tid in self._order:
            state = self._tasks[tid]
            if state.status is TaskStatus.PENDING:
                self._finish_step(state, TaskStatus.CANCELLED, note="not started: cancelled")

    # --------------------------------------------------------- compensation

    async def _compensate(self) -> None:
        targets = [
            tid
            for tid in self._order
            if self._tasks[tid].status is TaskStatus.COMPLETED
            and self._specs[tid].compensation is not None
        ]
        if not targets:
            return
        self._phase = "compensating"
        for tid in targets:
            comp = self._specs[tid].compensation
            assert comp is not None
            state = CompensationState(executor=comp.executor)
            state.transitions.append(
                Transition(TaskStatus.PENDING.value, workflow.now(), seq=self._next())
            )
            self._tasks[tid].compensation = state
        running: dict[str, asyncio.Task[None]] = {}
        while True:
            self._dirty = False
            self._raise_internal_error()
            ready = self._compensations_ready(set(targets))
            for tid in reversed(self._order):
                if tid in ready and not self._paused:
                    running[tid] = asyncio.create_task(self._run_compensation(tid, running))
            if not running and all(
                self._compensation(tid).status in TERMINAL_TASK_STATES for tid in targets
            ):
                return
            try:
                await workflow.wait_condition(lambda: self._dirty)
            except asyncio.CancelledError:
                if not _cancel_requested():
                    raise
                # Compensation is the cleanup: it runs to the end even if cancelled.
                self._cancelled = True
                self._paused = False

    def _compensations_ready(self, targets: set[str]) -> set[str]:
        """The PENDING compensations whose dependents' compensations (direct or not)
        have all ended: reverse dependency order.

        One pass against the dependency order: ``clear`` holds the tasks below which
        (the task itself included) every compensation has ended, so a task is ready
        when all its direct dependents are clear. Linear in the graph, where
        comparing each task with all its descendants would be quadratic."""
        below = self._dependents
        clear: set[str] = set()
        ready: set[str] = set()
        for tid in reversed(self._order):
            dependents_clear = all(d in clear for d in below[tid])
            if tid not in targets:
                if dependents_clear:
                    clear.add(tid)
                continue
            status = self._compensation(tid).status
            if status is TaskStatus.PENDING and dependents_clear:
                ready.add(tid)
            if status in TERMINAL_TASK_STATES and dependents_clear:
                clear.add(tid)
        return ready

    def _compensation(self, tid: str) -> CompensationState:
        state = self._tasks[tid].compensation
        assert state is not None
        return state

    async def _run_compensation(self, tid: str, running: dict[str, asyncio.Task[None]]) -> None:
        assert self._definition is not None
        comp = self._specs[tid].compensation
        assert comp is not None
        task_state = self._tasks[tid]
        defaults = {
            "task_id": tid,
            "parameters": task_state.parameters,
            "result": task_state.result,
        }
        try:
            await self._attempts(
                self._compensation(tid),
                activity_prefix=f"{tid}#compensation",
                executor=comp.executor,
                parameters=lambda: (
                    defaults
                    if comp.parameters is None
                    else resolve(comp.parameters, self._context())
                ),
                policy=comp.retry_policy,
                timeout=comp.timeout,
                stoppable=False,
            )
        except Exception as error:
            self._internal_error = self._internal_error or error
        finally:
            running.pop(tid, None)
            self._dirty = True

    # ------------------------------------------------------------- finishing

    def _compute_output(self) -> None:
        assert self._definition is not None
        wf = self._definition
        try:
            if wf.output is not None:
                output = resolve(wf.output, self._context())
            else:
                has_dependents = {d for t in wf.tasks for d in t.dependencies}
                output = {
                    tid: self._tasks[tid].result for tid in self._order if tid not in has_dependents
                }
        except ExpressionError as error:
            self._error = ErrorInfo(
                "ExpressionError", f"output: {error}", time=workflow.now(), non_retryable=True
            )
            return
        problem = schema_problem(wf.output_schema, output)
        if problem is not None:
            self._error = ErrorInfo(
                "DagOutputSchemaError",
                f"output does not match output_schema: {problem}",
                time=workflow.now(),
                non_retryable=True,
            )
            return
        self._output = output

    async def _finish(self) -> Any:
        self._phase = "done"
        self._end_time = workflow.now()
        for state in self._tasks.values():
            if state.status is TaskStatus.PENDING:  # the run failed before it started
                self._finish_step(state, TaskStatus.SKIPPED, note="not started: the run failed")
        failed = self._failed_tasks()
        if self._cancelled:
            self._set_status(WorkflowStatus.CANCELLED)
            raise asyncio.CancelledError
        if failed or self._error is not None:
            if self._error is None:
                names = ", ".join(failed)
                self._error = ErrorInfo(
                    "DagFailed", f"task(s) failed: {names}", time=workflow.now()
                )
            self._set_status(WorkflowStatus.FAILED, note=str(self._error))
            instance = self._instance()
            wf_name = self._definition.id if self._definition else "?"
            raise exc.ApplicationError(
                f"DAG {wf_name!r} failed: {self._error.message}",
                failure_summary(instance),
                type="DagFailed",
                non_retryable=True,
            )
        self._set_status(WorkflowStatus.COMPLETED)
        return self._output

    def _failed_tasks(self) -> list[str]:
        return [tid for tid in self._order if self._tasks[tid].status is TaskStatus.FAILED]

    def _raise_internal_error(self) -> None:
        if self._internal_error is not None:
            raise self._internal_error

    # -------------------------------------------------------------- helpers

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _context(self) -> dict[str, Any]:
        wf = self._definition
        return {
            "input": self._input,
            "tasks": {
                tid: {"result": state.result}
                for tid, state in self._tasks.items()
                if state.status is TaskStatus.COMPLETED
            },
            "workflow": {
                "id": wf.id if wf else "",
                "version": wf.version if wf else "",
                "instance_id": workflow.info().workflow_id,
            },
        }

    def _set_status(self, status: WorkflowStatus, note: str | None = None) -> None:
        if status is self._status:
            return
        self._status = status
        self._transitions.append(
            Transition(status.value, workflow.now(), note=note, seq=self._next())
        )
        workflow.upsert_search_attributes({"DagStatus": status.value})

    def _enter(
        self,
        step: StepState,
        status: TaskStatus,
        attempt: int | None = None,
        *,
        note: str | None = None,
        at: datetime | None = None,
    ) -> None:
        step.status = status
        when = at if status is TaskStatus.RUNNING else workflow.now()
        step.transitions.append(Transition(status.value, when, attempt, note, seq=self._next()))

    def _finish_step(
        self,
        step: StepState,
        status: TaskStatus,
        attempt: int | None = None,
        *,
        note: str | None = None,
    ) -> None:
        self._enter(step, status, attempt, note=note)
        step.end_time = workflow.now()
        step.next_retry_time = None

    def _instance(self) -> WorkflowInstance:
        info = workflow.info()
        wf = self._definition
        states = self._tasks
        return WorkflowInstance(
            id=info.workflow_id,
            run_id=info.run_id,
            workflow_id=wf.id if wf else "",
            workflow_version=wf.version if wf else "",
            status=self._status,
            phase=self._phase,
            input=self._input,
            output=self._output,
            task_states=dict(states),
            start_time=self._start_time or info.start_time,
            end_time=self._end_time,
            error=self._error,
            failed_tasks=[t for t in self._order if states[t].status is TaskStatus.FAILED],
            skipped_tasks=[t for t in self._order if states[t].status is TaskStatus.SKIPPED],
            cancelled_tasks=[t for t in self._order if states[t].status is TaskStatus.CANCELLED],
            transitions=list(self._transitions),
            execution_context={
                "namespace": info.namespace,
                "task_queue": info.task_queue,
                "workflow_type": info.workflow_type,
                "failure_policy": wf.failure_policy.value if wf else None,
                "paused": self._paused,
            },
        )
