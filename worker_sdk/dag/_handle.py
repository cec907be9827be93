"""Starting DAG runs and working with them from a client."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from .. import exceptions as exc
from .._workflow_instance import WorkflowInstanceImpl as _Replay
from ..client import Client, WorkflowExecutionDescription, WorkflowHandle
from ..workflow import definition_of
from ._errors import DagValidationError, ValidationIssue
from ._expressions import jsonable
from ._interpreter import DagWorkflow
from ._model import DAG_WORKFLOW_TYPE, DEFAULT_TASK_QUEUE, Executor, TaskStatus, WorkflowStatus
from ._state import (
    DagFailureError,
    ErrorInfo,
    StepState,
    Transition,
    WorkflowInstance,
)
from ._workflow import Workflow, check_input


class DagHandle:
    """A running (or finished) DAG run; get one from ``dag.start_dag(client, ...)``
    or as ``DagHandle(client, id)``."""

    def __init__(self, client: Client, id: str, *, run_id: str | None = None) -> None:
        self.client = client
        self.id = id
        self.workflow: WorkflowHandle[Any] = WorkflowHandle(client, id, run_id=run_id)

    @property
    def run_id(self) -> str | None:
        return self.workflow.run_id

    async def status(self, *, from_history: bool = False) -> WorkflowInstance:
        """The WorkflowInstance with every TaskState, from the interpreter's ``status``
        query (answered by a worker); an attempt a worker is executing right now shows
        as RUNNING (from the server's pending-activity record; see the module
        docstring). ``from_history=True`` answers the same query by replaying the
        run's history here, so it needs no worker."""
        if from_history:
            data = _query_from_history(await self.workflow.fetch_history(), self.client)
        else:
            data = await self.workflow.query("status")
        instance = WorkflowInstance.from_dict(data)
        if instance.done:
            return instance
        try:
            description = await self.workflow.describe()
        except exc.RPCError:
            return instance
        _merge_running(instance, description)
        return instance

    async def pause(self, reason: str | None = None) -> None:
        """Stop scheduling new tasks and attempts (a durable signal); running attempts
        finish and are recorded."""
        await self.workflow.signal("pause", reason)

    async def resume(self) -> None:
        """Continue a paused run (a durable signal)."""
        await self.workflow.signal("resume")

    async def cancel(self, reason: str | None = None) -> None:
        """Cancel the run: running attempts are asked to stop, compensations of
        completed tasks run, and the run closes CANCELLED."""
        await self.workflow.cancel(reason)

    async def terminate(self, reason: str | None = None) -> None:
        """End the run at once (no compensation)."""
        await self.workflow.terminate(reason)

    async def describe(self) -> WorkflowExecutionDescription:
        """The engine's description of the interpreter run."""
        return await self.workflow.describe()

    async def result(self) -> Any:
        """Wait for the run to end: its output, or ``DagFailureError``."""
        try:
            return await self.workflow.result()
        except exc.WorkflowFailureError as error:
            raise _failure_error(self.id, error) from None

    async def watch(
        self, interval: float = 0.2, *, from_history: bool = False
    ) -> AsyncIterator[WorkflowInstance]:
        """Yield the instance whenever it changed, until the run ended (polling
        ``status(from_history=...)`` every ``interval`` seconds)."""
        last: dict[str, Any] | None = None
        while True:
            try:
                instance = await self.status(from_history=from_history)
            except exc.WorkflowQueryFailedError:
                await asyncio.sleep(interval)
                continue
            current = instance.to_dict()
            if current != last:
                last = current
                yield instance
            if instance.done:
                return
            await asyncio.sleep(interval)


def _query_from_history(history: Any, client: Client) -> Any:
    """Replay ``history`` with the interpreter and ask its ``status`` query, as a
    worker answering the query would."""

    events = history.events
    started = events[0].workflow_execution_started_event_attributes
    instance = _Replay(  # type: ignore[abstract]
        definition_of(DagWorkflow),
        namespace=client.namespace,
        workflow_id=history.workflow_id,
        run_id=started.original_execution_run_id,
        task_queue=started.task_queue.name,
        converter=client.data_converter,
    )
    try:
        instance.process(events, replay_only=True)
        instance.catch_up_for_query()
        return instance.query("status", None)
    finally:
        instance.dispose()


