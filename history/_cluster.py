"""Cluster metadata, shard leases and membership (specified by tla/ShardLease.tla).

Runs are spread over a fixed number of shards, chosen when the database is first
initialised and never changed (``cluster_metadata.shard_count``): changing it would
move runs between shards under their owners' feet. A run's shard is a stable hash of
its namespace and workflow id (``shard_of``), so every run of a workflow id, and a
continue-as-new successor, lives on the same shard.

A node owns a shard through its ``shards`` row: ``owner``, ``lease_expires_at`` and
``range_id``, the fencing token. Acquiring is a compare-and-set on ``range_id`` that
bumps it (``acquire_shard``), renewing extends the lease only while ``range_id`` is
still the node's token (``renew_shard``), and every transaction that writes a shard's
data first reads the row (``FOR SHARE`` at READ COMMITTED) and compares ``range_id``
with the writer's token (``check_fence_txn``, called by ``_batch_write.apply_batch``).
So a node that lost its lease (paused, partitioned, clock skewed) can never commit
again, whatever it believes: safety rests on the token alone, never on a clock.

The functions here are synchronous SQLAlchemy Core functions of a ``Connection``, run
by the store's runner like the rest of the store's statements.
"""

from __future__ import annotations

import enum
import functools
import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, delete, insert, inspect, select, text, update
from sqlalchemy.exc import IntegrityError

from . import _schema as s
from ._dialects import is_lock_not_available
from ._errors import ClusterConfigError, ShardOwnershipLostError

#: Shards of a database initialised without ``--shards``.
DEFAULT_SHARD_COUNT = 16
#: The most shards a cluster may have (shard rows are scanned in full by every node).
MAX_SHARD_COUNT = 4096
#: ``shards.owner`` of a row whose owner released it.
NO_OWNER = ""
#: The range id a shard has before anyone acquired it (its row does not exist yet):
#: the first owner gets 2, as ShardLease.tla's Init has the row at 1.
INITIAL_RANGE_ID = 1

_SHARD_COUNT = "shard_count"


#: Runs whose shard ``shard_of`` remembers. Every call about a run asks for its shard
#: several times (routing, the shard check, the fence), within the call: the runs in
#: flight need remembering, not every run seen. Kept below the engine's default state
#: cache (10,000 runs): at 65,536 this memo was the one per-run structure past it,
#: about 220 bytes a run (key tuple, LRU link, the workflow id) up to 14 MB, filling
#: until the 65,536th run (bench/README.md, Memory).
SHARD_MEMO_SIZE = 8192


