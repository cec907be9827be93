"""Unit tests of the Mutation builder (server/_mutation.py): what a transition writes,
decided without a store or a server."""

from __future__ import annotations

from tideflow.api.v1.history_pb2 import EventType
from tideflow.api.v1.state_pb2 import MutableState
from tideflow.server._mutation import Mutation

ET = EventType
T0 = 1_700_000_000_000_000


def running_with_started_task(version: int) -> MutableState:
    ms = MutableState(namespace="default", workflow_id="w", run_id="r", version=version)
    ms.next_event_id = 4
    ms.workflow_task.scheduled_event_id = 2
    ms.workflow_task.started_event_id = 3
    return ms


def test_buffered_events_are_written_with_the_epoch_of_their_flush() -> None:
    """An event buffered under one ownership epoch and flushed after a handoff is
    written now, so it carries the new epoch: history never has an older epoch after a
    newer one (Replication.tla, mutant flush-after-handoff)."""
    ms = running_with_started_task(version=1)
    buffering = Mutation(ms, T0)
    buffering.append_or_buffer(ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED, signal_name="s")
    assert not buffering.events and ms.buffered_events[0].version == 1

    ms.version = 2  # a handoff bumped the epoch while the event waited
    ms.ClearField("workflow_task")
    flushing = Mutation(ms, T0 + 1)
    assert flushing.flush_buffered()
    [event] = flushing.events
    assert (event.event_id, event.version) == (4, 2)
    assert event.event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    assert not ms.buffered_events and ms.next_event_id == 5


def test_dropping_a_buffered_timer_fire_keeps_the_other_buffered_events() -> None:
    ms = running_with_started_task(version=0)
    m = Mutation(ms, T0)
    m.append_or_buffer(ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED, signal_name="before")
    m.append_or_buffer(ET.EVENT_TYPE_TIMER_FIRED, timer_id="t1", started_event_id=3)
    m.append_or_buffer(ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED, signal_name="after")
    assert m.drop_buffered_timer_fired("t1") == 3
    names = [e.workflow_execution_signaled_event_attributes.signal_name for e in ms.buffered_events]
    assert names == ["before", "after"]
