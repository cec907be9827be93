"""Schedules: durable, server-side starts of a workflow on a cron or interval spec.

A schedule is a row in the store (``history/_schedule_store.py``) plus a ledger of
what happened to each of its slots. Each schedule lives on a shard (its namespace and
id hashed like a run's workflow id), and the node holding that shard's lease drives
it: the ``Scheduler`` of a node loads only the schedules of the shards it holds, picks
a shard's schedules up when the node acquires it (``wake``), and no longer sees them
once the shard is gone (their writes from then on are refused by the fence). Two
loops in one TaskGroup run the steps below; a lock per schedule keeps its decisions,
starts and trigger decisions from reading its occupancy at the same time:

1. **Decide.** For each schedule whose next slot is due, every slot between the last
   decided one and now gets its fate: PENDING (start it), BUFFERED (overlap policy
   BUFFER_ONE / BUFFER_ALL, a run is still open), SKIPPED_OVERLAP (SKIP, or a full
   buffer) or SKIPPED_CATCHUP (the server was down and the slot is older than the
   catch-up window). The ledger rows and the advance of ``last_slot`` commit in one
   compare-and-set transaction, so each slot is decided exactly once, even across a
   crash (the next slot is always computed from the persisted ``last_slot``).
2. **Act.** A PENDING row is started with workflow id ``<action id>-<slot RFC 3339>``
   and a request id derived from the schedule and the slot, then marked STARTED. A
   crash between the two is harmless: after a restart the row is still PENDING, and
   starting it again returns the run the first attempt created (the engine
   de-duplicates starts by request id). BUFFERED rows become PENDING when the runs
   the schedule started have closed; CANCEL_OTHER / TERMINATE_OTHER first cancel or
   terminate those runs.

The decision and the ledger updates are fenced by the range id of the schedule's
shard (a node that lost the shard commits none of them), and the version guard on
``last_slot`` stays the safety net: even two nodes both believing they own a schedule
decide each slot once, and start its run once (the request id is the slot's).
A slot's run (its workflow id) hashes to any shard, not necessarily the schedule's:
the scheduler starts, cancels and terminates runs through ``ScheduledRuns``: by
default the engine's gateway (server/_run_gateway.py), which acts on this node's
engine, or on the owner of the run's shard once the server wired its router in.

The schedule RPCs (create, describe, patch, delete, list) are served by any node from
the store: their writes are compare-and-set or keyed, correct whoever makes them. The
owner notices a change made on another node on its next pass, which comes within
``_MAX_IDLE_S`` (a change made on the owner itself wakes it at once).

Triggers ("run now") are ledger rows keyed by their request id, so a retried trigger
fires once. Any node records one (REQUESTED); the owner's decide pass gives it its
fate under the overlap policy, as it does for slots, so two nodes never both see the
schedule free. Pausing stops decisions; unpausing resumes from now (slots that passed
while paused are not caught up). Scheduled runs carry the search attributes
``TemporalScheduledById`` and ``TemporalScheduledStartTime`` (Temporal's names), so
``list_workflows("TemporalScheduledById = 'my-schedule'")`` finds them.

Which slots a spec has (cron expressions via cronsim, time zones, intervals) is
``server/_cron.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from tideflow.api.v1 import service_pb2
from tideflow.api.v1.common_pb2 import WorkflowExecutionStatus as WS
from tideflow.api.v1.service_pb2 import ScheduleOverlapPolicy as OP
from tideflow.history import (
    HistoryStore,
    RunKey,
    ScheduleActionKind,
    ScheduleActionRecord,
    ScheduleActionState,
    ScheduleRecord,
    ShardOwnershipLostError,
    StoreError,
    datetime_of,
    encode_search_attribute,
    format_rfc3339,
    search_attributes_problem,
    slot_action_key,
    trigger_action_key,
)

from ._config import Clock
from ._cron import CompiledSpec
from ._cron import CronError as CronError  # re-exported: tests and tools import it from here
from ._cron import CronExpression as CronExpression
from ._engine import HistoryEngine
from ._errors import (
    InvalidArgumentError,
    ScheduleAlreadyExistsError,
    ScheduleNotFoundError,
    ServiceError,
    UnavailableError,
)
from ._failures import RateLimitedLog, log_retry

log = logging.getLogger("tideflow.server.schedules")

St = ScheduleActionState
_US = 1_000_000
DEFAULT_CATCHUP_WINDOW_US = 365 * 86_400 * _US
# Slots decided per schedule and pass; a long outage is worked off over several passes.
_MAX_SLOTS_PER_PASS = 1_000
# Finished ledger rows kept per schedule (older ones are pruned).
_LEDGER_KEEP = 200
_RECENT = 10
_RECENT_SKIPPED = 20
_FUTURE = 10
# How often runs are checked for having closed while actions wait on them.
_WAIT_POLL_S = 0.25
# Longest sleep between passes. A change made on this node wakes the loops at once; one
# made on another node (a schedule of our shards created, unpaused or triggered there)
# is seen on the next pass, so this bounds how late such a schedule can fire.
_MAX_IDLE_S = 1.0
# At most one warning per this many seconds about starts that failed and are retried
# (a run on another node's shard is refused until that shard comes here).
_START_LOG_S = 10.0
# Pause after a pass failed with an unexpected error.
_RETRY_S = 1.0
_MAX_ACTION_WORKFLOW_ID = 960
_IDENTITY = "tideflow-scheduler"
SCHEDULED_BY_ID = "TemporalScheduledById"
SCHEDULED_START_TIME = "TemporalScheduledStartTime"


# -------------------------------------------------------------------- scheduler


@contextlib.contextmanager
def _lost_shard_skipped(schedule_id: str) -> Iterator[None]:
    """The fence refused a write of this schedule: its shard went to another node
    (which goes on from what was committed). The pass goes on with the others."""
    try:
        yield
    except ShardOwnershipLostError as exc:
        log.info("schedule %s: left to its shard's new owner (%s)", schedule_id, exc)


def _overlap(policy: int) -> int:
    return policy or OP.SCHEDULE_OVERLAP_POLICY_SKIP


@dataclass(slots=True)
class _Occupancy:
    """What the overlap policy looks at: runs still open, actions not yet started."""

    running: int
    pending: int
    buffered: int

    def fate(self, overlap: int) -> ScheduleActionState:
        """The fate of a new action under ``overlap``; updates the counts."""
        busy = self.running > 0 or self.pending > 0
        if overlap == OP.SCHEDULE_OVERLAP_POLICY_SKIP and busy:
            return St.SKIPPED_OVERLAP
        if overlap == OP.SCHEDULE_OVERLAP_POLICY_BUFFER_ONE and busy:
            if self.buffered:
                return St.SKIPPED_OVERLAP
            self.buffered += 1
            return St.BUFFERED
        if overlap == OP.SCHEDULE_OVERLAP_POLICY_BUFFER_ALL and (busy or self.buffered):
            self.buffered += 1
            return St.BUFFERED
        self.pending += 1
        return St.PENDING


def _timestamp(micros: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMicroseconds(micros)
    return ts


def _request_id(namespace: str, schedule_id: str, action_key: str) -> str:
    digest = hashlib.sha256(f"{namespace}\0{schedule_id}\0{action_key}".encode()).hexdigest()
    return f"schedule-{digest[:48]}"


def validate_schedule(schedule: service_pb2.Schedule) -> CompiledSpec:
    """Check a schedule before it is stored; raises InvalidArgumentError."""
    spec = CompiledSpec.compile(schedule.spec)
    if not schedule.action.HasField("start_workflow"):
        raise InvalidArgumentError("schedule action must start a workflow")
    info = schedule.action.start_workflow
    if not info.workflow_id:
        raise InvalidArgumentError("schedule action: workflow_id is empty")
    if len(info.workflow_id) > _MAX_ACTION_WORKFLOW_ID:
        raise InvalidArgumentError(
            f"schedule action: workflow_id is longer than {_MAX_ACTION_WORKFLOW_ID} characters"
        )
    if not info.workflow_type.name:
        raise InvalidArgumentError("schedule action: workflow_type is empty")
    if not info.task_queue.name:
        raise InvalidArgumentError("schedule action: task_queue is empty")
    for name in ("workflow_execution_timeout", "workflow_run_timeout", "workflow_task_timeout"):
        if getattr(info, name).ToMicroseconds() < 0:
            raise InvalidArgumentError(f"schedule action: {name} must not be negative")
    if info.HasField("search_attributes"):
        problem = search_attributes_problem(info.search_attributes, allow_removal=False)
        if problem:
            raise InvalidArgumentError(f"schedule action: {problem}")
    policies = schedule.policies
    if policies.overlap_policy not in OP.values():
        raise InvalidArgumentError(f"unknown overlap policy {policies.overlap_policy}")
    if policies.catchup_window.ToMicroseconds() < 0:
        raise InvalidArgumentError("catchup_window must not be negative")
    return spec


def require_scheduler(scheduler: Scheduler | None) -> Scheduler:
    """The node's scheduler, or UNAVAILABLE if this server runs none."""
    if scheduler is None:
        raise UnavailableError("schedules are not running on this server")
    return scheduler


