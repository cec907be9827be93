"""Run state: the ``WorkflowInstance`` with every ``TaskState`` and transition."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .. import exceptions as exc
from ._model import TERMINAL_WORKFLOW_STATES, TaskStatus, WorkflowStatus

# ------------------------------------------------------------------ views


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _parse_time(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@dataclass(slots=True)
class ErrorInfo:
    """What went wrong in one attempt (or with the whole run)."""

    type: str
    message: str
    attempt: int | None = None
    time: datetime | None = None
    non_retryable: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "message": self.message,
            "attempt": self.attempt,
            "time": _time(self.time),
            "non_retryable": self.non_retryable,
        }

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> ErrorInfo:
        return ErrorInfo(
            type=data["type"],
            message=data["message"],
            attempt=data.get("attempt"),
            time=_parse_time(data.get("time")),
            non_retryable=bool(data.get("non_retryable", False)),
        )

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


@dataclass(slots=True)
class Transition:
    """One step of a state machine: the state entered, when, in which attempt.

    ``time`` is None for a RUNNING whose start the executor did not report;
    ``observed`` marks a RUNNING seen live on the server (not yet in history)."""

    status: str
    time: datetime | None
    attempt: int | None = None
    note: str | None = None
    observed: bool = False
    seq: int | None = None  # position among all transitions of the run

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"status": self.status, "time": _time(self.time)}
        if self.seq is not None:
            data["seq"] = self.seq
        if self.attempt is not None:
            data["attempt"] = self.attempt
        if self.note:
            data["note"] = self.note
        if self.observed:
            data["observed"] = True
        return data

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Transition:
        return Transition(
            status=data["status"],
            time=_parse_time(data.get("time")),
            attempt=data.get("attempt"),
            note=data.get("note"),
            observed=bool(data.get("observed", False)),
            seq=data.get("seq"),
        )


@dataclass(slots=True, kw_only=True)
class StepState:
    status: TaskStatus = TaskStatus.PENDING
    executor: str = ""
    activity_type: str | None = None
    task_queue: str | None = None
    attempts: int = 0
    max_attempts: int = 1
    start_time: datetime | None = None
    end_time: datetime | None = None
    next_retry_time: datetime | None = None
    error: ErrorInfo | None = None
    errors: list[ErrorInfo] = field(default_factory=list)
    parameters: Any = None  # as resolved for the attempts
    result: Any = None
    # Where the completed attempt ran, as the server recorded it: tier (cloud / edge /
    # device), site and worker identity (before: what the executor or mapping said).
    executed_at: str | None = None
    site: str | None = None
    worker: str | None = None
    transitions: list[Transition] = field(default_factory=list)

    def _base_dict(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "executor": self.executor,
            "activity_type": self.activity_type,
            "task_queue": self.task_queue,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "start_time": _time(self.start_time),
            "end_time": _time(self.end_time),
            "next_retry_time": _time(self.next_retry_time),
            "error": None if self.error is None else self.error.to_dict(),
            "errors": [e.to_dict() for e in self.errors],
            "parameters": self.parameters,
            "result": self.result,
            "executed_at": self.executed_at,
            "site": self.site,
            "worker": self.worker,
            "transitions": [t.to_dict() for t in self.transitions],
        }

    @staticmethod
    def _base_kwargs(data: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "status": TaskStatus(data["status"]),
            "executor": data.get("executor", ""),
            "activity_type": data.get("activity_type"),
            "task_queue": data.get("task_queue"),
            "attempts": data.get("attempts", 0),
            "max_attempts": data.get("max_attempts", 1),
            "start_time": _parse_time(data.get("start_time")),
            "end_time": _parse_time(data.get("end_time")),
            "next_retry_time": _parse_time(data.get("next_retry_time")),
            "error": None if data.get("error") is None else ErrorInfo.from_dict(data["error"]),
            "errors": [ErrorInfo.from_dict(e) for e in data.get("errors", [])],
            "parameters": data.get("parameters"),
            "result": data.get("result"),
            "executed_at": data.get("executed_at"),
            "site": data.get("site"),
            "worker": data.get("worker"),
            "transitions": [Transition.from_dict(t) for t in data.get("transitions", [])],
        }

    def statuses(self) -> list[str]:
        """The states this step went through, in order."""
        return [t.status for t in self.transitions]


@dataclass(slots=True, kw_only=True)
class CompensationState(StepState):
    """The saga compensation of one completed task."""

    def to_dict(self) -> dict[str, Any]:
        return self._base_dict()

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> CompensationState:
        return CompensationState(**StepState._base_kwargs(data))


@dataclass(slots=True, kw_only=True)
class TaskState(StepState):
    """The document's TaskState: status, times, attempts, errors, result, where it
    ran — plus every transition, and the task's compensation if one ran."""

    task_id: str
    name: str | None = None
    dependencies: list[str] = field(default_factory=list)
    compensation: CompensationState | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "task_id": self.task_id,
            "name": self.name,
            "dependencies": self.dependencies,
        }
        data |= self._base_dict()
        data["compensation"] = None if self.compensation is None else self.compensation.to_dict()
        return data

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> TaskState:
        return TaskState(
            task_id=data["task_id"],
            name=data.get("name"),
            dependencies=list(data.get("dependencies", [])),
            compensation=None
            if data.get("compensation") is None
            else CompensationState.from_dict(data["compensation"]),
            **StepState._base_kwargs(data),
        )


