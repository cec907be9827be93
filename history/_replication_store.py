"""What sites store for replication (tla/Replication.tla): replicas, inbox, alarms.

A replica of a run homed at another site lives in ``executions`` and
``history_events`` like any run, so list, count, describe and history serve it
unchanged; it is read-only because its mutable state names another home (the engine
refuses to write it). ``append_replicated`` is the only way it grows: one transaction
that applies a batch of the home's events only where it continues the replica
(``DeliverEvents``), with the run's state when the batch reaches the home's last event.

The inbox (``site_inbox``) holds signals, cancels and terminates that reached this
site for a run homed elsewhere: a set keyed by (namespace, request id, kind), merged
by union (a duplicate insert is a no-op), an entry removed only once the replica shows
its effect (``ForwardSignal`` keeps it until then).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from tideflow.api.v1.history_pb2 import HistoryEvent
from tideflow.api.v1.state_pb2 import MutableState

from . import _schema as s
from ._dialects import Runner
from ._records import RunKey
from ._visibility_store import index_events

T = TypeVar("T")
FencedWrite = Callable[[RunKey, Callable[[Connection], Any]], Awaitable[Any]]


class ReplicaVerdict(enum.Enum):
    """What ``append_replicated`` did with a batch."""

    APPLIED = "applied"  # the replica grew
    STALE = "stale"  # nothing new (a duplicate or older batch): no change
    GAP = "gap"  # starts after the replica's end: pull again from there
    MISMATCH = "mismatch"  # an overlapping event differs: alarm, nothing applied


@dataclass(frozen=True, slots=True)
class ServedRun:
    key: RunKey
    last_event_id: int
    home_cluster: str


@dataclass(frozen=True, slots=True)
class InboxEntry:
    namespace: str
    request_id: str
    kind: int
    workflow_id: str
    run_id: str
    request: bytes
    received_at: int
    attempts: int


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    peer: str
    home_last_event_id: int
    synced_at: int


def home_of(ms: MutableState, local: str) -> str:
    """The run's home: a run from before sites existed is homed where it is stored."""
    return ms.home_cluster or local


def _key_of(row: Any) -> RunKey:
    return RunKey(namespace=row.namespace, workflow_id=row.workflow_id, run_id=row.run_id)


def _run_filter(table: Any, key: RunKey) -> Any:
    return and_(
        table.c.namespace == key.namespace,
        table.c.workflow_id == key.workflow_id,
        table.c.run_id == key.run_id,
    )


def _last_event_id_txn(conn: Connection, key: RunKey) -> int:
    h = s.history_events
    value = conn.execute(select(func.max(h.c.event_id)).where(_run_filter(h, key))).scalar()
    return int(value or 0)


