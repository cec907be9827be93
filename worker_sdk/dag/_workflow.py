"""A DAG definition (``Workflow``) and its validation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import jsonschema

from .. import exceptions as exc
from . import _graph
from ._durations import format_duration
from ._errors import DagValidationError, ExpressionError, ValidationIssue
from ._expressions import jsonable, references, schema_problem
from ._model import (
    ID_RE,
    Executor,
    FailurePolicy,
    RetryPolicy,
    Task,
    check_keys,
    mapping,
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
        data = mapping(data, "workflow")
        check_keys(data, _WORKFLOW_FIELDS, "workflow")
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


def _graph_of(wf: Workflow) -> dict[str, list[str]]:
    return {t.id: list(t.dependencies) for t in wf.tasks}


def _topological_order(wf: Workflow) -> list[str]:
    graph = _graph_of(wf)
    order = _graph.topological_order(graph)
    if order is None:
        cycle = _graph.find_cycle(graph) or sorted(graph)
        raise DagValidationError([ValidationIssue(cycle[0], f"cycle: {' -> '.join(cycle)}")], wf.id)
    return order


def ancestors(wf: Workflow) -> dict[str, set[str]]:
    """Every task's transitive dependencies (the definition must be acyclic).

    Quadratic in the size of a long chain; validation and the interpreter do not
    need it (they walk the graph as needed)."""
    graph = _graph_of(wf)
    result: dict[str, set[str]] = {}
    for tid in _topological_order(wf):
        found: set[str] = set()
        for dep in graph[tid]:
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
        if task.id in seen:
            issues.append(
                ValidationIssue(
                    task.id,
                    f"task {task.id!r}: duplicate task id "
                    f"(tasks[{seen[task.id]}] and tasks[{index}])",
                )
            )
        seen.setdefault(task.id, index)
        issues += _check_task(task, known)
    for name, executor_ in wf.executors.items():
        if executor_.activity == "":
            issues.append(ValidationIssue(None, f"executor {name!r}: empty activity type"))
    cycle = _check_graph(wf, issues)
    issues += _check_schemas(wf)
    acyclic = cycle is None and len(seen) == len(wf.tasks)
    issues += _check_expressions(wf, acyclic=acyclic)
    if issues:
        raise DagValidationError(issues, wf.id or None)


def _check_task(task: Task, known: set[str] | None) -> list[ValidationIssue]:
    where = f"task {task.id!r}"
    issues: list[ValidationIssue] = []
    if not isinstance(task.id, str) or not ID_RE.match(task.id):
        issues.append(ValidationIssue(task.id, f"{where}: id must match [A-Za-z0-9][A-Za-z0-9_-]*"))
    steps: list[tuple[str, str, timedelta | None, RetryPolicy]] = [
        (where, task.executor, task.timeout, task.retry_policy)
    ]
    if task.compensation is not None:
        comp = task.compensation
        steps.append((f"{where} compensation", comp.executor, comp.timeout, comp.retry_policy))
    for step_where, executor, timeout, policy in steps:
        if not executor:
            issues.append(ValidationIssue(task.id, f"{step_where}: no executor"))
        elif known is not None and executor not in known:
            issues.append(ValidationIssue(task.id, f"{step_where}: unknown executor {executor!r}"))
        issues += _check_timeout(timeout, step_where, task.id)
        issues += _check_policy(policy, f"{step_where} retry_policy", task.id)
    counts = Counter(task.dependencies)
    for dep in sorted(d for d, n in counts.items() if n > 1):
        issues.append(ValidationIssue(task.id, f"{where}: depends on {dep!r} twice"))
    return issues


def _check_graph(wf: Workflow, issues: list[ValidationIssue]) -> list[str] | None:
    """Add unknown dependencies and a cycle to ``issues``; returns the cycle."""
    ids = {t.id for t in wf.tasks}
    for task in wf.tasks:
        for dep in task.dependencies:
            if dep not in ids:
                issues.append(
                    ValidationIssue(task.id, f"task {task.id!r}: depends on unknown task {dep!r}")
                )
    cycle = _graph.find_cycle(_graph_of(wf))
    if cycle:
        issues.append(ValidationIssue(cycle[0], f"task {cycle[0]!r}: cycle: {' -> '.join(cycle)}"))
    return cycle


def _check_schemas(wf: Workflow) -> list[ValidationIssue]:
    issues = []
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
    return issues


@dataclass(frozen=True, slots=True)
class _Use:
    """A ``${tasks.<id>...}`` that names a task other than a direct dependency."""

    task_id: str
    where: str
    text: str
    target: str
    position: int  # where its issue goes among the others (they stay in task order)


def _check_expressions(wf: Workflow, *, acyclic: bool) -> list[ValidationIssue]:
    """Malformed expressions, unknown tasks, and results used by a task that does not
    (transitively) depend on their task. Only references beyond a direct dependency
    need a graph walk, one per distinct referenced task: linear for a long chain,
    where computing every task's ancestors would be quadratic."""
    issues: list[ValidationIssue] = []
    ids = {t.id for t in wf.tasks}
    indirect: list[_Use] = []

    def check(value: Any, where: str, task_id: str | None, direct: set[str] | None) -> None:
        try:
            refs = references(value)
        except ExpressionError as error:
            issues.append(ValidationIssue(task_id, f"{where}: {error}"))
            return
        for ref in refs:
            if ref.root != "tasks" or ref.task_id is None:
                continue
            if ref.task_id not in ids:
                issues.append(
                    ValidationIssue(
                        task_id, f"{where}: {ref.text} refers to unknown task {ref.task_id!r}"
                    )
                )
            elif task_id is not None and direct is not None and ref.task_id not in direct:
                indirect.append(_Use(task_id, where, ref.text, ref.task_id, len(issues)))

    for task in wf.tasks:
        direct = set(task.dependencies)
        check(task.parameters, f"task {task.id!r} parameters", task.id, direct)
        if task.compensation is not None and task.compensation.parameters is not None:
            where = f"task {task.id!r} compensation parameters"
            check(task.compensation.parameters, where, task.id, direct | {task.id})
    if wf.output is not None:
        check(wf.output, "workflow output", None, None)
    below: dict[str, set[str]] = {}
    reverse = _graph.dependents(_graph_of(wf)) if acyclic else {}
    for use in reversed(indirect):
        # With a cycle or duplicate ids "upstream" is ill-defined: direct deps only.
        if acyclic:
            if use.target not in below:
                below[use.target] = _graph.reachable(reverse, use.target)
            if use.task_id in below[use.target]:
                continue
        issues.insert(
            use.position,
            ValidationIssue(
                use.task_id,
                f"{use.where}: {use.text} refers to task {use.target!r}, which is not one "
                "of its (transitive) dependencies",
            ),
        )
    return issues


def check_input(wf: Workflow, input: Any) -> None:
    """Raise ``InvalidArgumentError`` (status INVALID_ARGUMENT) if ``input`` is not a
    JSON object matching the definition's input schema."""
    if not isinstance(input, Mapping):
        raise exc.InvalidArgumentError(
            f"DAG {wf.id!r}: input must be a JSON object, got {type(input).__name__}",
            status="INVALID_ARGUMENT",
        )
    problem = schema_problem(wf.input_schema, jsonable(input))
    if problem:
        raise exc.InvalidArgumentError(
            f"DAG {wf.id!r} v{wf.version}: input does not match input_schema: {problem}",
            status="INVALID_ARGUMENT",
        )
