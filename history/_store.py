"""The durable history store: one schema and one code path for every dialect.

Each state transition of a run is one database transaction (events + mutable state +
outbox rows + timers), guarded by optimistic concurrency on the run's ``db_version``.
Throughput comes from group commit: transitions submitted concurrently are written by
a writer lane in one transaction, so one fsync covers many of them. If any
transition of a batch is rejected or fails (a conflict, or a value the database
refuses), the batch is rolled back and each transition is committed on its own, so
one request never fails another; only a database that cannot be reached fails the
whole batch, since each transition alone would fail the same way.

Database exceptions never escape raw (``_dialects.GuardedRunner``): a lost or
refused connection is ``StoreUnavailableError`` (retryable: the frontend answers
UNAVAILABLE), a refused value ``InvalidValueError`` (the input is at fault).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Row, Select, and_, delete, func, insert, or_, select
from sqlalchemy.exc import IntegrityError

from tideflow.api.search_attributes import SearchAttributeValue
from tideflow.api.v1.history_pb2 import HistoryEvent

from . import _cluster as cluster
from . import _schema as s
from ._api_keys import ApiKeyStore
from ._batch_write import Rejected, apply_batch, batch_rows
from ._cluster import MemberRecord, ShardRecord
from ._dialects import (
    SERIALIZABLE,
    GuardedRunner,
    Runner,
    open_runner,
    retrying,
)
from ._errors import (
    ConditionFailedError,
    CurrentExecutionConflictError,
    InvalidValueError,
    ShardOwnershipLostError,
    StoreUnavailableError,
)
from ._pg_commit_function import write_batch_direct
from ._records import (
    CurrentRecord,
    ExecutionRecord,
    ExecutionSummary,
    RunKey,
    TaskKind,
    TaskRow,
    TimerKind,
    TimerRow,
    Transition,
    now_micros,
)
from ._replication_store import ReplicationStore
from ._schedule_store import ScheduleStore
from ._schema_setup import create_schema, upgrade_columns
from ._site_metadata_store import SiteMetadataStore
from ._token_keys import TokenKeyStore
from ._visibility_store import Cursor as VisibilityCursor
from ._visibility_store import (
    VisibilityQuery,
    VisibilityRecord,
    count_executions,
    list_executions,
    run_search_attributes,
)

# WorkflowExecutionStatus RUNNING in the executions' status column.
_RUNNING_STATUS = 1
log = logging.getLogger("tideflow.history")

_MAX_BATCH = 64
# Bulk submissions (a page of due timers: server/_timer_fires.py) arrive together and
# fill larger transactions: fewer begins, fence reads, statement set-ups and commits.
_MAX_BULK_BATCH = 512
_MAX_TXN_RETRIES = 8
# Attempts at creating the schema while other nodes create it too, and the pause
# before the next one (times the attempt number).


# What a writer lane queues: transitions that commit together, who waits on them, and
# the fencing tokens (shard -> range id) they were submitted with (empty: unfenced).
_Item = tuple[tuple[Transition, ...], "asyncio.Future[None]", dict[int, int]]


class HistoryStore:
    """Async store of runs, histories, task backlog and timers.

    Use ``await HistoryStore.open(url)``; ``close()`` is safe to call twice.
    """

    #: Shards of a database initialised without a shard count.
    DEFAULT_SHARD_COUNT = cluster.DEFAULT_SHARD_COUNT

    def __init__(self, runner: Runner) -> None:
        # Commit counters: transitions / transactions is the group-commit batch size;
        # conflict_retries counts the transactions the database aborted for a
        # concurrent one and the runner ran again (_dialects.GuardedRunner).
        self.stats = {"transactions": 0, "transitions": 0, "conflict_retries": 0}
        # Told (transitions, seconds) of each committed transaction: the server's
        # metrics (server/_metrics.py); None: nobody asks.
        self.observe_commit: Callable[[int, float], None] | None = None
        self._runner = GuardedRunner(runner, self.stats)
        self.dialect = runner
        self._lanes: list[asyncio.Queue[_Item]] = []
        # Commits submitted that no writer has taken yet (``withdraw`` may cancel them),
        # and those of them that are ``bulk``.
        self._waiting: set[asyncio.Future[None]] = set()
        self._bulk: set[asyncio.Future[None]] = set()
        self._writers: list[asyncio.Task[None]] = []
        self._closed = False
        # Set when a write failed so that it may or may not have committed (the
        # connection went away around the commit). Its task and timer rows may then be
        # in the store while nobody was told, and a retry may even have found its own
        # commit as a conflict. The server re-reads the backlog once the store answers
        # again (server/_resync.py) and clears the flag.
        self.writes_in_doubt = asyncio.Event()
        # The cluster's shard count (history/_cluster.py), read or fixed by open().
        self.shard_count = cluster.DEFAULT_SHARD_COUNT
        # The fence (tla/ShardLease.tla): shard -> range id this node holds it with.
        # None until a node's ShardController enables it: a store opened by a tool or a
        # test writes unfenced. Once enabled, a write of a shard not in it is refused.
        self._fence: dict[int, int] | None = None
        # Told of every write the fence refused (the node drops the shard at once).
        self.on_fenced: Callable[[ShardOwnershipLostError], None] | None = None
        # Told of every fenced transition committed: shard -> the token it carried,
        # and shard -> the range id the fence read in its transaction (trace mode: the
        # appends tla/TraceShardLease.tla checks).
        self.on_committed: Callable[[dict[int, int], dict[int, int]], None] | None = None

    @classmethod
    async def open(
        cls, url: str, *, sqlite_synchronous: str = "NORMAL", shards: int | None = None
    ) -> HistoryStore:
        """Open (and initialise, the first time) the database at ``url``. ``shards``
        fixes the shard count of a new database; on one initialised already it must
        match (``ClusterConfigError``)."""
        runner = open_runner(url, sqlite_synchronous=sqlite_synchronous)
        return await cls.open_on(runner, shards=shards)

    @classmethod
    async def open_on(cls, runner: Runner, *, shards: int | None = None) -> HistoryStore:
        """A store on a given runner (``open`` makes one from a URL; tests wrap one to
        inject database faults)."""
        store = cls(runner)
        try:
            await create_schema(store._runner)
            await store._init_cluster(shards)
            await upgrade_columns(store._runner, store.shard_count)
            await store.ensure_namespace("default", description="created by tideflow")
        except BaseException:
            # An open that failed (the database unreachable, say) must not leave the
            # runner's connections or writer thread behind: a server start tries again.
            await runner.close()
            raise
        store._start_writers()
        return store

    async def _init_cluster(self, requested: int | None) -> None:
        if requested is not None:
            cluster.check_shard_count(requested)
        stored = await self._runner.read(cluster.read_shard_count_txn)
        if stored is None:
            count = cluster.DEFAULT_SHARD_COUNT if requested is None else requested
            # IntegrityError: another node initialised the database at the same moment.
            with contextlib.suppress(IntegrityError):
                await self._runner.write(lambda conn: cluster.insert_shard_count_txn(conn, count))
            stored = await self._runner.read(cluster.read_shard_count_txn)
            assert stored is not None
        if requested is not None:
            cluster.check_shard_count(requested, stored=stored)
        self.shard_count = stored

    def _start_writers(self) -> None:
        for lane in range(self.dialect.writer_lanes):
            queue: asyncio.Queue[_Item] = asyncio.Queue()
            self._lanes.append(queue)
            self._writers.append(
                asyncio.create_task(self._writer(queue), name=f"tideflow-store-writer-{lane}")
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._writers:
            task.cancel()
        for task in self._writers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for queue in self._lanes:
            while not queue.empty():
                _, fut, _ = queue.get_nowait()
                self._waiting.discard(fut)
                self._bulk.discard(fut)
                if not fut.done():
                    fut.set_exception(StoreUnavailableError("store closed"))
        await self._runner.close()

    # ------------------------------------------------------------------ writes

    async def apply(self, transition: Transition, *together: Transition) -> None:
        """Commit a transition atomically; raises ConditionFailedError or
        CurrentExecutionConflictError if it lost a race, and changes nothing then.
        InvalidValueError means the database refused one of its values (nothing is
        written); StoreUnavailableError that the database could not be reached, after
        retries (it may have committed if the connection broke around the commit:
        ``writes_in_doubt`` is then set, and a retry finds its own commit as a race).

        Transitions passed in ``together`` (other runs: the new run of a
        continue-as-new, say) commit in the same transaction, all or nothing.

        Cancelled, the commit is withdrawn if no writer has taken it yet; otherwise it
        still commits (or fails) after this call has ended (``submit`` says when).
        """
        commit = self.submit(transition, *together)
        try:
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            if not self.withdraw(commit):
                commit.add_done_callback(_retrieved)
            raise

    def submit(
        self, transition: Transition, *together: Transition, bulk: bool = False
    ) -> asyncio.Future[None]:
        """``apply`` without waiting: the commit's future, which ends as ``apply`` would
        (its result or error). ``withdraw`` takes it back while no writer has it.
        ``bulk``: one of many submitted at once; a writer taking it takes up to
        ``_MAX_BULK_BATCH`` transitions into the transaction instead of ``_MAX_BATCH``."""
        if self._closed:
            raise StoreUnavailableError("store closed")
        group = (transition, *together)
        tokens = self._tokens(t.key for t in group)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A run always maps to the same lane, so its transitions commit in order.
        lane = hash((transition.key.namespace, transition.key.workflow_id)) % len(self._lanes)
        self._waiting.add(fut)
        if bulk:
            self._bulk.add(fut)
        self._lanes[lane].put_nowait((group, fut, tokens))
        return fut

    def withdraw(self, commit: asyncio.Future[None]) -> bool:
        """Take back a ``submit``ted commit no writer has taken yet: it is never written
        and ``commit`` is cancelled. False once a writer has it: it will commit or fail
        like any other, and ``commit`` ends with which (its caller must wait for that
        before acting on what the commit writes: a row handed on earlier may be judged
        stale against the store and dropped, and then the commit lands)."""
        if commit in self._waiting:
            self._waiting.discard(commit)
            self._bulk.discard(commit)
            commit.cancel()
            return True
        return commit.cancelled()

    # ------------------------------------------------------------------ the fence

    def shard_of(self, key: RunKey) -> int:
        """The shard of ``key``'s run (``_cluster.shard_of``)."""
        return cluster.shard_of(key.namespace, key.workflow_id, self.shard_count)

    def enable_fencing(self) -> None:
        """From now on every write of a shard's data must carry this node's token."""
        if self._fence is None:
            self._fence = {}

    def hold_shard(self, shard: int, range_id: int) -> None:
        """This node acquired ``shard`` with token ``range_id``: its writes carry it."""
        self.enable_fencing()
        assert self._fence is not None
        self._fence[shard] = range_id

    def drop_shard(self, shard: int) -> None:
        """This node no longer owns ``shard``: its writes are refused before any
        transaction from now on."""
        if self._fence is not None:
            self._fence.pop(shard, None)

    @property
    def fencing(self) -> bool:
        """Whether writes are fenced (a node's ShardController enabled it)."""
        return self._fence is not None

    def holds(self, shard: int) -> bool:
        """Whether this node holds ``shard`` (no copy: asked on every request)."""
        return self._fence is not None and shard in self._fence

    def shard_token(self, shard: int) -> int | None:
        """The token a write of ``shard``'s data carries: None while writes are not
        fenced; ShardOwnershipLostError if this node does not hold the shard."""
        if self._fence is None:
            return None
        token = self._fence.get(shard)
        if token is None:
            raise ShardOwnershipLostError(shard, 0, None, "this node does not hold it")
        return token

    @property
    def held_shards(self) -> dict[int, int]:
        """shard -> token of the shards this node holds (a copy)."""
        return dict(self._fence or {})

    def _tokens(self, keys: Any) -> dict[int, int]:
        """The tokens the writes of runs ``keys`` carry; refuses a shard not held."""
        if self._fence is None:
            return {}
        tokens = {}
        for key in keys:
            shard = self.shard_of(key)
            token = self._fence.get(shard)
            if token is None:
                raise ShardOwnershipLostError(
                    shard, 0, None, f"run {key}: this node does not hold it"
                )
            tokens[shard] = token
        return tokens

    @property
    def _fence_read(self) -> cluster.FenceRead:
        """How the fence reads the shard rows (``_cluster.check_fence_txn``)."""
        if self.dialect.isolation == SERIALIZABLE:
            return cluster.FenceRead.PLAIN
        return cluster.FenceRead.LOCKED

    def _refused(self, error: ShardOwnershipLostError) -> None:
        if self.on_fenced is not None:
            self.on_fenced(error)

    async def _writer(self, queue: asyncio.Queue[_Item]) -> None:
        while True:
            batch = [await queue.get()]
            limit = _MAX_BULK_BATCH if batch[0][1] in self._bulk else _MAX_BATCH
            while len(batch) < limit and not queue.empty():
                batch.append(queue.get_nowait())
            self._waiting.difference_update(fut for _, fut, _ in batch)
            self._bulk.difference_update(fut for _, fut, _ in batch)
            live = [item for item in batch if not item[1].done()]
            try:
                for items in _one_transition_per_run(live):
                    await self._commit_batch(items)
            except asyncio.CancelledError:
                for _, fut, _ in live:
                    if not fut.done():
                        fut.set_exception(StoreUnavailableError("store closed"))
                raise

    async def _commit_batch(self, batch: list[_Item]) -> None:
        if not batch:
            return
        if len(batch) > 1:
            try:
                current = await self._run_txn(
                    [t for group, _, _ in batch for t in group], _merged([f for _, _, f in batch])
                )
            except StoreUnavailableError as exc:
                # The database is gone: each transition alone would fail the same way
                # (after its own retries). Every caller gets the retryable error.
                _fail(batch, exc)
                return
            except Exception as exc:
                # A conflict, a value the database refuses, or a defect: which transition
                # caused it is unknown, and the others must not fail with it. Commit
                # each on its own, so the error lands on its owner only.
                if not isinstance(exc, Rejected):
                    log.debug("batch of %d failed (%s); committing each alone", len(batch), exc)
            else:
                for _, fut, tokens in batch:
                    self._report_commit(tokens, current)
                    if not fut.done():
                        fut.set_result(None)
                return
        for index, (group, fut, tokens) in enumerate(batch):
            try:
                current = await self._run_txn(group, _merged([tokens]))
            except Rejected as rejected:
                if not fut.done():
                    fut.set_exception(rejected.error)
            except StoreUnavailableError as exc:
                _fail(batch[index:], exc)  # it went away meanwhile: no use trying the rest
                return
            except InvalidValueError as exc:
                if not fut.done():
                    fut.set_exception(InvalidValueError(f"workflow {_workflow_ids(group)}: {exc}"))
            except Exception as exc:
                if not fut.done():
                    fut.set_exception(exc)
            else:
                self._report_commit(tokens, current)
                if not fut.done():
                    fut.set_result(None)

    def _report_commit(self, tokens: dict[int, int], current: dict[int, int]) -> None:
        if self.on_committed is not None and tokens:
            self.on_committed(tokens, current)

    async def _run_txn(
        self, transitions: Sequence[Transition], tokens: dict[int, set[int]]
    ) -> dict[int, int]:
        """Run the transitions in one transaction, retrying transient failures.

        The runner runs it again after a conflict (nothing was committed); here it is
        run again after a lost connection, which is safe even if the first attempt did
        commit: the version guard and the unique keys then reject the copy, and the
        caller reloads the run and finds its change there. ``tokens`` (shard -> the
        tokens the transitions carry) are checked by the fence in the same transaction;
        returns the range ids it read (shard -> range id). Nothing outside the
        transaction changes until it committed or failed for good.
        """
        rows = batch_rows(transitions, self.shard_count)
        fence = self._fence_read

        async def attempt() -> dict[int, int]:
            try:
                if self._runner.direct is not None:
                    return await write_batch_direct(self._runner, rows, tokens, fence)
                return await self._runner.write(lambda conn: apply_batch(conn, rows, tokens, fence))
            except IntegrityError as exc:
                raise Rejected(_integrity_error(exc, transitions)) from exc
            except ShardOwnershipLostError as exc:
                self._refused(exc)
                raise Rejected(exc) from exc
            except StoreUnavailableError:
                self.writes_in_doubt.set()
                raise

        began = time.perf_counter()
        current = await retrying(
            attempt, _MAX_TXN_RETRIES, "transaction", retry_on=StoreUnavailableError
        )
        self.stats["transactions"] += 1
        self.stats["transitions"] += len(transitions)
        if self.observe_commit is not None:
            self.observe_commit(len(transitions), time.perf_counter() - began)
        return current

    async def delete_timer(self, timer_key: str, *, run: RunKey | None = None) -> None:
        """Drop a timer that fired for a transition that no longer applies. ``run``
        (the timer's run) is required once fencing is on: the fence checks it."""
        query = delete(s.timers).where(s.timers.c.timer_key == timer_key)
        await self._fenced_write(run, lambda conn: conn.execute(query))

    async def delete_task(self, task_key: str, *, run: RunKey | None = None) -> None:
        """Drop a backlog row whose task is no longer outstanding (``run`` as for
        ``delete_timer``)."""
        query = delete(s.tasks).where(s.tasks.c.task_key == task_key)
        await self._fenced_write(run, lambda conn: conn.execute(query))

    async def _fenced_write(self, run: RunKey | None, fn: Callable[[Connection], Any]) -> Any:
        """One write of a run's shard data outside a transition, fenced like one;
        returns what ``fn`` returned."""
        if run is None:
            if self._fence is not None:
                raise ValueError("a fenced store needs the run of every write")
            return await self._runner.write(fn)
        tokens = _merged([self._tokens([run])])
        fence = self._fence_read

        def txn(conn: Connection) -> Any:
            cluster.check_fence_txn(conn, tokens, fence)
            return fn(conn)

        try:
            return await self._runner.write(txn)
        except ShardOwnershipLostError as exc:
            self._refused(exc)
            raise

    # ------------------------------------------------------- leases, membership

    async def read_shard(self, shard: int) -> ShardRecord:
        """One shard's lease row (ShardLease.tla ``ReadShard``)."""
        return await self._runner.read(lambda conn: cluster.read_shard_txn(conn, shard))

    async def read_shards(self) -> list[ShardRecord]:
        """Every shard's lease row, in shard order."""
        count = self.shard_count
        return await self._runner.read(lambda conn: cluster.read_shards_txn(conn, count))

    async def acquire_shard(self, read: ShardRecord, node_id: str, lease_us: int) -> int | None:
        """Compare-and-set the shard to ``node_id`` if it is still as ``read`` and free
        (ShardLease.tla ``AcquireShard``); the new range id, or None (also if another
        node created the row, or a paused node's transaction holds it past the wait)."""
        now = now_micros()
        try:
            return await self._runner.write(
                lambda conn: cluster.acquire_shard_txn(conn, read, node_id, now, now + lease_us)
            )
        except Exception as exc:
            if cluster.not_acquired(exc):
                return None
            raise

    async def renew_shard(self, shard: int, range_id: int, lease_us: int) -> None:
        """Extend the lease (ShardLease.tla ``RenewLease``); ShardOwnershipLostError
        if the range id moved (another node owns the shard)."""
        expires = now_micros() + lease_us
        await self._runner.write(
            lambda conn: cluster.renew_shard_txn(conn, shard, range_id, expires)
        )

    async def renew_shards(
        self, tokens: Mapping[int, int], lease_us: int
    ) -> dict[int, ShardOwnershipLostError]:
        """``renew_shard`` for every shard of ``tokens`` (shard -> range id) in one
        transaction; the shards whose range id moved, with their errors."""
        expires = now_micros() + lease_us
        return await self._runner.write(
            lambda conn: cluster.renew_shards_txn(conn, tokens, expires)
        )

    async def release_shard(self, shard: int, range_id: int) -> bool:
        """Give the shard up for any node to take at once; False if it was not ours."""
        return await self._runner.write(
            lambda conn: cluster.release_shard_txn(conn, shard, range_id)
        )

    async def heartbeat(self, member: MemberRecord) -> None:
        """Insert or refresh this node's membership row."""
        if await self._runner.write(lambda conn: cluster.heartbeat_txn(conn, member)):
            return
        # IntegrityError: a concurrent heartbeat of this node inserted it.
        with contextlib.suppress(IntegrityError):
            await self._runner.write(lambda conn: cluster.join_txn(conn, member))

    async def list_members(self) -> list[MemberRecord]:
        return await self._runner.read(cluster.list_members_txn)

    async def leave(self, node_id: str) -> None:
        """Remove this node's membership row (a graceful stop)."""
        await self._runner.write(lambda conn: cluster.leave_txn(conn, node_id))

    # ------------------------------------------------------------- namespaces

    async def ensure_namespace(
        self, name: str, *, description: str = "", retention_seconds: int = 0
    ) -> bool:
        """Create the namespace if missing; returns True if this call created it."""
        query = insert(s.namespaces).values(
            name=name,
            description=description,
            retention_seconds=retention_seconds,
            created_at=now_micros(),
        )
        try:
            await self._runner.write(lambda conn: conn.execute(query))
        except IntegrityError:
            return False
        return True

    async def list_namespaces(self) -> list[tuple[str, str, int]]:
        """Every namespace as (name, description, retention seconds), by name."""
        n = s.namespaces
        query = select(n.c.name, n.c.description, n.c.retention_seconds).order_by(n.c.name)
        rows = await self._runner.read(lambda conn: conn.execute(query).all())
        return [(row[0], row[1], row[2]) for row in rows]

    async def namespace_exists(self, name: str) -> bool:
        query = select(s.namespaces.c.name).where(s.namespaces.c.name == name)
        return (await self._runner.read(lambda conn: conn.execute(query).first())) is not None

    # ------------------------------------------------------------------ reads

    async def get_execution(self, key: RunKey) -> ExecutionRecord | None:
        e = s.executions
        query = select(e).where(
            e.c.namespace == key.namespace,
            e.c.workflow_id == key.workflow_id,
            e.c.run_id == key.run_id,
        )
        row = await self._runner.read(lambda conn: conn.execute(query).first())
        return None if row is None else _execution_record(row._mapping)

    async def get_current(self, namespace: str, workflow_id: str) -> CurrentRecord | None:
        c = s.current_executions
        query = select(c).where(c.c.namespace == namespace, c.c.workflow_id == workflow_id)
        row = await self._runner.read(lambda conn: conn.execute(query).first())
        if row is None:
            return None
        m = row._mapping
        return CurrentRecord(
            namespace=m["namespace"],
            workflow_id=m["workflow_id"],
            run_id=m["run_id"],
            status=m["status"],
            start_request_id=m["start_request_id"],
        )

    async def read_events(
        self, key: RunKey, *, first_event_id: int = 1, max_events: int | None = None
    ) -> list[HistoryEvent]:
        h = s.history_events
        query = (
            select(h.c.data)
            .where(
                h.c.namespace == key.namespace,
                h.c.workflow_id == key.workflow_id,
                h.c.run_id == key.run_id,
                h.c.event_id >= first_event_id,
            )
            .order_by(h.c.event_id)
        )
        if max_events is not None:
            query = query.limit(max_events)

        def fetch(conn: Connection) -> list[HistoryEvent]:
            return [HistoryEvent.FromString(r[0]) for r in conn.execute(query)]

        return await self._runner.read(fetch)

    async def list_tasks(
        self,
        *,
        limit: int = 10_000,
        after_key: str = "",
        shards: Collection[int] | None = None,
        queue_shards: Collection[int] | None = None,
    ) -> list[TaskRow]:
        """Backlog rows in key order (recovery pages through them), of runs of
        ``shards`` only and of task queues of ``queue_shards`` only, if given."""
        t = s.tasks
        query = select(t).where(t.c.task_key > after_key).order_by(t.c.task_key).limit(limit)
        if queue_shards is not None:
            # The rows of other runs' shards queued here: their writes are fenced by
            # their own shards; rows written after this scan are handed over (AddTasks).
            query = query.where(t.c.queue_shard.in_(sorted(queue_shards)))
        tokens = self._scan_tokens(shards)
        rows = await self._runner.read(
            lambda conn: _scan_shards_txn(conn, query, t.c.shard_id, shards, tokens)
        )
        return [
            TaskRow(
                key=RunKey(namespace=r.namespace, workflow_id=r.workflow_id, run_id=r.run_id),
                task_queue=r.task_queue,
                kind=TaskKind(r.kind),
                ref_id=r.ref_id,
                attempt=r.attempt,
                created_at=r.created_at,
                placement=r.placement or b"",
            )
            for r in rows
        ]

    async def timers_due_before(
        self,
        fire_before: int,
        *,
        limit: int = 10_000,
        shards: Collection[int] | None = None,
        after: tuple[int, str] | None = None,
    ) -> list[TimerRow]:
        """Timers due before ``fire_before``, in (fire_at, timer_key) order, of ``shards``
        only if given. ``after`` is a keyset cursor: ``(fire_at, key)`` reads the rows
        after that row, ``(fire_at, "")`` those due at or after ``fire_at``."""
        t = s.timers
        query = (
            select(t)
            .where(t.c.fire_at < fire_before)
            .order_by(t.c.fire_at, t.c.timer_key)
            .limit(limit)
        )
        if after is not None:
            after_at, after_key = after
            if after_key:
                query = query.where(
                    or_(
                        t.c.fire_at > after_at,
                        and_(t.c.fire_at == after_at, t.c.timer_key > after_key),
                    )
                )
            else:
                query = query.where(t.c.fire_at >= after_at)
        tokens = self._scan_tokens(shards)
        rows = await self._runner.read(
            lambda conn: _scan_shards_txn(conn, query, t.c.shard_id, shards, tokens)
        )
        return [
            TimerRow(
                key=RunKey(namespace=r.namespace, workflow_id=r.workflow_id, run_id=r.run_id),
                kind=TimerKind(r.kind),
                ref_id=r.ref_id,
                attempt=r.attempt,
                fire_at=r.fire_at,
            )
            for r in rows
        ]

    def _scan_tokens(self, shards: Collection[int] | None) -> dict[int, int] | None:
        """What a scan of ``shards`` checks: None for no check (every row, or an
        unfenced store), else shard -> token of the shards of ``shards`` held now."""
        if shards is None or self._fence is None:
            return None
        return {shard: self._fence[shard] for shard in shards if shard in self._fence}

    async def open_runs_by_namespace(self) -> dict[str, int]:
        """How many runs are open (running) in each namespace (the metrics' gauge;
        the executions' status index answers it)."""
        e = s.executions
        query = (
            select(e.c.namespace, func.count())
            .where(e.c.status == _RUNNING_STATUS)
            .group_by(e.c.namespace)
        )
        rows = await self._runner.read(lambda conn: conn.execute(query).all())
        return {str(row[0]): int(row[1]) for row in rows}

    async def work_outstanding(
        self, now: int, busy_timer_kinds: Collection[int]
    ) -> tuple[bool, int | None]:
        """(whether any work is outstanding, the earliest timer's due time), read in one
        statement so both describe one committed state: outstanding means a task row
        (dispatchable work), a timer of ``busy_timer_kinds`` (a task handed to a worker
        and not answered yet) or a timer due at ``now`` that has not fired. The
        time-skipping test environment (server/_time_skipping.py) asks this; every
        node's other paths never do."""
        t, tm = s.tasks, s.timers
        tasks = select(func.count()).select_from(t).scalar_subquery()
        busy = (
            select(func.count())
            .select_from(tm)
            .where(or_(tm.c.kind.in_(sorted(busy_timer_kinds)), tm.c.fire_at <= now))
            .scalar_subquery()
        )
        earliest = select(func.min(tm.c.fire_at)).scalar_subquery()
        query = select(tasks, busy, earliest)
        row = await self._runner.read(lambda conn: conn.execute(query).one())
        return bool(row[0] or row[1]), None if row[2] is None else int(row[2])

    async def count_rows(self, table: str, **where: Any) -> int:
        """Row count of one table (tests and diagnostics)."""
        tbl = s.metadata.tables[table]
        query = select(tbl)
        if where:
            query = query.where(and_(*(tbl.c[name] == value for name, value in where.items())))
        return len(await self._runner.read(lambda conn: conn.execute(query).all()))

    # ------------------------------------------------- visibility and schedules

    async def list_executions(
        self,
        namespace: str,
        query: VisibilityQuery,
        *,
        page_size: int,
        cursor: VisibilityCursor | None = None,
    ) -> tuple[list[VisibilityRecord], VisibilityCursor | None]:
        """A page of runs matching ``query`` and the cursor of the next page (None
        on the last); see ``_visibility_store``."""
        return await self._runner.read(
            lambda conn: list_executions(conn, namespace, query, page_size, cursor)
        )

    async def count_executions(self, namespace: str, query: VisibilityQuery) -> int:
        """How many runs match ``query`` (its ORDER BY is ignored)."""
        return await self._runner.read(lambda conn: count_executions(conn, namespace, query))

    async def search_attributes_of(self, key: RunKey) -> dict[str, SearchAttributeValue]:
        """The current search attributes of a run."""
        return await self._runner.read(lambda conn: run_search_attributes(conn, key))

    @property
    def schedules(self) -> ScheduleStore:
        """Schedule rows and ledgers (``_schedule_store``), on this store's database;
        the scheduler's writes are fenced by their schedule's shard like a run's."""
        return ScheduleStore(
            self._runner, self.shard_count, token_of=self.shard_token, refused=self._refused
        )

    @property
    def replication(self) -> ReplicationStore:
        """Replicas, the site inbox and replication alarms (``_replication_store``);
        a replica's writes are fenced by its run's shard like a transition."""
        return ReplicationStore(self._runner, self._fenced_write)

    @property
    def token_keys(self) -> TokenKeyStore:
        """The keys that sign task tokens (``_token_keys``), on this store's database."""
        return TokenKeyStore(self._runner)

    @property
    def site_metadata(self) -> SiteMetadataStore:
        """The sites' shared metadata document (``_site_metadata_store``)."""
        return SiteMetadataStore(self._runner)

    @property
    def api_keys(self) -> ApiKeyStore:
        """The API keys of ``api-key`` authentication (``_api_keys``), on this database."""
        return ApiKeyStore(self._runner)


