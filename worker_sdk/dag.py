"""Declarative workflows: DAGs of tasks, run durably by the engine.

This is the design document's model (``Workflow``, ``Task``, ``RetryPolicy``,
``WorkflowInstance``, ``TaskState`` and their state machines) on top of the durable
core. A DAG is *data*: build it in Python, or load it from YAML / JSON. A built-in
interpreter workflow, :class:`DagWorkflow` (workflow type ``tideflow.dag``), runs it;
each task attempt is an activity, so a DAG run gets replay, crash recovery and a full
history like any other workflow.

Defining a DAG (the document's ETL example)::

    from datetime import timedelta
    from tideflow.worker_sdk import dag

    wf = dag.Workflow("data-etl-process", "1.0.0")
    extract = (
        dag.Task("extract-data")
        .with_executor("data-connector")
        .with_parameter("database", "${input.source_db}")
        .with_parameter("query", "SELECT * FROM events")
        .with_timeout(timedelta(minutes=5))
        .with_retry_policy(dag.RetryPolicy(
            max_attempts=3,
            backoff=dag.ExponentialBackoff(timedelta(seconds=1), timedelta(seconds=30)))))
    transform = (
        dag.Task("transform-data", executor="data-transformer", timeout="10m")
        .with_parameter("rows", "${tasks.extract-data.result.rows}")
        .depends_on(extract))
    wf.add_task(extract).add_task(transform)
    wf.validate()                       # DagValidationError naming the task, if not
    text = dag.dumps(wf)                # YAML (or dag.dumps(wf, "json")); dag.loads(text)

Running it::

    # a worker runs the interpreter and the executors (activities)
    Worker(client, task_queue="etl", workflows=[dag.DagWorkflow],
           activities=[data_connector, data_transformer, data_writer])

    handle = await client.start_dag(wf, {"source_db": "src.db"}, task_queue="etl")
    instance = await handle.status()    # WorkflowInstance with every TaskState
    await handle.pause(); await handle.resume()
    output = await handle.result()      # or DagFailureError

File format (YAML or JSON; ``dumps`` writes this canonical form, ``loads`` reads it,
and ``loads(dumps(wf)) == wf``)::

    id: data-etl-process            # required
    version: "1.0.0"                # required; quote it in YAML
    name: ETL                       # optional; also: description
    metadata: {owner: data-team}    # free-form
    failure_policy: fail_workflow   # or: continue
    input_schema: {...}             # JSON Schema, checked at start (INVALID_ARGUMENT)
    output_schema: {...}            # JSON Schema, checked on completion
    output: {rows: "${tasks.load-data.result.rows_loaded}"}   # default: sink results
    executors:                      # optional: executor name -> activity + queue
      data-connector: {activity: data-connector, task_queue: etl, executed_at: edge}
    tasks:
      - id: extract-data            # [A-Za-z0-9_-]+, unique
        name: Extract               # optional
        executor: data-connector    # required
        parameters: {...}           # any JSON; strings may hold ${...} expressions
        timeout: 5m                 # per attempt: 1d 2h 3m 4s 500ms 10us, or seconds
        retry_policy:
          max_attempts: 3           # default 1 (no retries)
          backoff: {initial_interval: 1s, maximum_interval: 30s, coefficient: 2.0}
          non_retryable_errors: [ValueError]
        depends_on: [other-task]
        compensation:               # saga: undoes this task if the workflow fails
          executor: undo-extract
          parameters: {...}         # default {task_id, parameters, result}
          timeout: 1m
          retry_policy: {max_attempts: 3}
        metadata: {...}

Expressions. A string in ``parameters`` (at any depth), in a compensation's
``parameters`` or in ``output`` may contain ``${...}`` references:

- ``${input}`` / ``${input.a.b}``: the workflow input (a JSON object);
- ``${tasks.<id>.result}`` / ``${tasks.<id>.result.rows.0.name}``: the result of task
  ``<id>``, which must be a (transitive) dependency of the task that uses it
  (compensations may also use their own task; ``output`` may use any task);
- ``${workflow.id}``, ``${workflow.version}``, ``${workflow.instance_id}``.

A path is dot-separated; a segment is a key (``[A-Za-z0-9_-]+``) or, on a list, an
index (``0``, ``1``, ...). A string that is exactly one ``${...}`` is replaced by the
value itself (any JSON type); inside a longer string the value is inserted as text
(strings as they are, anything else as JSON). ``${input.x ?? 0}`` gives a default
(JSON) for a key that is missing. ``$${`` writes a literal ``${``.
References are checked by ``validate``; resolution is a pure function of the input
and of results already recorded in history, so it is deterministic on replay. A key
that is missing at run time fails the task (``ExpressionError``, not retried).

State machines (exposed by ``DagHandle.status()`` and ``tideflow dag status``)::

    workflow:  CREATED -> RUNNING -> COMPLETED | FAILED,  RUNNING <-> PAUSED,
               CREATED -> PAUSED   (+ CANCELLED after handle.cancel())
    task:      PENDING -> SCHEDULED -> RUNNING -> COMPLETED
               RUNNING -> FAILED -> RETRY -> SCHEDULED      (FAILED is final after
               the last attempt, or at once for a non-retryable error)
       beyond the document:  PENDING -> SKIPPED (a dependency failed, or the run
               failed first);  -> CANCELLED (handle.cancel(), or a retry that the
               failing run no longer makes);  PENDING -> FAILED (its ${...}
               parameters cannot be resolved)

Every transition is recorded (``TaskState.transitions``: state, time, attempt, note,
and a run-wide sequence number), with ``attempts``, every attempt's error, the
result, the resolved parameters, start / end times, ``executed_at`` and the worker.

Executors are activities called with one argument, the task's resolved parameters
(a JSON object), and return any JSON value (the task's result). An executor name
maps to activity type = the name and task queue = the run's queue, unless the
definition's ``executors`` (or ``start_dag(executors=...)``) says otherwise. A task
without ``timeout`` gets ``DEFAULT_TASK_TIMEOUT`` (10 minutes) per attempt.

Retries: the interpreter drives them itself. Every attempt is one activity call with
``maximum_attempts=1`` and activity id ``<task-id>#<attempt>``; after a failed attempt
the task goes FAILED -> RETRY, the interpreter waits out the exponential backoff on a
durable timer and schedules the next attempt. So every attempt, its error and every
backoff are in history, and RETRY is a real, observable state (the server's own
activity retries would hide attempts until the last one).

RUNNING: the engine writes ``ActivityTaskStarted`` together with an attempt's outcome,
so workflow code cannot see the moment a worker picks an attempt up. The interpreter
records RUNNING when the outcome arrives (with the worker's start time when the
executor was declared with :func:`executor`, otherwise without a time), and
``DagHandle.status()`` shows an attempt that a worker is executing *right now* as
RUNNING, with its start time and worker, from the server's pending-activity record
(``DescribeWorkflow``). ``DagHandle.status(from_history=True)`` answers the same
query by replaying the history locally, without a worker.

Pause / resume are signals (``pause`` / ``resume``): paused, no new task, attempt or
compensation is scheduled; attempts already running finish and are recorded. A
cancellation lifts the pause (its compensations do not wait). The run's
``DagStatus`` (and ``DagId``, ``DagVersion``) search attributes follow the workflow
state, so ``client.list_workflows("DagStatus = 'PAUSED'")`` finds paused DAGs (the
engine's own status of the interpreter run stays Running).

Failure policy: ``fail_workflow`` (default) stops scheduling when a task has failed
for good, lets running attempts finish, marks unstarted tasks SKIPPED and fails the
run; ``continue`` keeps running every task that does not depend on a failed task
(those are SKIPPED) and fails the run at the end. Either way the failure names the
failed tasks. When the run fails (or is cancelled), the compensations of COMPLETED
tasks run in reverse dependency order (a task's compensation starts once the
compensations of all tasks that depend on it, directly or not, have finished;
independent ones run in parallel), each with its own retry policy; every outcome is
recorded in ``TaskState.compensation``. A failed compensation does not stop the others.

Versions: the whole definition travels in the run's start input, so a run keeps the
definition (and version) it started with; a new version only affects new runs.

Data: inputs, parameters and results are recorded in history (payloads are limited to
2 MiB by default); pass large data by reference (a file, a table, an object key).
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import os
import re
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import yaml

from . import activity as activity_mod
from . import exceptions as exc

if TYPE_CHECKING:
    from ._dag_interpreter import DagWorkflow
    from .client import Client, WorkflowExecutionDescription, WorkflowHandle

__all__ = [
    "DAG_WORKFLOW_TYPE",
    "DEFAULT_TASK_QUEUE",
    "DEFAULT_TASK_TIMEOUT",
    "Compensation",
    "CompensationState",
    "DagFailureError",
    "DagHandle",
    "DagValidationError",
    "DagWorkflow",
    "ErrorInfo",
    "Executor",
    "ExecutorInfo",
    "ExponentialBackoff",
    "ExpressionError",
    "FailurePolicy",
    "ProgressPrinter",
    "RetryPolicy",
    "Task",
    "TaskState",
    "TaskStatus",
    "Transition",
    "ValidationIssue",
    "Workflow",
    "WorkflowInstance",
    "WorkflowStatus",
    "check_input",
    "dump",
    "dumps",
    "executor",
    "executor_info",
    "format_duration",
    "load",
    "loads",
    "new_task",
    "new_workflow",
    "parse_duration",
    "render_dot",
    "render_graph",
    "render_table",
    "resolve",
    "start_dag",
    "validate",
]

#: The interpreter's workflow type name.
DAG_WORKFLOW_TYPE = "tideflow.dag"
#: Task queue of DAG runs (and of executors without an explicit queue) by default.
DEFAULT_TASK_QUEUE = "tideflow-dag"
#: Start-to-close timeout of one attempt when a task sets none.
DEFAULT_TASK_TIMEOUT = timedelta(minutes=10)
#: Key that marks an executor's result envelope (see :func:`executor`).
ENVELOPE_KEY = "__tideflow_dag_executor__"

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


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


# -------------------------------------------------------------- durations

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|d|h|m|s)")
_UNIT_US = {"d": 86_400_000_000, "h": 3_600_000_000, "m": 60_000_000, "s": 1_000_000}
_UNIT_US |= {"ms": 1_000, "us": 1}


def parse_duration(value: Any) -> timedelta:
    """``timedelta``, seconds (int/float) or a string like ``"1h30m"``, ``"500ms"``,
    ``"2.5s"`` (units d, h, m, s, ms, us; a leading ``-`` is allowed so validation can
    say what is wrong with a negative value). Raises ``ValueError``."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    if not isinstance(value, str):
        raise ValueError(f"invalid duration {value!r}: expected a string like '5m' or seconds")
    text = value.strip().replace(" ", "")
    sign = 1
    if text.startswith("-"):
        sign, text = -1, text[1:]
    if not text:
        raise ValueError(f"invalid duration {value!r}")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return timedelta(seconds=sign * float(text))
    total = 0.0
    position = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_US[match.group(2)]
        position = match.end()
    if position != len(text):
        raise ValueError(
            f"invalid duration {value!r}: use units d, h, m, s, ms, us (e.g. '5m', '1h30m')"
        )
    return timedelta(microseconds=sign * round(total))


