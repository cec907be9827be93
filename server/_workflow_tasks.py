"""Workflow tasks: the transitions that start, complete and fail one.

A workflow task is the unit in which workflow code runs: it is started by a worker's
poll, and its completion carries the commands that become the run's next events
(server/_commands.py). A failed or timed-out task is retried: the second attempt at
once, later ones after a backoff, all "transient" (no history until one completes).
Every function here works on a ``Mutation``; the engine runs them under the run's lock
and commits what they built.

TLA+ actions (tla/EngineCore.tla): ``WftTaskValid`` + ``RecordWorkflowTaskStarted``,
``StartWorkflowTask``, ``WftTokenValid``, ``CompleteWorkflowTaskWith`` (with or without
sticky attributes), ``MaterializeTransient``, ``FailWft``, ``FailWorkflowTaskWith``,
``StartEagerly``.
"""

from __future__ import annotations

import uuid

from tideflow.api.v1 import command_pb2, service_pb2, state_pb2
from tideflow.api.v1.common_pb2 import Failure, TimeoutType
from tideflow.api.v1.common_pb2 import WorkflowExecutionStatus as WS
from tideflow.api.v1.history_pb2 import (
    EventType,
    WorkflowTaskCompletedMetadata,
    WorkflowTaskFailedCause,
)
from tideflow.history import TaskRow, TimerKind

from . import _commands
from ._config import ServerConfig
from ._errors import NotFoundError
from ._mutation import Mutation

ET = EventType
_US = 1_000_000
# Largest exponent 2.0 ** n takes without OverflowError.
_MAX_BACKOFF_EXPONENT = 1023


def start(m: Mutation, identity: str) -> state_pb2.WorkflowTaskInfo:
    """Hand the scheduled workflow task to a worker; returns a copy of its info."""
    ms = m.ms
    wft = ms.workflow_task
    request_id = str(uuid.uuid4())
    wft.history_size_bytes = ms.history_size_bytes
    if wft.transient:
        # Ids a completion will give the scheduled/started events; nothing can be
        # appended before then because new events are buffered meanwhile.
        wft.scheduled_event_id = ms.next_event_id
        wft.started_event_id = ms.next_event_id + 1
        m.dirty = True
    else:
        event = m.append(
            ET.EVENT_TYPE_WORKFLOW_TASK_STARTED,
            scheduled_event_id=wft.scheduled_event_id,
            identity=identity,
            request_id=request_id,
            history_size_bytes=wft.history_size_bytes,
        )
        wft.started_event_id = event.event_id
    wft.started_time.FromMicroseconds(m.now)
    wft.identity = identity
    wft.request_id = request_id
    wft.timer_keys.append(
        m.add_timer(
            TimerKind.WORKFLOW_TASK_TIMEOUT,
            wft.scheduled_event_id,
            wft.attempt,
            m.now + ms.workflow_task_timeout.ToMicroseconds(),
        )
    )
    info = state_pb2.WorkflowTaskInfo()
    info.CopyFrom(wft)
    return info


def record_started(m: Mutation, task: TaskRow, identity: str) -> state_pb2.WorkflowTaskInfo | None:
    """A poller took the task row: start the task, or None if the row is stale."""
    ms = m.ms
    wft = ms.workflow_task
    if (
        ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING
        or not ms.HasField("workflow_task")
        or wft.started_event_id != 0
        or wft.attempt != task.attempt
        or (0 if wft.transient else wft.scheduled_event_id) != task.ref_id
    ):
        return None
    m.trace["task"] = task
    m.done_task_keys.append(task.task_key)
    return start(m, identity)


def check_token(m: Mutation, token: state_pb2.TaskToken) -> None:
    """Refuse a report about a task that is no longer the started one."""
    ms = m.ms
    wft = ms.workflow_task
    if (
        ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING
        or not ms.HasField("workflow_task")
        or wft.started_event_id == 0
        or wft.scheduled_event_id != token.scheduled_event_id
        or wft.started_event_id != token.started_event_id
        or wft.attempt != token.attempt
    ):
        raise NotFoundError(
            "workflow task not found: it already completed, timed out, or the run closed "
            f"(workflow_id={token.workflow_id!r}, "
            f"scheduled_event_id={token.scheduled_event_id}, "
            f"attempt={token.attempt})"
        )


def materialize_transient(m: Mutation) -> None:
    """A transient attempt that completes gets its scheduled/started events now."""
    ms = m.ms
    wft = ms.workflow_task
    if not wft.transient:
        return
    scheduled = m.append(
        ET.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
        task_queue=wft.task_queue,
        start_to_close_timeout=ms.workflow_task_timeout,
        attempt=wft.attempt,
    )
    started = m.append(
        ET.EVENT_TYPE_WORKFLOW_TASK_STARTED,
        scheduled_event_id=scheduled.event_id,
        identity=wft.identity,
        request_id=wft.request_id,
        history_size_bytes=wft.history_size_bytes,
    )
    assert scheduled.event_id == wft.scheduled_event_id
    assert started.event_id == wft.started_event_id


