"""One state transition of one run, being built.

A ``Mutation`` works on a private copy of the run's mutable state and collects
everything the transition writes: new history events, outbox (task) rows, timer rows,
and rows it consumed. The engine commits it as one ``Transition`` or throws it away;
nothing is visible to anyone before the commit.

TLA+ (tla/History.tla): ``AppendEvents`` is one Mutation committed; buffering of events
while a workflow task is started is ``BufferEvent`` / ``FlushBuffer``.
"""

from __future__ import annotations

from typing import Any

from tideflow.api.v1 import history_pb2, state_pb2
from tideflow.api.v1.common_pb2 import TaskQueue, TaskQueueKind, WorkflowExecutionStatus
from tideflow.api.v1.common_pb2 import WorkflowExecutionStatus as WS
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent, ParentClosePolicy
from tideflow.history import (
    CurrentWrite,
    ExecutionSummary,
    RunKey,
    TaskKind,
    TaskRow,
    TimerKind,
    TimerRow,
    TransferAction,
    Transition,
    attributes_of,
    make_event,
)

ET = EventType
# Plain ints for the hot paths (every fire schedules a workflow task): an enum
# wrapper's attribute lookup costs a Python call each time.
_RUNNING = int(WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING)
_STICKY = int(TaskQueueKind.TASK_QUEUE_KIND_STICKY)
_WFT_SCHEDULED = int(ET.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED)
_ACTIVITY_OUTCOMES = {
    ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
    ET.EVENT_TYPE_ACTIVITY_TASK_FAILED,
    ET.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT,
    ET.EVENT_TYPE_ACTIVITY_TASK_CANCELED,
}


def run_key_of(ms: state_pb2.MutableState) -> RunKey:
    return RunKey(namespace=ms.namespace, workflow_id=ms.workflow_id, run_id=ms.run_id)


