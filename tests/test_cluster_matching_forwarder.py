"""The TaskForwarder (server/_matching_routes.py), which hands task rows to the node
that serves their task queue, against a scripted view of the cluster: a node that is
down delays only its own rows, each row is delivered once, rows whose queue has no
owner wait for one, and rows of runs that moved away are left to the new owner."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest
from helpers import eventually

from tideflow.api.v1 import matching_pb2
from tideflow.history import RunKey, TaskKind, TaskRow
from tideflow.server._matching_routes import MatchingRoutes, TaskForwarder, task_row
from tideflow.server._peers import Peer

HERE = Peer("here", "")
UP = Peer("up", "127.0.0.1:1")
DOWN = Peer("down", "127.0.0.1:2")


class ScriptedCluster:
    """What the forwarder asks of ``MatchingRoutes``: queue -> owner, the runs this node
    owns, and the nodes' AddTasks (refused UNAVAILABLE by the nodes in ``down``)."""

    node_id = HERE.node_id

    def __init__(self) -> None:
        self.owners: dict[str, Peer | None] = {}
        self.lost_runs: set[str] = set()
        self.down: set[str] = set()
        self.received: dict[str, list[str]] = {}
        self.attempts: dict[str, int] = {}

    def owns_run(self, key: RunKey) -> bool:
        return key.workflow_id not in self.lost_runs

    def queue_owner(self, namespace: str, task_queue: str, kind: TaskKind) -> Peer | None:
        return self.owners[task_queue]

    def is_here(self, peer: Peer) -> bool:
        return peer.node_id == HERE.node_id

    async def refresh(self) -> None:
        return None

    async def node_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def matching_stub(self, peer: Peer) -> Any:
        cluster = self

        class Stub:
            async def AddTasks(
                self, request: matching_pb2.AddTasksRequest, **kwargs: Any
            ) -> matching_pb2.AddTasksResponse:
                cluster.attempts[peer.node_id] = cluster.attempts.get(peer.node_id, 0) + 1
                if peer.node_id in cluster.down:
                    raise grpc.aio.AioRpcError(
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.aio.Metadata(),
                        grpc.aio.Metadata(),
                        "connection refused",
                    )
                keys = [task_row(t).task_key for t in request.tasks]
                cluster.received.setdefault(peer.node_id, []).extend(keys)
                return matching_pb2.AddTasksResponse()

        return Stub()


def _row(queue: str) -> TaskRow:
    key = RunKey(namespace="default", workflow_id=f"wf-{uuid.uuid4()}", run_id="r")
    return TaskRow(key=key, task_queue=queue, kind=TaskKind.ACTIVITY, ref_id=5, attempt=1)


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[ScriptedCluster, TaskForwarder, list[TaskRow]]]:
    scripted = ScriptedCluster()
    accepted: list[TaskRow] = []
    forwarder = TaskForwarder(cast(MatchingRoutes, scripted), accepted.extend)
    running = asyncio.ensure_future(forwarder.run())
    try:
        yield scripted, forwarder, accepted
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_node_that_is_down_delays_only_its_own_rows(
    cluster: tuple[ScriptedCluster, TaskForwarder, list[TaskRow]],
) -> None:
    scripted, forwarder, _ = cluster
    scripted.owners = {"to-up": UP, "to-down": DOWN}
    scripted.down = {"down"}
    first = [_row("to-up"), _row("to-down")]
    forwarder.send(first)
    await eventually(lambda: scripted.attempts.get("down", 0) >= 3, "retries of node down")
    # Rows for the node that answers keep going through at once meanwhile.
    later = _row("to-up")
    forwarder.send([later])
    await eventually(lambda: len(scripted.received.get("up", [])) == 2, "rows of node up")
    scripted.down.clear()
    await eventually(lambda: forwarder.pending == 0, "every row delivered")
    assert scripted.received == {
        "up": [first[0].task_key, later.task_key],
        "down": [first[1].task_key],
    }


async def test_rows_wait_for_an_owner_and_are_dropped_when_their_run_moves(
    cluster: tuple[ScriptedCluster, TaskForwarder, list[TaskRow]],
) -> None:
    scripted, forwarder, accepted = cluster
    scripted.owners = {"moving": None, "gone": None}
    waiting, moved = _row("moving"), _row("gone")
    forwarder.send([waiting, moved])
    await eventually(lambda: forwarder.pending == 2 and scripted.attempts == {}, "rows held")
    # The run of one row moved to another node (which hands it over from the store);
    # this node acquired the other row's queue shard.
    scripted.lost_runs.add(moved.key.workflow_id)
    scripted.owners["moving"] = HERE
    forwarder.nudge()
    await eventually(lambda: forwarder.pending == 0, "the rows settled")
    assert accepted == [waiting]
    assert scripted.received == {}
