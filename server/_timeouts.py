"""Durable timers firing: user timers and every timeout the engine arms.

The timer queue (server/_timers.py) hands each due timer row to the engine, which
runs ``fire`` on the run's state under its lock. A row is only a hint: each handler
first checks that the timer still applies (the task or attempt it guards may have
moved on, or a refill raced the delete) and returns False for a stale one, which is
then dropped without a transition. One handler per ``TimerKind``, in ``_HANDLERS``.

TLA+ actions (tla/EngineCore.tla): ``FireTimerValid``, ``FireTimer`` /
``FireTimerWith`` (with the heartbeat timer's re-arm decision); the timeouts they
lead to: ``FailWft`` (workflow task timed out), ``UnstickMut`` (sticky
schedule-to-start), ``DispatchActivityAttempt`` (retry backoff over),
``AttemptFailed`` (activity timeouts), ``Close`` (run timeout).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tideflow.api.v1 import state_pb2
from tideflow.api.v1.common_pb2 import Failure, RetryState, TaskQueueKind, TimeoutType
from tideflow.api.v1.common_pb2 import WorkflowExecutionStatus as WS
from tideflow.api.v1.history_pb2 import EventType
from tideflow.history import TaskKind, TimerKind, TimerRow

from . import _activities, _workflow_tasks
from ._config import ServerConfig
from ._mutation import Mutation

ET = EventType
# Plain ints: an enum wrapper's attribute lookup costs a Python call per fire.
_RUNNING = int(WS.WORKFLOW_EXECUTION_STATUS_RUNNING)
_TIMER_FIRED = int(ET.EVENT_TYPE_TIMER_FIRED)


def fire(m: Mutation, timer: TimerRow, config: ServerConfig) -> bool:
    """The transition of a due timer; False if it is stale (nothing to commit)."""
    ms = m.ms
    if ms.status != _RUNNING:
        return False
    m.trace["timer"] = timer
    handler = _HANDLERS.get(timer.kind)
    handled = handler is not None and handler(m, timer, config)
    if handled:
        m.done_timer_keys.append(timer.timer_key)
        forget_key(ms, timer.timer_key)
    return handled


def forget_key(holder: Any, timer_key: str) -> bool:
    """Remove a fired timer's key from the list that tracks it (its row is deleted in
    this transition); False if the key was not tracked, i.e. the timer is stale."""
    keys = holder.timer_keys
    if timer_key in keys:
        keys.remove(timer_key)
        return True
    return False


# ------------------------------------------------------------------------ the run


def _user_timer_fired(m: Mutation, timer: TimerRow, config: ServerConfig) -> bool:
    ms = m.ms
    for timer_id, timer_info in ms.pending_timers.items():
        if timer_info.started_event_id == timer.ref_id:
            m.append_or_buffer(
                _TIMER_FIRED,
                timer_id=timer_id,
                started_event_id=timer_info.started_event_id,
            )
            del ms.pending_timers[timer_id]
            m.schedule_workflow_task()
            return True
    return False


def _run_timed_out(m: Mutation, timer: TimerRow, config: ServerConfig) -> bool:
    m.close(
        WS.WORKFLOW_EXECUTION_STATUS_TIMED_OUT,
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
        retry_state=RetryState.RETRY_STATE_TIMEOUT,
    )
    return True


# ------------------------------------------------------------------ workflow task


def _workflow_task_timer(m: Mutation, timer: TimerRow) -> state_pb2.WorkflowTaskInfo | None:
    """The workflow task a timer guards, if it is still that attempt's timer."""
    ms = m.ms
    if not ms.HasField("workflow_task") or ms.workflow_task.attempt != timer.attempt:
        return None
    wft = ms.workflow_task
    if not forget_key(wft, timer.timer_key):
        return None  # fired before (a refill raced the delete)
    return wft


def _sticky_schedule_to_start(m: Mutation, timer: TimerRow, config: ServerConfig) -> bool:
    wft = _workflow_task_timer(m, timer)
    if (
        wft is None
        or wft.started_event_id != 0
        or wft.task_queue.kind != TaskQueueKind.TASK_QUEUE_KIND_STICKY
    ):
        return False
    m.unstick()  # the sticky worker did not pick it up in time
    return True


def _workflow_task_retry(m: Mutation, timer: TimerRow, config: ServerConfig) -> bool:
    wft = _workflow_task_timer(m, timer)
    if wft is None or wft.started_event_id != 0:
        return False
    m.add_task(
        TaskKind.WORKFLOW,
        wft.task_queue.name,
        0 if wft.transient else wft.scheduled_event_id,
        wft.attempt,
    )
    return True


def _workflow_task_timed_out(m: Mutation, timer: TimerRow, config: ServerConfig) -> bool:
    wft = _workflow_task_timer(m, timer)
    if wft is None or wft.started_event_id == 0 or wft.scheduled_event_id != timer.ref_id:
        return False
    _workflow_tasks.fail(
        m,
        0,
        Failure(message="workflow task timed out", source="server"),
        "",
        config,
        timed_out=True,
    )
    return True


