"""Plain values that cross the store boundary."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from tideflow.api.v1.history_pb2 import HistoryEvent


def now_micros() -> int:
    """Wall-clock time in microseconds, the unit of every stored time."""
    return time.time_ns() // 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class RunKey:
    namespace: str
    workflow_id: str
    run_id: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.workflow_id}/{self.run_id}"


class TaskKind(IntEnum):
    WORKFLOW = 0
    ACTIVITY = 1
    # Cross-run effects (start a child, tell a parent, signal another run...), done by
    # the server itself; ``task_queue`` names the action (see TransferAction).
    TRANSFER = 2


class TransferAction:
    START_CHILD = "transfer:start-child"
    CHILD_CLOSED = "transfer:child-closed"
    PARENT_CLOSE_POLICY = "transfer:parent-close-policy"
    SIGNAL_EXTERNAL = "transfer:signal-external"
    CANCEL_EXTERNAL = "transfer:cancel-external"


class TimerKind(IntEnum):
    USER_TIMER = 0
    WORKFLOW_TASK_TIMEOUT = 1
    WORKFLOW_TASK_RETRY = 2
    ACTIVITY_SCHEDULE_TO_START = 3
    ACTIVITY_START_TO_CLOSE = 4
    ACTIVITY_SCHEDULE_TO_CLOSE = 5
    ACTIVITY_HEARTBEAT = 6
    ACTIVITY_RETRY = 7
    WORKFLOW_RUN_TIMEOUT = 8
    STICKY_SCHEDULE_TO_START = 9


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRow:
    """A dispatchable task: ``ref_id`` is the scheduled event id (0 for a transient
    workflow task attempt), ``attempt`` the attempt it dispatches."""

    key: RunKey
    task_queue: str
    kind: TaskKind
    ref_id: int
    attempt: int
    created_at: int = 0
    # An activity task's placement (a serialized tideflow.api.v1.Placement): matching
    # hands it only to a worker that meets it. Empty: any worker.
    placement: bytes = b""

    @property
    def task_key(self) -> str:
        k = self.key
        return (
            f"{k.namespace}|{k.workflow_id}|{k.run_id}|{int(self.kind)}|{self.ref_id}"
            f"|{self.attempt}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerRow:
    key: RunKey
    kind: TimerKind
    ref_id: int
    attempt: int
    fire_at: int  # microseconds since the epoch

    @property
    def timer_key(self) -> str:
        k = self.key
        return (
            f"{k.namespace}|{k.workflow_id}|{k.run_id}|{int(self.kind)}|{self.ref_id}"
            f"|{self.attempt}|{self.fire_at}"
        )


def timer_key_kind(timer_key: str) -> TimerKind:
    """The kind field of a ``TimerRow.timer_key``.

    Parsed from the right because the workflow id may itself contain "|"; a substring
    test such as ``"|5|" in key`` would also match a ref id or attempt of 5.
    """
    return TimerKind(int(timer_key.rsplit("|", 4)[1]))


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionSummary:
    """The columns of ``executions`` that visibility reads without decoding state."""

    workflow_type: str
    task_queue: str
    status: int
    start_time: int
    close_time: int | None
    history_length: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionRecord:
    key: RunKey
    state: bytes
    db_version: int
    summary: ExecutionSummary


@dataclass(frozen=True, slots=True, kw_only=True)
class CurrentRecord:
    namespace: str
    workflow_id: str
    run_id: str
    status: int
    start_request_id: str


class CurrentWrite(IntEnum):
    NONE = 0
    INSERT = 1  # first run of this workflow id
    REPLACE = 2  # new run replaces a closed one (`replaces_run_id`)
    UPDATE_STATUS = 3  # the current run changed status (closed)


@dataclass(frozen=True, slots=True, kw_only=True)
class Transition:
    """Everything one state transition of one run writes, committed atomically.

    ``expected_version`` 0 creates the run; otherwise the executions row must still
    have that version. ``events`` carry their final event ids (gap-free).
    """

    key: RunKey
    expected_version: int
    new_version: int
    state: bytes
    summary: ExecutionSummary
    events: Sequence[HistoryEvent] = ()
    new_tasks: Sequence[TaskRow] = ()
    done_task_keys: Sequence[str] = ()
    new_timers: Sequence[TimerRow] = ()
    done_timer_keys: Sequence[str] = ()
    current: CurrentWrite = CurrentWrite.NONE
    replaces_run_id: str = ""
    start_request_id: str = ""
