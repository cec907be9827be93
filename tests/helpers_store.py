"""Store-level test data shared by the store suites (test_store.py,
test_store_faults.py, test_shard_leases.py): run keys, events and the transitions a
test applies straight to a ``HistoryStore`` (``create`` a run, ``transition`` it on),
with the tasks and timers they carry; ``RunnerWrapper``, the base of the runners
that inject a fault around a real one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection

from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.api.v1.state_pb2 import MutableState
from tideflow.history import (
    CurrentWrite,
    ExecutionSummary,
    RunKey,
    TaskKind,
    TaskRow,
    TimerKind,
    TimerRow,
    Transition,
    make_event,
)
from tideflow.history._dialects import Runner

T = TypeVar("T")

RUNNING, COMPLETED = 1, 2  # WorkflowExecutionStatus
T0 = 1_700_000_000_000_000  # a fixed instant (microseconds), for deterministic timers


def run_key(workflow_id: str = "wf", run_id: str = "run-1") -> RunKey:
    return RunKey(namespace="default", workflow_id=workflow_id, run_id=run_id)


def make_events(first_id: int, count: int) -> list[HistoryEvent]:
    events = []
    for event_id in range(first_id, first_id + count):
        if event_id == 1:
            e = make_event(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED, T0, identity="test")
        else:
            e = make_event(
                EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED, T0 + event_id, signal_name="s"
            )
        e.event_id = event_id
        events.append(e)
    return events


def state_bytes(next_event_id: int, marker: str = "") -> bytes:
    return MutableState(next_event_id=next_event_id, start_request_id=marker).SerializeToString()


def task(key: RunKey, ref_id: int, kind: TaskKind = TaskKind.ACTIVITY) -> TaskRow:
    return TaskRow(key=key, task_queue="q", kind=kind, ref_id=ref_id, attempt=1, created_at=T0)


def timer(key: RunKey, ref_id: int, fire_at: int) -> TimerRow:
    return TimerRow(key=key, kind=TimerKind.USER_TIMER, ref_id=ref_id, attempt=1, fire_at=fire_at)


def transition(
    key: RunKey,
    *,
    version: int,
    first_event_id: int,
    n_events: int = 1,
    status: int = RUNNING,
    marker: str = "",
    workflow_type: str = "Wf",
    **kwargs: object,
) -> Transition:
    """Transition from ``version`` (0 creates the run) appending ``n_events`` events."""
    last = first_event_id + n_events - 1
    summary = ExecutionSummary(
        workflow_type=workflow_type,
        task_queue="q",
        status=status,
        start_time=T0,
        close_time=None if status == RUNNING else T0 + 1,
        history_length=last,
    )
    return Transition(
        key=key,
        expected_version=version,
        new_version=version + 1,
        state=state_bytes(last + 1, marker),
        summary=summary,
        events=make_events(first_event_id, n_events),
        **kwargs,  # type: ignore[arg-type]
    )


def create(key: RunKey, n_events: int = 1, **kwargs: Any) -> Transition:
    kwargs.setdefault("current", CurrentWrite.INSERT)
    return transition(key, version=0, first_event_id=1, n_events=n_events, **kwargs)


class RunnerWrapper:
    """A runner that passes everything to ``inner``; a fault-injecting runner
    overrides ``write`` (``HistoryStore.open_on`` takes it)."""

    def __init__(self, inner: Runner) -> None:
        self._inner = inner
        self.name = inner.name
        self.isolation = inner.isolation
        self.writer_lanes = inner.writer_lanes

    async def write(self, fn: Callable[[Connection], T]) -> T:
        return await self._inner.write(fn)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        return await self._inner.read(fn)

    async def close(self) -> None:
        await self._inner.close()
