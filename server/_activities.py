"""Activity attempts: the transitions that dispatch, start, retry and finish one.

Attempts write no history of their own: a retry is a state change and a timer row,
and ActivityTaskStarted is written only with the attempt's outcome
(``Mutation.append_activity_outcome``), so a flaky activity does not grow the run's
history. Every function here works on a ``Mutation`` and nothing else; the engine
runs them under the run's lock and commits what they built.

TLA+ actions (tla/EngineCore.tla): ``ActivityTokenValid``, ``ActivityTaskValid``,
``DispatchActivityAttempt``, ``StartActivityAttempt``, ``FinishActivity``,
``AttemptFailed``.
"""

from __future__ import annotations

import uuid

from tideflow.api.v1 import state_pb2
from tideflow.api.v1.common_pb2 import Failure, RetryState, TimeoutType
from tideflow.api.v1.common_pb2 import WorkflowExecutionStatus as WS
from tideflow.api.v1.history_pb2 import EventType
from tideflow.history import TaskKind, TaskRow, TimerKind, timer_key_kind

from . import _retry
from ._errors import NotFoundError
from ._mutation import Mutation
from ._placement import encode

ET = EventType


def check_token(m: Mutation, token: state_pb2.TaskToken) -> state_pb2.ActivityInfo:
    """The started attempt a worker's report is about (ActivityTokenValid)."""
    ms = m.ms
    info = ms.pending_activities.get(token.scheduled_event_id)
    if (
        ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING
        or info is None
        or info.attempt != token.attempt
        or info.started_time.ToMicroseconds() == 0
    ):
        raise NotFoundError(
            "activity task not found: it already completed, timed out, was retried, or the "
            f"run closed (workflow_id={token.workflow_id!r}, "
            f"scheduled_event_id={token.scheduled_event_id}, attempt={token.attempt})"
        )
    return info


def record_started(m: Mutation, task: TaskRow, identity: str, site: str, tier: int) -> bool:
    """A poller took the attempt's task row (ActivityTaskValid + RecordActivityStarted);
    False if the row is stale (the attempt moved on or the run closed). ``site`` and
    ``tier`` are the poller's: where the attempt runs, as the server saw it."""
    ms = m.ms
    info = ms.pending_activities.get(task.ref_id)
    if (
        ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING
        or info is None
        or info.attempt != task.attempt
        or info.started_time.ToMicroseconds() != 0
        or info.backing_off
    ):
        return False
    m.trace["task"] = task
    m.done_task_keys.append(task.task_key)
    start_attempt(m, info, identity, site, tier)
    return True


def dispatch_attempt(m: Mutation, info: state_pb2.ActivityInfo) -> None:
    """The current attempt waits for a worker: a task row, and its schedule-to-start
    timer unless that equals the schedule-to-close deadline (already armed)."""
    info.backing_off = False
    info.scheduled_time.FromMicroseconds(m.now)
    info.task_key = m.add_task(
        TaskKind.ACTIVITY,
        info.task_queue.name,
        info.scheduled_event_id,
        info.attempt,
        placement=encode(info.placement),
    )
    s2s = info.schedule_to_start_timeout.ToMicroseconds()
    if s2s and s2s != info.schedule_to_close_timeout.ToMicroseconds():
        info.timer_keys.append(
            m.add_timer(
                TimerKind.ACTIVITY_SCHEDULE_TO_START,
                info.scheduled_event_id,
                info.attempt,
                m.now + s2s,
            )
        )


