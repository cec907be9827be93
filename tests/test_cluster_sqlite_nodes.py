"""Several ``tideflow server start`` processes on ONE SQLite file (WAL): the cluster of
tests/test_cluster_nodes.py without a database server.

Two real node processes split the 16 shards of one file. Workflows with activities, a
durable timer and a signal complete whichever node they are started, signalled and
polled through (routing and matching across nodes). Then one node is SIGKILLed: the
survivor takes its shards over once the leases lapse (each steal bumps the range id,
the fence's token) and the dead node's sleeping runs complete there.

Every write transaction of a node is ``BEGIN IMMEDIATE`` (history/_sqlite.py): the
fence's read and the batch's writes are one serial transaction across the processes,
and a node that finds the file's write lock taken waits (busy_timeout) or runs the
transaction again, never fails it.

Leases are 2 s here. Waits poll conditions against generous deadlines.
"""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import Processes, ServerProcess
from helpers_cluster import (
    FAST_RETRY,
    QUEUE,
    check_history,
    double,
    result,
    split,
    start,
    start_node,
    start_sleeping,
    wait,
    wait_for_steals,
    workers,
    workflow_ids,
)
from sqlalchemy import Connection

from tideflow.history import HistoryStore
from tideflow.history._sqlite import SQLiteRunner
from tideflow.worker_sdk import workflow

LEASE_S = 2.0


@workflow.defn
class Knock:
    """Waits for a signal, then runs an activity: ``"<word>:<2n>"``."""

    def __init__(self) -> None:
        self.words: list[str] = []

    @workflow.run
    async def run(self, n: int) -> str:
        await workflow.wait_condition(lambda: bool(self.words))
        doubled: int = await workflow.execute_activity(
            double, n, start_to_close_timeout=timedelta(seconds=10), retry_policy=FAST_RETRY
        )
        return f"{self.words[0]}:{doubled}"

    @workflow.signal
    def knock(self, word: str) -> None:
        self.words.append(word)


async def test_a_write_transaction_holds_the_file_lock_before_its_first_statement(
    tmp_path: Path,
) -> None:
    """The fence reads the shard rows before the batch writes anything: the file's
    write lock must already be this transaction's then, or another process could
    acquire the shard (bump its range id) between the fence's read and the writes."""
    path = tmp_path / "lock.db"
    runner = SQLiteRunner(str(path))

    def other_process_writer(_conn: Connection) -> str:
        # Inside the transaction, before it ran any statement: another connection
        # (as another node's would) asks for the write lock without waiting.
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            return "granted"
        except sqlite3.OperationalError as exc:
            return str(exc)
        finally:
            other.close()

    try:
        assert await runner.write(other_process_writer) == "database is locked"
        # Once the transaction ended, the lock is free again.
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        other.close()
    finally:
        await runner.close()


@pytest.mark.slow
async def test_two_nodes_on_one_sqlite_file_serve_and_survive_a_sigkill(
    procs: Processes, tmp_path: Path, trace_dir: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'cluster.db'}"
    a = await start_node(procs, url, "node-a", LEASE_S)
    b = await start_node(procs, url, "node-b", LEASE_S)
    store = await HistoryStore.open(url)
    try:
        owners = await wait(lambda: split(store, "node-a", "node-b"), "a balanced split")
        async with workers(a, b, more_workflows=[Knock]) as clients:
            await _serve_on_both(clients, owners)
            await _survive_sigkill(a, b, clients, owners, trace_dir, store)
    finally:
        await store.close()


async def _serve_on_both(clients: dict[str, Any], owners: dict[int, str]) -> None:
    """Runs of both nodes' shards, started through their owner; each Knock run is
    signalled through the other node (forwarded to its owner)."""
    other = {"node-a": "node-b", "node-b": "node-a"}
    paused = [(node, wid) for node in other for wid in workflow_ids(owners, node, 3, "pause")]
    knocked = [(node, wid) for node in other for wid in workflow_ids(owners, node, 2, "knock")]
    for n, (node, workflow_id) in enumerate(paused):
        await start(clients[node], workflow_id, n, 0.2)
    for n, (node, workflow_id) in enumerate(knocked):
        await clients[node].start_workflow(Knock.run, args=[n], id=workflow_id, task_queue=QUEUE)
    for node, workflow_id in knocked:
        handle = clients[other[node]].get_workflow_handle(workflow_id)
        await handle.signal(Knock.knock, f"via-{other[node]}")
    for n, (node, workflow_id) in enumerate(paused):
        assert await result(clients[node], workflow_id) == f"{n}:{n * 4}"
        await check_history(clients[node], workflow_id)
    for n, (node, workflow_id) in enumerate(knocked):
        assert await result(clients[node], workflow_id) == f"via-{other[node]}:{n * 2}"


async def _survive_sigkill(
    a: ServerProcess,
    b: ServerProcess,
    clients: dict[str, Any],
    owners: dict[int, str],
    trace_dir: Path,
    store: HistoryStore,
) -> None:
    """SIGKILL node-a while runs of its shards sleep: node-b steals each of its shards
    after the lease lapsed, and the runs complete on node-b, each exactly once."""
    doomed = workflow_ids(owners, "node-a", 4, "doomed")
    await start_sleeping(clients["node-a"], doomed, 1.0)
    await a.kill()
    await wait(lambda: split(store, "node-b"), "node-b to take over")
    dead = {shard for shard, owner in owners.items() if owner == "node-a"}
    await wait_for_steals(trace_dir, b.name, "node-a", dead)
    for n, workflow_id in enumerate(doomed):
        assert await result(clients["node-b"], workflow_id) == f"{n}:{n * 4}"
        await check_history(clients["node-b"], workflow_id)
