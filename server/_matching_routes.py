"""Matching across the nodes of one cluster: which node serves a task queue, and how
task rows and calls cross from node to node (docs/cluster.md tells the design).

Every task queue ``(namespace, name, kind)`` belongs to a shard
(``history.queue_shard_of``, a hash independent of the runs' one); the node holding that
shard's lease serves the queue: its backlog, its parked polls and its queries. No lease
of its own: the queue moves with its shard, and a node that acquires the shard loads
the queue's rows from the store (they name their ``queue_shard``).

- ``TaskForwarder``: the node that committed task rows (the run's owner) hands each row
  of a queue served elsewhere to that queue's owner (``AddTasks``, batched per node);
  a row whose owner is unknown (the shard is moving) or unreachable is sent again with
  backoff while the run is still this node's. The row is in the store meanwhile, so a
  new owner of either shard finds it there.
- ``MatchingRoutes``: the view of who serves what (the shard rows, ``ShardController``)
  and the calls a queue's owner makes on the run's owner (``RecordTaskStarted``,
  ``DispatchQuery``, ``Unstick``), each proved by the node credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from tideflow.api.v1 import (
    common_pb2,
    matching_pb2,
    matching_pb2_grpc,
    service_pb2,
    service_pb2_grpc,
)
from tideflow.history import HistoryStore, RunKey, StoreError, TaskKind, TaskRow, queue_shard_of

from ._failures import log_retry
from ._peers import NodeCredential, Peer, PeerChannels
from ._shards import ShardController

log = logging.getLogger("tideflow.server.matching")

# Deadline of one AddTasks call; the rows are sent again after it.
_ADD_TIMEOUT_S = 5.0
# Deadline of a RecordTaskStarted or Unstick call.
_CALL_TIMEOUT_S = 10.0
# Rows per AddTasks call (each a few hundred bytes).
_MAX_BATCH = 500
# Backoff between passes of the forwarder that left rows undelivered.
_RETRY_MIN_S = 0.05
_RETRY_MAX_S = 2.0
# The shard rows are read again at most this often on behalf of failed routes.
_REFRESH_INTERVAL_S = 0.25
#: A polled task whose run's owner cannot be reached waits this long before it is
#: handed out again (``Matching.defer``).
DEFER_S = 0.5


@functools.lru_cache(maxsize=8192)
def _queue_shard(namespace: str, task_queue: str, kind: TaskKind, shard_count: int) -> int:
    # Cached: asked for every task row committed and every poll.
    return queue_shard_of(namespace, task_queue, int(kind), shard_count)


def task_message(task: TaskRow) -> matching_pb2.MatchingTask:
    key = task.key
    return matching_pb2.MatchingTask(
        namespace=key.namespace,
        workflow_id=key.workflow_id,
        run_id=key.run_id,
        task_queue=task.task_queue,
        kind=int(task.kind),
        ref_id=task.ref_id,
        attempt=task.attempt,
        created_at=task.created_at,
        placement=task.placement,
    )


def task_row(message: matching_pb2.MatchingTask) -> TaskRow:
    return TaskRow(
        key=RunKey(
            namespace=message.namespace, workflow_id=message.workflow_id, run_id=message.run_id
        ),
        task_queue=message.task_queue,
        kind=TaskKind(message.kind),
        ref_id=message.ref_id,
        attempt=message.attempt,
        created_at=message.created_at,
        placement=message.placement,
    )


@dataclass(frozen=True, slots=True)
class RemoteStart:
    """What the run's owner answered a RecordTaskStarted: the task, or None if stale."""

    response: service_pb2.PollWorkflowTaskResponse | service_pb2.PollActivityTaskResponse | None