class ReplicationStore:
    """Replicas, the inbox and the alarms, on the store's database. Writes of a run's
    rows go through ``fenced`` (``HistoryStore.fenced_write``): the fence of the run's
    shard is checked in the same transaction, as for any transition."""

    def __init__(self, runner: Runner, fenced: FencedWrite) -> None:
        self._runner = runner
        self._fenced = fenced

    # ------------------------------------------------------------ serving a peer

    async def runs_served(
        self, homes: set[str], local: str, after: RunKey | None, limit: int
    ) -> tuple[list[ServedRun], RunKey | None]:
        """Runs homed at one of ``homes``, in key order after ``after``: a page of at
        most ``limit`` rows looked at, and the cursor of the next page (None: done)."""
        e = s.executions
        query = select(e.c.namespace, e.c.workflow_id, e.c.run_id, e.c.history_length, e.c.state)
        if after is not None:
            query = query.where(
                or_(
                    e.c.namespace > after.namespace,
                    and_(e.c.namespace == after.namespace, e.c.workflow_id > after.workflow_id),
                    and_(
                        e.c.namespace == after.namespace,
                        e.c.workflow_id == after.workflow_id,
                        e.c.run_id > after.run_id,
                    ),
                )
            )
        query = query.order_by(e.c.namespace, e.c.workflow_id, e.c.run_id).limit(limit)
        rows = await self._runner.read(lambda conn: conn.execute(query).all())
        served = []
        for row in rows:
            home = home_of(MutableState.FromString(row.state), local)
            if home in homes:
                served.append(ServedRun(_key_of(row), row.history_length, home))
        if len(rows) < limit:
            return served, None
        return served, _key_of(rows[-1])

    async def runs_to_take_over(self, local: str) -> list[RunKey]:
        """Runs this site's replica names it home for, under an epoch it has not
        activated (handed here while it could not take them over)."""
        e = s.executions
        query = select(e.c.namespace, e.c.workflow_id, e.c.run_id, e.c.state)
        rows = await self._runner.read(lambda conn: conn.execute(query).all())
        keys = []
        for row in rows:
            ms = MutableState.FromString(row.state)
            if home_of(ms, local) == local and ms.activated_version < ms.version:
                keys.append(_key_of(row))
        return keys

    async def read_batch(
        self, key: RunKey, first_event_id: int, max_events: int
    ) -> tuple[list[HistoryEvent], bytes | None, int]:
        """Events ``first_event_id``.. (at most ``max_events``), the run's state if the
        batch reaches its last event (read in the same transaction, so they match),
        and the run's last event id."""
        h = s.history_events
        e = s.executions
        events_query = (
            select(h.c.data)
            .where(_run_filter(h, key), h.c.event_id >= first_event_id)
            .order_by(h.c.event_id)
            .limit(max_events)
        )
        state_query = select(e.c.state, e.c.history_length).where(_run_filter(e, key))

        def txn(conn: Connection) -> tuple[list[HistoryEvent], bytes | None, int]:
            # Events first, then the state: under READ COMMITTED (PostgreSQL) each
            # statement sees its own snapshot, so a commit in between can only make
            # the state newer than the events (the batch then does not "reach" and the
            # replica pulls again). The other order could return events newer than
            # the state and call the batch complete without a state: the replica kept
            # the events and never got the state (found by the replication trace test).
            events = [HistoryEvent.FromString(r[0]) for r in conn.execute(events_query)]
            row = conn.execute(state_query).first()
            if row is None:
                return [], None, 0
            last = int(row.history_length)
            reaches = (bool(events) and events[-1].event_id == last) or first_event_id > last
            return events, (row.state if reaches else None), last

        return await self._runner.read(txn)

    # ------------------------------------------------------------ the replica

    async def last_event_ids(self, keys: Sequence[RunKey]) -> dict[RunKey, int]:
        """The last event id of each run's history here (0: none)."""

        def txn(conn: Connection) -> dict[RunKey, int]:
            return {key: _last_event_id_txn(conn, key) for key in keys}

        return await self._runner.read(txn)

    async def append_replicated(
        self,
        key: RunKey,
        events: Sequence[HistoryEvent],
        state: bytes | None,
        *,
        local: str,
        peer: str,
        home_last_event_id: int,
        now: int,
    ) -> tuple[ReplicaVerdict, str]:
        """Apply a batch of the home's events to this site's replica of ``key``, in
        one fenced transaction, only where it continues the replica; and the run's
        state when given (it matches the batch's last event). A mismatch is recorded
        as an alarm and nothing else is written. Returns the verdict and a detail."""

        def txn(conn: Connection) -> tuple[ReplicaVerdict, str]:
            verdict = _check_continues(conn, key, events, local)
            if verdict[0] is ReplicaVerdict.MISMATCH:
                _record_alarm(conn, key, events, peer, now, verdict[1])
                return verdict
            if verdict[0] is ReplicaVerdict.GAP:
                return verdict
            have = _last_event_id_txn(conn, key)
            fresh = [e for e in events if e.event_id > have]
            if fresh:
                conn.execute(
                    insert(s.history_events),
                    [
                        {
                            "namespace": key.namespace,
                            "workflow_id": key.workflow_id,
                            "run_id": key.run_id,
                            "event_id": e.event_id,
                            "event_type": e.event_type,
                            "data": e.SerializeToString(),
                        }
                        for e in fresh
                    ],
                )
                # Memo and search attributes, as the home indexed them.
                index_events(conn, key, fresh)
            last = fresh[-1].event_id if fresh else have
            # A duplicate batch leaves a state that already matches its events alone.
            behind = bool(fresh) or _state_behind(conn, key, last)
            wrote_state = state is not None and behind and _write_state(conn, key, state, last)
            _note_sync(conn, key, peer, home_last_event_id, now)
            if not fresh and not wrote_state:
                return ReplicaVerdict.STALE, ""
            return ReplicaVerdict.APPLIED, ""

        result: tuple[ReplicaVerdict, str] = await self._fenced(key, txn)
        return result

    async def replica_info(self, key: RunKey) -> ReplicaInfo | None:
        r = s.replica_runs
        query = select(r.c.peer, r.c.home_last_event_id, r.c.synced_at).where(_run_filter(r, key))
        row = await self._runner.read(lambda conn: conn.execute(query).first())
        return None if row is None else ReplicaInfo(row.peer, row.home_last_event_id, row.synced_at)

    async def note_listing(self, key: RunKey, peer: str, home_last_event_id: int) -> None:
        """The peer's listing says its run ``key`` has ``home_last_event_id`` events."""
        r = s.replica_runs
        stmt = (
            update(r)
            .where(_run_filter(r, key))
            .values(peer=peer, home_last_event_id=home_last_event_id)
        )
        await self._runner.write(lambda conn: conn.execute(stmt))

    async def lag_by_peer(self) -> dict[str, tuple[int, int, int]]:
        """peer -> (runs behind, events behind, newest sync time) over its replicas."""
        r = s.replica_runs
        e = s.executions
        query = select(r.c.peer, r.c.home_last_event_id, r.c.synced_at, e.c.history_length).join(
            e,
            and_(
                e.c.namespace == r.c.namespace,
                e.c.workflow_id == r.c.workflow_id,
                e.c.run_id == r.c.run_id,
            ),
        )
        rows = await self._runner.read(lambda conn: conn.execute(query).all())
        lag: dict[str, tuple[int, int, int]] = {}
        for row in rows:
            runs, behind, synced = lag.get(row.peer, (0, 0, 0))
            gap = max(0, row.home_last_event_id - row.history_length)
            lag[row.peer] = (runs + (gap > 0), behind + gap, max(synced, row.synced_at))
        return lag

    # ------------------------------------------------------------ alarms

    async def alarms(self, limit: int = 10) -> tuple[int, list[str]]:
        a = s.replication_alarms
        count_query = select(func.count()).select_from(a)
        recent = select(a).order_by(a.c.detected_at.desc()).limit(limit)

        def txn(conn: Connection) -> tuple[int, list[str]]:
            count = int(conn.execute(count_query).scalar() or 0)
            lines = [
                f"{r.namespace}/{r.workflow_id}/{r.run_id} event {r.event_id} from {r.peer}: "
                f"{r.detail}"
                for r in conn.execute(recent)
            ]
            return count, lines

        return await self._runner.read(txn)

    # ------------------------------------------------------------ the inbox

    async def put_inbox(self, entry: InboxEntry) -> bool:
        """Store a request (union: a request id already there is kept as it is);
        True if it is new."""
        stmt = insert(s.site_inbox).values(
            namespace=entry.namespace,
            request_id=entry.request_id,
            kind=entry.kind,
            workflow_id=entry.workflow_id,
            run_id=entry.run_id,
            request=entry.request,
            received_at=entry.received_at,
            forwarded_at=None,
            attempts=0,
        )
        try:
            await self._runner.write(lambda conn: conn.execute(stmt))
        except IntegrityError:
            return False
        return True

    async def inbox(self, limit: int = 500) -> list[InboxEntry]:
        i = s.site_inbox
        query = select(i).order_by(i.c.received_at).limit(limit)
        rows = await self._runner.read(lambda conn: conn.execute(query).all())
        return [
            InboxEntry(
                namespace=r.namespace,
                request_id=r.request_id,
                kind=r.kind,
                workflow_id=r.workflow_id,
                run_id=r.run_id,
                request=r.request,
                received_at=r.received_at,
                attempts=r.attempts,
            )
            for r in rows
        ]

    async def inbox_depth(self) -> int:
        query = select(func.count()).select_from(s.site_inbox)

        def txn(conn: Connection) -> int:
            return int(conn.execute(query).scalar() or 0)

        return await self._runner.read(txn)

    async def note_forwarded(self, entry: InboxEntry, now: int) -> None:
        i = s.site_inbox
        stmt = (
            update(i)
            .where(_inbox_filter(entry))
            .values(forwarded_at=now, attempts=i.c.attempts + 1)
        )
        await self._runner.write(lambda conn: conn.execute(stmt))

    async def retire(self, entry: InboxEntry) -> None:
        """Drop an entry whose effect the replica shows (or that can never apply)."""
        stmt = delete(s.site_inbox).where(_inbox_filter(entry))
        await self._runner.write(lambda conn: conn.execute(stmt))


