"""Durable schedule state: the ``schedules`` rows and each schedule's action ledger.

The scheduler (``tideflow.server._schedules``) owns the logic; this module owns the
SQL. Two rules make firing exactly-once per slot:

- ``schedules.last_slot`` is the latest slot whose fate is decided. Deciding slots
  writes their ledger rows and advances ``last_slot`` in one transaction, guarded by
  the row's ``version`` (compare-and-set), so a slot is decided once even if two
  scheduler loops race or one crashes mid-way.
- A ledger row's primary key is the slot (``s:<micros>``) or the trigger's request id
  (``t:<request id>``): it cannot be recorded twice. A row is written PENDING before
  its workflow is started, and the start uses a request id derived from the row's
  key, so a start retried after a crash finds the run it already created.

With several server nodes, a schedule lives on a shard (``schedule_shard``: its
namespace and id hashed as a run's workflow id is, ``_cluster.shard_of``) and the
node holding that shard's lease fires it. The scheduler's writes (decisions, ledger
updates, pruning: ``fenced=True``) check the shard's range id in their transaction,
like a run's transitions, so a node that lost the shard cannot commit them; the
version and state guards above stay the exactly-once safety net. The RPC-side writes
(create, pause, trigger, delete) are not fenced: any node serves them, and they are
compare-and-set or keyed writes that are correct whoever makes them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, TypeVar

from sqlalchemy import Connection, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from . import _schema as s
from ._cluster import check_fence_txn, shard_of
from ._dialects import Runner
from ._errors import ShardOwnershipLostError

T = TypeVar("T")


class ScheduleActionState(IntEnum):
    """The fate of one slot or trigger of a schedule."""

    PENDING = 1  # decided to start; the start may or may not have happened yet
    BUFFERED = 2  # waits for the running workflow to close (BUFFER_ONE / BUFFER_ALL)
    STARTED = 3
    SKIPPED_CATCHUP = 4  # missed by more than the catch-up window
    SKIPPED_OVERLAP = 5  # the overlap policy dropped it
    FAILED = 6  # the start was refused (for example the workflow id was taken)
    # A trigger as recorded by whichever node served it; the schedule's owner gives it
    # its fate (the overlap policy reads the schedule's occupancy, which only the owner
    # may read and act on without a race).
    REQUESTED = 7


class ScheduleActionKind(IntEnum):
    SCHEDULED = 1  # a slot of the spec
    TRIGGERED = 2  # "trigger now"


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleRecord:
    namespace: str
    schedule_id: str
    definition: bytes  # a serialized tideflow.api.v1.Schedule
    paused: bool
    notes: str
    last_slot: int
    next_fire_at: int | None
    version: int
    created_at: int
    updated_at: int
    create_request_id: str
    action_count: int
    missed_catchup_count: int
    overlap_skipped_count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleActionRecord:
    namespace: str
    schedule_id: str
    action_key: str
    kind: ScheduleActionKind
    slot_time: int
    state: ScheduleActionState
    overlap: int  # the overlap policy this action obeys
    workflow_id: str = ""
    run_id: str = ""
    running: bool = False
    decided_at: int = 0
    started_at: int | None = None
    error: str = ""


def slot_action_key(slot_micros: int) -> str:
    return f"s:{slot_micros:020d}"


def trigger_action_key(request_id: str) -> str:
    return f"t:{request_id}"


def schedule_shard(namespace: str, schedule_id: str, shard_count: int) -> int:
    """The shard whose owner fires the schedule (the hash of runs, over its id)."""
    return shard_of(namespace, schedule_id, shard_count)


def _schedule(row: Any) -> ScheduleRecord:
    m = row._mapping
    return ScheduleRecord(**{f.name: m[f.name] for f in fields(ScheduleRecord)})


def _action(row: Any) -> ScheduleActionRecord:
    m = row._mapping
    values = {f.name: m[f.name] for f in fields(ScheduleActionRecord)}
    values["kind"] = ScheduleActionKind(values["kind"])
    values["state"] = ScheduleActionState(values["state"])
    values["running"] = bool(values["running"])
    return ScheduleActionRecord(**values)


def _action_row(a: ScheduleActionRecord) -> dict[str, Any]:
    row = {f.name: getattr(a, f.name) for f in fields(ScheduleActionRecord)}
    row["kind"] = int(a.kind)
    row["state"] = int(a.state)
    return row


class ScheduleStore:
    """Async access to schedules; every method is one transaction or one read."""

    def __init__(
        self,
        runner: Runner,
        shard_count: int,
        *,
        token_of: Callable[[int], int | None],
        refused: Callable[[ShardOwnershipLostError], None],
    ) -> None:
        self._runner = runner
        self.shard_count = shard_count
        # The fence (HistoryStore.shard_token / on_fenced): the range id this node
        # holds a shard with (None: unfenced), and whom to tell about a refused write.
        self._token_of = token_of
        self._refused = refused

    def shard_of(self, namespace: str, schedule_id: str) -> int:
        return schedule_shard(namespace, schedule_id, self.shard_count)

    async def _write(
        self, namespace: str, schedule_id: str, fenced: bool, fn: Callable[[Connection], T]
    ) -> T:
        """``fn`` in one write transaction; ``fenced``: checked against the range id
        of the schedule's shard in the same transaction (ShardOwnershipLostError, and
        nothing written, if this node does not hold it any more)."""
        shard = self.shard_of(namespace, schedule_id)
        token = self._token_of(shard) if fenced else None
        if token is None:
            return await self._runner.write(fn)
        tokens = {shard: {token}}

        def txn(conn: Connection) -> T:
            check_fence_txn(conn, tokens)
            return fn(conn)

        try:
            return await self._runner.write(txn)
        except ShardOwnershipLostError as exc:
            self._refused(exc)
            raise

    # ---------------------------------------------------------------- schedules

    async def create(self, record: ScheduleRecord) -> ScheduleRecord | None:
        """Insert a schedule; None if one with this id exists (the caller compares
        request ids to tell a retried create from a conflict)."""
        row = {f.name: getattr(record, f.name) for f in fields(ScheduleRecord)}
        row["shard_id"] = self.shard_of(record.namespace, record.schedule_id)
        try:
            await self._runner.write(lambda conn: conn.execute(insert(s.schedules).values(row)))
        except IntegrityError:
            return None
        return record

    async def get(self, namespace: str, schedule_id: str) -> ScheduleRecord | None:
        """The schedule's row, or None."""
        t = s.schedules
        query = select(t).where(t.c.namespace == namespace, t.c.schedule_id == schedule_id)
        row = await self._runner.read(lambda conn: conn.execute(query).first())
        return None if row is None else _schedule(row)

    async def list_schedules(
        self, namespace: str, *, after_id: str = "", limit: int = 1000
    ) -> list[ScheduleRecord]:
        """Schedules in id order, starting after ``after_id``."""
        t = s.schedules
        query = (
            select(t)
            .where(t.c.namespace == namespace, t.c.schedule_id > after_id)
            .order_by(t.c.schedule_id)
            .limit(limit)
        )
        rows = await self._runner.read(lambda conn: conn.execute(query).all())
        return [_schedule(r) for r in rows]

    async def update(
        self, namespace: str, schedule_id: str, expected_version: int, **values: Any
    ) -> bool:
        """Compare-and-set update of a schedule row; False if it changed meanwhile."""
        t = s.schedules
        query = (
            update(t)
            .where(
                t.c.namespace == namespace,
                t.c.schedule_id == schedule_id,
                t.c.version == expected_version,
            )
            .values(version=expected_version + 1, **values)
        )
        result = await self._runner.write(lambda conn: conn.execute(query))
        return bool(result.rowcount == 1)

    async def delete(self, namespace: str, schedule_id: str) -> bool:
        """Delete a schedule and its ledger; False if there was none."""

        def txn(conn: Connection) -> bool:
            t, a = s.schedules, s.schedule_actions
            conn.execute(
                delete(a).where(a.c.namespace == namespace, a.c.schedule_id == schedule_id)
            )
            result = conn.execute(
                delete(t).where(t.c.namespace == namespace, t.c.schedule_id == schedule_id)
            )
            return bool(result.rowcount == 1)

        return await self._runner.write(txn)

    async def due(
        self, now: int, *, shards: Collection[int] | None = None, limit: int = 100
    ) -> list[ScheduleRecord]:
        """Unpaused schedules (of ``shards`` only, if given) whose next slot is due at
        ``now``."""
        t = s.schedules
        query = (
            select(t)
            .where(t.c.paused.is_(False), t.c.next_fire_at.is_not(None), t.c.next_fire_at <= now)
            .order_by(t.c.next_fire_at)
            .limit(limit)
        )
        if shards is not None:
            query = query.where(t.c.shard_id.in_(sorted(shards)))
        rows = await self._runner.read(lambda conn: conn.execute(query).all())
        return [_schedule(r) for r in rows]

    async def next_due(self, *, shards: Collection[int] | None = None) -> int | None:
        """The earliest next slot of any unpaused schedule (of ``shards`` only, if
        given)."""
        t = s.schedules
        query = select(func.min(t.c.next_fire_at)).where(t.c.paused.is_(False))
        if shards is not None:
            query = query.where(t.c.shard_id.in_(sorted(shards)))
        value = await self._runner.read(lambda conn: conn.execute(query).scalar())
        return None if value is None else int(value)

    async def decide(
        self,
        record: ScheduleRecord,
        actions: Sequence[ScheduleActionRecord],
        *,
        last_slot: int,
        next_fire_at: int | None,
        missed_catchup: int,
        overlap_skipped: int,
        now: int,
        fenced: bool = False,
    ) -> bool:
        """Record the fate of slots and advance ``last_slot``, in one transaction;
        False (and nothing written) if the schedule changed since ``record`` was read."""

        def txn(conn: Connection) -> bool:
            t = s.schedules
            result = conn.execute(
                update(t)
                .where(
                    t.c.namespace == record.namespace,
                    t.c.schedule_id == record.schedule_id,
                    t.c.version == record.version,
                )
                .values(
                    version=record.version + 1,
                    last_slot=last_slot,
                    next_fire_at=next_fire_at,
                    missed_catchup_count=t.c.missed_catchup_count + missed_catchup,
                    overlap_skipped_count=t.c.overlap_skipped_count + overlap_skipped,
                    updated_at=now,
                )
            )
            if result.rowcount != 1:
                return False
            if actions:
                conn.execute(insert(s.schedule_actions), [_action_row(a) for a in actions])
            return True

        return await self._write(record.namespace, record.schedule_id, fenced, txn)

    # ------------------------------------------------------------------ ledger

    async def add_action(self, action: ScheduleActionRecord) -> bool:
        """Record a trigger; False if this request was recorded before (a retry) or
        the schedule is gone."""

        def txn(conn: Connection) -> bool:
            t = s.schedules
            # An update, not a read: it holds the schedule's row until the commit, so a
            # delete cannot slip in between and leave the trigger behind.
            result = conn.execute(
                update(t)
                .where(t.c.namespace == action.namespace, t.c.schedule_id == action.schedule_id)
                .values(updated_at=action.decided_at)
            )
            if result.rowcount != 1:
                return False
            conn.execute(insert(s.schedule_actions).values(_action_row(action)))
            return True

        try:
            return await self._runner.write(txn)
        except IntegrityError:
            return False

    async def actions(
        self,
        namespace: str,
        schedule_id: str,
        *,
        states: Sequence[ScheduleActionState] = (),
        running_only: bool = False,
        newest_first: bool = False,
        limit: int | None = None,
    ) -> list[ScheduleActionRecord]:
        """Ledger rows of a schedule, by slot time (oldest first unless told)."""
        a = s.schedule_actions
        query = select(a).where(a.c.namespace == namespace, a.c.schedule_id == schedule_id)
        if states:
            query = query.where(a.c.state.in_([int(x) for x in states]))
        if running_only:
            query = query.where(a.c.running.is_(True))
        order = (
            (a.c.slot_time.desc(), a.c.action_key.desc())
            if newest_first
            else (
                a.c.slot_time.asc(),
                a.c.action_key.asc(),
            )
        )
        query = query.order_by(*order)
        if limit is not None:
            query = query.limit(limit)
        rows = await self._runner.read(lambda conn: conn.execute(query).all())
        return [_action(r) for r in rows]

    async def count_actions(
        self, namespace: str, schedule_id: str, states: Sequence[ScheduleActionState]
    ) -> int:
        """How many ledger rows of a schedule are in these states."""
        a = s.schedule_actions
        query = (
            select(func.count())
            .select_from(a)
            .where(
                a.c.namespace == namespace,
                a.c.schedule_id == schedule_id,
                a.c.state.in_([int(x) for x in states]),
            )
        )
        return int(await self._runner.read(lambda conn: conn.execute(query).scalar_one()))

    async def schedules_with_actions(
        self,
        states: Sequence[ScheduleActionState],
        *,
        shards: Collection[int] | None = None,
        limit: int = 1000,
    ) -> list[tuple[str, str]]:
        """(namespace, schedule id) of schedules (of ``shards`` only, if given) with
        ledger rows in these states."""
        a, t = s.schedule_actions, s.schedules
        query = (
            select(a.c.namespace, a.c.schedule_id)
            .where(a.c.state.in_([int(x) for x in states]))
            .distinct()
            .limit(limit)
        )
        if shards is not None:
            query = query.join(
                t, (t.c.namespace == a.c.namespace) & (t.c.schedule_id == a.c.schedule_id)
            ).where(t.c.shard_id.in_(sorted(shards)))
        rows = await self._runner.read(lambda conn: conn.execute(query).all())
        return [(r.namespace, r.schedule_id) for r in rows]

    async def set_action(
        self,
        action: ScheduleActionRecord,
        *,
        expected_state: ScheduleActionState | None = None,
        count_action: bool = False,
        count_overlap_skipped: bool = False,
        fenced: bool = False,
        **values: Any,
    ) -> bool:
        """Update one ledger row (only if still in ``expected_state``), and the
        schedule's counters with it; False if the row is gone or moved on."""
        if "state" in values:
            values["state"] = int(values["state"])

        def txn(conn: Connection) -> bool:
            a = s.schedule_actions
            query = update(a).where(
                a.c.namespace == action.namespace,
                a.c.schedule_id == action.schedule_id,
                a.c.action_key == action.action_key,
            )
            if expected_state is not None:
                query = query.where(a.c.state == int(expected_state))
            if conn.execute(query.values(**values)).rowcount != 1:
                return False
            if count_action or count_overlap_skipped:
                t = s.schedules
                conn.execute(
                    update(t)
                    .where(
                        t.c.namespace == action.namespace,
                        t.c.schedule_id == action.schedule_id,
                    )
                    .values(
                        action_count=t.c.action_count + int(count_action),
                        overlap_skipped_count=t.c.overlap_skipped_count
                        + int(count_overlap_skipped),
                    )
                )
            return True

        return await self._write(action.namespace, action.schedule_id, fenced, txn)

    async def prune(
        self, namespace: str, schedule_id: str, *, keep: int, fenced: bool = False
    ) -> int:
        """Delete finished ledger rows beyond the newest ``keep`` (rows of open runs
        and of actions not yet started stay); returns how many were deleted."""
        a = s.schedule_actions
        finished = [
            int(x)
            for x in (
                ScheduleActionState.STARTED,
                ScheduleActionState.SKIPPED_CATCHUP,
                ScheduleActionState.SKIPPED_OVERLAP,
                ScheduleActionState.FAILED,
            )
        ]

        def txn(conn: Connection) -> int:
            mine = (a.c.namespace == namespace, a.c.schedule_id == schedule_id)
            cutoff = conn.execute(
                select(a.c.slot_time)
                .where(*mine)
                .order_by(a.c.slot_time.desc())
                .offset(keep)
                .limit(1)
            ).scalar()
            if cutoff is None:
                return 0
            result = conn.execute(
                delete(a).where(
                    *mine,
                    a.c.slot_time <= cutoff,
                    a.c.state.in_(finished),
                    a.c.running.is_(False),
                )
            )
            return int(result.rowcount)

        return await self._write(namespace, schedule_id, fenced, txn)
