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
import os
import random
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import Processes, ServerProcess, eventually, new_id
from helpers_chaos import (
    SIGNALS,
    Ledger,
    Tally,
    Workers,
    at_least,
    check_history,
    send_signal,
    verify,
)
from pg_cluster import PrivatePostgres, private_postgres

from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.worker_sdk import Client, DataConverter, WorkflowHandle

pytestmark = pytest.mark.slow

ET = EventType

KILLS = int(os.environ.get("TIDEFLOW_CHAOS_KILLS", "12"))
WORKFLOWS = max(int(os.environ.get("TIDEFLOW_CHAOS_WORKFLOWS", "60")), 3 * KILLS)
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
    assert check_history("wf", events, converter, tally) == ["wf#0", "wf#0"]
    assert tally.duplicated == ["wf: activity 2 has 2"]
    assert tally.lost == ["wf: timer 6 has no outcome"]

    events[4].event_id = 4  # and an event id twice
    tally = Tally()
    check_history("wf", events, converter, tally)
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
    workers = Workers(procs, {"a": server.address, "b": server.address}, task_queue)
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
        # Callables, not coroutines made up front: a run that fails early must not
        # leave a never-awaited coroutine behind (an error at teardown).
        waits = (None, lambda: ledger.executed(wf, "slow"), chaos_over.wait)
        for n, after in enumerate(waits):
            if after is not None:
                await after()
            await send_signal(handle, f"{wf}#{n}", f"{wf}-signal-{n}")
            tally.signals_sent += 1
        await handle.result()

    async def load() -> None:
        """Group g starts once g * KILLS / len(groups) kills happened."""
        running: list[asyncio.Future[None]] = []
        for g, group in enumerate(groups):
            due = g * KILLS // len(groups)
            await eventually(at_least(kills, due), f"kill {due}", timeout=RUN_BOUND_S)
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
        await verify(client, handles, values, ledger, tally, store_url)
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
    stuck = "\n".join(tally.stuck)
    assert not tally.lost, f"{summary}\nlost: {tally.lost[:20]}\n{stuck}"
    assert not tally.duplicated, f"{summary}\nduplicated: {tally.duplicated[:20]}"
    # The run really was chaotic: every planned kill happened (the driver stops early
    # only if the work finished first, which the progress targets rule out).
    assert tally.server_kills + tally.worker_kills == KILLS, summary
    assert tally.db_restarts == (1 if cluster is not None else 0), summary
