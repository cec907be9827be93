"""Workflows, activities and history helpers shared by the message suites
(test_signals.py, test_queries.py, test_cancellation.py, test_patching.py).

Activities run in the worker, not in the test's frame, so they record what happened
to them in module-level dicts keyed by a per-test uuid.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

from helpers import ET, assert_gap_free, events_of

from tideflow.api.v1.history_pb2 import HistoryEvent
from tideflow.worker_sdk import (
    WorkflowExecutionStatus,
    WorkflowHandle,
    activity,
    workflow,
)

TIMEOUT = timedelta(seconds=30)


def names(events: Sequence[HistoryEvent]) -> list[str]:
    """Event types without the EVENT_TYPE_ prefix, for readable assertion messages."""
    return [ET.Name(e.event_type).removeprefix("EVENT_TYPE_") for e in events]


def index_of(events: Sequence[HistoryEvent], event_type: int, nth: int = 0) -> int:
    """Position of the ``nth`` event of ``event_type``."""
    positions = [i for i, e in enumerate(events) if e.event_type == event_type]
    assert len(positions) > nth, f"no {ET.Name(event_type)} #{nth} in {names(events)}"
    return positions[nth]


def is_idle(handle: WorkflowHandle) -> Callable[[], Awaitable[bool]]:
    """The run waits in workflow code: its last workflow task completed, none is
    scheduled (nothing arrived since)."""

    async def check() -> bool:
        events = await events_of(handle)
        return events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED

    return check


async def expect_closed(handle: WorkflowHandle, status: WorkflowExecutionStatus) -> None:
    description = await handle.describe()
    assert description.status == status
    assert description.close_time is not None
    assert description.raw.pending_activities == []
    events = await events_of(handle)
    assert description.history_length == len(events)
    assert_gap_free(events)


# Keys whose gated workflow may get past its first workflow task.
OPEN_GATES: set[str] = set()


@activity.defn
async def shout(text: str) -> str:
    return text.upper()


@workflow.defn
class Inbox:
    """Collects ``add`` signals until ``close``; ``add_shouted`` is an async handler
    that runs an activity. With a ``gate_key`` its workflow task fails (a bug that is
    "fixed" by opening the gate), so its first workflow task does not complete."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.closed = False
        self.in_flight = 0
        self.phase = "constructed"
        self.seen_at_start: list[str] = []

    @workflow.run
    async def run(self, gate_key: str = "") -> dict[str, list[str]]:
        self.phase = "started"
        self.seen_at_start = list(self.items)
        if gate_key and gate_key not in OPEN_GATES:
            raise RuntimeError("gate closed: this workflow task fails until it opens")
        self.phase = "waiting"
        await workflow.wait_condition(lambda: self.closed and self.in_flight == 0)
        return {"items": self.items, "seen_at_start": self.seen_at_start}

    @workflow.signal
    def add(self, item: str) -> None:
        self.items.append(item)

    @workflow.signal
    async def add_shouted(self, item: str) -> None:
        self.in_flight += 1
        try:
            shouted: str = await workflow.execute_activity(
                shout, item, start_to_close_timeout=TIMEOUT
            )
            self.items.append(shouted)
        finally:
            self.in_flight -= 1

    @workflow.signal(name="close")
    def close_inbox(self) -> None:
        self.closed = True

    @workflow.query
    def snapshot(self) -> dict[str, Any]:
        return {"phase": self.phase, "items": list(self.items)}

    @workflow.query
    def count(self) -> int:
        return len(self.items)

    @workflow.query
    def item_at(self, index: int) -> str:
        return self.items[index]
