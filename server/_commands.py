"""Commands of a completed workflow task: validation, then application.

A workflow task's completion carries commands (schedule an activity, start a timer,
complete the run...). They are first validated as a whole against the run's state
(``validate``: one refused command fails the task and nothing is applied), then
applied one by one to the transition (``apply``). Each command type has one
validator and one applier, found through ``_HANDLERS`` keyed by its ``CommandType``.
Nothing here keeps state between calls; the engine runs it under the run's lock.

TLA+ actions (tla/EngineCore.tla): ``CommandsValid`` (with ``FiredUnseen``,
``HasBufferedSignal``), ``ApplyCommand`` / ``ApplyCommands``, ``ScheduleActivity``
(``ActCmd``), commands ``StartTimer``, ``CancelTimer`` (the cancel of a timer that
fired while the task ran wins), ``CancelActivityCmd``, ``Complete``, ``Fail``,
``CancelWorkflow``, ``ContinueAsNew``, ``RecordMarker``, ``UpsertSearchAttributes``,
``ChildCmd``, ``SignalExternal``, ``CancelExternal`` (their ``TransferRow``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tideflow.api.v1 import command_pb2, common_pb2, history_pb2, service_pb2, state_pb2
from tideflow.api.v1.command_pb2 import Command, CommandType
from tideflow.api.v1.common_pb2 import RetryState
from tideflow.api.v1.common_pb2 import WorkflowExecutionStatus as WS
from tideflow.api.v1.history_pb2 import EventType, WorkflowTaskFailedCause
from tideflow.history import CurrentWrite, TimerKind, TransferAction, search_attributes_problem

from . import _activities, _retry, _run_start
from ._config import ServerConfig
from ._mutation import Mutation
from ._placement import TIERS, encode, placement_problem

ET = EventType
# Activities one workflow task may start eagerly (the rest go through matching).
# tla/trace_to_tla.py reads this value: the model bounds eager starts the same way.
_MAX_EAGER_ACTIVITIES = 3


class BadCommandError(Exception):
    """A command the engine refuses; the workflow task fails with this message."""

    def __init__(
        self,
        message: str,
        cause: int = WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_BAD_COMMAND_ATTRIBUTES,
    ) -> None:
        super().__init__(message)
        self.cause = cause


@dataclass(frozen=True, slots=True, kw_only=True)
class Context:
    """What applying a task's commands needs besides the transition itself."""

    # The WorkflowTaskCompleted event the commands' events refer to.
    completed_id: int
    # The completing worker (it may run activities it asked for eagerly).
    identity: str
    # Scheduled event ids of the activities started eagerly, filled in by apply().
    eager: list[int]
    config: ServerConfig


@dataclass(slots=True, kw_only=True)
class _Validation:
    """What validation tracks across the commands of one task: ids taken by earlier
    commands count as pending for later ones."""

    ms: state_pb2.MutableState
    activity_ids: set[str]
    timer_ids: set[str]
    # Timers that fired while this task ran: the workflow has not seen the fire
    # yet and may still cancel them (the buffered TIMER_FIRED is then dropped).
    fired_unseen: set[str]
    # A signal is waiting that the workflow has not seen: it may not close yet.
    has_signal: bool

    @classmethod
    def of(cls, ms: state_pb2.MutableState) -> _Validation:
        return cls(
            ms=ms,
            activity_ids={info.activity_id for info in ms.pending_activities.values()},
            timer_ids=set(ms.pending_timers),
            fired_unseen={
                e.timer_fired_event_attributes.timer_id
                for e in ms.buffered_events
                if e.event_type == ET.EVENT_TYPE_TIMER_FIRED
            },
            has_signal=any(
                e.event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
                for e in ms.buffered_events
            ),
        )


_Validator = Callable[[_Validation, Command, str], None]
_Applier = Callable[[Context, Mutation, Command], None]