def format_duration(value: timedelta) -> str:
    """The canonical text of a duration (``parse_duration`` reads it back exactly)."""
    micros = value // timedelta(microseconds=1)
    if micros == 0:
        return "0s"
    if micros < 0:
        return "-" + format_duration(-value)
    parts = []
    for unit in ("d", "h", "m", "s", "ms", "us"):
        size = _UNIT_US[unit]
        count, micros = divmod(micros, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


# ------------------------------------------------------------ definitions


def _check_keys(data: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise DagValidationError(
            [ValidationIssue(None, f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")]
        )


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
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
        _check_keys(data, ("initial_interval", "maximum_interval", "coefficient"), where)
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
        data = _mapping(data, where)
        _check_keys(data, ("max_attempts", "backoff", "non_retryable_errors"), where)
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
            else ExponentialBackoff.from_dict(_mapping(backoff, f"{where}.backoff"), where),
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
        data = _mapping(data, where)
        _check_keys(data, ("executor", "parameters", "timeout", "retry_policy"), where)
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
        data = _mapping(data, where)
        _check_keys(data, ("activity", "task_queue", "executed_at"), where)
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
)


@dataclass(init=False, slots=True)
class Task:
    """One step of a DAG: an executor called with ``parameters``.

    Build it with keywords or with the document's fluent style::

        Task("extract-data", executor="data-connector", timeout="5m")
        Task("extract-data").with_executor("data-connector").with_timeout(timedelta(minutes=5))
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
        return data

    @staticmethod
    def from_dict(data: Any, index: int = 0) -> Task:
        if not isinstance(data, Mapping):
            raise DagValidationError([ValidationIssue(None, f"tasks[{index}]: expected a mapping")])
        raw_id = data.get("id")
        where = f"task {raw_id!r}" if raw_id is not None else f"tasks[{index}]"
        allowed = (*_TASK_FIELDS, "dependencies")
        _check_keys(data, allowed, where)
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
        )


_WORKFLOW_FIELDS = (
    "id",
    "version",
    "name",
    "description",
    "metadata",
    "failure_policy",
    "input_schema",
    "output_schema",
    "output",
    "executors",
    "tasks",
)


@dataclass(init=False, slots=True)
class Workflow:
    """A DAG definition: an id, a version, tasks and their dependencies.

    ``Workflow(id, version)`` then ``add_task(...)`` (the document's ``NewWorkflow`` /
    ``AddTask``), or everything as keywords."""

    id: str
    version: str
    tasks: list[Task]
    name: str | None
    description: str | None
    metadata: dict[str, Any]
    failure_policy: FailurePolicy
    input_schema: dict[str, Any] | None
    output_schema: dict[str, Any] | None
    output: Any
    executors: dict[str, Executor]

    def __init__(
        self,
        id: str,
        version: str,
        *,
        tasks: Iterable[Task] = (),
        name: str | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        failure_policy: FailurePolicy | str = FailurePolicy.FAIL_WORKFLOW,
        input_schema: Mapping[str, Any] | None = None,
        output_schema: Mapping[str, Any] | None = None,
        output: Any = None,
        executors: Mapping[str, Executor] | None = None,
    ) -> None:
        self.id = id
        self.version = version
        self.tasks = list(tasks)
        self.name = name
        self.description = description
        self.metadata = dict(metadata or {})
        self.failure_policy = FailurePolicy(failure_policy)
        self.input_schema = None if input_schema is None else dict(input_schema)
        self.output_schema = None if output_schema is None else dict(output_schema)
        self.output = output
        self.executors = dict(executors or {})

    def add_task(self, *tasks: Task) -> Workflow:
        self.tasks.extend(tasks)
        return self

    def task(self, task_id: str) -> Task:
        """The task with this id (``KeyError`` if none)."""
        for task in self.tasks:
            if task.id == task_id:
                return task
        raise KeyError(f"workflow {self.id!r} has no task {task_id!r}")

    def with_input_schema(self, schema: Mapping[str, Any]) -> Workflow:
        self.input_schema = dict(schema)
        return self

    def with_output_schema(self, schema: Mapping[str, Any]) -> Workflow:
        self.output_schema = dict(schema)
        return self

    def with_output(self, output: Any) -> Workflow:
        self.output = output
        return self

    def with_metadata(self, key: str, value: Any) -> Workflow:
        self.metadata[key] = value
        return self

    def with_failure_policy(self, policy: FailurePolicy | str) -> Workflow:
        self.failure_policy = FailurePolicy(policy)
        return self

    def with_executor(
        self,
        name: str,
        *,
        activity: str | None = None,
        task_queue: str | None = None,
        executed_at: str | None = None,
    ) -> Workflow:
        """Map executor ``name`` to an activity type and/or task queue."""
        self.executors[name] = Executor(
            activity=activity, task_queue=task_queue, executed_at=executed_at
        )
        return self

    def validate(self, *, executors: Iterable[str] | None = None) -> Workflow:
        """Check the definition (see :func:`validate`); returns it, or raises
        ``DagValidationError`` listing every problem, each naming its task."""
        validate(self, executors=executors)
        return self

    def topological_order(self) -> list[str]:
        """Task ids, dependencies first; ties keep definition order."""
        return _topological_order(self)

    def executor_for(self, name: str) -> Executor:
        """The (possibly default) mapping of executor ``name``."""
        return self.executors.get(name) or Executor()

    def to_dict(self) -> dict[str, Any]:
        """The canonical, JSON-compatible form (what ``dumps`` writes)."""
        data: dict[str, Any] = {"id": self.id, "version": self.version}
        if self.name is not None:
            data["name"] = self.name
        if self.description is not None:
            data["description"] = self.description
        if self.metadata:
            data["metadata"] = self.metadata
        if self.failure_policy is not FailurePolicy.FAIL_WORKFLOW:
            data["failure_policy"] = self.failure_policy.value
        if self.input_schema is not None:
            data["input_schema"] = self.input_schema
        if self.output_schema is not None:
            data["output_schema"] = self.output_schema
        if self.output is not None:
            data["output"] = self.output
        if self.executors:
            data["executors"] = {k: v.to_dict() for k, v in self.executors.items()}
        data["tasks"] = [task.to_dict() for task in self.tasks]
        return data

    @staticmethod
    def from_dict(data: Any) -> Workflow:
        """Build a definition from its dict form; structural problems raise
        ``DagValidationError`` (semantic checks are ``validate``'s)."""
        data = _mapping(data, "workflow")
        _check_keys(data, _WORKFLOW_FIELDS, "workflow")
        issues: list[ValidationIssue] = []
        wf_id, version = data.get("id"), data.get("version")
        if not isinstance(wf_id, str) or not wf_id:
            issues.append(ValidationIssue(None, "workflow: 'id' is required (a string)"))
        if isinstance(version, int | float) and not isinstance(version, bool):
            version = str(version)
        if not isinstance(version, str) or not version:
            issues.append(ValidationIssue(None, "workflow: 'version' is required (a string)"))
        raw_tasks = data.get("tasks")
        if not isinstance(raw_tasks, list):
            issues.append(ValidationIssue(None, "workflow: 'tasks' must be a list"))
            raw_tasks = []
        tasks: list[Task] = []
        for index, raw in enumerate(raw_tasks):
            try:
                tasks.append(Task.from_dict(raw, index))
            except DagValidationError as error:
                issues.extend(error.issues)
        try:
            policy = FailurePolicy(data.get("failure_policy", FailurePolicy.FAIL_WORKFLOW))
        except ValueError:
            issues.append(
                ValidationIssue(
                    None,
                    f"workflow: failure_policy {data.get('failure_policy')!r} is not one of "
                    f"{[p.value for p in FailurePolicy]}",
                )
            )
            policy = FailurePolicy.FAIL_WORKFLOW
        executors: dict[str, Executor] = {}
        raw_executors = data.get("executors") or {}
        if not isinstance(raw_executors, Mapping):
            issues.append(ValidationIssue(None, "workflow: executors must be a mapping"))
            raw_executors = {}
        for name, raw in raw_executors.items():
            try:
                executors[str(name)] = Executor.from_dict(raw, f"executor {name!r}")
            except DagValidationError as error:
                issues.extend(error.issues)
        for key in ("input_schema", "output_schema", "metadata"):
            if data.get(key) is not None and not isinstance(data[key], Mapping):
                issues.append(ValidationIssue(None, f"workflow: {key} must be a mapping"))
        if issues:
            raise DagValidationError(issues)
        return Workflow(
            str(wf_id),
            str(version),
            tasks=tasks,
            name=None if data.get("name") is None else str(data["name"]),
            description=None if data.get("description") is None else str(data["description"]),
            metadata=data.get("metadata"),
            failure_policy=policy,
            input_schema=data.get("input_schema"),
            output_schema=data.get("output_schema"),
            output=data.get("output"),
            executors=executors,
        )


def new_workflow(id: str, version: str) -> Workflow:
    """The document's ``NewWorkflow(id, version)``."""
    return Workflow(id, version)


def new_task(id: str) -> Task:
    """The document's ``NewTask(id)``; continue with ``.with_executor(...)`` etc."""
    return Task(id)


# ------------------------------------------------------------ load / dump


# Characters YAML reads as line breaks (or that are not printable) inside plain text.
_YAML_BREAKS = frozenset("\x85\u2028\u2029\x7f\ufeff")


def _yaml_dump(data: Any) -> str:
    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = None
        if any(ch in _YAML_BREAKS or (ord(ch) < 32 and ch != "\n") for ch in value):
            style = '"'  # escaped, so the text reads back exactly
        elif "\n" in value:
            style = "|"
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def dumps(workflow: Workflow, format: str = "yaml") -> str:
    """The definition as YAML (default) or JSON text."""
    data = workflow.to_dict()
    if format == "json":
        return json.dumps(data, indent=2) + "\n"
    if format == "yaml":
        return _yaml_dump(data)
    raise ValueError(f"unknown format {format!r}: use 'yaml' or 'json'")


def loads(text: str, format: str | None = None) -> Workflow:
    """Parse YAML or JSON text (JSON is YAML, so either works without ``format``)."""
    try:
        data = json.loads(text) if format == "json" else yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as error:
        raise DagValidationError(
            [ValidationIssue(None, f"cannot parse definition: {error}")]
        ) from None
    return Workflow.from_dict(data)


def load(path: str | os.PathLike[str]) -> Workflow:
    """Read a definition from a ``.yaml`` / ``.yml`` / ``.json`` file."""
    p = Path(path)
    return loads(p.read_text(encoding="utf-8"), "json" if p.suffix == ".json" else None)


def dump(workflow: Workflow, path: str | os.PathLike[str]) -> None:
    """Write a definition; the format follows the suffix (``.json`` or YAML)."""
    p = Path(path)
    p.write_text(dumps(workflow, "json" if p.suffix == ".json" else "yaml"), encoding="utf-8")


# ------------------------------------------------------------- validation


@dataclass(frozen=True, slots=True)
class ValidationIssue:
    """One problem with a definition; ``task_id`` is None for workflow-level ones."""

    task_id: str | None
    message: str

    def __str__(self) -> str:
        return self.message


class DagValidationError(ValueError):
    """A definition is invalid. ``issues`` lists every problem; each message names
    its task (``task 'load-data': depends on unknown task 'extract'``)."""

    def __init__(self, issues: Sequence[ValidationIssue], workflow_id: str | None = None) -> None:
        self.issues = list(issues)
        self.workflow_id = workflow_id
        head = f"invalid DAG {workflow_id!r}" if workflow_id else "invalid DAG"
        lines = "\n".join(f"  - {issue.message}" for issue in self.issues)
        super().__init__(f"{head}:\n{lines}")


def _find_cycle(wf: Workflow) -> list[str] | None:
    """One cycle as a path ``[a, b, c, a]``, or None; deterministic."""
    ids = {t.id for t in wf.tasks}
    deps = {t.id: [d for d in t.dependencies if d in ids] for t in wf.tasks}
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = 1
        stack.append(node)
        for dep in deps[node]:
            if color.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                # Show it in execution order: dependency -> dependent.
                return list(reversed(cycle))
            if color.get(dep) is None:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        color[node] = 2
        return None

    for task in wf.tasks:
        if color.get(task.id) is None and task.id in deps:
            found = visit(task.id)
            if found:
                return found
    return None


def _topological_order(wf: Workflow) -> list[str]:
    position = {t.id: i for i, t in enumerate(wf.tasks)}
    remaining = {t.id: {d for d in t.dependencies if d in position} for t in wf.tasks}
    order: list[str] = []
    while remaining:
        ready = sorted(
            (tid for tid, deps in remaining.items() if not deps), key=lambda t: position[t]
        )
        if not ready:
            cycle = _find_cycle(wf) or sorted(remaining)
            raise DagValidationError(
                [ValidationIssue(cycle[0], f"cycle: {' -> '.join(cycle)}")], wf.id
            )
        for tid in ready:
            order.append(tid)
            del remaining[tid]
        for deps in remaining.values():
            deps.difference_update(ready)
    return order


def ancestors(wf: Workflow) -> dict[str, set[str]]:
    """Every task's transitive dependencies (the definition must be acyclic)."""
    deps = {t.id: list(t.dependencies) for t in wf.tasks}
    result: dict[str, set[str]] = {}
    for tid in _topological_order(wf):
        found: set[str] = set()
        for dep in deps[tid]:
            found.add(dep)
            found |= result.get(dep, set())
        result[tid] = found
    return result


def descendants(wf: Workflow) -> dict[str, set[str]]:
    """Every task's transitive dependents."""
    result: dict[str, set[str]] = {t.id: set() for t in wf.tasks}
    for tid, found in ancestors(wf).items():
        for ancestor in found:
            result[ancestor].add(tid)
    return result


def _check_policy(policy: RetryPolicy, where: str, task_id: str | None) -> list[ValidationIssue]:
    issues = []
    if policy.max_attempts < 1:
        issues.append(
            ValidationIssue(
                task_id, f"{where}: max_attempts must be >= 1, got {policy.max_attempts}"
            )
        )
    backoff = policy.backoff
    if backoff.initial_interval <= timedelta(0):
        issues.append(ValidationIssue(task_id, f"{where}: backoff initial_interval must be > 0"))
    if backoff.maximum_interval < backoff.initial_interval:
        issues.append(
            ValidationIssue(
                task_id, f"{where}: backoff maximum_interval must be >= initial_interval"
            )
        )
    if backoff.coefficient < 1:
        issues.append(ValidationIssue(task_id, f"{where}: backoff coefficient must be >= 1"))
    return issues


def _check_timeout(timeout: timedelta | None, where: str, task_id: str) -> list[ValidationIssue]:
    if timeout is not None and timeout <= timedelta(0):
        return [
            ValidationIssue(
                task_id, f"{where}: bad timeout {format_duration(timeout)}: must be positive"
            )
        ]
    return []


def validate(wf: Workflow, *, executors: Iterable[str] | None = None) -> None:
    """Check a definition before anything runs; raise ``DagValidationError`` with
    every problem found, each message naming its task: duplicate or malformed ids,
    missing executors, unknown dependencies, cycles (the cycle's path), bad timeouts
    and retry policies, invalid JSON Schemas, bad ``${...}`` references, and — when
    ``executors`` (the executor names that workers provide) is given — unknown
    executors."""
    issues: list[ValidationIssue] = []
    if not wf.id:
        issues.append(ValidationIssue(None, "workflow: id is empty"))
    if not wf.version:
        issues.append(ValidationIssue(None, "workflow: version is empty"))
    if not wf.tasks:
        issues.append(ValidationIssue(None, "workflow: has no tasks"))
    known = None if executors is None else set(executors)
    seen: dict[str, int] = {}
    for index, task in enumerate(wf.tasks):
        where = f"task {task.id!r}"
        if task.id in seen:
            issues.append(
                ValidationIssue(
                    task.id,
                    f"{where}: duplicate task id (tasks[{seen[task.id]}] and tasks[{index}])",
                )
            )
        seen.setdefault(task.id, index)
        if not isinstance(task.id, str) or not _ID_RE.match(task.id):
            issues.append(
                ValidationIssue(task.id, f"{where}: id must match [A-Za-z0-9][A-Za-z0-9_-]*")
            )
        if not task.executor:
            issues.append(ValidationIssue(task.id, f"{where}: no executor"))
        elif known is not None and task.executor not in known:
            issues.append(ValidationIssue(task.id, f"{where}: unknown executor {task.executor!r}"))
        issues += _check_timeout(task.timeout, where, task.id)
        issues += _check_policy(task.retry_policy, f"{where} retry_policy", task.id)
        if task.compensation is not None:
            comp = task.compensation
            cwhere = f"{where} compensation"
            if not comp.executor:
                issues.append(ValidationIssue(task.id, f"{cwhere}: no executor"))
            elif known is not None and comp.executor not in known:
                issues.append(
                    ValidationIssue(task.id, f"{cwhere}: unknown executor {comp.executor!r}")
                )
            issues += _check_timeout(comp.timeout, cwhere, task.id)
            issues += _check_policy(comp.retry_policy, f"{cwhere} retry_policy", task.id)
        duplicates = sorted({d for d in task.dependencies if task.dependencies.count(d) > 1})
        for dep in duplicates:
            issues.append(ValidationIssue(task.id, f"{where}: depends on {dep!r} twice"))
    ids = {t.id for t in wf.tasks}
    for task in wf.tasks:
        for dep in task.dependencies:
            if dep not in ids:
                issues.append(
                    ValidationIssue(task.id, f"task {task.id!r}: depends on unknown task {dep!r}")
                )
    for name, executor_ in wf.executors.items():
        if executor_.activity == "":
            issues.append(ValidationIssue(None, f"executor {name!r}: empty activity type"))
    cycle = _find_cycle(wf)
    if cycle:
        issues.append(ValidationIssue(cycle[0], f"task {cycle[0]!r}: cycle: {' -> '.join(cycle)}"))
    for key in ("input_schema", "output_schema"):
        schema = getattr(wf, key)
        if schema is None:
            continue
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as error:
            issues.append(
                ValidationIssue(
                    None, f"workflow: {key} is not a valid JSON Schema: {error.message}"
                )
            )
    issues += _check_expressions(wf, has_cycle=cycle is not None)
    if issues:
        raise DagValidationError(issues, wf.id or None)


def _check_expressions(wf: Workflow, *, has_cycle: bool) -> list[ValidationIssue]:
    issues: list[ValidationIssue] = []
    ids = {t.id for t in wf.tasks}
    upstream: dict[str, set[str]] = {}
    if not has_cycle and len(ids) == len(wf.tasks):
        try:
            upstream = ancestors(wf)
        except (DagValidationError, KeyError):
            upstream = {}

    def check(value: Any, where: str, task_id: str | None, allowed: set[str] | None) -> None:
        try:
            refs = references(value)
        except ExpressionError as error:
            issues.append(ValidationIssue(task_id, f"{where}: {error}"))
            return
        for ref in refs:
            if ref.root != "tasks":
                continue
            if ref.task_id not in ids:
                issues.append(
                    ValidationIssue(
                        task_id, f"{where}: {ref.text} refers to unknown task {ref.task_id!r}"
                    )
                )
            elif allowed is not None and ref.task_id not in allowed:
                issues.append(
                    ValidationIssue(
                        task_id,
                        f"{where}: {ref.text} refers to task {ref.task_id!r}, which is not one "
                        "of its (transitive) dependencies",
                    )
                )

    for task in wf.tasks:
        ups = upstream.get(task.id, set(task.dependencies))
        check(task.parameters, f"task {task.id!r} parameters", task.id, ups)
        if task.compensation is not None and task.compensation.parameters is not None:
            check(
                task.compensation.parameters,
                f"task {task.id!r} compensation parameters",
                task.id,
                ups | {task.id},
            )
    if wf.output is not None:
        check(wf.output, "workflow output", None, None)
    return issues


# ------------------------------------------------------------ expressions


class ExpressionError(ValueError):
    """A ``${...}`` expression is malformed or cannot be resolved."""


_EXPR_RE = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True, slots=True)
class Reference:
    """One parsed ``${...}``: ``root`` is input, tasks or workflow; ``default`` is
    the value after ``??`` (``has_default`` says whether there is one)."""

    text: str
    root: str
    path: tuple[str, ...]
    has_default: bool = False
    default: Any = None

    @property
    def task_id(self) -> str | None:
        return self.path[0] if self.root == "tasks" and self.path else None


def _parse_reference(body: str) -> Reference:
    text = "${" + body + "}"
    expression, marker, fallback = body.partition("??")
    default: Any = None
    if marker:
        try:
            default = json.loads(fallback)
        except ValueError:
            raise ExpressionError(
                f"malformed expression {text}: the default after ?? must be JSON "
                '(0, "text", null, [], ...)'
            ) from None
    parts = expression.strip().split(".")
    if not parts or not all(_SEGMENT_RE.match(p) for p in parts):
        raise ExpressionError(f"malformed expression {text}: use dot-separated names")
    root, path = parts[0], tuple(parts[1:])
    ref = Reference(text, root, path, bool(marker), default)
    if root == "input":
        return ref
    if root == "tasks":
        if len(path) < 2 or path[1] != "result":
            raise ExpressionError(f"malformed expression {text}: use ${{tasks.<id>.result...}}")
        return ref
    if root == "workflow":
        if len(path) != 1 or path[0] not in ("id", "version", "instance_id"):
            raise ExpressionError(
                f"malformed expression {text}: workflow.id, workflow.version or "
                "workflow.instance_id"
            )
        return ref
    raise ExpressionError(f"unknown expression root in {text}: use input, tasks or workflow")


def _templates(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _templates(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _templates(item)


def references(value: Any) -> list[Reference]:
    """Every ``${...}`` in ``value`` (strings, at any depth of dicts and lists)."""
    found = []
    for text in _templates(value):
        for match in _EXPR_RE.finditer(text):
            if match.group(0) != "$${":
                found.append(_parse_reference(match.group(1)))
    return found


class _Missing(ExpressionError):
    """A key or index that is not there (an expression's ``??`` default applies)."""


def _lookup(ref: Reference, context: Mapping[str, Any]) -> Any:
    try:
        return _walk(ref, context)
    except _Missing:
        if ref.has_default:
            return ref.default
        raise


def _walk(ref: Reference, context: Mapping[str, Any]) -> Any:
    if ref.root == "tasks":
        task_id = ref.path[0]
        tasks = context.get("tasks", {})
        if task_id not in tasks:
            raise ExpressionError(f"{ref.text}: task {task_id!r} has no result (yet)")
        current: Any = tasks[task_id]
        steps = ref.path[1:]
        walked = f"tasks.{task_id}"
    else:
        current = context.get(ref.root)
        steps = ref.path
        walked = ref.root
    for step in steps:
        if isinstance(current, Mapping):
            if step not in current:
                raise _Missing(f"{ref.text}: {walked} has no key {step!r}")
            current = current[step]
        elif isinstance(current, list) and step.isdigit():
            index = int(step)
            if index >= len(current):
                raise _Missing(f"{ref.text}: {walked} has {len(current)} items, no index {index}")
            current = current[index]
        else:
            raise ExpressionError(
                f"{ref.text}: {walked} is {type(current).__name__}, cannot take {step!r}"
            )
        walked += f".{step}"
    return current


def _resolve_string(text: str, context: Mapping[str, Any]) -> Any:
    matches = list(_EXPR_RE.finditer(text))
    if not matches:
        return text
    if len(matches) == 1 and matches[0].group(0) != "$${" and matches[0].span() == (0, len(text)):
        return _lookup(_parse_reference(matches[0].group(1)), context)
    out = []
    position = 0
    for match in matches:
        out.append(text[position : match.start()])
        if match.group(0) == "$${":
            out.append("${")
        else:
            value = _lookup(_parse_reference(match.group(1)), context)
            out.append(value if isinstance(value, str) else json.dumps(value))
        position = match.end()
    out.append(text[position:])
    return "".join(out)


def resolve(value: Any, context: Mapping[str, Any]) -> Any:
    """Replace the ``${...}`` expressions in ``value`` (see the module docstring).

    ``context`` is ``{"input": ..., "tasks": {id: {"result": ...}}, "workflow": {...}}``.
    Raises ``ExpressionError``."""
    if isinstance(value, str):
        return _resolve_string(value, context)
    if isinstance(value, Mapping):
        return {k: resolve(v, context) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [resolve(v, context) for v in value]
    return value


# ---------------------------------------------------------------- schemas


def schema_problem(schema: Mapping[str, Any] | None, value: Any) -> str | None:
    """Why ``value`` violates ``schema`` (the most relevant error), or None."""
    if schema is None:
        return None
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = validator_cls(schema)
    best = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if best is None:
        return None
    where = "/".join(str(p) for p in best.absolute_path)
    return f"{best.message}" + (f" (at /{where})" if where else "")


def check_input(wf: Workflow, input: Any) -> None:
    """Raise ``InvalidArgumentError`` (status INVALID_ARGUMENT) if ``input`` is not a
    JSON object matching the definition's input schema."""
    if not isinstance(input, Mapping):
        raise exc.InvalidArgumentError(
            f"DAG {wf.id!r}: input must be a JSON object, got {type(input).__name__}",
            status="INVALID_ARGUMENT",
        )
    problem = schema_problem(wf.input_schema, _jsonable(input))
    if problem:
        raise exc.InvalidArgumentError(
            f"DAG {wf.id!r} v{wf.version}: input does not match input_schema: {problem}",
            status="INVALID_ARGUMENT",
        )


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


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
class _StepState:
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
    executed_at: str | None = None
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
            "worker": data.get("worker"),
            "transitions": [Transition.from_dict(t) for t in data.get("transitions", [])],
        }

    def statuses(self) -> list[str]:
        """The states this step went through, in order."""
        return [t.status for t in self.transitions]


@dataclass(slots=True, kw_only=True)
class CompensationState(_StepState):
    """The saga compensation of one completed task."""

    def to_dict(self) -> dict[str, Any]:
        return self._base_dict()

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> CompensationState:
        return CompensationState(**_StepState._base_kwargs(data))


@dataclass(slots=True, kw_only=True)
class TaskState(_StepState):
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
            **_StepState._base_kwargs(data),
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


# -------------------------------------------------------------- executors


def _identity() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


@dataclass(frozen=True, slots=True)
class ExecutorInfo:
    """Which DAG task and attempt an executor is running (see :func:`executor_info`)."""

    task_id: str
    attempt: int
    compensation: bool
    dag_instance_id: str


def executor_info() -> ExecutorInfo:
    """Inside an executor called by a DAG: the task id and the DAG-level attempt (the
    interpreter makes one activity call per attempt, so ``activity.info().attempt``
    is always 1)."""
    info = activity_mod.info()
    task_id, _, rest = info.activity_id.partition("#")
    compensation = rest.startswith("compensation#")
    number = rest.rsplit("#", 1)[-1]
    return ExecutorInfo(
        task_id=task_id,
        attempt=int(number) if number.isdigit() else info.attempt,
        compensation=compensation,
        dag_instance_id=info.workflow_id,
    )


def executor(
    name: str | None = None, *, executed_at: str | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a function ``fn(parameters: dict) -> result`` (async or sync) as a DAG
    executor: an activity named ``name`` (default: the function's name) whose result
    also tells the interpreter when the attempt started and ended, on which worker,
    and where (``executed_at``: cloud / edge / device; default the environment
    variable ``TIDEFLOW_EXECUTED_AT``, else ``cloud``). Register the returned function
    on a ``Worker`` like any activity. Plain activities work as executors too; they
    just report no start time or location."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        activity_name = name or fn.__name__
        location = executed_at or os.environ.get("TIDEFLOW_EXECUTED_AT") or "cloud"

        def envelope(result: Any, started: datetime) -> dict[str, Any]:
            return {
                ENVELOPE_KEY: 1,
                "result": result,
                "started_at": started.isoformat(),
                "ended_at": datetime.now(UTC).isoformat(),
                "executed_at": location,
                "worker": _identity(),
            }

        wrapper: Callable[..., Any]
        if inspect.iscoroutinefunction(fn):

            async def async_wrapper(parameters: dict[str, Any]) -> dict[str, Any]:
                started = datetime.now(UTC)
                return envelope(await fn(parameters), started)

            wrapper = async_wrapper
        else:
            # Sync executors stay sync: the worker runs them in its thread pool.
            def sync_wrapper(parameters: dict[str, Any]) -> dict[str, Any]:
                started = datetime.now(UTC)
                return envelope(fn(parameters), started)

            wrapper = sync_wrapper
        for attribute in ("__module__", "__name__", "__qualname__", "__doc__"):
            setattr(wrapper, attribute, getattr(fn, attribute, None))
        setattr(wrapper, "__tideflow_dag_executor__", fn)  # noqa: B010
        return activity_mod.defn(name=activity_name)(wrapper)

    return decorate


def unwrap_result(raw: Any) -> tuple[Any, dict[str, Any]]:
    """An executor's result and the envelope's metadata (empty for plain activities)."""
    if isinstance(raw, dict) and raw.get(ENVELOPE_KEY) == 1:
        meta = {k: v for k, v in raw.items() if k not in (ENVELOPE_KEY, "result")}
        return raw.get("result"), meta
    return raw, {}


# ---------------------------------------------------------- client side


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


class DagHandle:
    """A running (or finished) DAG run; get one from ``client.start_dag(...)`` or
    ``client.get_dag_handle(id)``."""

    def __init__(self, client: Client, id: str, *, run_id: str | None = None) -> None:
        from .client import WorkflowHandle

        self.client = client
        self.id = id
        self.workflow: WorkflowHandle = WorkflowHandle(client, id, run_id=run_id)

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

    async def watch(self, interval: float = 0.2) -> AsyncIterator[WorkflowInstance]:
        """Yield the instance whenever it changed, until the run ended (polling
        ``status()`` every ``interval`` seconds)."""
        last: dict[str, Any] | None = None
        while True:
            try:
                instance = await self.status()
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
    from ._dag_interpreter import DagWorkflow
    from ._workflow_instance import WorkflowInstance as _Replay
    from .workflow import definition_of

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
        steps: list[tuple[_StepState, str]] = [(state, f"{tid}#{state.attempts}")]
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
    """Validate ``definition`` and ``input`` and start a DAG run (see
    ``Client.start_dag``). Nothing is started if validation fails:
    ``DagValidationError`` for the definition, ``InvalidArgumentError``
    (INVALID_ARGUMENT) for input that violates the input schema."""
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
    request = {"definition": wf.to_dict(), "input": _jsonable(payload_input)}
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


# ------------------------------------------------------------- rendering


def _short(value: Any, width: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def _clock(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3]


def render_table(instance: WorkflowInstance) -> str:
    """A text table of the task states (what ``tideflow dag status`` prints)."""
    header = (
        f"DAG {instance.workflow_id} v{instance.workflow_version}  run {instance.id}  "
        f"status {instance.status.value}"
        + (f" ({instance.phase})" if instance.phase not in ("executing", "done") else "")
    )
    rows = [("TASK", "STATUS", "ATTEMPTS", "STARTED", "ENDED", "WHERE", "RESULT / ERROR")]
    for tid, st in instance.task_states.items():
        detail = (
            str(st.error)
            if st.error is not None and st.status is not TaskStatus.COMPLETED
            else ("" if st.result is None else _short(st.result, 48))
        )
        if st.status is TaskStatus.RETRY and st.next_retry_time is not None:
            detail = f"retry at {_clock(st.next_retry_time)}; last: {st.error}"
        rows.append(
            (
                tid,
                st.status.value,
                f"{st.attempts}/{st.max_attempts}",
                _clock(st.start_time),
                _clock(st.end_time),
                st.executed_at or "-",
                _short(detail, 60),
            )
        )
        if st.compensation is not None:
            comp = st.compensation
            rows.append(
                (
                    f"  ↳ compensate ({comp.executor})",
                    comp.status.value,
                    f"{comp.attempts}/{comp.max_attempts}",
                    _clock(comp.start_time),
                    _clock(comp.end_time),
                    comp.executed_at or "-",
                    _short(str(comp.error) if comp.error else "", 60),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [header]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if instance.failed_tasks:
        lines.append(f"failed tasks: {', '.join(instance.failed_tasks)}")
    if instance.skipped_tasks:
        lines.append(f"skipped tasks: {', '.join(instance.skipped_tasks)}")
    if instance.error is not None:
        lines.append(f"error: {instance.error}")
    if instance.status is WorkflowStatus.COMPLETED:
        lines.append(f"output: {_short(instance.output, 200)}")
    return "\n".join(lines)


def _levels(wf: Workflow) -> dict[str, int]:
    level: dict[str, int] = {}
    deps = {t.id: t.dependencies for t in wf.tasks}
    for tid in _topological_order(wf):
        level[tid] = 1 + max((level[d] for d in deps[tid]), default=-1)
    return level


def render_graph(wf: Workflow) -> str:
    """The DAG as text, one line per task grouped by depth, with its dependencies."""
    level = _levels(wf)
    lines = [
        f"{wf.id} v{wf.version}: {len(wf.tasks)} tasks, failure policy {wf.failure_policy.value}"
    ]
    for depth in range(max(level.values(), default=-1) + 1):
        lines.append(f"stage {depth}:")
        for task in wf.tasks:
            if level[task.id] != depth:
                continue
            extras = []
            if task.timeout is not None:
                extras.append(f"timeout {format_duration(task.timeout)}")
            if task.retry_policy.max_attempts > 1:
                extras.append(f"{task.retry_policy.max_attempts} attempts")
            if task.compensation is not None:
                extras.append(f"compensation {task.compensation.executor}")
            after = f" <- {', '.join(task.dependencies)}" if task.dependencies else ""
            suffix = f"  ({'; '.join(extras)})" if extras else ""
            lines.append(f"  {task.id} [{task.executor}]{after}{suffix}")
    edges = [(d, t.id) for t in wf.tasks for d in t.dependencies]
    lines.append("edges:")
    lines.extend(f"  {a} -> {b}" for a, b in edges)
    if not edges:
        lines.append("  (none)")
    return "\n".join(lines)


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_dot(wf: Workflow) -> str:
    """The DAG in Graphviz DOT (compensations as dashed nodes)."""
    lines = [
        f"digraph {_dot_quote(wf.id)} {{",
        "  rankdir=LR;",
        f"  label={_dot_quote(f'{wf.id} v{wf.version}')};",
        "  node [shape=box, style=rounded];",
    ]
    for task in wf.tasks:
        label = f"{task.id}\\n[{task.executor}]"
        lines.append(f'  {_dot_quote(task.id)} [label="{label}"];')
    for task in wf.tasks:
        for dep in task.dependencies:
            lines.append(f"  {_dot_quote(dep)} -> {_dot_quote(task.id)};")
    for task in wf.tasks:
        if task.compensation is not None:
            node = f"{task.id}/compensation"
            lines.append(
                f'  {_dot_quote(node)} [label="undo {task.id}\\n[{task.compensation.executor}]"'
                ", style=dashed];"
            )
            lines.append(f"  {_dot_quote(task.id)} -> {_dot_quote(node)} [style=dashed];")
    lines.append("}")
    return "\n".join(lines)


class ProgressPrinter:
    """Turns successive ``WorkflowInstance`` snapshots into progress lines: every
    transition of the run, its tasks and their compensations, once, in the order the
    interpreter made them (what ``tideflow dag run --wait`` prints)."""

    def __init__(self) -> None:
        self._printed: dict[str, int] = {}
        self._observed: set[tuple[str, int | None]] = set()
        self._closed = False

    def update(self, instance: WorkflowInstance) -> list[str]:
        """Lines for what changed since the previous call."""
        origin = instance.start_time
        entries: list[tuple[float, str]] = []

        def stamp(moment: datetime | None) -> str:
            if moment is None or origin is None:
                return "   ...  "
            return f"{(moment - origin).total_seconds():7.2f}s"

        def collect(label: str, transitions: list[Transition], step: _StepState | None) -> None:
            recorded = [t for t in transitions if not t.observed]
            done = self._printed.get(label, 0)
            for t in recorded[done:]:
                if t.status == TaskStatus.RUNNING and (label, t.attempt) in self._observed:
                    continue
                entries.append((float(t.seq or 0), self._line(stamp(t.time), label, t, step)))
            self._printed[label] = len(recorded)
            last_seq = float(recorded[-1].seq or 0) if recorded else 0.0
            for t in transitions:
                if t.observed and (label, t.attempt) not in self._observed:
                    self._observed.add((label, t.attempt))
                    entries.append((last_seq + 0.5, self._line(stamp(t.time), label, t, step)))

        collect("workflow", instance.transitions, None)
        for tid, st in instance.task_states.items():
            collect(tid, st.transitions, st)
            if st.compensation is not None:
                collect(f"{tid} (undo)", st.compensation.transitions, st.compensation)
        entries.sort(key=lambda entry: entry[0])
        lines = [line for _, line in entries]
        if instance.done and not self._closed:
            self._closed = True
            if instance.status is WorkflowStatus.COMPLETED:
                lines.append(f"output: {_short(instance.output, 200)}")
            elif instance.error is not None:
                lines.append(f"error: {instance.error}")
        return lines

    @staticmethod
    def _line(when: str, label: str, t: Transition, step: _StepState | None) -> str:
        line = f"[{when}] {label:<24} {t.status:<9}"
        if step is not None and t.attempt is not None:
            line += f" attempt {t.attempt}/{step.max_attempts}"
        if step is not None and t.status == TaskStatus.RUNNING:
            where = [w for w in (step.executed_at, step.worker) if w]
            if where:
                line += f" on {' / '.join(where)}"
        if t.note:
            line += f"  {t.note}"
        return line.rstrip()


# The interpreter lives in its own module; importing it here lazily keeps either
# import order working.
def __getattr__(name: str) -> Any:
    if name == "DagWorkflow":
        from ._dag_interpreter import DagWorkflow

        return DagWorkflow
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