def _inbox_filter(entry: InboxEntry) -> Any:
    i = s.site_inbox
    return and_(
        i.c.namespace == entry.namespace,
        i.c.request_id == entry.request_id,
        i.c.kind == entry.kind,
    )


def _check_continues(
    conn: Connection, key: RunKey, events: Sequence[HistoryEvent], local: str
) -> tuple[ReplicaVerdict, str]:
    """Replication.tla ``Continues``: no gap, and every event the replica already has
    equal to the batch's. A site that is itself the run's home takes no events from a
    peer beyond its own (a peer holding more would be a fork)."""
    if not events:
        return ReplicaVerdict.STALE, ""
    have = _last_event_id_txn(conn, key)
    first = events[0].event_id
    if first > have + 1:
        return ReplicaVerdict.GAP, f"batch starts at {first}, replica ends at {have}"
    h = s.history_events
    overlap = [e for e in events if e.event_id <= have]
    if overlap:
        stored = {
            r.event_id: r.data
            for r in conn.execute(
                select(h.c.event_id, h.c.data).where(
                    _run_filter(h, key),
                    h.c.event_id >= overlap[0].event_id,
                    h.c.event_id <= overlap[-1].event_id,
                )
            )
        }
        for event in overlap:
            if HistoryEvent.FromString(stored[event.event_id]) != event:
                return (
                    ReplicaVerdict.MISMATCH,
                    f"event {event.event_id} differs from the one stored",
                )
    if events[-1].event_id > have:
        state = conn.execute(select(s.executions.c.state).where(_run_filter(s.executions, key)))
        row = state.first()
        if row is not None and home_of(MutableState.FromString(row[0]), local) == local:
            return (
                ReplicaVerdict.MISMATCH,
                f"the run is homed here, the peer has events after {have}",
            )
    return ReplicaVerdict.APPLIED, ""