def validate(ms: state_pb2.MutableState, commands: list[Command]) -> None:
    """Raise BadCommandError for the first command the run cannot take."""
    state = _Validation.of(ms)
    for index, command in enumerate(commands):
        ctype = command.command_type
        where = f"command {index} ({_type_name(ctype)})"
        if command.WhichOneof("attributes") is None:
            raise BadCommandError(f"{where} has no attributes")
        handler = _HANDLERS.get(ctype)
        if handler is None:
            raise BadCommandError(f"{where} is not supported by this server yet")
        handler[0](state, command, where)


def apply(context: Context, m: Mutation, command: Command) -> None:
    """Apply one validated command to the transition."""
    _HANDLERS[command.command_type][1](context, m, command)


def _type_name(ctype: int) -> str:
    # An unknown number (a newer client, or garbage) must still give a message.
    try:
        return CommandType.Name(ctype)
    except ValueError:
        return str(ctype)


# ------------------------------------------------------------------ activities


def _validate_schedule_activity(state: _Validation, command: Command, where: str) -> None:
    a = command.schedule_activity_task_command_attributes
    if not a.activity_id:
        raise BadCommandError(f"{where}: activity_id is empty")
    if a.activity_id in state.activity_ids:
        raise BadCommandError(f"{where}: activity_id {a.activity_id!r} is already pending")
    state.activity_ids.add(a.activity_id)
    if not a.activity_type.name:
        raise BadCommandError(f"{where}: activity_type is empty")
    if (
        a.start_to_close_timeout.ToMicroseconds() <= 0
        and a.schedule_to_close_timeout.ToMicroseconds() <= 0
    ):
        raise BadCommandError(
            f"{where}: start_to_close_timeout or schedule_to_close_timeout must be set"
        )
    for name in (
        "schedule_to_close_timeout",
        "schedule_to_start_timeout",
        "start_to_close_timeout",
        "heartbeat_timeout",
    ):
        if getattr(a, name).ToMicroseconds() < 0:
            raise BadCommandError(f"{where}: {name} must not be negative")
    problem = _retry.validate(a.retry_policy) or placement_problem(a.placement, a.requirements)
    if problem:
        raise BadCommandError(f"{where}: {problem}")


def decline_eager_elsewhere(ms: state_pb2.MutableState, commands: Sequence[Command]) -> None:
    """Clear the eager request of an activity scheduled on a task queue other than the
    run's. The completing worker polls the run's queue; another queue's activity is for
    that queue's workers (Temporal's server decides the same), so it is dispatched there.
    Done before the trace records the commands: the model sees the request declined."""
    for command in commands:
        if command.command_type != CommandType.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK:
            continue
        a = command.schedule_activity_task_command_attributes
        if a.request_eager_execution and a.task_queue.name not in ("", ms.task_queue.name):
            a.request_eager_execution = False


def _apply_schedule_activity(context: Context, m: Mutation, command: Command) -> None:
    a = command.schedule_activity_task_command_attributes
    attrs = _scheduled_attributes(m.ms, a, context.completed_id)
    event = m.append(ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)
    event.activity_task_scheduled_event_attributes.CopyFrom(attrs)
    sid = event.event_id
    m.scheduled_activities[sid] = attrs
    info = m.ms.pending_activities[sid]
    info.scheduled_event_id = sid
    info.activity_id = a.activity_id
    info.activity_type.CopyFrom(a.activity_type)
    info.task_queue.CopyFrom(attrs.task_queue)
    info.attempt = 1
    info.first_scheduled_time.FromMicroseconds(m.now)
    info.scheduled_time.FromMicroseconds(m.now)
    info.schedule_to_close_timeout.CopyFrom(attrs.schedule_to_close_timeout)
    info.schedule_to_start_timeout.CopyFrom(attrs.schedule_to_start_timeout)
    info.start_to_close_timeout.CopyFrom(attrs.start_to_close_timeout)
    info.heartbeat_timeout.CopyFrom(attrs.heartbeat_timeout)
    info.retry_policy.CopyFrom(attrs.retry_policy)
    info.placement.tier = attrs.placement
    info.placement.requirements.CopyFrom(attrs.requirements)
    s2c = attrs.schedule_to_close_timeout.ToMicroseconds()
    if s2c:
        info.timer_keys.append(
            m.add_timer(TimerKind.ACTIVITY_SCHEDULE_TO_CLOSE, sid, 0, m.now + s2c)
        )
    eager = context.eager
    if (
        context.identity
        and a.request_eager_execution
        and len(eager) < _MAX_EAGER_ACTIVITIES
        # Only matching knows whether a worker meets a placement.
        and not encode(info.placement)
    ):
        # The completing worker runs it: no dispatch row, no poll, no extra commit.
        config = context.config
        _activities.start_attempt(
            m, info, context.identity, config.cluster_name, TIERS[config.site_tier]
        )
        eager.append(sid)
    else:
        _activities.dispatch_attempt(m, info)


