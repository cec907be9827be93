"""The chaos checks shared by tests/test_chaos.py (one server) and
tests/test_cluster_suite.py (several nodes): the ledger the chaos activities of
``procs/worker_proc.py`` append to, the worker processes, the expected result of a
``ChaosWorkflow``, and the end-of-run checks that count what was lost or duplicated
(results, gap-free histories, one outcome per activity, timer and child, every signal
exactly once, every activity executed)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import Proc, Processes, of_type

from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.api.v1.state_pb2 import MutableState
from tideflow.history import HistoryStore, RunKey
from tideflow.worker_sdk import Client, DataConverter, WorkflowExecutionStatus, WorkflowHandle

ET = EventType

SIGNALS = 3
# The activities of a workflow and its child: each runs at least once.
STEPS = ("first", "slow", "child")


#: Runs whose trail a failure's message carries.
STUCK_REPORTED = 3


@dataclass
class Tally:
    """What the run did and what the checks found."""

    server_kills: int = 0
    worker_kills: int = 0
    db_restarts: int = 0
    signals_sent: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    extra_executions: int = 0
    # What the first runs that did not complete got to (their last events, their
    # child's, their stored rows): part of the failure's message, since a CI log may
    # keep only the short summary.
    stuck: list[str] = field(default_factory=list)


class Ledger:
    """The file every chaos activity execution appends one JSON line to, read as it
    grows by ``watch()`` (one reader for all the waits on it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.executions: Counter[tuple[str, str]] = Counter()
        self.total = 0
        self._offset = 0
        self._waiters: dict[tuple[str, str], asyncio.Event] = {}

    def refresh(self) -> None:
        """Take in the whole lines appended since the last call."""
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            entry = json.loads(line)
            key = (entry["wf"], entry["step"])
            self.executions[key] += 1
            self.total += 1
            if key in self._waiters:
                self._waiters[key].set()

    async def watch(self) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(0.05)

    async def executed(self, wf: str, step: str) -> None:
        """Wait until activity ``step`` of ``wf`` ran (at least started) once."""
        if self.executions[(wf, step)]:
            return
        await self._waiters.setdefault((wf, step), asyncio.Event()).wait()

    def progressed(self, target: int, workflows: Collection[str]) -> Callable[[], bool]:
        """A check for ``eventually``: ``target`` executions recorded, or every
        activity of ``workflows`` (as it is when checked) executed already."""
        return lambda: (
            self.total >= target
            or all(self.executions[(wf, step)] for wf in list(workflows) for step in STEPS)
        )


def at_least(count: Callable[[], int], n: int) -> Callable[[], bool]:
    return lambda: count() >= n


class Workers:
    """Worker processes by slot, each polling its slot's server address; a killed one
    is replaced by a new process."""

    def __init__(self, procs: Processes, addresses: Mapping[str, str], task_queue: str) -> None:
        self._procs = procs
        self._addresses = dict(addresses)
        self._queue = task_queue
        self.running: dict[str, Proc] = {}
        self._starts: Counter[str] = Counter()

    async def start(self, slot: str) -> None:
        self._starts[slot] += 1
        name = f"worker-{slot}-{self._starts[slot]}"
        self.running[slot] = await self._procs.start_worker(
            name, self._addresses[slot], self._queue, "chaos"
        )

    async def kill_and_restart(self, slot: str) -> None:
        await self._procs.sigkill(self.running.pop(slot))
        await self.start(slot)


def expected_result(wf: str, value: int) -> dict[str, Any]:
    """What ``ChaosWorkflow`` returns (its activities: ``value * 7 + len(step)`` and
    ``value * 11``; the child adds 1), signals in the order they were sent."""
    return {
        "first": value * 7 + len("first"),
        "slow": value * 11,
        "child": value * 7 + len("child") + 1,
        "signals": [f"{wf}#{n}" for n in range(SIGNALS)],
    }


# What must happen exactly once for each event that opens something: (what, the
# opening event, the event of its outcome, its attributes, the field naming the opener).
_OUTCOMES = [
    (
        "activity",
        ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
        ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
        "activity_task_completed_event_attributes",
        "scheduled_event_id",
    ),
    (
        "activity start",
        ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
        ET.EVENT_TYPE_ACTIVITY_TASK_STARTED,
        "activity_task_started_event_attributes",
        "scheduled_event_id",
    ),
    (
        "timer",
        ET.EVENT_TYPE_TIMER_STARTED,
        ET.EVENT_TYPE_TIMER_FIRED,
        "timer_fired_event_attributes",
        "started_event_id",
    ),
    (
        "child",
        ET.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED,
        ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED,
        "child_workflow_execution_completed_event_attributes",
        "initiated_event_id",
    ),
    (
        "child start",
        ET.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED,
        ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED,
        "child_workflow_execution_started_event_attributes",
        "initiated_event_id",
    ),
]


def check_history(
    label: str, events: Sequence[HistoryEvent], converter: DataConverter, tally: Tally
) -> list[str]:
    """Count what is missing or doubled in one completed history; the signal values."""
    ids = [e.event_id for e in events]
    if ids != list(range(1, len(events) + 1)):
        doubled = [i for i, n in Counter(ids).items() if n > 1]
        tally.duplicated += [f"{label}: event id {i} twice" for i in doubled]
        if not doubled:
            tally.lost.append(f"{label}: event ids not 1..n")
    started = of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED)
    completed = of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED)
    if len(started) != 1 or events[0].event_type != ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
        tally.duplicated.append(f"{label}: {len(started)} WorkflowExecutionStarted")
    if len(completed) != 1 or events[-1].event_type != ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
        tally.duplicated.append(f"{label}: {len(completed)} completions, or not last")

    for kind, opened_type, outcome_type, attributes, link in _OUTCOMES:
        opened = [e.event_id for e in of_type(events, opened_type)]
        seen = Counter(getattr(getattr(e, attributes), link) for e in of_type(events, outcome_type))
        for event_id in opened:
            if seen[event_id] == 0:
                tally.lost.append(f"{label}: {kind} {event_id} has no outcome")
            elif seen[event_id] > 1:
                tally.duplicated.append(f"{label}: {kind} {event_id} has {seen[event_id]}")
        for event_id in set(seen) - set(opened):
            tally.duplicated.append(f"{label}: outcome of unknown {kind} {event_id}")
    for bad in (
        ET.EVENT_TYPE_ACTIVITY_TASK_FAILED,
        ET.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT,
        ET.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_FAILED,
        ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_FAILED,
        ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TIMED_OUT,
    ):
        if of_type(events, bad):
            tally.lost.append(f"{label}: {EventType.Name(bad)} in history")
    return [
        value
        for e in of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)
        for value in converter.from_payloads(e.workflow_execution_signaled_event_attributes.input)
    ]


