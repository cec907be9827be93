"""Trace mode: every committed transition of a run as one NDJSON line.

Enabled by the environment variable ``TIDEFLOW_TRACE_DIR`` (read when the server
starts). Each run gets ``<dir>/<workflow id>__<run id>.ndjson``; each line records the
engine action (named as in the TLA+ specs), the history events it appended, and a
compact snapshot of the run's state afterwards, including what writes no history
event (activity retries, timer re-arms). ``tla/`` turns these logs into TLA+ traces
and lets TLC decide whether the real run is a behaviour of the spec.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from tideflow.api.v1 import state_pb2
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.history import attributes_of

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _event(event: HistoryEvent) -> dict[str, Any]:
    attrs = attributes_of(event)
    out: dict[str, Any] = {
        "id": event.event_id,
        "type": EventType.Name(event.event_type).removeprefix("EVENT_TYPE_"),
    }
    for name in ("scheduled_event_id", "started_event_id", "attempt", "activity_id", "timer_id"):
        if attrs.DESCRIPTOR.fields_by_name.get(name) is not None:
            value = getattr(attrs, name)
            if value:
                out[name] = value
    if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
        out["activity_type"] = attrs.activity_type.name
    return out


def _state(ms: state_pb2.MutableState) -> dict[str, Any]:
    wft = ms.workflow_task if ms.HasField("workflow_task") else None
    return {
        "status": ms.status,
        "next_event_id": ms.next_event_id,
        "workflow_task": None
        if wft is None
        else {
            "scheduled": wft.scheduled_event_id,
            "started": wft.started_event_id,
            "attempt": wft.attempt,
            "transient": wft.transient,
        },
        "activities": {
            str(sid): {
                "activity_id": a.activity_id,
                "attempt": a.attempt,
                "started": a.started_time.ToMicroseconds() != 0,
                "backing_off": a.backing_off,
            }
            for sid, a in sorted(ms.pending_activities.items())
        },
        "timers": sorted(ms.pending_timers),
        "buffered": len(ms.buffered_events),
    }


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

    def record(
        self, action: str, ms: state_pb2.MutableState, events: list[HistoryEvent], now: int
    ) -> None:
        if self._dir is None:
            return
        name = f"{_UNSAFE.sub('_', ms.workflow_id)}__{ms.run_id}.ndjson"
        line = {
            "action": action,
            "time_us": now,
            "events": [_event(e) for e in events],
            "state": _state(ms),
        }
        # Appends are small and synchronous on purpose: the line must be on disk in
        # commit order, before the next transition of the run can commit.
        with (self._dir / name).open("a") as fh:
            fh.write(json.dumps(line, separators=(",", ":")) + "\n")