def _scheduled_attributes(
    ms: state_pb2.MutableState,
    a: command_pb2.ScheduleActivityTaskCommandAttributes,
    completed_id: int,
) -> history_pb2.ActivityTaskScheduledEventAttributes:
    """The ActivityTaskScheduled event of a command, its timeouts normalized."""
    attrs = history_pb2.ActivityTaskScheduledEventAttributes()
    attrs.activity_id = a.activity_id
    attrs.activity_type.CopyFrom(a.activity_type)
    attrs.task_queue.name = a.task_queue.name or ms.task_queue.name
    attrs.task_queue.kind = common_pb2.TASK_QUEUE_KIND_NORMAL
    if a.HasField("header"):
        attrs.header.CopyFrom(a.header)
    if a.HasField("input"):
        attrs.input.CopyFrom(a.input)
    # Timeout defaults follow Temporal: start-to-close inherits schedule-to-close and
    # vice versa; schedule-to-start defaults to "until schedule-to-close".
    s2c = a.schedule_to_close_timeout.ToMicroseconds()
    st2c = a.start_to_close_timeout.ToMicroseconds() or s2c
    s2s = a.schedule_to_start_timeout.ToMicroseconds()
    if s2c:
        attrs.schedule_to_close_timeout.FromMicroseconds(s2c)
        if s2s == 0 or s2s > s2c:
            s2s = s2c
        st2c = min(st2c, s2c)
    attrs.start_to_close_timeout.FromMicroseconds(st2c)
    if s2s:
        attrs.schedule_to_start_timeout.FromMicroseconds(s2s)
    heartbeat = a.heartbeat_timeout.ToMicroseconds()
    if heartbeat:
        attrs.heartbeat_timeout.FromMicroseconds(min(heartbeat, st2c))
    attrs.retry_policy.CopyFrom(_retry.with_defaults(a.retry_policy))
    attrs.retry_policy.non_retryable_error_types[:] = a.retry_policy.non_retryable_error_types
    attrs.workflow_task_completed_event_id = completed_id
    attrs.placement = a.placement
    if a.HasField("requirements"):
        attrs.requirements.CopyFrom(a.requirements)
    return attrs


def _validate_request_cancel_activity(state: _Validation, command: Command, where: str) -> None:
    sid = command.request_cancel_activity_task_command_attributes.scheduled_event_id
    if sid not in state.ms.pending_activities:
        raise BadCommandError(f"{where}: no pending activity scheduled by event {sid}")