def _failure_error(dag_id: str, error: exc.WorkflowFailureError) -> DagFailureError:
    cause = error.cause
    if isinstance(cause, exc.ApplicationError) and cause.type == "DagFailed" and cause.details:
        summary = cause.details[0]
        if isinstance(summary, Mapping):
            return DagFailureError(
                cause.message,
                status=WorkflowStatus(summary.get("status", "FAILED")),
                failed_tasks=summary.get("failed_tasks", []),
                skipped_tasks=summary.get("skipped_tasks", []),
                errors={
                    k: ErrorInfo.from_dict(v) for k, v in (summary.get("errors") or {}).items()
                },
                compensations=summary.get("compensations") or {},
                error=None
                if summary.get("error") is None
                else ErrorInfo.from_dict(summary["error"]),
                cause=cause,
            )
    if isinstance(cause, exc.CancelledError):
        return DagFailureError(
            f"DAG run {dag_id!r} was cancelled", status=WorkflowStatus.CANCELLED, cause=cause
        )
    return DagFailureError(
        f"DAG run {dag_id!r} did not complete: {cause}", status=WorkflowStatus.FAILED, cause=cause
    )


def _merge_running(instance: WorkflowInstance, description: WorkflowExecutionDescription) -> None:
    """Mark the attempts a worker is executing now as RUNNING."""
    started: dict[str, tuple[datetime, str]] = {}
    for pending in description.raw.pending_activities:
        if pending.HasField("last_started_time"):
            started[pending.activity_id] = (
                pending.last_started_time.ToDatetime(tzinfo=UTC),
                pending.last_worker_identity,
            )
    if not started:
        return
    for tid, state in instance.task_states.items():
        steps: list[tuple[StepState, str]] = [(state, f"{tid}#{state.attempts}")]
        if state.compensation is not None:
            steps.append((state.compensation, f"{tid}#compensation#{state.compensation.attempts}"))
        for step, activity_id in steps:
            if step.status is TaskStatus.SCHEDULED and activity_id in started:
                at, worker = started[activity_id]
                step.status = TaskStatus.RUNNING
                step.worker = worker or step.worker
                step.transitions.append(
                    Transition(TaskStatus.RUNNING.value, at, step.attempts, observed=True)
                )


async def start_dag(
    client: Client,
    definition: Workflow | Mapping[str, Any],
    input: Mapping[str, Any] | None = None,
    *,
    id: str | None = None,
    task_queue: str = DEFAULT_TASK_QUEUE,
    executors: Mapping[str, Executor | str] | None = None,
    known_executors: Iterable[str] | None = None,
    execution_timeout: timedelta | None = None,
    request_id: str | None = None,
) -> DagHandle:
    """Validate ``definition`` and ``input`` and start a DAG run.

    ``definition`` is a ``Workflow`` or its dict form, ``input`` a JSON object. A worker
    on ``task_queue`` must run ``DagWorkflow`` and the executors. ``executors`` maps
    executor names to activity types (str) or ``Executor``; ``known_executors``
    (names) makes unknown executors a validation error. Nothing is started if
    validation fails: ``DagValidationError`` for the definition,
    ``InvalidArgumentError`` (INVALID_ARGUMENT) for input that violates the input
    schema. Returns a ``DagHandle``: ``status()``, ``pause()``, ``resume()``,
    ``cancel()``, ``result()``."""
    wf = definition if isinstance(definition, Workflow) else Workflow.from_dict(definition)
    # Work on a copy: the caller's object stays as it was.
    try:
        wf = Workflow.from_dict(json.loads(json.dumps(wf.to_dict())))
    except (TypeError, ValueError) as error:
        raise DagValidationError(
            [ValidationIssue(None, f"the definition is not JSON data: {error}")], wf.id
        ) from None
    for name, mapped in (executors or {}).items():
        wf.executors[name] = Executor(activity=mapped) if isinstance(mapped, str) else mapped
    wf.validate(executors=known_executors)
    payload_input = {} if input is None else input
    check_input(wf, payload_input)
    run_id = id or f"dag-{wf.id}-{uuid.uuid4().hex[:12]}"
    request = {"definition": wf.to_dict(), "input": jsonable(payload_input)}
    handle = await client.start_workflow(
        DAG_WORKFLOW_TYPE,
        request,
        id=run_id,
        task_queue=task_queue,
        execution_timeout=execution_timeout,
        request_id=request_id,
        search_attributes={
            "DagId": wf.id,
            "DagVersion": wf.version,
            "DagStatus": WorkflowStatus.CREATED.value,
        },
    )
    return DagHandle(client, handle.id, run_id=handle.run_id)
