"""Retry arithmetic stays bounded however many attempts have failed: the workflow task
backoff (an int power of two overflowed a float) and the attempt counters (int32)."""

from __future__ import annotations

from tideflow.api.v1 import state_pb2
from tideflow.api.v1.common_pb2 import Failure, RetryPolicy, RetryState
from tideflow.api.v1.common_pb2 import WorkflowExecutionStatus as WS
from tideflow.api.v1.history_pb2 import WorkflowTaskFailedCause
from tideflow.history import TimerKind
from tideflow.server import ServerConfig, _retry, _workflow_tasks
from tideflow.server._mutation import Mutation

_NOW_US = 1_700_000_000 * 1_000_000


def _failing_run(attempt: int) -> state_pb2.MutableState:
    """A running run whose transient workflow task (attempt ``attempt``) has started."""
    ms = state_pb2.MutableState(
        namespace="default",
        workflow_id="w",
        run_id="r",
        status=WS.WORKFLOW_EXECUTION_STATUS_RUNNING,
        next_event_id=4,
    )
    ms.task_queue.name = "q"
    ms.workflow_task.attempt = attempt
    ms.workflow_task.transient = True
    ms.workflow_task.scheduled_event_id = 4
    ms.workflow_task.started_event_id = 5
    return ms


def test_the_backoff_is_capped_not_overflowed_after_many_failed_attempts() -> None:
    # 0.1 s * 2 ** (attempt - 3) raised OverflowError from attempt ~1,030 on: the
    # failure of the task could not be recorded, so the run was stuck for good.
    config = ServerConfig(workflow_task_retry_initial_s=0.1, workflow_task_retry_max_s=10.0)
    for attempt in (1_030, 1_100, 5_000, 1_000_000):
        m = Mutation(_failing_run(attempt), _NOW_US)
        _workflow_tasks.fail(
            m,
            WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_WORKFLOW_WORKER_UNHANDLED_FAILURE,
            Failure(message="boom"),
            "worker",
            config,
        )
        assert m.ms.workflow_task.attempt == attempt + 1
        assert m.events == []  # transient: still nothing in history
        (timer,) = m.new_timers
        assert timer.kind == TimerKind.WORKFLOW_TASK_RETRY
        assert timer.fire_at - _NOW_US == 10 * 1_000_000  # the configured cap


def test_the_backoff_doubles_up_to_the_cap() -> None:
    config = ServerConfig(workflow_task_retry_initial_s=0.1, workflow_task_retry_max_s=10.0)
    delays = [_workflow_tasks._retry_delay_us(config, attempt) for attempt in range(1, 14)]
    assert delays[:2] == [0, 0]  # the second attempt runs at once
    assert delays[2:6] == [100_000, 200_000, 400_000, 800_000]
    assert delays[-1] == 10_000_000
    assert delays == sorted(delays)
    # A zero initial delay (retry at once for ever) must not overflow either.
    at_once = ServerConfig(workflow_task_retry_initial_s=0.0, workflow_task_retry_max_s=0.0)
    assert _workflow_tasks._retry_delay_us(at_once, 10**9) == 0


def test_unlimited_activity_retries_end_at_the_attempt_counters_limit() -> None:
    # An attempt past int32 would not fit ActivityInfo.attempt: the retry's transition
    # would raise for ever instead of closing the activity.
    policy = RetryPolicy(maximum_attempts=0)  # unlimited
    now = _NOW_US
    retried = _retry.next_retry(policy, attempt=2**31 - 2, failure=None, now_us=now, deadline_us=0)
    assert retried.state == RetryState.RETRY_STATE_IN_PROGRESS
    last = _retry.next_retry(policy, attempt=2**31 - 1, failure=None, now_us=now, deadline_us=0)
    assert (last.delay_us, last.state) == (-1, RetryState.RETRY_STATE_MAXIMUM_ATTEMPTS_REACHED)