def _apply_request_cancel_activity(context: Context, m: Mutation, command: Command) -> None:
    sid = command.request_cancel_activity_task_command_attributes.scheduled_event_id
    act = m.ms.pending_activities[sid]
    requested = m.append(
        ET.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED,
        scheduled_event_id=sid,
        workflow_task_completed_event_id=context.completed_id,
    )
    if act.started_time.ToMicroseconds() != 0:
        act.cancel_requested = True  # the worker learns it from its next heartbeat
        return
    # Not running anywhere: cancel at once.
    m.append(
        ET.EVENT_TYPE_ACTIVITY_TASK_CANCELED,
        scheduled_event_id=sid,
        latest_cancel_requested_event_id=requested.event_id,
    )
    m.drop_timers(act.timer_keys)
    if act.task_key:
        m.done_task_keys.append(act.task_key)
    del m.ms.pending_activities[sid]
    m.schedule_workflow_task()


# ---------------------------------------------------------------------- timers


def _validate_start_timer(state: _Validation, command: Command, where: str) -> None:
    a = command.start_timer_command_attributes
    if not a.timer_id:
        raise BadCommandError(f"{where}: timer_id is empty")
    if a.timer_id in state.timer_ids:
        raise BadCommandError(f"{where}: timer_id {a.timer_id!r} is already pending")
    state.timer_ids.add(a.timer_id)
    if a.start_to_fire_timeout.ToMicroseconds() <= 0:
        raise BadCommandError(f"{where}: start_to_fire_timeout must be positive")


def _apply_start_timer(context: Context, m: Mutation, command: Command) -> None:
    a = command.start_timer_command_attributes
    event = m.append(
        ET.EVENT_TYPE_TIMER_STARTED,
        timer_id=a.timer_id,
        start_to_fire_timeout=a.start_to_fire_timeout,
        workflow_task_completed_event_id=context.completed_id,
    )
    fire_at = m.now + a.start_to_fire_timeout.ToMicroseconds()
    info = m.ms.pending_timers[a.timer_id]
    info.timer_id = a.timer_id
    info.started_event_id = event.event_id
    info.expiry_time.FromMicroseconds(fire_at)
    info.timer_key = m.add_timer(TimerKind.USER_TIMER, event.event_id, 0, fire_at)


def _validate_cancel_timer(state: _Validation, command: Command, where: str) -> None:
    timer_id = command.cancel_timer_command_attributes.timer_id
    if timer_id in state.timer_ids:
        state.timer_ids.discard(timer_id)
    elif timer_id in state.fired_unseen:
        state.fired_unseen.discard(timer_id)
    else:
        raise BadCommandError(f"{where}: no pending timer {timer_id!r}")


def _apply_cancel_timer(context: Context, m: Mutation, command: Command) -> None:
    ms = m.ms
    timer_id = command.cancel_timer_command_attributes.timer_id
    if timer_id in ms.pending_timers:
        info = ms.pending_timers[timer_id]
        started_event_id = info.started_event_id
        m.drop_timers([info.timer_key])
        del ms.pending_timers[timer_id]
    else:
        # It fired while this task ran. As in Temporal, the cancel wins: the
        # workflow never saw the fire, so history records the cancel and the
        # buffered TIMER_FIRED is dropped (its row is already gone).
        started_event_id = m.drop_buffered_timer_fired(timer_id)
    m.append(
        ET.EVENT_TYPE_TIMER_CANCELED,
        timer_id=timer_id,
        started_event_id=started_event_id,
        workflow_task_completed_event_id=context.completed_id,
    )


# -------------------------------------------------------------- closing the run


def _validate_close(state: _Validation, command: Command, where: str) -> None:
    if state.has_signal:
        raise BadCommandError(
            f"{where}: unhandled signal arrived during the workflow task; "
            "the workflow must see it before closing",
            WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_UNHANDLED_COMMAND,
        )


def _apply_complete(context: Context, m: Mutation, command: Command) -> None:
    a = command.complete_workflow_execution_command_attributes
    m.close(
        WS.WORKFLOW_EXECUTION_STATUS_COMPLETED,
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
        result=a.result if a.HasField("result") else None,
        workflow_task_completed_event_id=context.completed_id,
    )