def _record_alarm(
    conn: Connection,
    key: RunKey,
    events: Sequence[HistoryEvent],
    peer: str,
    now: int,
    detail: str,
) -> None:
    a = s.replication_alarms
    exists = conn.execute(
        select(a.c.event_id).where(_run_filter(a, key), a.c.event_id == events[0].event_id)
    ).first()
    if exists is None:
        conn.execute(
            insert(a).values(
                namespace=key.namespace,
                workflow_id=key.workflow_id,
                run_id=key.run_id,
                event_id=events[0].event_id,
                peer=peer,
                detected_at=now,
                detail=detail,
            )
        )


def _write_state(conn: Connection, key: RunKey, state: bytes, last: int) -> bool:
    """Replace the replica's state with the home's, if it matches the events held
    (the state of event ``last``); the run becomes its workflow id's current run
    unless a newer run is. Returns whether it wrote."""
    ms = MutableState.FromString(state)
    if ms.next_event_id - 1 != last:
        return False
    e = s.executions
    values = {
        "workflow_type": ms.workflow_type.name,
        "task_queue": ms.task_queue.name,
        "status": ms.status,
        "start_time": ms.start_time.ToMicroseconds(),
        "close_time": ms.close_time.ToMicroseconds() if ms.HasField("close_time") else None,
        "history_length": last,
        "state": state,
    }
    found = conn.execute(select(e.c.db_version).where(_run_filter(e, key))).first()
    if found is None:
        conn.execute(
            insert(e).values(
                namespace=key.namespace,
                workflow_id=key.workflow_id,
                run_id=key.run_id,
                db_version=1,
                **values,
            )
        )
    else:
        conn.execute(
            update(e).where(_run_filter(e, key)).values(db_version=e.c.db_version + 1, **values)
        )
    _point_current(conn, key, ms)
    return True


def _state_behind(conn: Connection, key: RunKey, last: int) -> bool:
    """Whether the replica has no state yet, or one of fewer events than ``last``."""
    e = s.executions
    length = conn.execute(select(e.c.history_length).where(_run_filter(e, key))).scalar()
    return length is None or length < last


def _point_current(conn: Connection, key: RunKey, ms: MutableState) -> None:
    c = s.current_executions
    where = and_(c.c.namespace == key.namespace, c.c.workflow_id == key.workflow_id)
    row = conn.execute(select(c.c.run_id).where(where)).first()
    values = {"run_id": key.run_id, "status": ms.status, "start_request_id": ms.start_request_id}
    if row is None:
        conn.execute(
            insert(c).values(namespace=key.namespace, workflow_id=key.workflow_id, **values)
        )
        return
    if row.run_id != key.run_id:
        e = s.executions
        other = conn.execute(
            select(e.c.start_time).where(
                e.c.namespace == key.namespace,
                e.c.workflow_id == key.workflow_id,
                e.c.run_id == row.run_id,
            )
        ).scalar()
        if other is not None and other > ms.start_time.ToMicroseconds():
            return  # a newer run of the workflow id is current here
    conn.execute(update(c).where(where).values(**values))


def _note_sync(conn: Connection, key: RunKey, peer: str, home_last: int, now: int) -> None:
    r = s.replica_runs
    updated = conn.execute(
        update(r)
        .where(_run_filter(r, key))
        .values(peer=peer, home_last_event_id=home_last, synced_at=now)
    )
    if updated.rowcount == 0:
        conn.execute(
            insert(r).values(
                namespace=key.namespace,
                workflow_id=key.workflow_id,
                run_id=key.run_id,
                peer=peer,
                home_last_event_id=home_last,
                synced_at=now,
            )
        )