class MatchingRoutes:
    """Who serves which task queue and run, and the calls between their nodes.

    ``shards`` and ``credential`` are set once the node has them (the shard controller
    is built after matching, the credential once the token keys are read)."""

    def __init__(self, store: HistoryStore, peers: PeerChannels, node_id: str) -> None:
        self._store = store
        self._peers = peers
        self.node_id = node_id
        self.shards: ShardController | None = None
        self.credential: NodeCredential | None = None
        self._refreshed_at = 0.0
        self._refreshing: asyncio.Lock = asyncio.Lock()

    # ------------------------------------------------------------- ownership

    def queue_shard(self, namespace: str, task_queue: str, kind: TaskKind) -> int:
        return _queue_shard(namespace, task_queue, kind, self._store.shard_count)

    def serves(self, namespace: str, task_queue: str, kind: TaskKind) -> bool:
        """Whether this node serves the task queue now (a store without fencing, a
        tool's or a test's, serves every queue)."""
        if not self._store.fencing:
            return True
        return self._store.holds(self.queue_shard(namespace, task_queue, kind))

    def owns_run(self, key: RunKey) -> bool:
        return not self._store.fencing or self._store.holds(self._store.shard_of(key))

    def queue_owner(self, namespace: str, task_queue: str, kind: TaskKind) -> Peer | None:
        """The node serving the queue by the last read of the shard rows (this node
        included); None while its shard moves."""
        if self.serves(namespace, task_queue, kind):
            return Peer(self.node_id, "")
        if self.shards is None:
            return None
        return self.shards.owner(self.queue_shard(namespace, task_queue, kind))

    def run_owner(self, key: RunKey) -> Peer | None:
        if self.owns_run(key):
            return Peer(self.node_id, "")
        return None if self.shards is None else self.shards.owner(self._store.shard_of(key))

    def is_here(self, peer: Peer) -> bool:
        return peer.node_id == self.node_id

    def peer(self, node_id: str) -> Peer | None:
        """A live node by its id (this node included), by the last membership read."""
        if node_id == self.node_id:
            return Peer(self.node_id, "")
        if self.shards is None:
            return None
        return next((p for p in self.shards.peers() if p.node_id == node_id), None)

    async def refresh(self) -> None:
        """Read the shard rows again (a route failed), at most every
        ``_REFRESH_INTERVAL_S``: many polls failing at once cost one read."""
        if self.shards is None:
            return
        async with self._refreshing:
            loop = asyncio.get_running_loop()
            if loop.time() - self._refreshed_at < _REFRESH_INTERVAL_S:
                return
            try:
                await self.shards.refresh()
            except StoreError as exc:
                # The routes stay as last read; the caller's retry reads them again.
                log_retry(log, "reading the shard rows for matching", exc)
            finally:
                self._refreshed_at = loop.time()

    # ------------------------------------------------------------------ calls

    def matching_stub(self, peer: Peer) -> matching_pb2_grpc.MatchingServiceStub:
        return matching_pb2_grpc.MatchingServiceStub(self._peers.channel(peer.address))  # type: ignore[no-untyped-call]

    def frontend_stub(self, peer: Peer) -> service_pb2_grpc.WorkflowServiceStub:
        return service_pb2_grpc.WorkflowServiceStub(self._peers.channel(peer.address))  # type: ignore[no-untyped-call]

    async def node_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.credential is None:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                "the node credential is not ready yet",
            )
        return await self.credential.metadata()

    async def _at_run_owner(self, key: RunKey, rpc: str, request: Any, what: str) -> Any:
        """``rpc`` of the MatchingService called on the owner of ``key``'s run; None if
        no other node owns it now (the shard is moving) or the call failed (the shard
        rows are read again for the next attempt)."""
        owner = self.run_owner(key)
        if owner is None or self.is_here(owner):
            await self.refresh()
            return None
        try:
            return await getattr(self.matching_stub(owner), rpc)(
                request, timeout=_CALL_TIMEOUT_S, metadata=await self.node_metadata()
            )
        except (grpc.aio.AioRpcError, StoreError) as exc:
            # StoreError: the token keys (for the node credential) could not be read.
            log_retry(log, f"{what} on node {owner.node_id}", exc)
            await self.refresh()
            return None

    async def record_started(
        self, task: TaskRow, identity: str, worker: common_pb2.WorkerPlacement | None = None
    ) -> RemoteStart | None:
        """Have the run's owner record ``task`` started (tla/History.tla
        ``RecordWorkflowTaskStartedA`` / ``RecordActivityStartedA`` on that node); None
        if no owner could do it now (the shard is moving, the node is down): the
        caller hands the task out again later."""
        request = matching_pb2.RecordTaskStartedRequest(
            task=task_message(task), identity=identity, worker=worker
        )
        answer: matching_pb2.RecordTaskStartedResponse | None = await self._at_run_owner(
            task.key, "RecordTaskStarted", request, f"recording {task.task_key} started"
        )
        if answer is None:
            return None
        if answer.outcome == matching_pb2.RECORD_TASK_STARTED_OUTCOME_STALE:
            return RemoteStart(None)
        if answer.outcome != matching_pb2.RECORD_TASK_STARTED_OUTCOME_STARTED:
            await self.refresh()  # not the owner any more
            return None
        which = answer.WhichOneof("task")
        return RemoteStart(
            answer.workflow_task if which == "workflow_task" else answer.activity_task
        )

    async def unstick(self, key: RunKey, sticky_queue: str) -> bool:
        """Ask the run's owner to move the run's workflow task off ``sticky_queue``;
        False if no owner could do it now."""
        request = matching_pb2.UnstickRequest(
            namespace=key.namespace,
            workflow_id=key.workflow_id,
            run_id=key.run_id,
            sticky_task_queue=sticky_queue,
        )
        answer: matching_pb2.UnstickResponse | None = await self._at_run_owner(
            key, "Unstick", request, f"unsticking {key}"
        )
        if answer is None or answer.not_owner:
            await self.refresh()
            return False
        return True