def _apply_fail(context: Context, m: Mutation, command: Command) -> None:
    m.close(
        WS.WORKFLOW_EXECUTION_STATUS_FAILED,
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
        failure=command.fail_workflow_execution_command_attributes.failure,
        retry_state=RetryState.RETRY_STATE_RETRY_POLICY_NOT_SET,
        workflow_task_completed_event_id=context.completed_id,
    )


def _apply_cancel_workflow(context: Context, m: Mutation, command: Command) -> None:
    a = command.cancel_workflow_execution_command_attributes
    m.close(
        WS.WORKFLOW_EXECUTION_STATUS_CANCELED,
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
        details=a.details if a.HasField("details") else None,
        workflow_task_completed_event_id=context.completed_id,
    )


def _apply_continue_as_new(context: Context, m: Mutation, command: Command) -> None:
    """Close this run and start its successor (same workflow id, empty history) in
    the same transaction, so there is never a moment with neither or both open."""
    ms = m.ms
    req = _successor_request(ms, command.continue_as_new_workflow_execution_command_attributes)
    new_run_id = str(uuid.uuid4())
    parent = None
    if ms.parent_workflow_id:
        # The chain stays the parent's child: the parent hears from the last run.
        parent = state_pb2.MutableState(
            namespace=ms.parent_namespace,
            workflow_id=ms.parent_workflow_id,
            run_id=ms.parent_run_id,
            home_cluster=ms.parent_home_cluster,
        )
    successor = _run_start.new_run(
        req,
        new_run_id,
        f"{ms.run_id}:continue-as-new",
        m.now,
        context.config,
        first_execution_run_id=ms.first_execution_run_id or ms.run_id,
        continued_execution_run_id=ms.run_id,
        parent=parent,
        parent_initiated_event_id=ms.parent_initiated_event_id,
        execution_expiration_us=ms.execution_expiration_time.ToMicroseconds(),
    )
    successor.current = CurrentWrite.REPLACE
    successor.replaces_run_id = ms.run_id
    m.close(
        WS.WORKFLOW_EXECUTION_STATUS_CONTINUED_AS_NEW,
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
        new_execution_run_id=new_run_id,
        workflow_type=req.workflow_type,
        task_queue=req.task_queue,
        input=req.input if req.HasField("input") else None,
        workflow_run_timeout=req.workflow_run_timeout
        if req.HasField("workflow_run_timeout")
        else None,
        workflow_task_timeout=req.workflow_task_timeout,
        workflow_task_completed_event_id=context.completed_id,
    )
    ms.new_execution_run_id = new_run_id
    m.side_runs.append(successor)


def _successor_request(
    ms: state_pb2.MutableState,
    a: command_pb2.ContinueAsNewWorkflowExecutionCommandAttributes,
) -> service_pb2.StartWorkflowRequest:
    """The start of a continue-as-new successor: the command's values, else this run's."""
    req = service_pb2.StartWorkflowRequest(
        namespace=ms.namespace, workflow_id=ms.workflow_id, identity="continue-as-new"
    )
    req.workflow_type.name = a.workflow_type.name or ms.workflow_type.name
    req.task_queue.name = a.task_queue.name or ms.task_queue.name
    if a.HasField("input"):
        req.input.CopyFrom(a.input)
    if a.workflow_run_timeout.ToMicroseconds():
        req.workflow_run_timeout.CopyFrom(a.workflow_run_timeout)
    elif ms.HasField("workflow_run_timeout"):
        req.workflow_run_timeout.CopyFrom(ms.workflow_run_timeout)
    req.workflow_task_timeout.CopyFrom(
        a.workflow_task_timeout
        if a.workflow_task_timeout.ToMicroseconds()
        else ms.workflow_task_timeout
    )
    # The execution timeout (and its deadline, passed to new_run) carry over.
    if ms.HasField("workflow_execution_timeout"):
        req.workflow_execution_timeout.CopyFrom(ms.workflow_execution_timeout)
    for name in ("header", "memo", "search_attributes", "retry_policy"):
        if a.HasField(name):
            getattr(req, name).CopyFrom(getattr(a, name))
    return req