def complete(
    m: Mutation,
    token: state_pb2.TaskToken,
    commands: list[command_pb2.Command],
    identity: str,
    sticky: service_pb2.StickyExecutionAttributes | None,
    eager: list[int],
    config: ServerConfig,
    force_new: bool = False,
    sdk_metadata: WorkflowTaskCompletedMetadata | None = None,
) -> str | None:
    """Apply a completed task's commands; returns why they were refused, or None.

    Refused commands fail the task (the worker sees a failed task, the workflow a
    retry). ``eager`` receives the scheduled event ids of the activities this worker
    asked to run itself. ``force_new`` (the request's force_create_new_workflow_task)
    schedules the next workflow task even if nothing new happened: the heartbeat of a
    worker whose local activities still run (with return_new_workflow_task the engine
    then starts it for that worker: ``start_eagerly``). ``sdk_metadata`` (a Temporal
    SDK's behaviour flags) goes into the WorkflowTaskCompleted event. TLA+:
    ``CompleteWorkflowTaskWith(ms, cmds, sticky, forceNew, returnNew)``."""
    eager.clear()  # a conflict retry recomputes the transition from scratch
    check_token(m, token)
    _commands.decline_eager_elsewhere(m.ms, commands)
    m.trace.update(
        token=token,
        commands=commands,
        sticky=sticky is not None and bool(sticky.worker_task_queue.name),
        eager_identity=bool(identity),
        force_new=force_new,
    )
    try:
        _commands.validate(m.ms, commands)
    except _commands.BadCommandError as exc:
        m.trace["rejected"] = exc
        fail(m, exc.cause, Failure(message=str(exc), source="server"), identity, config)
        return str(exc)
    completed_id = _record_completion(m, identity, sticky, sdk_metadata)
    ms = m.ms
    context = _commands.Context(
        completed_id=completed_id, identity=identity, eager=eager, config=config
    )
    for command in commands:
        if ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING:
            break  # commands after the one that closed the run are ignored
        _commands.apply(context, m, command)
    if ms.status == WS.WORKFLOW_EXECUTION_STATUS_RUNNING and (m.flush_buffered() or force_new):
        m.schedule_workflow_task()
    return None


def _record_completion(
    m: Mutation,
    identity: str,
    sticky: service_pb2.StickyExecutionAttributes | None,
    sdk_metadata: WorkflowTaskCompletedMetadata | None,
) -> int:
    """WorkflowTaskCompleted (after a transient attempt's own events), the sticky
    worker it names, and the task cleared; returns the completed event's id."""
    ms = m.ms
    wft = ms.workflow_task
    materialize_transient(m)
    completed = m.append(
        ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
        scheduled_event_id=wft.scheduled_event_id,
        started_event_id=wft.started_event_id,
        identity=identity,
        sdk_metadata=sdk_metadata,
    )
    ms.last_workflow_task_completed_event_id = completed.event_id
    ms.last_workflow_task_started_event_id = wft.started_event_id
    if sticky is not None and sticky.worker_task_queue.name:
        ms.sticky_task_queue = sticky.worker_task_queue.name
        ms.sticky_schedule_to_start_timeout.CopyFrom(sticky.schedule_to_start_timeout)
    elif ms.sticky_task_queue:
        m.unstick()
    m.clear_workflow_task()
    return completed.event_id


def fail(
    m: Mutation,
    cause: int,
    failure: Failure,
    identity: str,
    config: ServerConfig,
    *,
    timed_out: bool = False,
) -> None:
    """The started task failed or timed out: record it (unless transient) and
    schedule the next attempt."""
    ms = m.ms
    wft = ms.workflow_task
    attempt = wft.attempt
    # A failed or lost task may mean the sticky worker is gone: use the normal queue.
    m.unstick()
    if not wft.transient:
        _record_failure(m, cause, failure, identity, timed_out=timed_out)
    m.clear_workflow_task()
    reset_sticky = (
        cause == WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_RESET_STICKY_TASK_QUEUE
    )
    if m.flush_buffered() or reset_sticky:
        # New events, or a sticky worker that lost the run: a fresh, recorded
        # attempt (full history through the normal queue), not a retry.
        m.schedule_workflow_task()
        return
    next_attempt = attempt + 1
    delay = _retry_delay_us(config, next_attempt)
    m.schedule_workflow_task(attempt=next_attempt, delay_until=m.now + delay if delay else 0)


def _record_failure(
    m: Mutation, cause: int, failure: Failure, identity: str, *, timed_out: bool
) -> None:
    wft = m.ms.workflow_task
    if timed_out:
        m.append(
            ET.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT,
            scheduled_event_id=wft.scheduled_event_id,
            started_event_id=wft.started_event_id,
            timeout_type=TimeoutType.TIMEOUT_TYPE_START_TO_CLOSE,
        )
    else:
        m.append(
            ET.EVENT_TYPE_WORKFLOW_TASK_FAILED,
            scheduled_event_id=wft.scheduled_event_id,
            started_event_id=wft.started_event_id,
            cause=cause,
            failure=failure,
            identity=identity,
        )


def _retry_delay_us(config: ServerConfig, attempt: int) -> int:
    """Backoff before ``attempt``: none for the second (a transient retry at once),
    then exponential from the configured initial delay up to its cap."""
    if attempt <= 2:
        return 0
    # A float power of two, its exponent held below the float range: an int power
    # times a float raised OverflowError from about attempt 1,030 on (a workflow that
    # fails every task for a few hours), failing the failure's own transition. Past
    # the cap the product may be inf, which min() turns into the cap.
    growth = 2.0 ** min(attempt - 3, _MAX_BACKOFF_EXPONENT)
    return int(
        min(config.workflow_task_retry_initial_s * growth, config.workflow_task_retry_max_s) * _US
    )


def start_eagerly(
    m: Mutation, had_workflow_task: bool, queue: str, identity: str
) -> state_pb2.WorkflowTaskInfo | None:
    """Start the workflow task this transition scheduled on the reporting worker
    (same task queue), instead of dispatching it; None if it does not qualify."""
    ms = m.ms
    if (
        not queue
        or had_workflow_task
        or not ms.HasField("workflow_task")
        or ms.workflow_task.transient
        or ms.task_queue.name != queue
    ):
        return None
    row = m.workflow_task_row_key()
    m.new_tasks = [t for t in m.new_tasks if t.task_key != row]
    return start(m, identity)