class ScheduledRuns(Protocol):
    """What the scheduler does to the runs it starts, wherever their shards are held
    (request ids make each call safe to repeat)."""

    async def start_workflow(self, request: service_pb2.StartWorkflowRequest) -> str:
        """Start the run (or find the one this request id started); its run id."""
        ...

    async def terminate(self, key: RunKey, reason: str, identity: str, request_id: str) -> None:
        """Terminate the run."""
        ...

    async def request_cancel(
        self, key: RunKey, identity: str, request_id: str, reason: str
    ) -> None:
        """Ask the run to cancel itself."""
        ...


class _ScheduleLocks:
    """One lock per schedule, held while its slots or triggers are decided or its
    actions started: each of these reads the schedule's occupancy (open runs,
    pending and buffered actions) and then writes the ledger, so two of them at once
    could both see a schedule free. Different schedules do not wait for each other.
    A lock is dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, namespace: str, schedule_id: str) -> AsyncIterator[None]:
        key = (namespace, schedule_id)
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class Scheduler:
    """Fires the schedules of this node's shards; also serves the schedule RPCs (of
    every shard: they read and write the store).

    ``owned`` says which shards the node holds now (read at every pass); None fires
    every schedule of the store (a store without shards, in tools and tests).
    ``runs`` starts and stops the scheduled runs (default: the engine's gateway).
    """

    @property
    def _runs(self) -> ScheduledRuns:
        # Read when used: tests that never start a run pass no engine.
        return self._given_runs or self._engine.gateway

    def __init__(
        self,
        store: HistoryStore,
        engine: HistoryEngine,
        clock: Clock,
        *,
        owned: Callable[[], Collection[int]] | None = None,
        runs: ScheduledRuns | None = None,
    ) -> None:
        self._store = store
        self._db = store.schedules
        self._engine = engine
        self._given_runs = runs
        self._clock = clock
        self._owned = owned
        self._locks = _ScheduleLocks()
        self._decide_wakeup = asyncio.Event()
        self._act_wakeup = asyncio.Event()
        self._start_log = RateLimitedLog(log, _START_LOG_S)

    def wake(self) -> None:
        """New work (a schedule created, unpaused or triggered, or a shard acquired
        with its schedules): run both passes now."""
        self._decide_wakeup.set()
        self._act_wakeup.set()

    def _shards(self) -> Collection[int] | None:
        return None if self._owned is None else set(self._owned())

    # ----------------------------------------------------------------- loops

    async def run(self) -> None:
        """Fire schedules until cancelled.

        Two loops, owned by this call's TaskGroup: one decides the slots that came
        due, the other starts the actions decided (and waits for runs to close where
        the overlap policy says so), so a slow start never delays a decision. Cancelling
        ``run`` cancels both and returns once they have stopped; the cancellation
        propagates, it is never swallowed.
        """
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(
                self._loop("decide", self._decide_due, self._decide_wakeup),
                name="tideflow-scheduler-decide",
            )
            tasks.create_task(
                self._loop("act", self._act_on_decided, self._act_wakeup),
                name="tideflow-scheduler-act",
            )

    async def _loop(
        self, name: str, one_pass: Callable[[], Awaitable[float]], wakeup: asyncio.Event
    ) -> None:
        while True:
            wakeup.clear()
            try:
                delay = await one_pass()
            except Exception as exc:  # a store hiccup must not stop the schedules for good
                log_retry(log, f"scheduler {name} pass", exc)
                delay = _RETRY_S
            if delay > 0:
                # The timeout only ends the wait: a cancellation of this task still
                # raises CancelledError out of asyncio.timeout.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await wakeup.wait()

    async def _decide_due(self) -> float:
        """Decide the slots of every due schedule; returns how long the decide loop
        may sleep (until the next slot is due, or at once if more are)."""
        now = self._clock.now_micros()
        shards = self._shards()
        more = decided = False
        for record in await self._db.due(now, shards=shards):
            async with self._locks.hold(record.namespace, record.schedule_id):
                with _lost_shard_skipped(record.schedule_id):
                    more |= await self._decide(record, now)
            decided = True
        for namespace, schedule_id in await self._db.schedules_with_actions(
            (St.REQUESTED,), shards=shards
        ):
            async with self._locks.hold(namespace, schedule_id):
                with _lost_shard_skipped(schedule_id):
                    await self._decide_triggers(namespace, schedule_id)
            decided = True
        if decided:
            self._act_wakeup.set()
        if more:
            return 0.0
        next_due = await self._db.next_due(shards=shards)
        if next_due is None:
            return _MAX_IDLE_S
        return min(_MAX_IDLE_S, max(0.0, (next_due - self._clock.now_micros()) / _US))

    async def _act_on_decided(self) -> float:
        """Start or release the open actions of every schedule; returns how long the
        act loop may sleep (briefly while an action waits for a run to close)."""
        waiting = False
        for namespace, schedule_id in await self._db.schedules_with_actions(
            (St.PENDING, St.BUFFERED), shards=self._shards()
        ):
            async with self._locks.hold(namespace, schedule_id):
                with _lost_shard_skipped(schedule_id):
                    waiting |= await self._act(namespace, schedule_id)
        return _WAIT_POLL_S if waiting else _MAX_IDLE_S

    async def _running(
        self, namespace: str, schedule_id: str, *, first_only: bool = False, fenced: bool = True
    ) -> list[ScheduleActionRecord]:
        """Started actions whose workflow (following continue-as-new) is still open,
        oldest first; ``first_only`` stops at the first one. Actions found closed are
        marked so, which keeps the next check short (``fenced``: a write of the
        schedule's owner; the RPCs, served by any node, mark without the fence)."""
        still: list[ScheduleActionRecord] = []
        for action in await self._db.actions(
            namespace, schedule_id, states=(St.STARTED,), running_only=True
        ):
            current = await self._store.get_current(namespace, action.workflow_id)
            if current is not None and current.status == WS.WORKFLOW_EXECUTION_STATUS_RUNNING:
                still.append(action)
                if first_only:
                    break
            else:
                await self._db.set_action(action, running=False, fenced=fenced)
        return still

    async def _occupancy(self, namespace: str, schedule_id: str, overlap: int) -> _Occupancy:
        if overlap == OP.SCHEDULE_OVERLAP_POLICY_ALLOW_ALL:
            return _Occupancy(0, 0, 0)  # nothing to look at: every action starts
        running = await self._running(namespace, schedule_id, first_only=True)
        pending = await self._db.count_actions(namespace, schedule_id, (St.PENDING,))
        buffered = await self._db.count_actions(namespace, schedule_id, (St.BUFFERED,))
        return _Occupancy(len(running), pending, buffered)

    async def _decide(self, record: ScheduleRecord, now: int) -> bool:
        """Decide the fate of the due slots of one schedule; True if more are due."""
        schedule = service_pb2.Schedule.FromString(record.definition)
        try:
            spec = CompiledSpec.compile(schedule.spec)
        except InvalidArgumentError as exc:
            log.error("schedule %s has an invalid spec (%s); not firing", record.schedule_id, exc)
            return False
        overlap = _overlap(schedule.policies.overlap_policy)
        catchup = schedule.policies.catchup_window.ToMicroseconds() or DEFAULT_CATCHUP_WINDOW_US
        occupancy = await self._occupancy(record.namespace, record.schedule_id, overlap)
        actions: list[ScheduleActionRecord] = []
        missed = skipped = 0
        last = record.last_slot
        more = False
        while True:
            slot = spec.next_after(last)
            if slot is None or slot > now:
                break
            if len(actions) >= _MAX_SLOTS_PER_PASS:
                more = True
                break
            last = slot
            if now - slot > catchup:
                state = St.SKIPPED_CATCHUP
                missed += 1
            else:
                state = occupancy.fate(overlap)
                skipped += state == St.SKIPPED_OVERLAP
            actions.append(
                ScheduleActionRecord(
                    namespace=record.namespace,
                    schedule_id=record.schedule_id,
                    action_key=slot_action_key(slot),
                    kind=ScheduleActionKind.SCHEDULED,
                    slot_time=slot,
                    state=state,
                    overlap=overlap,
                    decided_at=now,
                )
            )
        committed = await self._db.decide(
            record,
            actions,
            last_slot=last,
            next_fire_at=spec.next_after(last),
            missed_catchup=missed,
            overlap_skipped=skipped,
            now=now,
            fenced=True,
        )
        if not committed:
            return True  # changed meanwhile (paused, deleted, another node): look again
        if missed:
            log.info(
                "schedule %s: %d slot(s) up to %s missed the catch-up window; skipped",
                record.schedule_id,
                missed,
                format_rfc3339(max(a.slot_time for a in actions if a.state == St.SKIPPED_CATCHUP)),
            )
        await self._db.prune(record.namespace, record.schedule_id, keep=_LEDGER_KEEP, fenced=True)
        return more

    async def _decide_triggers(self, namespace: str, schedule_id: str) -> None:
        """Give the schedule's requested triggers their fate under their overlap
        policy, oldest first (a trigger is recorded by whichever node served it; only
        the owner reads the occupancy and decides, under the schedule's lock)."""
        for action in await self._db.actions(namespace, schedule_id, states=(St.REQUESTED,)):
            occupancy = await self._occupancy(namespace, schedule_id, action.overlap)
            state = occupancy.fate(action.overlap)
            await self._db.set_action(
                action,
                expected_state=St.REQUESTED,
                count_overlap_skipped=state == St.SKIPPED_OVERLAP,
                state=state,
                fenced=True,
            )

    async def _act(self, namespace: str, schedule_id: str) -> bool:
        """Start the schedule's PENDING actions and release BUFFERED ones whose turn
        has come; True if some action still waits (for a run to close, or a retry)."""
        record = await self._db.get(namespace, schedule_id)
        if record is None:
            return False
        schedule = service_pb2.Schedule.FromString(record.definition)
        open_actions = await self._db.actions(
            namespace, schedule_id, states=(St.PENDING, St.BUFFERED)
        )
        pending = {a.action_key for a in open_actions if a.state == St.PENDING}
        for action in open_actions:
            if action.state == St.BUFFERED:
                if pending or await self._running(namespace, schedule_id, first_only=True):
                    return True  # waits for the open run to close
                if not await self._db.set_action(
                    action, expected_state=St.BUFFERED, state=St.PENDING, fenced=True
                ):
                    return True
            if action.overlap in (
                OP.SCHEDULE_OVERLAP_POLICY_CANCEL_OTHER,
                OP.SCHEDULE_OVERLAP_POLICY_TERMINATE_OTHER,
            ):
                running = await self._running(namespace, schedule_id)
                if running:
                    await self._stop_others(record, running, action)
                    if await self._running(namespace, schedule_id, first_only=True):
                        return True  # cancellation requested: start once they have closed
            if await self._start(record, schedule, action) is None:
                return True  # transient failure: retry shortly
            pending.discard(action.action_key)
        return False

    async def _stop_others(
        self,
        record: ScheduleRecord,
        running: Sequence[ScheduleActionRecord],
        action: ScheduleActionRecord,
    ) -> None:
        reason = f"schedule {record.schedule_id!r} (overlap policy {OP.Name(action.overlap)})"
        request_id = _request_id(record.namespace, record.schedule_id, action.action_key)
        for other in running:
            try:
                # The current run, following continue-as-new (a read of the store).
                key = await self._engine.resolve_run_id(record.namespace, other.workflow_id, "")
                if action.overlap == OP.SCHEDULE_OVERLAP_POLICY_TERMINATE_OTHER:
                    await self._runs.terminate(
                        key, f"terminated by {reason}", _IDENTITY, request_id
                    )
                else:
                    await self._runs.request_cancel(
                        key, _IDENTITY, request_id, f"cancelled by {reason}"
                    )
            except (ServiceError, StoreError) as exc:
                log.debug(
                    "schedule %s: stopping %s: %s", record.schedule_id, other.workflow_id, exc
                )

    async def _start(
        self,
        record: ScheduleRecord,
        schedule: service_pb2.Schedule,
        action: ScheduleActionRecord,
    ) -> bool | None:
        """Start the workflow of a PENDING action. True: started; False: refused for
        good (recorded FAILED); None: a transient error, try again later."""
        info = schedule.action.start_workflow
        workflow_id = f"{info.workflow_id}-{format_rfc3339(action.slot_time)}"
        request = service_pb2.StartWorkflowRequest(
            namespace=record.namespace,
            workflow_id=workflow_id,
            identity=_IDENTITY,
            request_id=_request_id(record.namespace, record.schedule_id, action.action_key),
        )
        request.workflow_type.CopyFrom(info.workflow_type)
        request.task_queue.name = info.task_queue.name
        for name in (
            "input",
            "workflow_execution_timeout",
            "workflow_run_timeout",
            "workflow_task_timeout",
            "retry_policy",
            "memo",
            "search_attributes",
            "header",
        ):
            if info.HasField(name):
                getattr(request, name).CopyFrom(getattr(info, name))
        attributes = request.search_attributes.indexed_fields
        attributes[SCHEDULED_BY_ID].CopyFrom(encode_search_attribute(record.schedule_id))
        attributes[SCHEDULED_START_TIME].CopyFrom(
            encode_search_attribute(datetime_of(action.slot_time))
        )
        try:
            run_id = await self._runs.start_workflow(request)
        except (UnavailableError, StoreError) as exc:
            self._start_log.warning(
                "schedule %s: start of %s failed, retried: %s", record.schedule_id, workflow_id, exc
            )
            return None
        except ServiceError as exc:
            log.warning(
                "schedule %s: start of %s refused: %s", record.schedule_id, workflow_id, exc
            )
            await self._db.set_action(
                action,
                expected_state=St.PENDING,
                state=St.FAILED,
                workflow_id=workflow_id,
                error=exc.message,
                fenced=True,
            )
            return False
        await self._db.set_action(
            action,
            expected_state=St.PENDING,
            count_action=True,
            state=St.STARTED,
            workflow_id=workflow_id,
            run_id=run_id,
            running=True,
            started_at=self._clock.now_micros(),
            fenced=True,
        )
        return True

    # ------------------------------------------------------------------ RPCs

    async def create(
        self, namespace: str, schedule_id: str, schedule: service_pb2.Schedule, request_id: str
    ) -> None:
        spec = validate_schedule(schedule)
        now = self._clock.now_micros()
        stored = service_pb2.Schedule()
        stored.CopyFrom(schedule)
        stored.ClearField("state")  # paused / notes live in their own columns
        record = ScheduleRecord(
            namespace=namespace,
            schedule_id=schedule_id,
            definition=stored.SerializeToString(),
            paused=schedule.state.paused,
            notes=schedule.state.notes,
            last_slot=now,
            next_fire_at=spec.next_after(now),
            version=1,
            created_at=now,
            updated_at=now,
            create_request_id=request_id,
            action_count=0,
            missed_catchup_count=0,
            overlap_skipped_count=0,
        )
        if await self._db.create(record) is None:
            existing = await self._db.get(namespace, schedule_id)
            if existing is not None and request_id and existing.create_request_id == request_id:
                return  # a retry of the create that made it
            raise ScheduleAlreadyExistsError(
                f"schedule {schedule_id!r} already exists", schedule_id=schedule_id
            )
        self.wake()

    async def _get(self, namespace: str, schedule_id: str) -> ScheduleRecord:
        record = await self._db.get(namespace, schedule_id)
        if record is None:
            raise ScheduleNotFoundError(
                f"schedule not found: {schedule_id!r}", schedule_id=schedule_id
            )
        return record

    async def describe(
        self, namespace: str, schedule_id: str
    ) -> service_pb2.DescribeScheduleResponse:
        record = await self._get(namespace, schedule_id)
        response = service_pb2.DescribeScheduleResponse()
        response.schedule.CopyFrom(self._schedule_of(record))
        await self._fill_info(record, response.info, full=True)
        return response

    def _schedule_of(self, record: ScheduleRecord) -> service_pb2.Schedule:
        schedule = service_pb2.Schedule.FromString(record.definition)
        schedule.state.paused = record.paused
        schedule.state.notes = record.notes
        return schedule

    async def _fill_info(
        self, record: ScheduleRecord, info: service_pb2.ScheduleInfo, *, full: bool
    ) -> None:
        ns, sid = record.namespace, record.schedule_id
        info.action_count = record.action_count
        info.missed_catchup_window = record.missed_catchup_count
        info.overlap_skipped = record.overlap_skipped_count
        info.create_time.CopyFrom(_timestamp(record.created_at))
        info.update_time.CopyFrom(_timestamp(record.updated_at))
        schedule = service_pb2.Schedule.FromString(record.definition)
        try:
            spec = CompiledSpec.compile(schedule.spec)
        except InvalidArgumentError:
            spec = None
        if spec is not None:
            base = record.last_slot
            if record.paused:
                base = max(base, self._clock.now_micros())
            info.future_action_times.extend(_timestamp(t) for t in spec.upcoming(base, _FUTURE))
        if not full:
            return
        for action in await self._running(ns, sid, fenced=False):
            info.running_workflows.add(workflow_id=action.workflow_id, run_id=action.run_id)
        info.buffered_actions = await self._db.count_actions(ns, sid, (St.BUFFERED,))
        info.pending_actions = await self._db.count_actions(ns, sid, (St.PENDING, St.REQUESTED))
        for action in await self._db.actions(
            ns, sid, states=(St.STARTED,), newest_first=True, limit=_RECENT
        ):
            result = info.recent_actions.add(triggered=action.kind == ScheduleActionKind.TRIGGERED)
            result.schedule_time.CopyFrom(_timestamp(action.slot_time))
            result.actual_time.CopyFrom(_timestamp(action.started_at or action.decided_at))
            result.start_workflow_result.workflow_id = action.workflow_id
            result.start_workflow_result.run_id = action.run_id
        reasons = {
            St.SKIPPED_CATCHUP: "catchup_window",
            St.SKIPPED_OVERLAP: "overlap",
            St.FAILED: "failed",
        }
        for action in await self._db.actions(
            ns, sid, states=tuple(reasons), newest_first=True, limit=_RECENT_SKIPPED
        ):
            skipped = info.recent_skipped.add(reason=reasons[action.state], message=action.error)
            skipped.schedule_time.CopyFrom(_timestamp(action.slot_time))

    async def patch(
        self, namespace: str, schedule_id: str, patch: service_pb2.SchedulePatch, request_id: str
    ) -> None:
        if patch.pause and patch.unpause:
            raise InvalidArgumentError("a patch cannot both pause and unpause")
        if patch.trigger_immediately.overlap_policy not in OP.values():
            raise InvalidArgumentError(
                f"unknown overlap policy {patch.trigger_immediately.overlap_policy}"
            )
        record = await self._get(namespace, schedule_id)
        if patch.pause or patch.unpause:
            await self._set_paused(record, paused=patch.pause, note=patch.note)
        if patch.HasField("trigger_immediately"):
            await self._trigger(
                record, patch.trigger_immediately.overlap_policy, request_id or str(uuid.uuid4())
            )
        self.wake()

    async def _set_paused(self, record: ScheduleRecord, *, paused: bool, note: str) -> None:
        for _ in range(20):
            now = self._clock.now_micros()
            values: dict[str, object] = {"paused": paused, "notes": note, "updated_at": now}
            if not paused and record.paused:
                # Slots that passed while paused are not caught up: resume from now.
                schedule = service_pb2.Schedule.FromString(record.definition)
                last = max(record.last_slot, now)
                values["last_slot"] = last
                values["next_fire_at"] = CompiledSpec.compile(schedule.spec).next_after(last)
            if await self._db.update(
                record.namespace, record.schedule_id, record.version, **values
            ):
                return
            record = await self._get(record.namespace, record.schedule_id)
        raise UnavailableError(f"schedule {record.schedule_id!r} is changing too fast; try again")

    async def _trigger(self, record: ScheduleRecord, overlap: int, request_id: str) -> None:
        schedule = service_pb2.Schedule.FromString(record.definition)
        overlap = _overlap(overlap or schedule.policies.overlap_policy)
        now = self._clock.now_micros()
        action = ScheduleActionRecord(
            namespace=record.namespace,
            schedule_id=record.schedule_id,
            action_key=trigger_action_key(request_id),
            kind=ScheduleActionKind.TRIGGERED,
            slot_time=now,
            state=St.REQUESTED,  # the owner's next decide pass gives it its fate
            overlap=overlap,
            decided_at=now,
        )
        # False: this request was recorded before (a retried trigger fires once).
        await self._db.add_action(action)

    async def delete(self, namespace: str, schedule_id: str) -> None:
        if not await self._db.delete(namespace, schedule_id):
            raise ScheduleNotFoundError(
                f"schedule not found: {schedule_id!r}", schedule_id=schedule_id
            )

    async def list_schedules(
        self, namespace: str, page_size: int, token: bytes
    ) -> service_pb2.ListSchedulesResponse:
        after = token.decode(errors="replace") if token else ""
        records = await self._db.list_schedules(namespace, after_id=after, limit=page_size + 1)
        response = service_pb2.ListSchedulesResponse()
        for record in records[:page_size]:
            entry = response.schedules.add(schedule_id=record.schedule_id)
            entry.schedule.CopyFrom(self._schedule_of(record))
            await self._fill_info(record, entry.info, full=False)
        if len(records) > page_size:
            response.next_page_token = records[page_size - 1].schedule_id.encode()
        return response