# --------------------------------------------------------- markers, visibility


def _validate_record_marker(state: _Validation, command: Command, where: str) -> None:
    if not command.record_marker_command_attributes.marker_name:
        raise BadCommandError(f"{where}: marker_name is empty")


def _apply_record_marker(context: Context, m: Mutation, command: Command) -> None:
    a = command.record_marker_command_attributes
    event = m.append(
        ET.EVENT_TYPE_MARKER_RECORDED,
        marker_name=a.marker_name,
        workflow_task_completed_event_id=context.completed_id,
        header=a.header if a.HasField("header") else None,
        failure=a.failure if a.HasField("failure") else None,
    )
    for name, payloads in a.details.items():
        event.marker_recorded_event_attributes.details[name].CopyFrom(payloads)


def _validate_upsert_search_attributes(state: _Validation, command: Command, where: str) -> None:
    problem = search_attributes_problem(
        command.upsert_workflow_search_attributes_command_attributes.search_attributes,
        allow_removal=True,
    )
    if problem:
        raise BadCommandError(f"{where}: {problem}")


def _apply_upsert_search_attributes(context: Context, m: Mutation, command: Command) -> None:
    # The store indexes the attributes from this event, in this transaction
    # (history/_visibility_store.py).
    upsert = command.upsert_workflow_search_attributes_command_attributes
    m.append(
        ET.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES,
        workflow_task_completed_event_id=context.completed_id,
        search_attributes=upsert.search_attributes,
    )


# ------------------------------------------------------------ other runs (transfer)


def _validate_start_child(state: _Validation, command: Command, where: str) -> None:
    c = command.start_child_workflow_execution_command_attributes
    if not c.workflow_id:
        raise BadCommandError(f"{where}: workflow_id is empty")
    if not c.workflow_type.name:
        raise BadCommandError(f"{where}: workflow_type is empty")
    if c.namespace and c.namespace != state.ms.namespace:
        raise BadCommandError(f"{where}: children must be in the parent's namespace")


def _apply_start_child(context: Context, m: Mutation, command: Command) -> None:
    ms = m.ms
    c = command.start_child_workflow_execution_command_attributes
    event = m.append(ET.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED)
    attrs = event.start_child_workflow_execution_initiated_event_attributes
    # The initiated event carries the command's fields: the transfer processor
    # starts the child from it (server/_cross_run.py).
    for descriptor, value in c.ListFields():
        if descriptor.name in attrs.DESCRIPTOR.fields_by_name:
            if descriptor.message_type is not None:
                getattr(attrs, descriptor.name).CopyFrom(value)
            else:
                setattr(attrs, descriptor.name, value)
    attrs.namespace = ms.namespace
    attrs.task_queue.name = c.task_queue.name or ms.task_queue.name
    attrs.workflow_task_completed_event_id = context.completed_id
    child = ms.pending_children[event.event_id]
    child.initiated_event_id = event.event_id
    child.namespace = ms.namespace
    child.workflow_id = c.workflow_id
    child.workflow_type.CopyFrom(c.workflow_type)
    child.parent_close_policy = c.parent_close_policy
    if c.home_cluster != context.config.cluster_name:
        child.home_cluster = c.home_cluster  # its start crosses the sites' link
    m.add_transfer(TransferAction.START_CHILD, event.event_id)


def _validate_signal_external(state: _Validation, command: Command, where: str) -> None:
    e = command.signal_external_workflow_execution_command_attributes
    if not e.execution.workflow_id or not e.signal_name:
        raise BadCommandError(f"{where}: execution.workflow_id and signal_name are required")