class Mutation:
    """Collects one transition of ``ms`` (a copy the mutation owns)."""

    def __init__(self, ms: state_pb2.MutableState, now: int) -> None:
        self.ms = ms
        self.now = now
        self.key = run_key_of(ms)
        self.events: list[HistoryEvent] = []
        self.new_tasks: list[TaskRow] = []
        self.done_task_keys: list[str] = []
        self.new_timers: list[TimerRow] = []
        self.done_timer_keys: list[str] = []
        self.current = CurrentWrite.NONE
        self.replaces_run_id = ""
        self.dirty = False
        # New runs created in the same commit (continue-as-new).
        self.side_runs: list[Mutation] = []
        # ActivityTaskScheduled attributes written by this transition, by event id.
        self.scheduled_activities: dict[int, history_pb2.ActivityTaskScheduledEventAttributes] = {}
        # What the transition was given or decided (the task row, token, commands, retry
        # decision...), as references: formatted by server/_trace.py in trace mode only.
        self.trace: dict[str, Any] = {}

    # ----------------------------------------------------------------- events

    @property
    def workflow_task_started(self) -> bool:
        return self.ms.HasField("workflow_task") and self.ms.workflow_task.started_event_id != 0

    def append(self, event_type: int, **attributes: Any) -> HistoryEvent:
        """Append an event to history now, with the next event id."""
        event = make_event(event_type, self.now, **attributes)
        event.event_id = self.ms.next_event_id
        event.version = self.ms.version
        self.ms.next_event_id += 1
        self.ms.history_size_bytes += event.ByteSize()
        self.events.append(event)
        self.dirty = True
        return event

    def append_or_buffer(self, event_type: int, **attributes: Any) -> None:
        """Append an event that came from outside workflow code.

        While a workflow task is started, such events wait in the buffer so that the
        task's completion and the events of its commands stay contiguous in history;
        they are flushed right after the task closes.
        """
        if self.workflow_task_started:
            event = make_event(event_type, self.now, **attributes)
            event.version = self.ms.version
            self.ms.buffered_events.append(event)
            self.dirty = True
        else:
            self.append(event_type, **attributes)

    def append_activity_outcome(
        self,
        info: state_pb2.ActivityInfo,
        event_type: int,
        **attributes: Any,
    ) -> None:
        """ActivityTaskStarted (written only now: retries leave no events) + outcome."""
        started_attrs: dict[str, Any] = {
            "scheduled_event_id": info.scheduled_event_id,
            "identity": info.started_identity,
            "request_id": info.request_id,
            "attempt": info.attempt,
            "site": info.started_site,
            "tier": info.started_tier,
        }
        if event_type == ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            attributes = {**attributes, "executed_at": info.started_tier, "site": info.started_site}
        if info.HasField("last_failure"):
            started_attrs["last_failure"] = info.last_failure
        if self.workflow_task_started:
            self.append_or_buffer(ET.EVENT_TYPE_ACTIVITY_TASK_STARTED, **started_attrs)
            self.append_or_buffer(
                event_type, scheduled_event_id=info.scheduled_event_id, **attributes
            )
        else:
            started = self.append(ET.EVENT_TYPE_ACTIVITY_TASK_STARTED, **started_attrs)
            self.append(
                event_type,
                scheduled_event_id=info.scheduled_event_id,
                started_event_id=started.event_id,
                **attributes,
            )

    def drop_buffered_timer_fired(self, timer_id: str) -> int:
        """Remove the buffered TIMER_FIRED of ``timer_id``; its started event id."""
        for index, event in enumerate(self.ms.buffered_events):
            if (
                event.event_type == ET.EVENT_TYPE_TIMER_FIRED
                and event.timer_fired_event_attributes.timer_id == timer_id
            ):
                started_event_id = event.timer_fired_event_attributes.started_event_id
                del self.ms.buffered_events[index]
                self.dirty = True
                return started_event_id
        raise KeyError(f"no buffered TIMER_FIRED for timer {timer_id!r}")

    def flush_buffered(self) -> bool:
        """Append buffered events with real ids; True if there were any."""
        if not self.ms.buffered_events:
            return False
        started_ids: dict[int, int] = {}
        for buffered in self.ms.buffered_events:
            event = HistoryEvent()
            event.CopyFrom(buffered)
            event.event_id = self.ms.next_event_id
            # The event is written now, so it carries the version (ownership epoch) of
            # now, not of when it was buffered: a handoff in between must not leave an
            # older epoch after newer ones in history.
            event.version = self.ms.version
            self.ms.next_event_id += 1
            attrs = attributes_of(event)
            if event.event_type == ET.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                started_ids[attrs.scheduled_event_id] = event.event_id
            elif event.event_type in _ACTIVITY_OUTCOMES:
                attrs.started_event_id = started_ids.get(attrs.scheduled_event_id, 0)
            self.ms.history_size_bytes += event.ByteSize()
            self.events.append(event)
        del self.ms.buffered_events[:]
        self.dirty = True
        return True

    # ------------------------------------------------------------ tasks/timers

    def add_task(
        self, kind: TaskKind, task_queue: str, ref_id: int, attempt: int, placement: bytes = b""
    ) -> str:
        row = TaskRow(
            key=self.key,
            task_queue=task_queue,
            kind=kind,
            ref_id=ref_id,
            attempt=attempt,
            created_at=self.now,
            placement=placement,
        )
        self.new_tasks.append(row)
        self.dirty = True
        return row.task_key

    def add_timer(self, kind: TimerKind, ref_id: int, attempt: int, fire_at: int) -> str:
        row = TimerRow(key=self.key, kind=kind, ref_id=ref_id, attempt=attempt, fire_at=fire_at)
        self.new_timers.append(row)
        self.dirty = True
        return row.timer_key

    def drop_timers(self, keys: Any) -> None:
        self.done_timer_keys.extend(keys)
        self.dirty = True

    def workflow_task_row_key(self) -> str:
        wft = self.ms.workflow_task
        ref = 0 if wft.transient else wft.scheduled_event_id
        return TaskRow(
            key=self.key,
            task_queue=wft.task_queue.name,
            kind=TaskKind.WORKFLOW,
            ref_id=ref,
            attempt=wft.attempt,
        ).task_key

    # ------------------------------------------------------------ workflow task

    def schedule_workflow_task(self, *, attempt: int = 1, delay_until: int = 0) -> None:
        """Schedule a workflow task unless one is already outstanding.

        Attempts after the first are transient: nothing is written to history until
        one of them completes, so a workflow stuck on a bug does not grow its history.
        """
        ms = self.ms
        if ms.HasField("workflow_task") or ms.status != _RUNNING:
            return
        wft = ms.workflow_task
        wft.attempt = attempt
        wft.task_queue.CopyFrom(ms.task_queue)
        if attempt == 1 and ms.sticky_task_queue:
            # The worker that caches the run gets it on its own queue, new events only.
            wft.task_queue.name = ms.sticky_task_queue
            wft.task_queue.kind = TaskQueueKind.TASK_QUEUE_KIND_STICKY
            wft.task_queue.normal_name = ms.task_queue.name
        wft.scheduled_time.FromMicroseconds(self.now)
        if attempt == 1:
            event = self.append(
                _WFT_SCHEDULED,
                task_queue=ms.task_queue,
                start_to_close_timeout=ms.workflow_task_timeout,
                attempt=1,
            )
            wft.scheduled_event_id = event.event_id
        else:
            wft.transient = True
        if delay_until > self.now:
            wft.timer_keys.append(
                self.add_timer(TimerKind.WORKFLOW_TASK_RETRY, 0, attempt, delay_until)
            )
        else:
            self.add_task(
                TaskKind.WORKFLOW,
                wft.task_queue.name,
                0 if wft.transient else wft.scheduled_event_id,
                attempt,
            )
            if wft.task_queue.kind == _STICKY:
                timeout = ms.sticky_schedule_to_start_timeout.ToMicroseconds()
                wft.timer_keys.append(
                    self.add_timer(
                        TimerKind.STICKY_SCHEDULE_TO_START,
                        wft.scheduled_event_id,
                        attempt,
                        self.now + timeout,
                    )
                )
        self.dirty = True

    def unstick(self) -> None:
        """Forget the sticky worker; a sticky task not yet started moves to the normal
        queue (same task, same attempt: only where it waits changes)."""
        ms = self.ms
        ms.sticky_task_queue = ""
        ms.ClearField("sticky_schedule_to_start_timeout")
        wft = ms.workflow_task
        if (
            ms.HasField("workflow_task")
            and wft.started_event_id == 0
            and wft.task_queue.kind == TaskQueueKind.TASK_QUEUE_KIND_STICKY
        ):
            self.done_task_keys.append(self.workflow_task_row_key())
            wft.task_queue.CopyFrom(ms.task_queue)
            self.add_task(
                TaskKind.WORKFLOW,
                ms.task_queue.name,
                0 if wft.transient else wft.scheduled_event_id,
                wft.attempt,
            )
        self.dirty = True

    def clear_workflow_task(self) -> None:
        if self.ms.HasField("workflow_task"):
            self.drop_timers(self.ms.workflow_task.timer_keys)
            self.ms.ClearField("workflow_task")
            self.dirty = True

    # -------------------------------------------------------------------- close

    def close(self, status: int, close_event_type: int, **attributes: Any) -> None:
        """Close the run: the close event, and every pending task and timer dropped."""
        ms = self.ms
        if (
            ms.HasField("workflow_task")
            and ms.workflow_task.started_event_id
            and not ms.workflow_task.transient
        ):
            wft = ms.workflow_task
            # Keep the history well formed for replay: a started task gets an outcome.
            self.append(
                ET.EVENT_TYPE_WORKFLOW_TASK_FAILED,
                scheduled_event_id=wft.scheduled_event_id,
                started_event_id=wft.started_event_id,
            )
        if ms.HasField("workflow_task") and ms.workflow_task.started_event_id == 0:
            self.done_task_keys.append(self.workflow_task_row_key())
        self.clear_workflow_task()
        self.flush_buffered()
        for info in ms.pending_activities.values():
            self.drop_timers(info.timer_keys)
            if info.task_key:
                self.done_task_keys.append(info.task_key)
        ms.pending_activities.clear()
        for timer in ms.pending_timers.values():
            self.done_timer_keys.append(timer.timer_key)
        ms.pending_timers.clear()
        self.drop_timers(ms.timer_keys)
        del ms.timer_keys[:]
        event = self.append(close_event_type, **attributes)
        ms.status = status  # type: ignore[assignment]
        ms.close_time.FromMicroseconds(self.now)
        ms.completion_event_id = event.event_id
        self.current = CurrentWrite.UPDATE_STATUS
        # Children stay listed (the close policy needs them); each gets its policy.
        for child in ms.pending_children.values():
            child.parent_closed = True
            if child.parent_close_policy != ParentClosePolicy.PARENT_CLOSE_POLICY_ABANDON:
                self.add_transfer(
                    TransferAction.PARENT_CLOSE_POLICY, child.initiated_event_id, slot=1
                )
        ms.pending_external.clear()
        if ms.parent_workflow_id and status != WS.WORKFLOW_EXECUTION_STATUS_CONTINUED_AS_NEW:
            # The last run of a child's chain reports to the parent.
            self.add_transfer(TransferAction.CHILD_CLOSED, event.event_id)

    def add_transfer(self, action: str, ref_id: int, *, slot: int = 0) -> str:
        """An outbox row the server's transfer processor acts on after the commit.

        A row's task key does not include its action (that rides in ``task_queue``),
        and two actions can name the same event: START_CHILD and PARENT_CLOSE_POLICY
        both use the child's initiated event id, and both rows exist when the parent
        closes before its child's start is recorded (or in the very transition that
        initiated the child). ``slot`` (stored as the row's attempt, which transfers
        do not otherwise use) keeps such rows apart; without it the second insert hit
        a unique key and the parent's close failed on every retry."""
        return self.add_task(TaskKind.TRANSFER, action, ref_id, slot)

    # ---------------------------------------------------------------- commit

    def summary(self) -> ExecutionSummary:
        ms = self.ms
        return ExecutionSummary(
            workflow_type=ms.workflow_type.name,
            task_queue=ms.task_queue.name,
            status=ms.status,
            start_time=ms.start_time.ToMicroseconds(),
            close_time=ms.close_time.ToMicroseconds() if ms.HasField("close_time") else None,
            history_length=ms.next_event_id - 1,
        )

    def to_transition(self, expected_version: int, *, start_request_id: str = "") -> Transition:
        return Transition(
            key=self.key,
            expected_version=expected_version,
            new_version=expected_version + 1,
            state=self.ms.SerializeToString(),
            summary=self.summary(),
            events=tuple(self.events),
            new_tasks=tuple(self.new_tasks),
            done_task_keys=tuple(self.done_task_keys),
            new_timers=tuple(self.new_timers),
            done_timer_keys=tuple(self.done_timer_keys),
            current=self.current,
            replaces_run_id=self.replaces_run_id,
            start_request_id=start_request_id,
        )


def task_queue(name: str) -> TaskQueue:
    return TaskQueue(name=name, kind=1)  # type: ignore[arg-type]