def event_trail(events: Sequence[HistoryEvent]) -> str:
    """``id:TYPE`` of each event, short enough for a failure report."""
    return " ".join(
        f"{e.event_id}:{EventType.Name(e.event_type).removeprefix('EVENT_TYPE_')}" for e in events
    )


async def stored_rows(store_url: str, workflow_ids: Collection[str]) -> str:
    """What the store holds of each run: its pending workflow task, its task and timer
    rows, its shard's owner (for the failure report)."""
    store = await HistoryStore.open(store_url)
    try:
        lines = []
        shards = {r.shard_id: (r.owner, r.range_id) for r in await store.read_shards()}
        for wf in workflow_ids:
            current = await store.get_current("default", wf)
            if current is None:
                continue
            key = RunKey(namespace="default", workflow_id=wf, run_id=current.run_id)
            shard = store.shard_of(key)
            record = await store.get_execution(key)
            if record is not None:
                ms = MutableState.FromString(record.state)
                lines.append(
                    f"{wf}: workflow task {ms.workflow_task} sticky={ms.sticky_task_queue!r} "
                    f"shard {shard} held by {shards.get(shard)}"
                )
            tasks = await store.list_tasks(shards=[shard])
            lines += [f"  task row {t}" for t in tasks if t.key.workflow_id == wf]
            timers = await store.timers_due_before(2**62, shards=[shard])
            lines += [f"  timer row {t}" for t in timers if t.key.workflow_id == wf]
        return "\n".join(lines)
    finally:
        await store.close()


async def history_of(handle: WorkflowHandle[Any]) -> list[HistoryEvent]:
    return list((await handle.fetch_history()).events)


async def verify(
    client: Client,
    handles: dict[str, WorkflowHandle[Any]],
    values: dict[str, int],
    ledger: Ledger,
    tally: Tally,
    store_url: str = "",
) -> None:
    """The end-of-run checks; for a run that did not complete, what its history, its
    child's and (given ``store_url``) its stored task and timer rows show."""
    tally.lost += [f"{wf}: never started" for wf in values if wf not in handles]
    for wf, handle in handles.items():
        description = await handle.describe()
        if description.status != WorkflowExecutionStatus.COMPLETED:
            tally.lost.append(f"{wf}: {description.status.name}, not completed")
            # What the stuck run and its child got to: the first thing to read when
            # this fails.
            child = client.get_workflow_handle(f"{wf}-child")
            report = [f"{wf} (not completed): {event_trail(await history_of(handle))}"]
            try:
                report.append(f"{wf}-child: {event_trail(await history_of(child))}")
            except Exception as e:  # the child may never have been started
                report.append(f"{wf}-child: {e!r}")
            if store_url:
                report.append(await stored_rows(store_url, (wf, f"{wf}-child")))
            print("\n".join(report))
            if len(tally.stuck) < STUCK_REPORTED:
                tally.stuck.append("\n".join(report))
            continue
        result = await handle.result()
        if result != expected_result(wf, values[wf]):
            # A signal or outcome applied twice, or one lost, changes the result.
            tally.lost.append(f"{wf}: result {result!r}")
        signals = check_history(wf, await history_of(handle), client.data_converter, tally)
        for value, seen in Counter(signals).items():
            if seen > 1:
                tally.duplicated.append(f"{wf}: signal {value} {seen} times")
        for n in range(SIGNALS):
            if f"{wf}#{n}" not in signals:
                tally.lost.append(f"{wf}: signal {wf}#{n} not in history")
        child = client.get_workflow_handle(f"{wf}-child")
        check_history(f"{wf}-child", await history_of(child), client.data_converter, tally)

    ledger.refresh()
    for wf in handles:
        for step in STEPS:
            if ledger.executions[(wf, step)] == 0:
                tally.lost.append(f"{wf}: activity {step} never executed")
    tally.extra_executions = ledger.total - len(handles) * len(STEPS)


async def send_signal(handle: WorkflowHandle[Any], value: str, request_id: str) -> None:
    """Deliver one signal, retrying with the same request id: however many attempts
    reached the server, it is applied once. The SDK retries a restart by itself for
    two minutes; this outlasts a longer unlucky streak of kills."""
    for attempt in range(5):
        try:
            await handle.signal("add", value, request_id=request_id)
            return
        except Exception:  # any failure of the call: try again, same id
            if attempt == 4:
                raise