@dataclass(slots=True, kw_only=True)
class WorkflowInstance:
    """The document's WorkflowInstance: one run of a DAG.

    ``id`` is the run's workflow id in the engine; ``workflow_id`` /
    ``workflow_version`` name the definition it runs."""

    id: str
    run_id: str = ""
    workflow_id: str = ""
    workflow_version: str = ""
    status: WorkflowStatus = WorkflowStatus.CREATED
    phase: str = "executing"
    input: Any = None
    output: Any = None
    task_states: dict[str, TaskState] = field(default_factory=dict)
    start_time: datetime | None = None
    end_time: datetime | None = None
    error: ErrorInfo | None = None
    failed_tasks: list[str] = field(default_factory=list)
    skipped_tasks: list[str] = field(default_factory=list)
    cancelled_tasks: list[str] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    execution_context: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_WORKFLOW_STATES

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "run_id": self.run_id,
            "workflow_id": self.workflow_id,
            "workflow_version": self.workflow_version,
            "status": self.status.value,
            "phase": self.phase,
            "input": self.input,
            "output": self.output,
            "task_states": {k: v.to_dict() for k, v in self.task_states.items()},
            # JSON objects may come back with sorted keys: keep the definition order.
            "task_order": list(self.task_states),
            "start_time": _time(self.start_time),
            "end_time": _time(self.end_time),
            "error": None if self.error is None else self.error.to_dict(),
            "failed_tasks": self.failed_tasks,
            "skipped_tasks": self.skipped_tasks,
            "cancelled_tasks": self.cancelled_tasks,
            "transitions": [t.to_dict() for t in self.transitions],
            "execution_context": self.execution_context,
        }

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> WorkflowInstance:
        states = data.get("task_states") or {}
        order = [k for k in data.get("task_order", []) if k in states]
        order += [k for k in states if k not in order]
        return WorkflowInstance(
            id=data["id"],
            run_id=data.get("run_id", ""),
            workflow_id=data.get("workflow_id", ""),
            workflow_version=data.get("workflow_version", ""),
            status=WorkflowStatus(data["status"]),
            phase=data.get("phase", "executing"),
            input=data.get("input"),
            output=data.get("output"),
            task_states={k: TaskState.from_dict(states[k]) for k in order},
            start_time=_parse_time(data.get("start_time")),
            end_time=_parse_time(data.get("end_time")),
            error=None if data.get("error") is None else ErrorInfo.from_dict(data["error"]),
            failed_tasks=list(data.get("failed_tasks", [])),
            skipped_tasks=list(data.get("skipped_tasks", [])),
            cancelled_tasks=list(data.get("cancelled_tasks", [])),
            transitions=[Transition.from_dict(t) for t in data.get("transitions", [])],
            execution_context=dict(data.get("execution_context") or {}),
        )


class DagFailureError(exc.TideflowError):
    """``DagHandle.result()`` of a DAG run that failed or was cancelled.

    ``status`` is FAILED or CANCELLED; ``failed_tasks`` / ``skipped_tasks`` name the
    tasks; ``errors`` maps failed task ids to their last error; ``compensations`` maps
    compensated task ids to the compensation's final status; ``cause`` is the
    engine-level failure."""

    def __init__(
        self,
        message: str,
        *,
        status: WorkflowStatus,
        failed_tasks: Sequence[str] = (),
        skipped_tasks: Sequence[str] = (),
        errors: Mapping[str, ErrorInfo] | None = None,
        compensations: Mapping[str, str] | None = None,
        error: ErrorInfo | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.failed_tasks = list(failed_tasks)
        self.skipped_tasks = list(skipped_tasks)
        self.errors = dict(errors or {})
        self.compensations = dict(compensations or {})
        self.error = error
        if cause is not None:
            self.__cause__ = cause


def failure_summary(instance: WorkflowInstance) -> dict[str, Any]:
    """What the interpreter puts in the failure's details (``DagFailureError``)."""
    return {
        "status": instance.status.value,
        "failed_tasks": instance.failed_tasks,
        "skipped_tasks": instance.skipped_tasks,
        "errors": {
            tid: st.error.to_dict()
            for tid, st in instance.task_states.items()
            if st.status is TaskStatus.FAILED and st.error is not None
        },
        "compensations": {
            tid: st.compensation.status.value
            for tid, st in instance.task_states.items()
            if st.compensation is not None
        },
        "error": None if instance.error is None else instance.error.to_dict(),
    }
