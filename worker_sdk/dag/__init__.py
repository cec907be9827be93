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

    handle = await dag.start_dag(client, wf, {"source_db": "src.db"}, task_queue="etl")
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
        placement: device           # cloud | edge | device | auto (README "Placement")
        requirements: {labels: [camera], min_memory_mb: 512, min_cores: 1}

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
result, the resolved parameters, start / end times, and where it ran: ``executed_at``
(tier), ``site`` and ``worker``, as the server recorded the poll that took the attempt.

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

from ._durations import format_duration, parse_duration
from ._errors import DagValidationError, ExpressionError, ValidationIssue
from ._executors import ExecutorInfo, executor, executor_info
from ._expressions import resolve
from ._format import dump, dumps, load, loads
from ._handle import DagHandle, start_dag
from ._interpreter import DagWorkflow
from ._model import (
    DAG_WORKFLOW_TYPE,
    DEFAULT_TASK_QUEUE,
    DEFAULT_TASK_TIMEOUT,
    Compensation,
    Executor,
    ExponentialBackoff,
    FailurePolicy,
    RetryPolicy,
    Task,
    TaskStatus,
    WorkflowStatus,
    new_task,
)
from ._render import ProgressPrinter, render_dot, render_graph, render_table
from ._state import (
    CompensationState,
    DagFailureError,
    ErrorInfo,
    TaskState,
    Transition,
    WorkflowInstance,
)
from ._workflow import (
    Workflow,
    check_input,
    new_workflow,
    validate,
)

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
