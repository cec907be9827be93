"""What the workflow API (``workflow.py``) hands to the runtime that runs the code: the
inputs of its calls and the enums they carry. Kept apart so the API module stays one
concern; ``workflow`` re-exports the public names."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum
from typing import Any

from .common import RetryPolicy
from .placement import Placement, Requirements


class ActivityCancellationType(IntEnum):
    """What cancelling an activity (or the workflow awaiting it) waits for.

    WAIT_CANCELLATION_COMPLETED holds the code that awaits the activity. Inside
    ``asyncio.gather`` that is the gather's child task only: gather raises
    ``CancelledError`` as soon as any one child ends cancelled (a TRY_CANCEL sibling,
    a timer), without waiting for the others (standard asyncio), so a workflow that
    re-raises it may close while the activity is still stopping. Await such an activity
    directly, or its handle after the gather, to wait for it.
    """

    TRY_CANCEL = 0  # ask the server to cancel it; the workflow moves on at once
    WAIT_CANCELLATION_COMPLETED = 1  # move on once the activity confirmed cancellation
    ABANDON = 2  # do not even ask: the activity runs on, its outcome is ignored


class ParentClosePolicy(IntEnum):
    """What happens to a running child when its parent closes."""

    TERMINATE = 1
    ABANDON = 2
    REQUEST_CANCEL = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class StartActivityInput:
    """An activity to schedule, as ``start_activity`` hands it to the runtime: the type
    name and result type are resolved, the timeouts checked."""

    activity_type: str
    args: list[Any]
    activity_id: str | None
    task_queue: str | None
    schedule_to_close_timeout: timedelta | None
    schedule_to_start_timeout: timedelta | None
    start_to_close_timeout: timedelta | None
    heartbeat_timeout: timedelta | None
    retry_policy: RetryPolicy | None
    result_type: Any
    cancellation_type: ActivityCancellationType
    placement: Placement | None = None
    requirements: Requirements | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StartLocalActivityInput:
    """A local activity to run, as ``execute_local_activity`` hands it to the runtime."""

    activity_type: str
    args: list[Any]
    activity_id: str | None
    schedule_to_close_timeout: timedelta | None
    start_to_close_timeout: timedelta | None
    retry_policy: RetryPolicy | None
    local_retry_threshold: timedelta
    result_type: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class StartChildWorkflowInput:
    """A child workflow to start, as ``start_child_workflow`` hands it to the runtime."""

    workflow_type: str
    args: list[Any]
    workflow_id: str
    task_queue: str | None
    parent_close_policy: ParentClosePolicy
    execution_timeout: timedelta | None
    run_timeout: timedelta | None
    task_timeout: timedelta | None
    result_type: Any
    # The child's home site (None: the parent's).
    home: str | None = None
