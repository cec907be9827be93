"""The cluster suite (issue 11): three ``tideflow server start`` nodes on one PostgreSQL
database, chaos workflows in flight (the issue's 300 for the SIGKILL plan at READ
COMMITTED, 150 at SERIALIZABLE, 100 for the rolling plan; ``TIDEFLOW_CLUSTER_WORKFLOWS=N``
sets all), and one of two plans:

- ``sigkill``: one node SIGKILLed, then another (each restarted once the survivors
  hold its shards);
- ``rolling``: a rolling restart, each node SIGTERMed (it hands its shards over) and
  started again in turn, with a fourth node joining mid-load and taking its share.

Each node has a worker process polling it alone (a node hands its own shards' tasks
to its own pollers, so the three cover every shard wherever it moves); the client is
connected to all three nodes (``Client.connect("a,b,c")``) and fails over when its
node dies. A ``ChaosWorkflow`` (``procs/worker_proc.py``) runs an activity, a timer, a
slow heartbeating activity and a child (on whichever node owns the child's shard),
and collects three signals: one at once, one after its slow activity ran, and one
once both kills are over. The checks are tests/test_chaos.py's (helpers_chaos.py):
every workflow completes with the result its input and signals determine, every
history (children too) is gap-free with one start, one close and one outcome per
activity, timer and child, every signal is in history exactly once, every activity
ran. Every plan runs at READ COMMITTED and at SERIALIZABLE (the CockroachDB code path).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import PG_SERIALIZABLE, serializable_url
from helpers import Processes, eventually, new_id
from helpers_chaos import SIGNALS, Ledger, Tally, Workers, at_least, send_signal, verify
from helpers_cluster_routing import node_starter, wait_split

from tideflow.history import HistoryStore
from tideflow.worker_sdk import Client, WorkflowHandle

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.serializable]

#: Workflows per plan and isolation (each with a child): the issue's 300 under SIGKILLs
#: at READ COMMITTED, 150 at SERIALIZABLE, whose runs take half again as long; 100 for
#: the rolling restart. Its steps wait on progress (a third of the workflows in more
#: executions), not on numbers in flight, and each step meets a group of fresh starts
#: (GROUPS spread over the steps): at 100, each of its three SIGTERM handoffs still
#: re-ran activities in flight (13-27 extra executions a run, against 51 at 150), and
#: a run took 27-32 s against 39 s at 150 (alone, load 2-3). The suite must stay within
#: make test's 15 minutes; TIDEFLOW_CLUSTER_WORKFLOWS=300 runs every one at 300, which
#: passed at SERIALIZABLE too: about 230 s under load.
SIZES = {("sigkill", False): 300, ("sigkill", True): 150}
DEFAULT_SIZE = 100
SIZE_OVERRIDE = os.environ.get("TIDEFLOW_CLUSTER_WORKFLOWS")
# Started in groups as the kills go on, so every kill meets fresh work.
GROUPS = 6
RUN_BOUND_S = 420.0
NODE_CONNECTIONS = 6
NODES = ("node-a", "node-b", "node-c")
LEASE_S = 4.0
# What happens to the nodes, one step after another, each after a third of the plan's
# workflows in more activity executions (the cluster makes progress under each step:
# a wait on progress, not time): ("kill" | "term" | "join", node).
PLANS = {
    "sigkill": [("kill", "node-a"), ("kill", "node-b")],
    "rolling": [("term", "node-a"), ("term", "node-b"), ("join", "node-d"), ("term", "node-c")],
}


# Two xdist workers run them, one isolation each, its two plans one after another
# (make test: --dist loadgroup): a run holds four nodes' database connections
# (NODE_CONNECTIONS each) and most of a core.
@pytest.fixture(
    params=[
        pytest.param("postgres", marks=pytest.mark.xdist_group("cluster-suite-rc")),
        pytest.param(PG_SERIALIZABLE, marks=pytest.mark.xdist_group("cluster-suite-ser")),
    ]
)
def store_url(request: pytest.FixtureRequest, pg_url: str) -> str:
    """PostgreSQL only (several processes on one database), at READ COMMITTED and at
    SERIALIZABLE (the CockroachDB code path: every transaction retried on 40001)."""
    return serializable_url(pg_url) if request.param == PG_SERIALIZABLE else pg_url


@pytest.mark.timeout(RUN_BOUND_S + 120)
@pytest.mark.parametrize("plan", list(PLANS))
async def test_three_nodes_under_load_lose_nothing(
    procs: Processes, store_url: str, store: HistoryStore, tmp_path: Path, plan: str
) -> None:
    steps = PLANS[plan]
    serializable = "serializable" in store_url
    workflows = int(SIZE_OVERRIDE or SIZES.get((plan, serializable), DEFAULT_SIZE))
    began = time.monotonic()
    rng = random.Random(0)
    # Leases of 4 s, not the 2 s of the shorter cluster tests: six busy processes on
    # two cores must not lose leases to scheduling delays alone.
    # Each node's connections capped (?max_connections): four nodes stay well inside
    # the database's 100 beside the tests running on the other xdist workers.
    capped = f"{store_url}{'&' if '?' in store_url else '?'}max_connections={NODE_CONNECTIONS}"
    start = node_starter(procs, capped, "--lease-seconds", str(LEASE_S))
    nodes = {name: await start(name) for name in NODES}
    await wait_split(store, *NODES)
    task_queue = new_id("cluster")
    workers = Workers(procs, {n: node.address for n, node in nodes.items()}, task_queue)
    await asyncio.gather(*(workers.start(n) for n in NODES))
    client = await Client.connect(",".join(node.address for node in nodes.values()))
    ledger = Ledger(tmp_path / "ledger.jsonl")
    tally = Tally()
    values = {f"cluster-{n}": rng.randrange(1, 10**6) for n in range(workflows)}
    handles: dict[str, WorkflowHandle[Any]] = {}
    kills_over = asyncio.Event()
    kills_done = 0

    async def run_one(wf: str) -> None:
        job = {"wf": wf, "value": values[wf], "signals": SIGNALS, "ledger": str(ledger.path)}
        handles[wf] = handle = await client.start_workflow(
            "ChaosWorkflow", job, id=wf, task_queue=task_queue, task_timeout=timedelta(seconds=2)
        )
        # Callables, not coroutines made up front: a run that fails early must not
        # leave a never-awaited coroutine behind (an error at teardown).
        waits = (None, lambda: ledger.executed(wf, "slow"), kills_over.wait)
        for n, after in enumerate(waits):
            if after is not None:
                await after()
            await send_signal(handle, f"{wf}#{n}", f"{wf}-signal-{n}")
            tally.signals_sent += 1

    async def load() -> None:
        """The groups start spread over the steps: the first at once, the last after
        the last step but one."""
        running: list[asyncio.Future[None]] = []
        size = -(-workflows // GROUPS)
        ids = list(values)
        for g in range(GROUPS):
            due = g * len(steps) // GROUPS
            await eventually(at_least(lambda: kills_done, due), f"kill {due}", timeout=RUN_BOUND_S)
            running += [asyncio.ensure_future(run_one(wf)) for wf in ids[g * size : (g + 1) * size]]
        await asyncio.gather(*running)

    async def chaos() -> None:
        nonlocal kills_done
        for action, victim in steps:
            target = ledger.total + workflows // 3
            await eventually(
                ledger.progressed(target, handles), f"{target} executions", timeout=RUN_BOUND_S
            )
            print(f"cluster suite: {action} {victim} at {time.monotonic() - began:.0f}s")
            if action == "join":
                nodes[victim] = await start(victim)
                await wait_split(store, *nodes)
            else:
                if action == "kill":
                    await nodes[victim].kill()
                else:
                    assert await nodes[victim].terminate() == 0
                tally.server_kills += 1
                await wait_split(store, *(n for n in nodes if n != victim))
                await nodes[victim].start()
            kills_done += 1
        kills_over.set()

    watcher = asyncio.ensure_future(ledger.watch())
    try:
        try:
            async with asyncio.timeout(RUN_BOUND_S):
                await asyncio.gather(load(), chaos())
                print(f"cluster suite: load and kills over at {time.monotonic() - began:.0f}s")
                await asyncio.gather(*(h.result() for h in handles.values()))
        except TimeoutError:
            print(f"cluster suite: not done within {RUN_BOUND_S:.0f} s; checking what there is")
        await verify(client, handles, values, ledger, tally, store_url)
    finally:
        watcher.cancel()
        await client.close()
    isolation = "serializable" if serializable else "read committed"
    summary = (
        f"cluster suite: plan={plan} isolation={isolation} nodes={len(nodes)} "
        f"workflows={workflows} "
        f"(+{workflows} children) signals={tally.signals_sent} stops={tally.server_kills} "
        f"lost={len(tally.lost)} duplicated={len(tally.duplicated)} "
        f"extra_activity_executions={tally.extra_executions} "
        f"elapsed={time.monotonic() - began:.0f}s"
    )
    print(summary)
    stuck = "\n".join(tally.stuck)
    assert not tally.lost, f"{summary}\nlost: {tally.lost[:20]}\n{stuck}"
    assert not tally.duplicated, f"{summary}\nduplicated: {tally.duplicated[:20]}"
    assert tally.server_kills == sum(action != "join" for action, _ in steps), summary