class TaskForwarder:
    """Hands task rows of queues served by other nodes to those nodes (``AddTasks``),
    retrying the rows not delivered yet while their run is this node's.

    Each destination backs off on its own (50 ms doubling to 2 s): a node that is down
    delays only its own rows, never the rows of the nodes that answer. Rows whose
    queue has no known owner (its shard is moving) back off as one more destination.
    ``accept`` takes rows whose queue turned out to be served here after all (this
    node acquired the queue's shard meanwhile)."""

    def __init__(self, routes: MatchingRoutes, accept: Callable[[list[TaskRow]], None]) -> None:
        self._routes = routes
        self._accept = accept
        # task_key -> row, not delivered yet (a row sent twice is one entry).
        self._pending: dict[str, TaskRow] = {}
        self._wakeup = asyncio.Event()
        # Destination (node id; "" for "no owner known") -> (delay, loop time before
        # which it is not tried again), for the destinations that failed last time.
        self._backoff: dict[str, tuple[float, float]] = {}
        self.delivered = 0

    def send(self, tasks: list[TaskRow]) -> None:
        for task in tasks:
            self._pending[task.task_key] = task
        self._wakeup.set()

    def nudge(self) -> None:
        """The shards moved (this node acquired one): try every row again now."""
        self._backoff.clear()
        self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        """Deliver rows as they come, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            retry_at = await self._deliver()
            if retry_at is None:
                continue
            await self._routes.refresh()
            # Until the first backed-off destination is due, or new rows come.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, retry_at - loop.time())):
                    await self._wakeup.wait()
            self._wakeup.set()

    async def _deliver(self) -> float | None:
        """One pass over the pending rows; the loop time of the next retry, or None if
        nothing waits for one."""
        routes = self._routes
        by_owner: dict[Peer, list[TaskRow]] = {}
        here: list[TaskRow] = []
        waiting = False
        for key, task in list(self._pending.items()):
            if not routes.owns_run(task.key):
                # The run's new owner hands the row over from the store.
                del self._pending[key]
                continue
            owner = routes.queue_owner(task.key.namespace, task.task_queue, task.kind)
            if owner is None:
                waiting = True
            elif routes.is_here(owner):
                del self._pending[key]
                here.append(task)
            else:
                by_owner.setdefault(owner, []).append(task)
        if here:
            self._accept(here)
        now = asyncio.get_running_loop().time()
        due = [o for o in by_owner if self._backoff.get(o.node_id, (0.0, 0.0))[1] <= now]
        sent = await asyncio.gather(*(self._send(o, by_owner[o]) for o in due))
        outcomes = {o.node_id: ok for o, ok in zip(due, sent, strict=True)}
        if waiting:
            outcomes[""] = False
        live = {o.node_id for o in by_owner} | ({""} if waiting else set())
        self._backoff = {d: b for d, b in self._backoff.items() if d in live}
        for destination, ok in outcomes.items():
            if ok:
                self._backoff.pop(destination, None)
            else:
                delay = self._backoff.get(destination, (_RETRY_MIN_S / 2, 0.0))[0] * 2
                delay = min(delay, _RETRY_MAX_S)
                self._backoff[destination] = (delay, now + delay)
        return min((at for _, at in self._backoff.values()), default=None)

    async def _send(self, owner: Peer, tasks: list[TaskRow]) -> bool:
        stub = self._routes.matching_stub(owner)
        for first in range(0, len(tasks), _MAX_BATCH):
            batch = tasks[first : first + _MAX_BATCH]
            request = matching_pb2.AddTasksRequest(tasks=[task_message(t) for t in batch])
            try:
                answer = await stub.AddTasks(
                    request, timeout=_ADD_TIMEOUT_S, metadata=await self._routes.node_metadata()
                )
            except (grpc.aio.AioRpcError, StoreError) as exc:
                log_retry(log, f"handing {len(batch)} task(s) to node {owner.node_id}", exc)
                return False
            refused = set(answer.refused_task_keys)
            for task in batch:
                if task.task_key not in refused and self._pending.get(task.task_key) == task:
                    del self._pending[task.task_key]
                    self.delivered += 1
            if refused:
                return False
        return True
