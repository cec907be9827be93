"""Trace mode of the sites (tla/Replication.tla): one NDJSON line per replication step
of this site in ``<TIDEFLOW_TRACE_DIR>/replication/<site>.ndjson``.

tla/replication_trace_to_tla.py merges the files of all sites by time (one machine,
one clock in the tests) and TLC checks each run's steps against
tla/TraceReplication.tla. Every line is written AHEAD of the write it describes
(``outcome: "pending"``), so a step a peer can only observe after the commit (an event
it pulls, a forwarded signal the home applies) is always earlier in the merged order
than the observation. Its outcome follows on a line of its own (``{"seq", "commit"}``:
"ok", or for a replicated batch the store's verdict); a pending line with no outcome
did not happen (the engine's aborted commits write none) or may not have (a crash, a
failed write): the converter drops it.

Lines (all with ``format``, ``site``, ``seq``, ``time_us``, ``action``, ``run``):

- ``HomeAppend``: a transition of the engine that appended events (the home's
  ``ApplySignal``, ``CompleteRun``, ``Handoff`` and every other event of the run):
  ``events``, each ``{id, type, epoch, sid, from, to, new_epoch}``, and ``buffered``,
  the request ids of signals and cancel requests its state holds buffered (one
  taken during a workflow task is an event only when the task ends: a transition
  that only buffers one is logged too);
- ``TakeOver``: the new home activated a run handed to it (server/_handoff.py);
- ``ApplyBatch``: a batch pulled from ``peer`` (``DeliverEvents``), ``events`` as
  above, ``state`` (it carried the run's state) and that state's ``buffered``; its
  outcome line carries the verdict of ``append_replicated``;
- ``InboxStored`` / ``InboxForwarded`` / ``InboxRetired``: a request's id ``sid``
  and ``kind`` (signal, cancel, terminate) stored in, forwarded from or removed from
  this site's inbox. A forward
  names the home it went ``to`` and its ``basis``: how many events the replica had
  that named that home (the forward is decided on a state read earlier, and a batch
  may commit in between; 0: not read by the caller, the replica as the line finds
  it).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.api.v1.state_pb2 import MutableState
from tideflow.history import RunKey, attributes_of

from ._trace import writer_trace_file

if TYPE_CHECKING:
    from ._mutation import Mutation

FORMAT = 1
ET = EventType


def run_name(key: RunKey) -> str:
    return f"{key.namespace}/{key.workflow_id}/{key.run_id}"


def event_line(event: HistoryEvent) -> dict[str, Any]:
    """What Replication.tla's ``Ev`` records of an event (type, the epoch of its
    writer, a signal's or cancel request's request id, a handoff's clusters and new
    epoch)."""
    out: dict[str, Any] = {
        "id": event.event_id,
        "type": EventType.Name(event.event_type).removeprefix("EVENT_TYPE_"),
        "epoch": event.version,
    }
    if event.event_type in (
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED,
    ):
        out["sid"] = attributes_of(event).request_id
    elif event.event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_HANDOFF:
        attrs = attributes_of(event)
        out["from"] = attrs.from_cluster
        out["to"] = attrs.to_cluster
        out["new_epoch"] = attrs.new_version
    return out


class ReplicationTracer:
    """Off (one attribute test per step) unless ``TIDEFLOW_TRACE_DIR`` is set."""

    def __init__(self, directory: str | None, site: str) -> None:
        self._site = site
        self._seq = itertools.count(1)
        self._path = writer_trace_file(directory if site else None, "replication", site)

    @classmethod
    def from_environment(cls, site: str) -> ReplicationTracer:
        return cls(os.environ.get("TIDEFLOW_TRACE_DIR") or None, site)

    @property
    def enabled(self) -> bool:
        return self._path is not None

    def _append(self, line: dict[str, Any]) -> None:
        assert self._path is not None
        # Small synchronous appends: on disk before the write they describe starts.
        with self._path.open("a") as fh:
            fh.write(json.dumps(line, separators=(",", ":")) + "\n")

    def ahead(self, action: str, key: RunKey, **fields: Any) -> int:
        """Log a step before its write; the sequence number its outcome names (0:
        trace mode is off)."""
        if self._path is None:
            return 0
        seq = next(self._seq)
        self._append(
            {
                "format": FORMAT,
                "site": self._site,
                "seq": seq,
                "time_us": time.time_ns() // 1000,
                "action": action,
                "outcome": "pending",
                "run": run_name(key),
                **fields,
            }
        )
        return seq

    def outcome(self, seq: int, commit: str) -> None:
        if self._path is not None and seq:
            self._append({"format": FORMAT, "site": self._site, "seq": seq, "commit": commit})

    def events(self, events: Sequence[HistoryEvent]) -> list[dict[str, Any]]:
        return [event_line(e) for e in events] if self._path is not None else []

    def home_step(self, action: str, m: Mutation) -> int:
        """An engine commit of the home: logged when it appends events or holds
        buffered signals, and take-overs (0: nothing logged)."""
        if self._path is None:
            return 0
        buffered = buffered_signals(m.ms)
        if action == "TakeOver":
            return self.ahead("TakeOver", m.key)
        if not (m.events or buffered):
            return 0
        events = self.events(m.events)
        return self.ahead("HomeAppend", m.key, step=action, events=events, buffered=buffered)


def buffered_signals(ms: MutableState) -> list[str]:
    """Request ids of the signals and cancel requests the run's state buffered during
    a workflow task: taken (the inbox of a replica showing this state retires them)
    but not yet SIGNALED / CANCEL_REQUESTED events."""
    return sorted(
        attributes_of(e).request_id
        for e in ms.buffered_events
        if e.event_type
        in (
            ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
            ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED,
        )
    )
