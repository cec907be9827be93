"""Matching: task queues with long polls.

A committed transition's new task rows arrive here, on the node that serves their task
queue (the holder of the queue's shard: server/_matching_routes.py hands rows of other
nodes' queues to their owners). A task goes straight to a poller that is already
waiting ("sync match", no extra store round trip) or waits in the queue's in-memory
backlog. The rows stay in the store until the engine records the task started, so a
crash loses nothing: ``recover`` reloads a queue shard's rows when its node acquires it.
An activity task with a placement goes only to a poller that meets it, the best ranked
of those waiting (server/_placement.py); the others wait for a poller that does.

TLA+ (tla/History.tla): ``DispatchWorkflowTask`` / ``DispatchActivityTask`` hand a
backlog row to a poller (``RecordWorkflowTaskStartedA`` / ``RecordActivityStartedA``;
a row that turns out stale when the engine records it started is dropped), and
``Restart`` rebuilds the backlogs from the store (``recover``, per queue shard).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from tideflow.api.v1 import common_pb2, service_pb2
from tideflow.history import HistoryStore, RunKey, TaskKind, TaskRow

from ._errors import UnavailableError
from ._metrics import ServerMetrics
from ._placement import PlacementPolicy, WorkerSite, decode

log = logging.getLogger("tideflow.server.matching")

_QueueId = tuple[str, str, TaskKind]


@dataclass(slots=True, eq=False)
class QueryTask:
    """A query for a run, handed to a workflow worker; never persisted (a query whose
    caller is gone is worthless). ``result`` gets the answer or an exception."""

    query_id: str
    key: RunKey
    query: service_pb2.WorkflowQuery
    result: asyncio.Future[common_pb2.Payloads]
    # The poll response built by the run's owner when that is another node (the
    # history is its to read); None: built here when a poller takes the query.
    prepared: service_pb2.PollWorkflowTaskResponse | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteTaskRow(TaskRow):
    """An activity task of a run homed at another site, ``home``, which offered it
    over the sites' link (server/_remote_tasks.py): handed to a poller here that meets
    it, and recorded started by the home. Never in this site's store."""

    home: str = ""


Dispatchable = TaskRow | QueryTask


@dataclass(slots=True, eq=False)
class _Poller:
    future: asyncio.Future[Dispatchable]
    # Who polls (activity polls); None: a workflow-task poll, which takes any task.
    worker: WorkerSite | None


@dataclass(slots=True, eq=False)
class _TaskQueue:
    backlog: deque[TaskRow] = field(default_factory=deque)
    queries: deque[QueryTask] = field(default_factory=deque)
    pollers: deque[_Poller] = field(default_factory=deque)
    queued_keys: set[str] = field(default_factory=set)
    # For DescribeTaskQueue: worker identity -> wall-clock time its last poll began or
    # ended, and how many of its polls are parked here now.
    seen: dict[str, float] = field(default_factory=dict)
    polling: dict[str, int] = field(default_factory=dict)
    # What each recently seen activity worker advertised (why a task waits: describe).
    workers: dict[str, WorkerSite] = field(default_factory=dict)


#: How long a poller stays listed after its last poll (Temporal keeps five minutes).
POLLER_TTL_S = 300.0
#: How long after this node last committed a task for another node's queue polls here
#: still wait in its local partition (``Matching.wants_local``).
LOCAL_DEMAND_S = 10.0
# Queues remembered for that before the stale ones are forgotten.
_MAX_DEMAND = 1024


class QueueMovedError(UnavailableError):
    """This node does not serve the task queue (any more): its shard is another
    node's, or moving. A poll parked here when the shard left gets it at once."""


def _admits(task: Dispatchable, worker: WorkerSite | None) -> bool:
    if isinstance(task, QueryTask) or not task.placement:
        return True
    placement = decode(task.placement)
    return placement is None or (worker is not None and placement.admits(worker))