def _scan_shards_txn(
    conn: Connection,
    query: Select[Any],
    shard_column: Any,
    shards: Collection[int] | None,
    tokens: dict[int, int] | None,
) -> Sequence[Row[Any]]:
    """Rows of ``query``, of ``shards`` only if given. With ``tokens`` (a fenced
    store) only the shards still held with them, checked in the scan's own transaction
    (``_cluster.held_shards_txn``: the scan is then ordered after the acquisition, and
    cannot miss a late write of the shard's old owner). A read: run again as it is
    after a conflict."""
    if shards is not None:
        if tokens is not None:
            shards = cluster.held_shards_txn(conn, tokens)
            if not shards:
                return []
        query = query.where(shard_column.in_(sorted(shards)))
    return conn.execute(query).all()


def _merged(token_maps: Sequence[dict[int, int]]) -> dict[int, set[int]]:
    """shard -> every token the transitions of a batch carry for it (one per shard,
    unless the shard changed hands between their submissions)."""
    merged: dict[int, set[int]] = {}
    for tokens in token_maps:
        for shard, token in tokens.items():
            merged.setdefault(shard, set()).add(token)
    return merged


def _retrieved(commit: asyncio.Future[None]) -> None:
    """Retrieve the outcome of a commit whose caller went away (never reported as an
    exception nobody retrieved)."""
    if not commit.cancelled():
        commit.exception()


