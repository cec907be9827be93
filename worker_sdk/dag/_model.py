"""The definition's building blocks: states, policies, executors and tasks."""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..placement import Placement, Requirements, check_placement
from ._durations import format_duration, parse_duration
from ._errors import DagValidationError, ValidationIssue

#: The interpreter's workflow type name.
DAG_WORKFLOW_TYPE = "tideflow.dag"
#: Task queue of DAG runs (and of executors without an explicit queue) by default.
DEFAULT_TASK_QUEUE = "tideflow-dag"
#: Start-to-close timeout of one attempt when a task sets none.
DEFAULT_TASK_TIMEOUT = timedelta(minutes=10)
#: Key that marks an executor's result envelope (see :func:`executor`).
ENVELOPE_KEY = "__tideflow_dag_executor__"

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


# ------------------------------------------------------------------ enums


class TaskStatus(enum.StrEnum):
    """A task's (or a compensation's) state."""

    PENDING = "PENDING"
    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    RETRY = "RETRY"
    SKIPPED = "SKIPPED"
    CANCELLED = "CANCELLED"


class WorkflowStatus(enum.StrEnum):
    """A DAG run's state."""

    CREATED = "CREATED"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class FailurePolicy(enum.StrEnum):
    """What a task that failed for good does to the rest of the DAG."""

    FAIL_WORKFLOW = "fail_workflow"  # stop scheduling, fail the run (default)
    CONTINUE = "continue"  # run every branch that does not depend on it, then fail


TERMINAL_TASK_STATES = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.SKIPPED, TaskStatus.CANCELLED}
)
TERMINAL_WORKFLOW_STATES = frozenset(
    {WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.CANCELLED}
)

# ------------------------------------------------------------ definitions