class Matching:
    def __init__(
        self,
        owns: Callable[[str, str, TaskKind], bool] | None = None,
        policy: PlacementPolicy | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.policy = policy or PlacementPolicy()
        self._queues: dict[_QueueId, _TaskQueue] = {}
        self._metrics = metrics
        # Whether this node serves a task queue now, ``(namespace, name, kind)``: it
        # holds the queue's shard (server/_matching_routes.py). Tasks of other queues
        # are neither queued nor handed out. None: every queue.
        self._owns = owns
        # Sticky queues whose worker shut down (bounded: names are per worker).
        self._retired: set[tuple[str, str]] = set()
        # Told when an activity task with a placement starts waiting here (the sites
        # may offer it to another site's workers: server/_remote_tasks.py).
        self.on_waiting: Callable[[], None] | None = None
        # Local partitions: polls parked on this node for queues another node serves,
        # waiting for a task this node commits (``offer_local``). They hold pollers
        # only, never tasks: a task handed to one that cannot be started goes back
        # through ``local_fallback`` (the dispatcher's ``route``: another local poll,
        # or the queue's owner), so nothing is stranded here.
        self._local: dict[_QueueId, deque[_Poller]] = {}
        # When this node last committed a task for each queue another node serves
        # (monotonic clock): only those queues' polls wait in a local partition here.
        self._local_demand: dict[_QueueId, float] = {}
        self.local_fallback: Callable[[list[TaskRow]], None] = lambda tasks: None

    def _queue(self, qid: _QueueId) -> _TaskQueue:
        queue = self._queues.get(qid)
        if queue is None:
            queue = self._queues[qid] = _TaskQueue()
        return queue

    def serves(self, namespace: str, task_queue: str, kind: TaskKind) -> bool:
        """Whether this node serves the task queue now."""
        return self._owns is None or self._owns(namespace, task_queue, kind)

    def add(self, task: TaskRow) -> None:
        if not self.serves(task.key.namespace, task.task_queue, task.kind):
            return  # the queue's owner recovers it from the store
        queue = self._queue((task.key.namespace, task.task_queue, task.kind))
        # Already queued (recovery racing a commit), unless as another site's offer
        # of a run since handed over here: the home's own row replaces it.
        if task.task_key in queue.queued_keys and (
            isinstance(task, RemoteTaskRow) or not self._drop_offered(queue, task.task_key)
        ):
            return
        if self._hand_over(queue, task):
            if self._metrics is not None:
                self._metrics.task_dispatched(task.kind, sync=True)
            return
        queue.queued_keys.add(task.task_key)
        queue.backlog.append(task)
        if self._metrics is not None:
            self._metrics.task_dispatched(task.kind, sync=False)
        if task.placement and self.on_waiting is not None and not isinstance(task, RemoteTaskRow):
            self.on_waiting()

    def _hand_over(self, queue: _TaskQueue, task: Dispatchable) -> bool:
        """Give ``task`` to a waiting poller (sync match); False if none may take it. A
        task without placement goes to the longest waiting poller; one with placement
        to the best ranked poller that meets it (server/_placement.py)."""
        while queue.pollers and queue.pollers[0].future.done():
            queue.pollers.popleft()
        if not queue.pollers:
            return False
        if isinstance(task, QueryTask) or not task.placement:
            queue.pollers.popleft().future.set_result(task)
            return True
        best: _Poller | None = None
        best_rank: tuple[int, int, int] | None = None
        for poller in queue.pollers:
            worker = poller.worker
            if poller.future.done() or worker is None or not _admits(task, worker):
                continue
            rank = self.policy.rank(task.key, worker, queue.polling.get(worker.identity, 0))
            if best_rank is None or rank < best_rank:
                best, best_rank = poller, rank
        if best is None:
            return False
        queue.pollers.remove(best)
        best.future.set_result(task)
        return True

    def add_query(self, namespace: str, task_queue: str, query: QueryTask) -> None:
        """Queries go ahead of workflow tasks: a caller is waiting on each."""
        queue = self._queue((namespace, task_queue, TaskKind.WORKFLOW))
        if not self._hand_over(queue, query):
            queue.queries.append(query)

    def add_many(self, tasks: list[TaskRow]) -> None:
        for task in tasks:
            self.add(task)

    async def poll(
        self,
        namespace: str,
        task_queue: str,
        kind: TaskKind,
        timeout: float,
        *,
        identity: str | None = None,
        worker: WorkerSite | None = None,
    ) -> Dispatchable | None:
        """Next task of the queue, or None once ``timeout`` seconds pass without one.
        ``identity`` (the worker's) is remembered for DescribeTaskQueue; ``worker``
        (activity polls) is who polls: only tasks whose placement it meets are handed
        to it. Raises QueueMovedError if this node does not serve the queue, or stops
        serving it while the poll waits."""
        if not self.serves(namespace, task_queue, kind):
            raise QueueMovedError(f"task queue {task_queue!r} is served by another node")
        queue = self._queue((namespace, task_queue, kind))
        if worker is not None:
            identity = worker.identity
            queue.workers[identity] = worker
        if identity is None:
            return await self._poll(queue, timeout, worker)
        self._access(queue, identity, +1)
        try:
            return await self._poll(queue, timeout, worker)
        finally:
            self._access(queue, identity, -1)

    async def _poll(
        self, queue: _TaskQueue, timeout: float, worker: WorkerSite | None
    ) -> Dispatchable | None:
        while queue.queries:
            query = queue.queries.popleft()
            if not query.result.done():  # its caller may have given up
                return query
        for index, task in enumerate(queue.backlog):
            # Tasks this worker does not meet stay queued for one that does.
            if _admits(task, worker):
                del queue.backlog[index]
                queue.queued_keys.discard(task.task_key)
                if not queue.backlog:
                    # A set never shrinks: let go of the table a burst of tasks grew.
                    queue.queued_keys = set()
                return task
        future: asyncio.Future[Dispatchable] = asyncio.get_running_loop().create_future()
        poller = _Poller(future, worker)
        queue.pollers.append(poller)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(future)
        except TimeoutError:
            # A task may have been handed over in the same instant the deadline hit.
            return future.result() if future.done() and not future.cancelled() else None
        except asyncio.CancelledError:
            # The poller went away after a task was handed to it: keep the task.
            if future.done() and not future.cancelled() and future.exception() is None:
                self._requeue_front(queue, future.result())
            raise
        finally:
            if not future.done():
                future.cancel()
                with contextlib.suppress(ValueError):
                    queue.pollers.remove(poller)

    # ------------------------------------------------ local partitions

    def offer_local(self, task: TaskRow) -> bool:
        """Hand a task this node committed (it owns the run) for a queue another node
        serves to a poll parked here for that queue: the task is started in this
        node's own store, with no ``AddTasks`` to the queue's owner and no
        ``RecordTaskStarted`` back. False if no parked poll here may take it (the row
        goes to the queue's owner, whose backlog every node's polls reach)."""
        qid = (task.key.namespace, task.task_queue, task.kind)
        now = time.monotonic()
        if len(self._local_demand) >= _MAX_DEMAND and qid not in self._local_demand:
            horizon = now - LOCAL_DEMAND_S
            self._local_demand = {q: t for q, t in self._local_demand.items() if t >= horizon}
        self._local_demand[qid] = now
        pollers = self._local.get(qid)
        if not pollers:
            return False
        for poller in list(pollers):
            if poller.future.done():
                pollers.remove(poller)
            elif _admits(task, poller.worker):
                pollers.remove(poller)
                poller.future.set_result(task)
                if self._metrics is not None:
                    self._metrics.task_dispatched_local(task.kind)
                return True
        return False

    def wants_local(self, namespace: str, task_queue: str, kind: TaskKind) -> bool:
        """Whether this node committed a task for the queue (another node's) in the
        last ``LOCAL_DEMAND_S``: a poll here waits in the local partition only then
        (elsewhere it would only delay the owner's backlog)."""
        at = self._local_demand.get((namespace, task_queue, kind))
        return at is not None and time.monotonic() - at < LOCAL_DEMAND_S

    async def poll_local(
        self,
        namespace: str,
        task_queue: str,
        kind: TaskKind,
        timeout: float,
        worker: WorkerSite | None = None,
    ) -> TaskRow | None:
        """Park a poll in this node's local partition of a queue another node serves
        for up to ``timeout`` seconds: a task this node commits for the queue meanwhile
        (``offer_local``), or None."""
        qid = (namespace, task_queue, kind)
        pollers = self._local.setdefault(qid, deque())
        future: asyncio.Future[Dispatchable] = asyncio.get_running_loop().create_future()
        poller = _Poller(future, worker)
        pollers.append(poller)
        if self._metrics is not None:
            self._metrics.local_polls.inc()
        task: Dispatchable | None = None
        try:
            async with asyncio.timeout(timeout):
                task = await asyncio.shield(future)
        except TimeoutError:
            # A task may have been handed over in the same instant the deadline hit.
            task = future.result() if future.done() and not future.cancelled() else None
        except asyncio.CancelledError:
            # The poller went away after a task was handed to it: route the task on.
            if future.done() and not future.cancelled() and future.exception() is None:
                self.local_fallback([future.result()])  # type: ignore[list-item]
            raise
        finally:
            if self._metrics is not None:
                self._metrics.local_polls.dec()
            if not future.done():
                future.cancel()
                with contextlib.suppress(ValueError):
                    pollers.remove(poller)
            if not pollers and self._local.get(qid) is pollers:
                del self._local[qid]
        assert task is None or isinstance(task, TaskRow)
        return task

    def give_back(self, task: TaskRow) -> None:
        """A polled task could not be delivered (store hiccup): dispatch it again."""
        if not self.serves(task.key.namespace, task.task_queue, task.kind):
            return  # its queue moved to another node, which recovers it
        queue = self._queue((task.key.namespace, task.task_queue, task.kind))
        self._requeue_front(queue, task)

    def _requeue_front(self, queue: _TaskQueue, task: Dispatchable) -> None:
        if self._hand_over(queue, task):
            return
        if isinstance(task, QueryTask):
            queue.queries.appendleft(task)
        elif task.task_key not in queue.queued_keys:
            queue.queued_keys.add(task.task_key)
            queue.backlog.appendleft(task)

    def defer(self, task: TaskRow, delay_s: float) -> None:
        """A polled task whose run's owner could not be reached (it is moving, or
        down): queue it again after ``delay_s``, so that polls take other tasks
        meanwhile instead of spinning on this one."""
        asyncio.get_running_loop().call_later(delay_s, self.add, task)

    def drop_unowned(self) -> int:
        """Forget the queues this node no longer serves (it lost their shard); returns
        how many tasks were dropped. Their parked polls get QueueMovedError at once
        (the poll is routed to the new owner), their waiting queries UNAVAILABLE (the
        caller retries, reaching the new owner)."""
        if self._owns is None:
            return 0
        dropped = 0
        for qid in [qid for qid in self._queues if not self._owns(*qid)]:
            queue = self._queues.pop(qid)
            dropped += len(queue.backlog)
            moved = f"task queue {qid[1]!r} moved to another node; retry"
            for query in queue.queries:
                if not query.result.done():
                    query.result.set_exception(UnavailableError(moved))
            for poller in queue.pollers:
                if not poller.future.done():
                    poller.future.set_exception(QueueMovedError(moved))
        return dropped

    async def recover(
        self, store: HistoryStore, queue_shards: Collection[int] | None = None
    ) -> int:
        """Load the persisted task rows (of the task queues of ``queue_shards`` only, if
        given) into the backlogs: a server start, a queue shard acquired, the store
        back after an outage."""
        count = 0
        after = ""
        while True:
            rows = await store.list_tasks(after_key=after, limit=5000, queue_shards=queue_shards)
            if not rows:
                return count
            for row in sorted(rows, key=lambda r: r.created_at):
                if row.kind != TaskKind.TRANSFER:  # the transfer processor's own rows
                    self.add(row)
            count += len(rows)
            after = rows[-1].task_key

    def retire(self, namespace: str, task_queue: str) -> list[TaskRow]:
        """A sticky queue whose worker left: returns its waiting tasks; tasks added to
        it later are reported by ``is_retired`` so the caller can move them."""
        self._retired.add((namespace, task_queue))
        queue = self._queues.pop((namespace, task_queue, TaskKind.WORKFLOW), None)
        if queue is None:
            return []
        for poller in queue.pollers:
            poller.future.cancel()
        return list(queue.backlog)

    def is_retired(self, namespace: str, task_queue: str) -> bool:
        return (namespace, task_queue) in self._retired

    def pollers(
        self, namespace: str, task_queue: str, kind: TaskKind
    ) -> list[tuple[str, float, bool]]:
        """``(identity, last access time, polling now)`` of the workers that polled the
        queue in the last ``POLLER_TTL_S`` seconds, most recent first."""
        queue = self._queues.get((namespace, task_queue, kind))
        if queue is None:
            return []
        horizon = time.time() - POLLER_TTL_S
        for identity in [i for i, at in queue.seen.items() if at < horizon]:
            if not queue.polling.get(identity):
                del queue.seen[identity]
                queue.workers.pop(identity, None)
        found = [(i, at, bool(queue.polling.get(i))) for i, at in queue.seen.items()]
        return sorted(found, key=lambda item: item[1], reverse=True)

    def _access(self, queue: _TaskQueue, identity: str, polls: int) -> None:
        queue.seen[identity] = time.time()
        count = queue.polling.get(identity, 0) + polls
        if count > 0:
            queue.polling[identity] = count
        else:
            queue.polling.pop(identity, None)

    def waiting_reason(self, namespace: str, task_queue: str, placement: bytes) -> str:
        """Why an activity task of this placement waits, if no worker polling the queue
        now meets it (a worker that went away, or never came); empty if one does, if the
        task may run anywhere, or if this node does not serve the queue (it cannot tell).
        A worker busy with all its slots full does not poll: it counts as away."""
        decoded = decode(placement)
        queue = self._queues.get((namespace, task_queue, TaskKind.ACTIVITY))
        if decoded is None or not self.serves(namespace, task_queue, TaskKind.ACTIVITY):
            return ""
        polling = [w for i, w in queue.workers.items() if queue.polling.get(i)] if queue else []
        if any(decoded.admits(w) for w in polling):
            return ""
        return (
            f"no worker polling task queue {task_queue!r} now meets its placement "
            f"({decoded.describe()}); {len(polling)} other worker(s) poll it"
        )

    # ------------------------------------------------ placement across sites

    def advertised(self) -> list[tuple[str, str, WorkerSite]]:
        """(namespace, task queue, worker) of every activity worker of this site seen
        polling in the last ``POLLER_TTL_S``: what this site's record advertises to
        the other sites (server/_remote_tasks.py)."""
        horizon = time.time() - POLLER_TTL_S
        found = []
        for (namespace, task_queue, kind), queue in self._queues.items():
            if kind != TaskKind.ACTIVITY:
                continue
            for identity, worker in queue.workers.items():
                if queue.seen.get(identity, 0.0) >= horizon:
                    found.append((namespace, task_queue, worker))
        return found

    def offerable(self) -> list[TaskRow]:
        """Activity tasks of runs homed here, waiting, that no worker seen polling
        their queue here in the last ``POLLER_TTL_S`` meets: another site's workers
        may take them (a worker of the home that meets a task keeps it here)."""
        horizon = time.time() - POLLER_TTL_S
        found: list[TaskRow] = []
        for (_, _, kind), queue in self._queues.items():
            if kind != TaskKind.ACTIVITY:
                continue
            local = [w for i, w in queue.workers.items() if queue.seen.get(i, 0.0) >= horizon]
            for task in queue.backlog:
                if not task.placement or isinstance(task, RemoteTaskRow):
                    continue
                placement = decode(task.placement)
                if placement is not None and not any(placement.admits(w) for w in local):
                    found.append(task)
        return found

    def take(
        self, namespace: str, task_queue: str, task_key: str, *, remote: bool = False
    ) -> TaskRow | None:
        """Remove a waiting activity task from its backlog (a peer's poller took it,
        or its home withdrew it): the task, or None if it is not waiting here.
        ``remote``: only a task another site offered."""
        queue = self._queues.get((namespace, task_queue, TaskKind.ACTIVITY))
        if queue is None or task_key not in queue.queued_keys:
            return None
        for index, task in enumerate(queue.backlog):
            if task.task_key == task_key:
                if remote and not isinstance(task, RemoteTaskRow):
                    return None
                del queue.backlog[index]
                queue.queued_keys.discard(task_key)
                return task
        return None

    @staticmethod
    def _drop_offered(queue: _TaskQueue, task_key: str) -> bool:
        """Forget another site's offer of ``task_key``; False if none is queued."""
        for index, task in enumerate(queue.backlog):
            if task.task_key == task_key and isinstance(task, RemoteTaskRow):
                del queue.backlog[index]
                queue.queued_keys.discard(task_key)
                return True
        return False

    def drop_remote(self, home: str) -> int:
        """Forget every task ``home`` offered (it offers again what still waits)."""
        dropped = 0
        for queue in self._queues.values():
            gone = [t for t in queue.backlog if isinstance(t, RemoteTaskRow) and t.home == home]
            if not gone:
                continue
            gone_ids = {id(t) for t in gone}
            queue.backlog = deque(t for t in queue.backlog if id(t) not in gone_ids)
            queue.queued_keys.difference_update(t.task_key for t in gone)
            dropped += len(gone)
        return dropped

    def backlog_sizes(self) -> dict[tuple[str, str, str], int]:
        """(namespace, task queue, "workflow"/"activity") -> tasks waiting, of the
        queues that have any (the metrics' backlog gauge)."""
        return {
            (ns, name, kind.name.lower()): len(queue.backlog)
            for (ns, name, kind), queue in self._queues.items()
            if queue.backlog
        }

    def memory_held(self) -> dict[str, int]:
        """What matching holds: task queues (per queue, not per run), the tasks waiting
        in their backlogs and the keys that de-duplicate them, queries, parked polls."""
        queues = self._queues.values()
        return {
            "matching_queues": len(self._queues),
            "matching_backlog_tasks": sum(len(q.backlog) for q in queues),
            "matching_queued_keys": sum(len(q.queued_keys) for q in queues),
            "matching_queries": sum(len(q.queries) for q in queues),
            "matching_pollers": sum(len(q.pollers) for q in queues),
            "matching_retired_queues": len(self._retired),
            "matching_local_pollers": sum(len(p) for p in self._local.values()),
            "matching_local_demand": len(self._local_demand),
        }

    def backlog_size(self, namespace: str, task_queue: str, kind: TaskKind) -> int:
        queue = self._queues.get((namespace, task_queue, kind))
        return len(queue.backlog) if queue else 0