@functools.lru_cache(maxsize=SHARD_MEMO_SIZE)
def shard_of(namespace: str, workflow_id: str, shard_count: int) -> int:
    """The shard (0 .. shard_count - 1) of every run of ``workflow_id``.

    The first 8 bytes of BLAKE2b over ``namespace``, a NUL and ``workflow_id`` (UTF-8),
    big-endian, modulo the shard count. Stable across processes, machines and Python
    versions (Python's own ``hash`` of a string is salted per process); the NUL keeps
    ("a", "b|c") and ("a|b", "c") apart, as neither field may contain it.
    """
    digest = hashlib.blake2b(
        namespace.encode() + b"\0" + workflow_id.encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") % shard_count


# Cached: every task row written asks, and a server has few queues (the hash was a
# few percent of a timer fire's CPU).
@functools.lru_cache(maxsize=4096)
def queue_shard_of(namespace: str, task_queue: str, kind: int, shard_count: int) -> int:
    """The shard whose owner serves task queue ``task_queue`` of kind ``kind`` (its
    matching owner: server/_matching_routes.py).

    Like ``shard_of``, but BLAKE2b personalised with ``tideflow-queue`` over namespace,
    NUL, queue name, NUL, kind (decimal): as uniform as the run hash and independent of
    it, so a busy queue and the runs it serves do not pile onto one node.
    """
    data = namespace.encode() + b"\0" + task_queue.encode() + b"\0" + str(kind).encode()
    digest = hashlib.blake2b(data, digest_size=8, person=b"tideflow-queue").digest()
    return int.from_bytes(digest, "big") % shard_count


@dataclass(frozen=True, slots=True)
class ShardRecord:
    """A ``shards`` row as read (a shard nobody acquired yet reads as owner "",
    range id ``INITIAL_RANGE_ID``, expired)."""

    shard_id: int
    owner: str
    range_id: int
    lease_expires_at: int
    exists: bool = True

    @property
    def unowned(self) -> bool:
        """Released, or never acquired."""
        return self.owner == NO_OWNER

    def free_at(self, now: int) -> bool:
        """Released, never acquired, or its lease has lapsed."""
        return self.owner == NO_OWNER or self.lease_expires_at < now


@dataclass(frozen=True, slots=True)
class MemberRecord:
    node_id: str
    address: str
    heartbeat_at: int
    started_at: int


def insert_shard_count_txn(conn: Connection, count: int) -> None:
    """Record the shard count of a database being initialised; IntegrityError if a
    node recorded one first (its own transaction: the primary key decides)."""
    conn.execute(insert(s.cluster_metadata).values(name=_SHARD_COUNT, value=str(count)))


def read_shard_count_txn(conn: Connection) -> int | None:
    m = s.cluster_metadata
    stored = conn.execute(select(m.c.value).where(m.c.name == _SHARD_COUNT)).scalar()
    return None if stored is None else int(str(stored))


def check_shard_count(count: int, *, stored: int | None = None) -> None:
    """Refuse a shard count out of range, or one other than the database's."""
    if not 1 <= count <= MAX_SHARD_COUNT:
        raise ClusterConfigError(f"--shards {count}: must be between 1 and {MAX_SHARD_COUNT}")
    if stored is not None and stored != count:
        raise ClusterConfigError(
            f"the database was initialised with {stored} shards; --shards {count} "
            "conflicts with it (the shard count never changes: drop --shards, or "
            f"pass --shards {stored})"
        )


# Tables with a ``shard_id`` column: the columns that pick one row, and the id that is
# hashed with the row's namespace (a run's workflow id, or the schedule id).
_SHARDED = {
    "tasks": (("task_key",), "workflow_id"),
    "timers": (("timer_key",), "workflow_id"),
    "schedules": (("namespace", "schedule_id"), "schedule_id"),
}


def missing_shard_columns_txn(conn: Connection) -> list[str]:
    """Tables of a database created before shards whose rows lack ``shard_id``."""
    inspector = inspect(conn)
    return [
        name
        for name in _SHARDED
        if "shard_id" not in {c["name"] for c in inspector.get_columns(name)}
    ]


def add_shard_column_txn(conn: Connection, name: str, shard_count: int) -> int:
    """Upgrade ``tasks``, ``timers`` or ``schedules`` of a database created before
    shards: add ``shard_id``, fill it in from each row's run (or schedule id), add its
    index. Returns the rows filled in."""
    table = s.metadata.tables[name]
    key_names, hashed = _SHARDED[name]
    key = [table.c[k] for k in key_names]
    conn.execute(text(f"ALTER TABLE {name} ADD COLUMN shard_id INTEGER NOT NULL DEFAULT 0"))
    wanted = dict.fromkeys(("namespace", hashed, *key_names))
    rows = [r._mapping for r in conn.execute(select(*(table.c[n] for n in wanted)))]
    if rows:
        conn.execute(
            update(table)
            .where(*(column == bindparam(f"key_{column.name}") for column in key))
            .values(shard_id=bindparam("sid")),
            [
                {
                    "sid": shard_of(r["namespace"], r[hashed], shard_count),
                    **{f"key_{n}": r[n] for n in key_names},
                }
                for r in rows
            ],
        )
    for index in table.indexes:
        if "shard_id" in {c.name for c in index.columns}:
            index.create(conn)
    return len(rows)


def missing_queue_shard_column_txn(conn: Connection) -> bool:
    """Whether ``tasks`` lacks ``queue_shard`` (a database created before matching
    spread over the nodes)."""
    return "queue_shard" not in {c["name"] for c in inspect(conn).get_columns("tasks")}


def add_queue_shard_column_txn(conn: Connection, shard_count: int) -> int:
    """Upgrade ``tasks``: add ``queue_shard``, fill it in from each row's queue, add its
    index. Returns the rows filled in."""
    t = s.tasks
    conn.execute(text("ALTER TABLE tasks ADD COLUMN queue_shard INTEGER NOT NULL DEFAULT 0"))
    rows = conn.execute(select(t.c.task_key, t.c.namespace, t.c.task_queue, t.c.kind)).all()
    if rows:
        conn.execute(
            update(t).where(t.c.task_key == bindparam("k")).values(queue_shard=bindparam("q")),
            [{"k": r[0], "q": queue_shard_of(r[1], r[2], r[3], shard_count)} for r in rows],
        )
    for index in t.indexes:
        if "queue_shard" in {c.name for c in index.columns}:
            index.create(conn)
    return len(rows)


def missing_placement_column_txn(conn: Connection) -> bool:
    """Whether ``tasks`` lacks ``placement`` (a database created before placement)."""
    return "placement" not in {c["name"] for c in inspect(conn).get_columns("tasks")}


def add_placement_column_txn(conn: Connection) -> None:
    """Upgrade ``tasks``: add ``placement``. Existing rows keep NULL (any worker): they
    were scheduled before activities could say where they run."""
    column_type = s.tasks.c.placement.type.compile(dialect=conn.dialect)
    conn.execute(text(f"ALTER TABLE tasks ADD COLUMN placement {column_type}"))


def read_shards_txn(conn: Connection, shard_count: int) -> list[ShardRecord]:
    """Every shard's row, in shard order; a shard without a row reads as never acquired."""
    t = s.shards
    rows = {r.shard_id: r for r in conn.execute(select(t))}
    out = []
    for shard in range(shard_count):
        row = rows.get(shard)
        if row is None:
            out.append(ShardRecord(shard, NO_OWNER, INITIAL_RANGE_ID, 0, exists=False))
        else:
            out.append(ShardRecord(shard, row.owner, row.range_id, row.lease_expires_at))
    return out


def read_shard_txn(conn: Connection, shard: int) -> ShardRecord:
    """One shard's row (ShardLease.tla ``ReadShard``)."""
    t = s.shards
    row = conn.execute(select(t).where(t.c.shard_id == shard)).first()
    if row is None:
        return ShardRecord(shard, NO_OWNER, INITIAL_RANGE_ID, 0, exists=False)
    return ShardRecord(shard, row.owner, row.range_id, row.lease_expires_at)


#: How long an acquisition waits for another transaction's lock on the shard row.
ACQUIRE_LOCK_TIMEOUT_MS = 1000


def not_acquired(exc: BaseException) -> bool:
    """Whether ``acquire_shard_txn`` failed without taking the shard, the others
    having the row: another node created it first (the primary key), or a
    transaction on it held its lock past ``ACQUIRE_LOCK_TIMEOUT_MS``."""
    return isinstance(exc, IntegrityError) or is_lock_not_available(exc)


def acquire_shard_txn(
    conn: Connection, read: ShardRecord, node_id: str, now: int, expires_at: int
) -> int | None:
    """Take the shard if its row is still as ``read`` and free (ShardLease.tla
    ``AcquireShard``): the new range id, or None if another node acquired it or its
    owner renewed since the read. A row still held by ``node_id`` itself (a restart of
    the same node) is taken back at once; the bump fences the old incarnation."""
    new_range = read.range_id + 1
    t = s.shards
    if conn.dialect.name in ("postgresql", "cockroachdb"):
        # Never wait long on the row: a node paused (SIGSTOP, a hung VM) inside a
        # transaction on it (its release, say) holds its lock for as long as it is
        # paused, and this node's lease pass, renewals included, would wait with it
        # (test_cluster_nodes' zombie stalled on it). Given up, the shard is not free
        # now; the next pass tries again.
        conn.execute(text(f"SET LOCAL lock_timeout = '{ACQUIRE_LOCK_TIMEOUT_MS}ms'"))
    if not read.exists:
        # The first acquisition: the primary key plays the compare-and-set (the
        # store runs this INSERT alone in its transaction and maps IntegrityError to
        # None).
        conn.execute(
            insert(t).values(
                shard_id=read.shard_id,
                owner=node_id,
                range_id=new_range,
                lease_expires_at=expires_at,
            )
        )
        return new_range
    result = conn.execute(
        update(t)
        .where(
            t.c.shard_id == read.shard_id,
            t.c.range_id == read.range_id,
            (t.c.lease_expires_at < now) | (t.c.owner == node_id) | (t.c.owner == NO_OWNER),
        )
        .values(owner=node_id, range_id=new_range, lease_expires_at=expires_at)
    )
    return new_range if result.rowcount == 1 else None


def renew_shard_txn(conn: Connection, shard: int, range_id: int, expires_at: int) -> None:
    """Extend the lease while ``range_id`` is current (ShardLease.tla ``RenewLease``;
    a lapsed lease nobody took over is renewed too). Raises ShardOwnershipLostError
    when another node took the shard."""
    t = s.shards
    result = conn.execute(
        update(t)
        .where(t.c.shard_id == shard, t.c.range_id == range_id)
        .values(lease_expires_at=expires_at)
    )
    if result.rowcount != 1:
        current = read_shard_txn(conn, shard)
        raise ShardOwnershipLostError(
            shard, range_id, current.range_id, f"taken over by {current.owner or 'nobody'}"
        )


def renew_shards_txn(
    conn: Connection, tokens: Mapping[int, int], expires_at: int
) -> dict[int, ShardOwnershipLostError]:
    """``renew_shard_txn`` for each shard of ``tokens`` (shard -> range id) in one
    transaction (one commit per pass, not one per shard); the shards another node
    took, with the error each would have raised alone."""
    lost: dict[int, ShardOwnershipLostError] = {}
    for shard, range_id in tokens.items():
        try:
            renew_shard_txn(conn, shard, range_id, expires_at)
        except ShardOwnershipLostError as exc:
            lost[shard] = exc
    return lost


def release_shard_txn(conn: Connection, shard: int, range_id: int) -> bool:
    """Give the shard up at once (a graceful stop, or a rebalance): owner "" and an
    expired lease, so any node acquires it on its next pass. The range id stays: the
    next owner bumps it. False if the shard was no longer ours."""
    t = s.shards
    result = conn.execute(
        update(t)
        .where(t.c.shard_id == shard, t.c.range_id == range_id)
        .values(owner=NO_OWNER, lease_expires_at=0)
    )
    return bool(result.rowcount == 1)


class FenceRead(enum.Enum):
    """How the fence reads the shard rows, by the database's isolation."""

    #: READ COMMITTED (PostgreSQL's default): ``SELECT ... FOR SHARE``.
    LOCKED = "locked"
    #: SERIALIZABLE (CockroachDB, PostgreSQL with ?isolation_level=serializable,
    #: SQLite): a plain ``SELECT``.
    PLAIN = "plain"


# Built once: the fence runs in every write transaction, and building a statement
# costs more than running this one (measured on SQLite: ~0.2 ms per transaction).
_FENCE_QUERY = select(s.shards.c.shard_id, s.shards.c.range_id).where(
    s.shards.c.shard_id.in_(bindparam("shards", expanding=True))
)
_SQLITE_FENCE_SELECT = (
    f"SELECT {s.shards.c.shard_id.name}, {s.shards.c.range_id.name} "
    f"FROM {s.shards.name} WHERE {s.shards.c.shard_id.name} IN"
)
_FENCE_QUERIES = {
    FenceRead.PLAIN: _FENCE_QUERY,
    FenceRead.LOCKED: _FENCE_QUERY.with_for_update(read=True),
}


def check_fence_txn(
    conn: Connection,
    tokens: Mapping[int, Collection[int]],
    read: FenceRead = FenceRead.LOCKED,
) -> dict[int, int]:
    """The fence (ShardLease.tla ``StoreAccepts``): every shard written must still have
    the range id its writer holds, read in the writer's own transaction. ``tokens``
    maps a shard to the tokens its transitions carry (two when the shard changed hands
    between their submissions: one is stale).

    What the fence must guarantee: no write W of a node that lost a shard is ordered
    after the acquisition A that took the shard from it (A bumps the range id), so that
    the new owner, which reads the shard's data after A, sees every write of the old
    owner or none can commit any more.

    READ COMMITTED (``FenceRead.LOCKED``): each statement reads the latest committed
    row, so a plain read would let A commit between W's check and W's commit, and W
    would land after A. ``FOR SHARE`` holds A's UPDATE until W ends (or makes W wait
    for A and then read A's range id): W commits entirely before A or is refused.

    SERIALIZABLE (``FenceRead.PLAIN``): the database makes the committed transactions
    equivalent to one serial order, and a plain read of the row is enough. W read the
    old range id, so in that order W comes before A (after A it would have read the
    new one). Every transaction that read the new range id comes after A, hence after
    W: the new owner's writes and fenced reads (``held_shards_txn``) see W, or one of
    the transactions is aborted with SQLSTATE 40001 and run again (and W, run again,
    reads the new range id and is refused). Note that W and A alone do not conflict:
    both commit, with W ordered first, which is what the fence needs. A lock would add
    nothing: CockroachDB does not even take ``FOR SHARE`` locks at SERIALIZABLE unless
    told to (``enable_shared_locking_for_serializable``), and leaving the clause out
    keeps PostgreSQL at SERIALIZABLE on exactly the statements CockroachDB runs. SQLite
    has one writer at a time, across every process on the file, and ignores the clause
    anyway: its write transactions take the file's write lock at BEGIN IMMEDIATE
    (``history/_sqlite.py``), before this read, so W and A are strictly serial.

    Returns the range ids read (shard -> range id): trace mode logs them with each
    committed write, as the store's own account of the fence (tla/TraceShardLease.tla)."""
    if not tokens:
        return {}
    shards = sorted(tokens)
    if conn.dialect.name == "sqlite":
        # Straight on the sqlite3 cursor, as the batch's writes are
        # (history/_batch_write.py): SQLAlchemy's execution path cost more than the
        # read. SQLite has one writer at a time (this transaction holds the file's
        # write lock since its BEGIN IMMEDIATE), so no lock clause either way.
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            marks = ",".join("?" * len(shards))
            cursor.execute(f"{_SQLITE_FENCE_SELECT} ({marks})", shards)
            return fence_verdict(tokens, dict(cursor.fetchall()))
        finally:
            cursor.close()
    rows = conn.execute(_FENCE_QUERIES[read], {"shards": shards})
    return fence_verdict(tokens, {row.shard_id: row.range_id for row in rows})


def fence_verdict(
    tokens: Mapping[int, Collection[int]], current: Mapping[int, int]
) -> dict[int, int]:
    """The fence's check of the range ids it read (``current``: shard -> range id of
    the rows found) against the tokens; see ``check_fence_txn``."""
    for shard, held in sorted(tokens.items()):
        actual = current.get(shard, INITIAL_RANGE_ID)
        for token in held:
            if token != actual:
                raise ShardOwnershipLostError(shard, token, actual, "refused by the fence")
    return {shard: current.get(shard, INITIAL_RANGE_ID) for shard in tokens}


def held_shards_txn(conn: Connection, tokens: Mapping[int, int]) -> list[int]:
    """The shards of ``tokens`` (shard -> range id) whose row still has that range id,
    read in the caller's transaction: a recovery read that scans a shard's rows in the
    same transaction is ordered after the acquisition it is recovering for, so under
    SERIALIZABLE it cannot miss a write of the old owner that commits after it
    (``check_fence_txn``; without this read nothing but the clock would order the scan
    after the acquisition on CockroachDB, whose serializability is not strict)."""
    if not tokens:
        return []
    rows = conn.execute(_FENCE_QUERY, {"shards": sorted(tokens)})
    current = {row.shard_id: row.range_id for row in rows}
    return [shard for shard, token in sorted(tokens.items()) if current.get(shard) == token]


def heartbeat_txn(conn: Connection, member: MemberRecord) -> bool:
    """Refresh the node's membership row; False if it has none yet."""
    t = s.cluster_members
    result = conn.execute(
        update(t)
        .where(t.c.node_id == member.node_id)
        .values(address=member.address, heartbeat_at=member.heartbeat_at)
    )
    return bool(result.rowcount == 1)


def join_txn(conn: Connection, member: MemberRecord) -> None:
    """Insert the node's membership row (IntegrityError if a concurrent heartbeat of
    the same node id inserted it: it is fresh then)."""
    conn.execute(
        insert(s.cluster_members).values(
            node_id=member.node_id,
            address=member.address,
            heartbeat_at=member.heartbeat_at,
            started_at=member.started_at,
        )
    )


def list_members_txn(conn: Connection) -> list[MemberRecord]:
    t = s.cluster_members
    return [
        MemberRecord(r.node_id, r.address, r.heartbeat_at, r.started_at)
        for r in conn.execute(select(t).order_by(t.c.node_id))
    ]


def leave_txn(conn: Connection, node_id: str) -> None:
    conn.execute(delete(s.cluster_members).where(s.cluster_members.c.node_id == node_id))