def start_attempt(
    m: Mutation, info: state_pb2.ActivityInfo, identity: str, site: str, tier: int
) -> None:
    """The current attempt is handed to a worker: arm its start-to-close and
    heartbeat timeouts. (No event: ActivityTaskStarted is written with the outcome.)"""
    info.task_key = ""
    info.started_time.FromMicroseconds(m.now)
    info.started_identity = identity
    info.started_site = site
    info.started_tier = tier  # type: ignore[assignment]
    info.request_id = str(uuid.uuid4())
    info.ClearField("last_heartbeat_time")
    schedule_to_start = [
        k for k in info.timer_keys if timer_key_kind(k) == TimerKind.ACTIVITY_SCHEDULE_TO_START
    ]
    m.drop_timers(schedule_to_start)
    info.timer_keys[:] = [k for k in info.timer_keys if k not in schedule_to_start]
    info.timer_keys.append(
        m.add_timer(
            TimerKind.ACTIVITY_START_TO_CLOSE,
            info.scheduled_event_id,
            info.attempt,
            m.now + info.start_to_close_timeout.ToMicroseconds(),
        )
    )
    hb = info.heartbeat_timeout.ToMicroseconds()
    if hb:
        info.timer_keys.append(
            m.add_timer(
                TimerKind.ACTIVITY_HEARTBEAT, info.scheduled_event_id, info.attempt, m.now + hb
            )
        )
    m.dirty = True


def finish(m: Mutation, info: state_pb2.ActivityInfo) -> None:
    """The activity has its outcome in history: drop its rows, wake the workflow."""
    m.drop_timers(info.timer_keys)
    if info.task_key:
        m.done_task_keys.append(info.task_key)
    del m.ms.pending_activities[info.scheduled_event_id]
    m.schedule_workflow_task()


def attempt_failed(
    m: Mutation,
    info: state_pb2.ActivityInfo,
    failure: Failure,
    *,
    timeout_type: int | None,
) -> None:
    """An attempt failed or timed out: retry after a backoff, or record the outcome."""
    decision = _retry_decision(m, info, failure, timeout_type)
    m.trace["retry"] = decision.delay_us >= 0
    if decision.delay_us >= 0:
        _back_off(m, info, failure, decision.delay_us)
        return
    if timeout_type is not None:
        m.append_activity_outcome(
            info,
            ET.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT,
            failure=failure,
            retry_state=decision.state,
        )
    else:
        m.append_activity_outcome(
            info,
            ET.EVENT_TYPE_ACTIVITY_TASK_FAILED,
            failure=failure,
            identity=info.started_identity,
            retry_state=decision.state,
        )
    finish(m, info)


def _retry_decision(
    m: Mutation, info: state_pb2.ActivityInfo, failure: Failure, timeout_type: int | None
) -> _retry.RetryDecision:
    # Schedule-to-close and schedule-to-start bound the whole activity, not one attempt:
    # no retry can help.
    if timeout_type in (
        TimeoutType.TIMEOUT_TYPE_SCHEDULE_TO_CLOSE,
        TimeoutType.TIMEOUT_TYPE_SCHEDULE_TO_START,
    ):
        return _retry.RetryDecision(-1, RetryState.RETRY_STATE_TIMEOUT)
    s2c = info.schedule_to_close_timeout.ToMicroseconds()
    return _retry.next_retry(
        info.retry_policy,
        attempt=info.attempt,
        failure=None if timeout_type is not None else failure,
        now_us=m.now,
        deadline_us=info.first_scheduled_time.ToMicroseconds() + s2c if s2c else 0,
    )


def _back_off(m: Mutation, info: state_pb2.ActivityInfo, failure: Failure, delay_us: int) -> None:
    # Retries are the server's job and write no history: only state changes. The
    # schedule-to-close deadline spans every attempt, so its timer stays armed.
    keep = [k for k in info.timer_keys if timer_key_kind(k) == TimerKind.ACTIVITY_SCHEDULE_TO_CLOSE]
    m.drop_timers([k for k in info.timer_keys if k not in keep])
    info.timer_keys[:] = keep
    info.last_failure.CopyFrom(failure)
    info.attempt += 1
    info.ClearField("started_time")
    info.started_identity = ""
    info.started_site = ""
    info.ClearField("started_tier")
    info.backing_off = True
    info.timer_keys.append(
        m.add_timer(
            TimerKind.ACTIVITY_RETRY,
            info.scheduled_event_id,
            info.attempt,
            m.now + delay_us,
        )
    )
