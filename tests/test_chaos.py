"""Chaos: a server process and two worker processes under load, SIGKILLed at random.

One test per store (SQLite file; PostgreSQL on a private cluster from ``pg_cluster.py``,
so restarting the database disturbs nobody else). The real CLI runs the server
(``helpers.ServerProcess``) and ``procs/worker_proc.py`` (flavour ``chaos``) runs two
workers: ``ChaosWorkflow`` runs an activity, a timer, a slow heartbeating activity and
a child workflow (an activity and a timer), and waits for its signals.

A driver with a seeded RNG (``TIDEFLOW_CHAOS_SEED``; random by default, printed)
SIGKILLs the server (a new process starts on the same port and store) or one of the
workers (a new one starts), each kill after K more activity executions were recorded
(a wait on progress, never on the clock). The test starts the workflows in groups of
ten as the kills go on, so there is always fresh work to interrupt, and sends each
one three signals: at once, after its slow activity ran, and once the kills are over
(so every run outlasts them). Half-way the driver restarts PostgreSQL (on the
PostgreSQL variant). Checks at the end, each counted as lost or duplicated:

- every workflow completed with the result its input and signals determine;
- every history (parents and children) gap-free, started once, closed once, last;
- every signal sent is in its history exactly once;
- each activity, timer and child has exactly one outcome;
- every activity ran at least once; the extra (at-least-once) executions are counted
  from the ledger the activities append to, and reported.

A one-line summary (``chaos summary: ...``) is printed (``pytest -s`` shows it).

Sizes: ``TIDEFLOW_CHAOS_KILLS`` (default 12) kills; ``TIDEFLOW_CHAOS_WORKFLOWS``
(default 60, at least 3 per kill) workflows. The long variant is
``TIDEFLOW_CHAOS_KILLS=100``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import Proc, Processes, ServerProcess, eventually, new_id, of_type
from pg_cluster import PrivatePostgres, private_postgres

from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.worker_sdk import Client, DataConverter, WorkflowExecutionStatus, WorkflowHandle

pytestmark = pytest.mark.slow

ET = EventType

KILLS = int(os.environ.get("TIDEFLOW_CHAOS_KILLS", "12"))
WORKFLOWS = max(int(os.environ.get("TIDEFLOW_CHAOS_WORKFLOWS", "60")), 3 * KILLS)
SIGNALS = 3
# The activities of a workflow and its child: each runs at least once.
STEPS = ("first", "slow", "child")
# Workflows are started in groups as the kills go on, so fresh work is always there.
GROUP = 10
# A kill comes after this many more executions (drawn by the RNG): the system makes
# progress between any two kills, however fast the machine.
PROGRESS_BETWEEN_KILLS = (1, 6)
# The whole run's bound: generous for a loaded 2-core machine (a healthy default run
# takes a fraction); the long variant scales it. A run not done by then is lost.
RUN_BOUND_S = 240.0 + 4.0 * KILLS

STORES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=[pytest.mark.postgres]),
]


def _selected(store: str) -> bool:
    choice = os.environ.get("TIDEFLOW_TEST_DB", "").strip().lower() or "all"
    return choice in ("all", store)


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    if not _selected(kind):
        pytest.skip(f"{kind} not selected (TIDEFLOW_TEST_DB)")
    return kind


@pytest.fixture
def cluster(store_kind: str) -> Iterator[PrivatePostgres | None]:
    """The private PostgreSQL cluster of the PostgreSQL variant (None on SQLite)."""
    if store_kind != "postgres":
        yield None
        return
    pg = private_postgres()
    try:
        yield pg
    finally:
        pg.destroy()


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


def _at_least(count: Callable[[], int], n: int) -> Callable[[], bool]:
    return lambda: count() >= n


class Workers:
    """The two worker processes; a killed one is replaced by a new process."""

    def __init__(self, procs: Processes, address: str, task_queue: str) -> None:
        self._procs = procs
        self._address = address
        self._queue = task_queue
        self.running: dict[str, Proc] = {}
        self._starts: Counter[str] = Counter()

    async def start(self, slot: str) -> None:
        self._starts[slot] += 1
        name = f"worker-{slot}-{self._starts[slot]}"
        self.running[slot] = await self._procs.start_worker(
            name, self._address, self._queue, "chaos"
        )

    async def kill_and_restart(self, slot: str) -> None:
        await self._procs.sigkill(self.running.pop(slot))
        await self.start(slot)


def _expected(wf: str, value: int) -> dict[str, Any]:
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


def _check_history(
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


async def _history(handle: WorkflowHandle[Any]) -> list[HistoryEvent]:
    return list((await handle.fetch_history()).events)


async def _verify(
    client: Client,
    handles: dict[str, WorkflowHandle[Any]],
    values: dict[str, int],
    ledger: Ledger,
    tally: Tally,
) -> None:
    tally.lost += [f"{wf}: never started" for wf in values if wf not in handles]
    for wf, handle in handles.items():
        description = await handle.describe()
        if description.status != WorkflowExecutionStatus.COMPLETED:
            tally.lost.append(f"{wf}: {description.status.name}, not completed")
            continue
        result = await handle.result()
        if result != _expected(wf, values[wf]):
            # A signal or outcome applied twice, or one lost, changes the result.
            tally.lost.append(f"{wf}: result {result!r}")
        signals = _check_history(wf, await _history(handle), client.data_converter, tally)
        for value, seen in Counter(signals).items():
            if seen > 1:
                tally.duplicated.append(f"{wf}: signal {value} {seen} times")
        for n in range(SIGNALS):
            if f"{wf}#{n}" not in signals:
                tally.lost.append(f"{wf}: signal {wf}#{n} not in history")
        child = client.get_workflow_handle(f"{wf}-child")
        _check_history(f"{wf}-child", await _history(child), client.data_converter, tally)

    ledger.refresh()
    for wf in handles:
        for step in STEPS:
            if ledger.executions[(wf, step)] == 0:
                tally.lost.append(f"{wf}: activity {step} never executed")
    tally.extra_executions = ledger.total - len(handles) * len(STEPS)


async def _send_signal(handle: WorkflowHandle[Any], value: str, request_id: str) -> None:
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


def test_the_checks_count_what_is_lost_and_duplicated() -> None:
    """The end-of-run checks on a made-up history: a run that lost or doubled
    something must not pass them."""
    converter = DataConverter()
    kinds = [
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED,
        ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,  # 2: completed twice
        ET.EVENT_TYPE_ACTIVITY_TASK_STARTED,
        ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
        ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
        ET.EVENT_TYPE_TIMER_STARTED,  # 6: never fired
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
    ]
    events = [HistoryEvent(event_id=n, event_type=t) for n, t in enumerate(kinds, start=1)]
    events[2].activity_task_started_event_attributes.scheduled_event_id = 2
    for doubled in events[3:5]:
        doubled.activity_task_completed_event_attributes.scheduled_event_id = 2
    for signal in events[6:8]:
        signal.workflow_execution_signaled_event_attributes.input.CopyFrom(
            converter.to_payloads(["wf#0"])
        )
    tally = Tally()
    assert _check_history("wf", events, converter, tally) == ["wf#0", "wf#0"]
    assert tally.duplicated == ["wf: activity 2 has 2"]
    assert tally.lost == ["wf: timer 6 has no outcome"]

    events[4].event_id = 4  # and an event id twice
    tally = Tally()
    _check_history("wf", events, converter, tally)
    assert "wf: event id 4 twice" in tally.duplicated


@pytest.mark.parametrize("store_kind", STORES, indirect=True)
@pytest.mark.timeout(RUN_BOUND_S + 120)
async def test_chaos(
    store_kind: str, cluster: PrivatePostgres | None, procs: Processes, tmp_path: Path
) -> None:
    seed = int(os.environ.get("TIDEFLOW_CHAOS_SEED", "0")) or random.SystemRandom().randrange(
        1, 2**31
    )
    print(f"\nchaos seed {seed} ({store_kind}): TIDEFLOW_CHAOS_SEED={seed} repeats its choices")
    rng = random.Random(seed)
    began = time.monotonic()
    store_url = cluster.url if cluster is not None else f"sqlite:///{tmp_path / 'chaos.db'}"
    ledger = Ledger(tmp_path / "ledger.jsonl")
    tally = Tally()
    task_queue = new_id("chaos")

    server = ServerProcess(procs, store_url)
    await server.start()
    workers = Workers(procs, server.address, task_queue)
    await asyncio.gather(workers.start("a"), workers.start("b"))

    client = await Client.connect(server.address)
    handles: dict[str, WorkflowHandle[Any]] = {}
    values = {f"chaos-{n}-{seed}": rng.randrange(1, 10**6) for n in range(WORKFLOWS)}
    groups = [list(values)[g : g + GROUP] for g in range(0, WORKFLOWS, GROUP)]
    chaos_over = asyncio.Event()

    async def run_one(wf: str) -> None:
        """Start ``wf`` and send its signals: one at once, one after its slow activity
        ran, the last once the kills are over (so the run outlasts them all)."""
        job = {"wf": wf, "value": values[wf], "signals": SIGNALS, "ledger": str(ledger.path)}
        handles[wf] = handle = await client.start_workflow(
            "ChaosWorkflow",
            job,
            id=wf,
            task_queue=task_queue,
            task_timeout=timedelta(seconds=2),
        )
        for n, after in enumerate((None, ledger.executed(wf, "slow"), chaos_over.wait())):
            if after is not None:
                await after
            await _send_signal(handle, f"{wf}#{n}", f"{wf}-signal-{n}")
            tally.signals_sent += 1
        await handle.result()

    async def load() -> None:
        """Group g starts once g * KILLS / len(groups) kills happened."""
        running: list[asyncio.Future[None]] = []
        for g, group in enumerate(groups):
            due = g * KILLS // len(groups)
            await eventually(_at_least(kills, due), f"kill {due}", timeout=RUN_BOUND_S)
            running += [asyncio.ensure_future(run_one(wf)) for wf in group]
        await asyncio.gather(*running)

    def kills() -> int:
        return tally.server_kills + tally.worker_kills

    async def chaos() -> None:
        """Each kill after K more executions (or once every started workflow has no
        activity left to run: its last signal waits for the kills to be over)."""
        db_restart_at = KILLS // 2 if cluster is not None else -1
        for kill in range(KILLS):
            target = ledger.total + rng.randint(*PROGRESS_BETWEEN_KILLS)
            victim = rng.choice(["server", "server", "a", "b"])
            await eventually(
                ledger.progressed(target, handles),
                f"kill {kill}: {target} executions",
                timeout=RUN_BOUND_S,
            )
            if kill == db_restart_at and cluster is not None:
                await asyncio.to_thread(cluster.restart)
                tally.db_restarts += 1
            if victim == "server":
                await server.kill()
                await server.start()
                tally.server_kills += 1
            else:
                await workers.kill_and_restart(victim)
                tally.worker_kills += 1
        chaos_over.set()

    watcher = asyncio.ensure_future(ledger.watch())
    try:
        # gather: a failure of the driver (a process that does not come back) fails
        # the test at once instead of at the bound.
        try:
            await asyncio.wait_for(asyncio.gather(load(), chaos()), RUN_BOUND_S)
        except TimeoutError:
            # A run that never completes is lost: count it (and report the rest)
            # instead of failing without figures.
            print(f"chaos: not done within {RUN_BOUND_S:.0f} s; checking what there is")
        await _verify(client, handles, values, ledger, tally)
    finally:
        watcher.cancel()
        await client.close()

    summary = (
        f"chaos summary: store={store_kind} seed={seed} workflows={WORKFLOWS} "
        f"(+{WORKFLOWS} children) signals={tally.signals_sent} "
        f"server_kills={tally.server_kills} worker_kills={tally.worker_kills} "
        f"db_restarts={tally.db_restarts} lost={len(tally.lost)} "
        f"duplicated={len(tally.duplicated)} "
        f"extra_activity_executions={tally.extra_executions} "
        f"elapsed={time.monotonic() - began:.0f}s"
    )
    print(summary)
    assert not tally.lost, f"{summary}\nlost: {tally.lost[:20]}"
    assert not tally.duplicated, f"{summary}\nduplicated: {tally.duplicated[:20]}"
    # The run really was chaotic: every planned kill happened (the driver stops early
    # only if the work finished first, which the progress targets rule out).
    assert tally.server_kills + tally.worker_kills == KILLS, summary
    assert tally.db_restarts == (1 if cluster is not None else 0), summary