def _apply_signal_external(context: Context, m: Mutation, command: Command) -> None:
    ms = m.ms
    e = command.signal_external_workflow_execution_command_attributes
    event = m.append(
        ET.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED,
        workflow_task_completed_event_id=context.completed_id,
        namespace=ms.namespace,
        workflow_execution=e.execution,
        signal_name=e.signal_name,
        input=e.input if e.HasField("input") else None,
        control=e.control,
        child_workflow_only=e.child_workflow_only,
        header=e.header if e.HasField("header") else None,
    )
    ms.pending_external[event.event_id].CopyFrom(
        state_pb2.ExternalRequest(
            initiated_event_id=event.event_id,
            namespace=ms.namespace,
            workflow_id=e.execution.workflow_id,
            run_id=e.execution.run_id,
        )
    )
    m.add_transfer(TransferAction.SIGNAL_EXTERNAL, event.event_id)


def _validate_cancel_external(state: _Validation, command: Command, where: str) -> None:
    cancel = command.request_cancel_external_workflow_execution_command_attributes
    if not cancel.workflow_id:
        raise BadCommandError(f"{where}: workflow_id is empty")


def _apply_cancel_external(context: Context, m: Mutation, command: Command) -> None:
    ms = m.ms
    r = command.request_cancel_external_workflow_execution_command_attributes
    target = common_pb2.WorkflowExecution(workflow_id=r.workflow_id, run_id=r.run_id)
    event = m.append(
        ET.EVENT_TYPE_REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED,
        workflow_task_completed_event_id=context.completed_id,
        namespace=ms.namespace,
        workflow_execution=target,
        control=r.control,
        child_workflow_only=r.child_workflow_only,
        reason=r.reason,
    )
    ms.pending_external[event.event_id].CopyFrom(
        state_pb2.ExternalRequest(
            initiated_event_id=event.event_id,
            namespace=ms.namespace,
            workflow_id=r.workflow_id,
            run_id=r.run_id,
            cancel=True,
        )
    )
    m.add_transfer(TransferAction.CANCEL_EXTERNAL, event.event_id)


CT = CommandType
# Validator and applier of every command type the engine supports; other types fail
# the workflow task ("not supported").
_HANDLERS: dict[int, tuple[_Validator, _Applier]] = {
    CT.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK: (
        _validate_schedule_activity,
        _apply_schedule_activity,
    ),
    CT.COMMAND_TYPE_REQUEST_CANCEL_ACTIVITY_TASK: (
        _validate_request_cancel_activity,
        _apply_request_cancel_activity,
    ),
    CT.COMMAND_TYPE_START_TIMER: (_validate_start_timer, _apply_start_timer),
    CT.COMMAND_TYPE_CANCEL_TIMER: (_validate_cancel_timer, _apply_cancel_timer),
    CT.COMMAND_TYPE_COMPLETE_WORKFLOW_EXECUTION: (_validate_close, _apply_complete),
    CT.COMMAND_TYPE_FAIL_WORKFLOW_EXECUTION: (_validate_close, _apply_fail),
    CT.COMMAND_TYPE_CANCEL_WORKFLOW_EXECUTION: (_validate_close, _apply_cancel_workflow),
    CT.COMMAND_TYPE_CONTINUE_AS_NEW_WORKFLOW_EXECUTION: (_validate_close, _apply_continue_as_new),
    CT.COMMAND_TYPE_RECORD_MARKER: (_validate_record_marker, _apply_record_marker),
    CT.COMMAND_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES: (
        _validate_upsert_search_attributes,
        _apply_upsert_search_attributes,
    ),
    CT.COMMAND_TYPE_START_CHILD_WORKFLOW_EXECUTION: (_validate_start_child, _apply_start_child),
    CT.COMMAND_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION: (
        _validate_signal_external,
        _apply_signal_external,
    ),
    CT.COMMAND_TYPE_REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION: (
        _validate_cancel_external,
        _apply_cancel_external,
    ),
}
