"""Trace mode: every transition of a run as one NDJSON line, written ahead of its commit.

Enabled by the environment variable ``TIDEFLOW_TRACE_DIR`` (read when the server
starts). Each run gets ``<dir>/<workflow id>__<run id>.ndjson``; each transition line
records the engine action (named as in the TLA+ specs), what the transition was given
or decided (``args``: the task row a poll took, the token a report carried, the
commands of a workflow task, the timer row that fired, the retry and heartbeat re-arm
decisions, the eager flags), the history events it appended (an activity's with its
normalized timeouts), the task and timer rows it wrote and consumed, and a compact
snapshot of the run's state afterwards, including what writes no history event
(activity retries, timer re-arms, sticky queues).

The line is written before the store commit ("outcome": "pending") and followed by
``{"commit": "ok"}`` or ``{"commit": "aborted"}`` (the store refused it; the engine
retries). A pending line with neither after it may or may not have committed: the
process died, or the commit raised. So a SIGKILL can leave an uncertain line but never
a missing one. ``tla/trace_to_tla.py`` folds these into one line per transition, turns
the log into a TLA+ trace, and TLC decides whether the real run is a behaviour of
``tla/EngineCore.tla`` (see the trace validation section of tla/README.md).

Off (one attribute test per transition) unless the variable is set. The engine only
stores references to its inputs in ``Mutation.trace``; they are formatted here, and
only in trace mode.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tideflow.api.v1 import common_pb2, state_pb2
from tideflow.api.v1.command_pb2 import Command, CommandType
from tideflow.api.v1.history_pb2 import (
    EventType,
    HistoryEvent,
    ParentClosePolicy,
    WorkflowTaskFailedCause,
)
from tideflow.history import (
    ShardRecord,
    TaskKind,
    TaskRow,
    TimerKind,
    TimerRow,
    attributes_of,
)

if TYPE_CHECKING:
    from ._mutation import Mutation

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def writer_trace_file(directory: str | None, folder: str, writer: str) -> Path | None:
    """``<directory>/<folder>/<writer>.ndjson`` (the folder made), where one node or
    site writes its trace lines; None when trace mode is off (no ``directory``)."""
    if not directory:
        return None
    path = Path(directory) / folder
    path.mkdir(parents=True, exist_ok=True)
    return path / f"{_UNSAFE.sub('_', writer)}.ndjson"


# Version of the line format below; tla/trace_to_tla.py refuses other versions.
FORMAT = 3


def _event(event: HistoryEvent) -> dict[str, Any]:
    attrs = attributes_of(event)
    out: dict[str, Any] = {
        "id": event.event_id,
        "type": EventType.Name(event.event_type).removeprefix("EVENT_TYPE_"),
    }
    for name in (
        "scheduled_event_id",
        "started_event_id",
        "initiated_event_id",
        "attempt",
        "activity_id",
        "timer_id",
    ):
        if attrs.DESCRIPTOR.fields_by_name.get(name) is not None:
            value = getattr(attrs, name)
            if value:
                out[name] = value
    if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
        out["activity_type"] = attrs.activity_type.name
        # The timeouts as the engine normalized them: they decide which timers it arms.
        for name in ("schedule_to_close", "schedule_to_start", "start_to_close", "heartbeat"):
            out[f"{name}_us"] = getattr(attrs, f"{name}_timeout").ToMicroseconds()
    elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
        out["request_id"] = attrs.request_id
    return out


def _state(ms: state_pb2.MutableState) -> dict[str, Any]:
    wft = ms.workflow_task if ms.HasField("workflow_task") else None
    return {
        "status": ms.status,
        "next_event_id": ms.next_event_id,
        "sticky": bool(ms.sticky_task_queue),
        "cancel_requested": ms.cancel_requested,
        "has_parent": bool(ms.parent_workflow_id),
        "workflow_task": None
        if wft is None
        else {
            "scheduled": wft.scheduled_event_id,
            "started": wft.started_event_id,
            "attempt": wft.attempt,
            "transient": wft.transient,
            "sticky": wft.task_queue.kind == common_pb2.TASK_QUEUE_KIND_STICKY,
        },
        "activities": {
            str(sid): {
                "activity_id": a.activity_id,
                "attempt": a.attempt,
                "started": a.started_time.ToMicroseconds() != 0,
                "backing_off": a.backing_off,
                "cancel_requested": a.cancel_requested,
            }
            for sid, a in sorted(ms.pending_activities.items())
        },
        # timer id -> its TIMER_STARTED event id
        "timers": {tid: t.started_event_id for tid, t in sorted(ms.pending_timers.items())},
        # initiated event id -> whether its start was recorded / the parent closed
        "children": {
            str(i): {"started": bool(c.run_id), "parent_closed": c.parent_closed}
            for i, c in sorted(ms.pending_children.items())
        },
        "external": sorted(ms.pending_external),
        "buffered": len(ms.buffered_events),
        "buffered_events": [_event(e) for e in ms.buffered_events],
    }


def _task_row(kind: int, ref: int, attempt: int) -> dict[str, Any]:
    return {"kind": TaskKind(kind).name, "ref": ref, "attempt": attempt}


def _timer_row(kind: int, ref: int, attempt: int) -> dict[str, Any]:
    return {"kind": TimerKind(kind).name, "ref": ref, "attempt": attempt}


def _task_key_row(key: str) -> dict[str, Any]:
    # TaskRow.task_key: "<namespace>|<workflow id>|<run id>|<kind>|<ref>|<attempt>"; the
    # workflow id may itself contain "|", so split from the right.
    _, kind, ref, attempt = key.rsplit("|", 3)
    return _task_row(int(kind), int(ref), int(attempt))


def _timer_key_row(key: str) -> dict[str, Any]:
    # TimerRow.timer_key: "...|<kind>|<ref>|<attempt>|<fire_at>"
    _, kind, ref, attempt, _fire_at = key.rsplit("|", 4)
    return _timer_row(int(kind), int(ref), int(attempt))


def _command(command: Command) -> dict[str, Any]:
    ctype = command.command_type
    out: dict[str, Any] = {"type": CommandType.Name(ctype).removeprefix("COMMAND_TYPE_")}
    if ctype == CommandType.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK:
        a = command.schedule_activity_task_command_attributes
        out["id"] = a.activity_id
        out["eager"] = a.request_eager_execution
    elif ctype == CommandType.COMMAND_TYPE_START_TIMER:
        out["id"] = command.start_timer_command_attributes.timer_id
    elif ctype == CommandType.COMMAND_TYPE_CANCEL_TIMER:
        out["id"] = command.cancel_timer_command_attributes.timer_id
    elif ctype == CommandType.COMMAND_TYPE_START_CHILD_WORKFLOW_EXECUTION:
        policy = command.start_child_workflow_execution_command_attributes.parent_close_policy
        out["abandon"] = policy == ParentClosePolicy.PARENT_CLOSE_POLICY_ABANDON
    elif ctype == CommandType.COMMAND_TYPE_REQUEST_CANCEL_ACTIVITY_TASK:
        out["scheduled"] = (
            command.request_cancel_activity_task_command_attributes.scheduled_event_id
        )
    return out


def _args(m: Mutation) -> dict[str, Any]:
    """The inputs and decisions the engine noted in ``m.trace``, as JSON."""
    out: dict[str, Any] = {}
    for name, value in m.trace.items():
        if isinstance(value, TaskRow):
            out[name] = _task_row(value.kind, value.ref_id, value.attempt)
        elif isinstance(value, TimerRow):
            out[name] = _timer_row(value.kind, value.ref_id, value.attempt)
        elif isinstance(value, state_pb2.TaskToken):
            out[name] = {
                "scheduled": value.scheduled_event_id,
                "started": value.started_event_id,
                "attempt": value.attempt,
            }
        elif name == "commands":
            out[name] = [_command(c) for c in value]
        elif name == "cause":
            out[name] = WorkflowTaskFailedCause.Name(value).removeprefix(
                "WORKFLOW_TASK_FAILED_CAUSE_"
            )
        elif name == "rejected":
            out[name] = {
                "cause": WorkflowTaskFailedCause.Name(value.cause).removeprefix(
                    "WORKFLOW_TASK_FAILED_CAUSE_"
                ),
                "message": str(value),
            }
        else:
            out[name] = value
    return out


class Tracer:
    def __init__(self, directory: str | None) -> None:
        self._dir = Path(directory) if directory else None
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_environment(cls) -> Tracer:
        return cls(os.environ.get("TIDEFLOW_TRACE_DIR") or None)

    @property
    def enabled(self) -> bool:
        return self._dir is not None

    def _path(self, m: Mutation) -> Path:
        assert self._dir is not None
        ms = m.ms
        return self._dir / f"{_UNSAFE.sub('_', ms.workflow_id)}__{ms.run_id}.ndjson"

    def _append(self, path: Path, line: dict[str, Any]) -> None:
        # Appends are small and synchronous on purpose: a line must be on disk in commit
        # order, before the next transition of the run can commit (the engine holds the
        # run's lock across both writes and the commit).
        with path.open("a") as fh:
            fh.write(json.dumps(line, separators=(",", ":")) + "\n")

    def write_ahead(self, action: str, m: Mutation) -> None:
        """Log a transition before its commit (outcome "pending"), and the start of
        each run created in the same commit (a continue-as-new successor). A pending
        line that no ``outcome`` line follows may or may not have committed (the process
        died, or the commit raised): the trace converter treats it as exactly that."""
        if self._dir is None:
            return
        self._append(self._path(m), self._line(action, m))
        for side in m.side_runs:
            self._append(self._path(side), self._line("StartRun", side))

    def outcome(self, m: Mutation, *, committed: bool) -> None:
        """After the commit: it happened (``committed``), or the store refused it (a
        concurrent change; the engine retries from a fresh copy of the run)."""
        if self._dir is None:
            return
        line = {"commit": "ok" if committed else "aborted"}
        for mutation in (m, *m.side_runs):
            self._append(self._path(mutation), line)

    def never_started(self, m: Mutation) -> None:
        """A new run whose StartRun the store refused (its workflow id has a current
        run: a start that tried without reading it first). The run never existed and
        its run id is never used again: its trace, that one line, goes."""
        if self._dir is not None:
            self._path(m).unlink(missing_ok=True)

    def _line(self, action: str, m: Mutation) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "action": action,
            "outcome": "pending",
            "time_us": m.now,
            "args": _args(m),
            "events": [_event(e) for e in m.events],
            "rows": {
                "new_tasks": [_task_row(t.kind, t.ref_id, t.attempt) for t in m.new_tasks],
                "done_tasks": [_task_key_row(k) for k in m.done_task_keys],
                "new_timers": [_timer_row(t.kind, t.ref_id, t.attempt) for t in m.new_timers],
                "done_timers": [_timer_key_row(k) for k in m.done_timer_keys],
            },
            "state": _state(m.ms),
        }


class LeaseTracer:
    """Trace mode of the shard leases (tla/ShardLease.tla): one NDJSON line per lease
    step of this node in ``<TIDEFLOW_TRACE_DIR>/shards/<node id>.ndjson``, a folder of
    its own so that the run traces' converter never mistakes it for a run.
    tla/lease_trace_to_tla.py merges the files of all nodes and TLC checks them against
    tla/TraceShardLease.tla.

    Lines (all with ``format``, ``node``, ``time_us``, ``action``, ``shard``):

    - ``AcquireShard``: ``read_range`` (the range id read), ``range`` (the new one,
      null if the compare-and-set lost), ``previous_owner`` and ``expires_at`` (the
      row as read), ``now`` (this node's clock when it judged the row free),
      ``stolen`` (an expired lease of another node);
    - ``RenewLease``: ``range`` (the token), ``ok``; a failed renewal (the range id
      moved, the node dropped the shard) has ``current``, the range id the store had;
    - ``ReleaseShard``: ``range``, ``ok``;
    - ``FencedWrite``: a write the store refused: ``held`` (the writer's token) and
      ``current`` (the range id the fence read);
    - ``AppendEvent``: a transition of the shard committed: ``range`` (its token) and
      ``current`` (the range id the fence read in the same transaction).

    Every ``current`` is read by the store in the transaction of the step: it places
    the step between the shard row's changes, whatever the nodes' clocks say.
    """

    FORMAT = 2

    def __init__(self, directory: str | None, node_id: str) -> None:
        self._node = node_id
        self._path = writer_trace_file(directory, "shards", node_id)

    @classmethod
    def from_environment(cls, node_id: str) -> LeaseTracer:
        return cls(os.environ.get("TIDEFLOW_TRACE_DIR") or None, node_id)

    @property
    def enabled(self) -> bool:
        return self._path is not None

    def _write(self, action: str, shard: int, **fields: Any) -> None:
        if self._path is None:
            return
        line = {
            "format": self.FORMAT,
            "node": self._node,
            "time_us": time.time_ns() // 1000,
            "action": action,
            "shard": shard,
            **fields,
        }
        with self._path.open("a") as fh:
            fh.write(json.dumps(line, separators=(",", ":")) + "\n")

    def acquire(self, read: ShardRecord, new_range: int | None, *, now: int) -> None:
        """ShardLease.tla ``ReadShard`` + ``AcquireShard`` (``now``: the clock the
        node judged ``read`` free by)."""
        stolen = not read.unowned and read.owner != self._node and read.lease_expires_at < now
        self._write(
            "AcquireShard",
            read.shard_id,
            read_range=read.range_id,
            range=new_range,
            previous_owner=read.owner,
            expires_at=read.lease_expires_at,
            now=now,
            stolen=stolen,
        )

    def renew(self, shard: int, range_id: int, *, current: int | None = None) -> None:
        """``RenewLease``: ``current`` is None when it succeeded, else the range id the
        store had."""
        if current is None:
            self._write("RenewLease", shard, range=range_id, ok=True)
        else:
            self._write("RenewLease", shard, range=range_id, ok=False, current=current)

    def release(self, shard: int, range_id: int, *, ok: bool) -> None:
        self._write("ReleaseShard", shard, range=range_id, ok=ok)

    def fenced(self, shard: int, held: int, current: int | None) -> None:
        self._write("FencedWrite", shard, held=held, current=current)

    def appended(self, tokens: dict[int, int], current: dict[int, int]) -> None:
        """A transition committed (HistoryStore.on_committed)."""
        for shard, range_id in sorted(tokens.items()):
            self._write("AppendEvent", shard, range=range_id, current=current.get(shard))