# --------------------------------------------------------------------- activities


def _activity_timer(
    m: Mutation, timer: TimerRow, *, same_attempt: bool
) -> state_pb2.ActivityInfo | None:
    """The activity a timer guards, if the timer is still tracked (and, with
    ``same_attempt``, armed for the current attempt)."""
    info = m.ms.pending_activities.get(timer.ref_id)
    if info is None:
        return None
    if not forget_key(info, timer.timer_key):
        return None  # fired before (a refill raced the delete)
    if same_attempt and info.attempt != timer.attempt:
        return None
    return info


def _activity_retry(m: Mutation, timer: TimerRow, config: ServerConfig) -> bool:
    info = _activity_timer(m, timer, same_attempt=False)
    if info is None or not info.backing_off or info.attempt != timer.attempt:
        return False
    _activities.dispatch_attempt(m, info)
    return True


def _activity_schedule_to_close(m: Mutation, timer: TimerRow, config: ServerConfig) -> bool:
    # The deadline of the whole activity, whichever attempt is current.
    info = _activity_timer(m, timer, same_attempt=False)
    if info is None:
        return False
    _activity_timed_out(m, info, TimeoutType.TIMEOUT_TYPE_SCHEDULE_TO_CLOSE)
    return True


def _activity_schedule_to_start(m: Mutation, timer: TimerRow, config: ServerConfig) -> bool:
    info = _activity_timer(m, timer, same_attempt=True)
    if info is None or info.started_time.ToMicroseconds() != 0 or info.backing_off:
        return False
    _activity_timed_out(m, info, TimeoutType.TIMEOUT_TYPE_SCHEDULE_TO_START)
    return True


def _activity_start_to_close(m: Mutation, timer: TimerRow, config: ServerConfig) -> bool:
    info = _activity_timer(m, timer, same_attempt=True)
    if info is None or info.started_time.ToMicroseconds() == 0:
        return False
    _activity_timed_out(m, info, TimeoutType.TIMEOUT_TYPE_START_TO_CLOSE)
    return True


def _activity_heartbeat(m: Mutation, timer: TimerRow, config: ServerConfig) -> bool:
    info = _activity_timer(m, timer, same_attempt=True)
    if info is None or info.started_time.ToMicroseconds() == 0:
        return False
    last = info.last_heartbeat_time.ToMicroseconds() or info.started_time.ToMicroseconds()
    due = last + info.heartbeat_timeout.ToMicroseconds()
    if due > m.now:
        # Heartbeats arrived meanwhile: re-arm at the new deadline.
        m.trace["rearm"] = True
        info.timer_keys.append(
            m.add_timer(TimerKind.ACTIVITY_HEARTBEAT, info.scheduled_event_id, info.attempt, due)
        )
        return True
    _activity_timed_out(m, info, TimeoutType.TIMEOUT_TYPE_HEARTBEAT)
    return True


def _activity_timed_out(m: Mutation, info: state_pb2.ActivityInfo, timeout: TimeoutType) -> None:
    failure = Failure(
        message=f"activity {TimeoutType.Name(timeout).removeprefix('TIMEOUT_TYPE_')} timeout",
        source="server",
    )
    failure.timeout_failure_info.timeout_type = timeout
    if info.HasField("heartbeat_details"):
        failure.timeout_failure_info.last_heartbeat_details.CopyFrom(info.heartbeat_details)
    if info.HasField("last_failure") and timeout == TimeoutType.TIMEOUT_TYPE_SCHEDULE_TO_CLOSE:
        failure.cause.CopyFrom(info.last_failure)
    _activities.attempt_failed(m, info, failure, timeout_type=timeout)


_Handler = Callable[[Mutation, TimerRow, ServerConfig], bool]
_HANDLERS: dict[TimerKind, _Handler] = {
    TimerKind.USER_TIMER: _user_timer_fired,
    TimerKind.WORKFLOW_RUN_TIMEOUT: _run_timed_out,
    TimerKind.WORKFLOW_TASK_TIMEOUT: _workflow_task_timed_out,
    TimerKind.WORKFLOW_TASK_RETRY: _workflow_task_retry,
    TimerKind.STICKY_SCHEDULE_TO_START: _sticky_schedule_to_start,
    TimerKind.ACTIVITY_RETRY: _activity_retry,
    TimerKind.ACTIVITY_SCHEDULE_TO_CLOSE: _activity_schedule_to_close,
    TimerKind.ACTIVITY_SCHEDULE_TO_START: _activity_schedule_to_start,
    TimerKind.ACTIVITY_START_TO_CLOSE: _activity_start_to_close,
    TimerKind.ACTIVITY_HEARTBEAT: _activity_heartbeat,
}