def check_keys(data: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise DagValidationError(
            [ValidationIssue(None, f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")]
        )


def mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise DagValidationError([ValidationIssue(None, f"{where}: expected a mapping")])
    return value


@dataclass(frozen=True, slots=True)
class ExponentialBackoff:
    """Delay before attempt n+1: ``initial * coefficient**(n-1)``, at most ``maximum``."""

    initial_interval: timedelta = timedelta(seconds=1)
    maximum_interval: timedelta = timedelta(seconds=30)
    coefficient: float = 2.0

    def delay(self, attempt: int) -> timedelta:
        """The wait after failed attempt ``attempt`` (1-based)."""
        try:
            seconds = self.initial_interval.total_seconds() * self.coefficient ** max(
                0, attempt - 1
            )
        except OverflowError:
            return self.maximum_interval
        if seconds >= self.maximum_interval.total_seconds():
            return self.maximum_interval
        return timedelta(seconds=seconds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "initial_interval": format_duration(self.initial_interval),
            "maximum_interval": format_duration(self.maximum_interval),
            "coefficient": self.coefficient,
        }

    @staticmethod
    def from_dict(data: Mapping[str, Any], where: str = "backoff") -> ExponentialBackoff:
        check_keys(data, ("initial_interval", "maximum_interval", "coefficient"), where)
        default = ExponentialBackoff()
        try:
            return ExponentialBackoff(
                initial_interval=parse_duration(
                    data.get("initial_interval", default.initial_interval)
                ),
                maximum_interval=parse_duration(
                    data.get("maximum_interval", default.maximum_interval)
                ),
                coefficient=float(data.get("coefficient", default.coefficient)),
            )
        except (TypeError, ValueError) as error:
            raise DagValidationError([ValidationIssue(None, f"{where}: {error}")]) from None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often a task is attempted and how long to wait in between.

    ``max_attempts`` counts every attempt (1 = no retries). Errors whose type is in
    ``non_retryable_errors`` (or an ``ApplicationError(non_retryable=True)``) are not
    retried."""

    max_attempts: int = 1
    backoff: ExponentialBackoff = ExponentialBackoff()
    non_retryable_errors: tuple[str, ...] = ()

    def delay(self, attempt: int) -> timedelta:
        return self.backoff.delay(attempt)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"max_attempts": self.max_attempts}
        data["backoff"] = self.backoff.to_dict()
        if self.non_retryable_errors:
            data["non_retryable_errors"] = list(self.non_retryable_errors)
        return data

    @staticmethod
    def from_dict(data: Mapping[str, Any], where: str = "retry_policy") -> RetryPolicy:
        data = mapping(data, where)
        check_keys(data, ("max_attempts", "backoff", "non_retryable_errors"), where)
        max_attempts = data.get("max_attempts", 1)
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
            raise DagValidationError(
                [ValidationIssue(None, f"{where}: max_attempts must be an integer")]
            )
        errors = data.get("non_retryable_errors", ())
        if isinstance(errors, str) or not all(isinstance(e, str) for e in errors):
            raise DagValidationError(
                [ValidationIssue(None, f"{where}: non_retryable_errors must be a list of names")]
            )
        backoff = data.get("backoff")
        return RetryPolicy(
            max_attempts=max_attempts,
            backoff=ExponentialBackoff()
            if backoff is None
            else ExponentialBackoff.from_dict(mapping(backoff, f"{where}.backoff"), where),
            non_retryable_errors=tuple(errors),
        )


def _coerce_timeout(value: timedelta | str | float | None) -> timedelta | None:
    return None if value is None else parse_duration(value)


@dataclass(slots=True)
class Compensation:
    """The saga step that undoes a completed task when the workflow fails."""

    executor: str
    parameters: dict[str, Any] | None = None
    timeout: timedelta | None = None
    retry_policy: RetryPolicy = RetryPolicy(max_attempts=3)

    def __post_init__(self) -> None:
        self.timeout = _coerce_timeout(self.timeout)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"executor": self.executor}
        if self.parameters is not None:
            data["parameters"] = self.parameters
        if self.timeout is not None:
            data["timeout"] = format_duration(self.timeout)
        data["retry_policy"] = self.retry_policy.to_dict()
        return data

    @staticmethod
    def from_dict(data: Any, where: str) -> Compensation:
        if isinstance(data, str):
            return Compensation(executor=data)
        data = mapping(data, where)
        check_keys(data, ("executor", "parameters", "timeout", "retry_policy"), where)
        parameters = data.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise DagValidationError([ValidationIssue(None, f"{where}: parameters: not a mapping")])
        try:
            timeout = _coerce_timeout(data.get("timeout"))
        except ValueError as error:
            raise DagValidationError(
                [ValidationIssue(None, f"{where}: timeout: {error}")]
            ) from None
        retry = data.get("retry_policy")
        return Compensation(
            executor=str(data.get("executor", "")),
            parameters=None if parameters is None else dict(parameters),
            timeout=timeout,
            retry_policy=RetryPolicy(max_attempts=3)
            if retry is None
            else RetryPolicy.from_dict(retry, f"{where}.retry_policy"),
        )


@dataclass(slots=True)
class Executor:
    """Where an executor name leads: an activity type on a task queue.

    Defaults: activity type = the executor name, task queue = the DAG run's queue.
    ``executed_at`` (cloud / edge / device, free text) is recorded on each task that
    used the executor unless the executor reports its own location."""

    activity: str | None = None
    task_queue: str | None = None
    executed_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in (
                ("activity", self.activity),
                ("task_queue", self.task_queue),
                ("executed_at", self.executed_at),
            )
            if v is not None
        }

    @staticmethod
    def from_dict(data: Any, where: str) -> Executor:
        if isinstance(data, str):
            return Executor(activity=data)
        data = mapping(data, where)
        check_keys(data, ("activity", "task_queue", "executed_at"), where)
        return Executor(
            activity=None if data.get("activity") is None else str(data["activity"]),
            task_queue=None if data.get("task_queue") is None else str(data["task_queue"]),
            executed_at=None if data.get("executed_at") is None else str(data["executed_at"]),
        )


_TASK_FIELDS = (
    "id",
    "name",
    "executor",
    "parameters",
    "timeout",
    "retry_policy",
    "depends_on",
    "compensation",
    "metadata",
    "placement",
    "requirements",
)


@dataclass(init=False, slots=True)
class Task:
    """One step of a DAG: an executor called with ``parameters``.

    Build it with keywords or with the document's fluent style::

        Task("extract-data", executor="data-connector", timeout="5m")
        Task("extract-data").with_executor("data-connector").with_timeout(timedelta(minutes=5))

    ``placement`` (cloud / edge / device / auto) and ``requirements`` (labels, minimum
    memory and cores) say where its attempts may run (worker_sdk/placement.py).
    """

    id: str
    executor: str
    name: str | None
    parameters: dict[str, Any]
    timeout: timedelta | None
    retry_policy: RetryPolicy
    dependencies: list[str]
    compensation: Compensation | None
    metadata: dict[str, Any]
    placement: Placement | None
    requirements: Requirements | None

    def __init__(
        self,
        id: str,
        *,
        executor: str = "",
        name: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        timeout: timedelta | str | float | None = None,
        retry_policy: RetryPolicy | None = None,
        depends_on: Iterable[str | Task] = (),
        compensation: Compensation | str | None = None,
        metadata: Mapping[str, Any] | None = None,
        placement: Placement | None = None,
        requirements: Requirements | Mapping[str, Any] | None = None,
    ) -> None:
        self.id = id
        self.executor = executor
        self.name = name
        self.parameters = dict(parameters or {})
        self.timeout = _coerce_timeout(timeout)
        self.retry_policy = retry_policy or RetryPolicy()
        self.dependencies = [d.id if isinstance(d, Task) else d for d in depends_on]
        self.compensation = (
            Compensation(executor=compensation) if isinstance(compensation, str) else compensation
        )
        self.metadata = dict(metadata or {})
        self.placement = placement
        self.requirements = Requirements.of(requirements)
        check_placement(placement)

    # The document's builder methods; each returns the task.
    def with_executor(self, executor: str) -> Task:
        self.executor = executor
        return self

    def with_name(self, name: str) -> Task:
        self.name = name
        return self

    def with_parameter(self, key: str, value: Any) -> Task:
        self.parameters[key] = value
        return self

    def with_parameters(self, parameters: Mapping[str, Any]) -> Task:
        self.parameters.update(parameters)
        return self

    def with_timeout(self, timeout: timedelta | str | float) -> Task:
        self.timeout = parse_duration(timeout)
        return self

    def with_retry_policy(self, policy: RetryPolicy) -> Task:
        self.retry_policy = policy
        return self

    def depends_on(self, *tasks: str | Task) -> Task:
        """Add dependencies (task ids or tasks)."""
        for task in tasks:
            self.dependencies.append(task.id if isinstance(task, Task) else task)
        return self

    def with_compensation(
        self,
        executor: str,
        *,
        parameters: Mapping[str, Any] | None = None,
        timeout: timedelta | str | float | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> Task:
        self.compensation = Compensation(
            executor=executor,
            parameters=None if parameters is None else dict(parameters),
            timeout=_coerce_timeout(timeout),
            retry_policy=retry_policy or RetryPolicy(max_attempts=3),
        )
        return self

    def with_metadata(self, key: str, value: Any) -> Task:
        self.metadata[key] = value
        return self

    def with_placement(
        self,
        placement: Placement,
        requirements: Requirements | Mapping[str, Any] | None = None,
    ) -> Task:
        check_placement(placement)
        self.placement = placement
        self.requirements = Requirements.of(requirements)
        return self

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id}
        if self.name is not None:
            data["name"] = self.name
        data["executor"] = self.executor
        if self.parameters:
            data["parameters"] = self.parameters
        if self.timeout is not None:
            data["timeout"] = format_duration(self.timeout)
        if self.retry_policy != RetryPolicy():
            data["retry_policy"] = self.retry_policy.to_dict()
        if self.dependencies:
            data["depends_on"] = list(self.dependencies)
        if self.compensation is not None:
            data["compensation"] = self.compensation.to_dict()
        if self.metadata:
            data["metadata"] = self.metadata
        if self.placement is not None:
            data["placement"] = self.placement
        if self.requirements is not None:
            data["requirements"] = self.requirements.to_dict()
        return data

    @staticmethod
    def from_dict(data: Any, index: int = 0) -> Task:
        if not isinstance(data, Mapping):
            raise DagValidationError([ValidationIssue(None, f"tasks[{index}]: expected a mapping")])
        raw_id = data.get("id")
        where = f"task {raw_id!r}" if raw_id is not None else f"tasks[{index}]"
        allowed = (*_TASK_FIELDS, "dependencies")
        check_keys(data, allowed, where)
        if not isinstance(raw_id, str):
            raise DagValidationError([ValidationIssue(None, f"{where}: id must be a string")])
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, Mapping):
            raise DagValidationError(
                [ValidationIssue(raw_id, f"{where}: parameters must be a mapping")]
            )
        deps = data.get("depends_on", data.get("dependencies")) or []
        if isinstance(deps, str):
            deps = [deps]
        if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
            raise DagValidationError(
                [ValidationIssue(raw_id, f"{where}: depends_on must be a list of task ids")]
            )
        try:
            timeout = _coerce_timeout(data.get("timeout"))
        except ValueError as error:
            raise DagValidationError(
                [ValidationIssue(raw_id, f"{where}: bad timeout: {error}")]
            ) from None
        try:
            retry = data.get("retry_policy")
            policy = (
                None if retry is None else RetryPolicy.from_dict(retry, f"{where}.retry_policy")
            )
            compensation = (
                None
                if data.get("compensation") is None
                else Compensation.from_dict(data["compensation"], f"{where}.compensation")
            )
        except DagValidationError as error:
            raise DagValidationError(
                [ValidationIssue(raw_id, issue.message) for issue in error.issues]
            ) from None
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, Mapping):
            raise DagValidationError([ValidationIssue(raw_id, f"{where}: metadata: not a mapping")])
        executor = data.get("executor", "")
        try:
            placement = data.get("placement")
            check_placement(placement)
            requirements = Requirements.of(data.get("requirements"))
        except ValueError as error:
            raise DagValidationError([ValidationIssue(raw_id, f"{where}: {error}")]) from None
        return Task(
            raw_id,
            executor=str(executor) if executor is not None else "",
            name=None if data.get("name") is None else str(data["name"]),
            parameters=parameters,
            timeout=timeout,
            retry_policy=policy,
            depends_on=deps,
            compensation=compensation,
            metadata=metadata,
            placement=placement,
            requirements=requirements,
        )


def new_task(id: str) -> Task:
    """The document's ``NewTask(id)``; continue with ``.with_executor(...)`` etc."""
    return Task(id)