def _fail(batch: Sequence[_Item], error: StoreUnavailableError) -> None:
    for _, fut, _ in batch:
        if not fut.done():
            # One exception object per waiter: raising it fills in its traceback.
            fut.set_exception(StoreUnavailableError(str(error)))


def _workflow_ids(group: Sequence[Transition]) -> str:
    """The group's workflow ids for an error message (an id may be 1,000 characters)."""
    return ", ".join(repr(_shortened(t.key.workflow_id)) for t in group)


def _shortened(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."


def _one_transition_per_run(batch: list[_Item]) -> list[list[_Item]]:
    """Split a batch so no group holds two transitions of one run.

    ``apply_batch`` writes each kind of row with one statement, so within a group a
    run's later transition could not see rows an earlier one inserted (a task it
    consumes, say). Groups commit one after the other, in submission order.
    """
    groups: list[list[_Item]] = [[]]
    seen: set[RunKey] = set()
    for item in batch:
        keys = {t.key for t in item[0]}
        if keys & seen:
            groups.append([])
            seen = set()
        groups[-1].append(item)
        seen |= keys
    return [g for g in groups if g]


def _integrity_error(exc: IntegrityError, batch: Sequence[Transition]) -> Exception:
    """Name the race a unique violation means (the message names the table)."""
    text = str(exc.orig).lower()
    where = str(batch[0].key) if len(batch) == 1 else "a run of the batch"
    if "current_executions" in text:
        return CurrentExecutionConflictError(f"workflow id of {where} already has a run")
    if "history_events" in text:
        return ConditionFailedError(f"{where}: an event id was already written by another writer")
    if "executions" in text:
        return ConditionFailedError(f"{where} already exists")
    return ConditionFailedError(f"{where}: conflicting write ({exc.orig})")


def _execution_record(m: Any) -> ExecutionRecord:
    return ExecutionRecord(
        key=RunKey(namespace=m["namespace"], workflow_id=m["workflow_id"], run_id=m["run_id"]),
        state=m["state"],
        db_version=m["db_version"],
        summary=ExecutionSummary(
            workflow_type=m["workflow_type"],
            task_queue=m["task_queue"],
            status=m["status"],
            start_time=m["start_time"],
            close_time=m["close_time"],
            history_length=m["history_length"],
        ),
    )
