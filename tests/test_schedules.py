"""Schedules: cron and interval specs, the durable scheduler, and the client API.

- Unit: cron expressions (fields, lists, ranges, steps, names, macros, the day-of-month
  / day-of-week rule) and interval specs with offsets and bounds.
- Store level, on SQLite and PostgreSQL: deciding slots is compare-and-set, a trigger
  request is recorded once, old ledger rows are pruned.
- End to end, on a real server (port 0) over SQLite and PostgreSQL: an interval
  schedule fires each slot once; pause / unpause / trigger / describe / delete; overlap
  policies SKIP vs ALLOW_ALL, BUFFER_ONE and TERMINATE_OTHER; invalid schedules.
- Across a real server restart (a server process SIGKILLed and started again on the
  same database, SQLite or PostgreSQL, and port): no slot fires twice, slots missed
  while the server was down fire once if within the catch-up window and are recorded
  as skipped if not.

Schedules use one-second intervals so tests are quick. Nothing sleeps to synchronize:
tests poll conditions against a deadline; where a test needs wall-clock time to pass
(slots to come due), it waits for the clock itself.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from helpers import ServerProcess, eventually

from tideflow.api.v1 import service_pb2
from tideflow.history import (
    HistoryStore,
    ScheduleActionKind,
    ScheduleActionRecord,
    ScheduleActionState,
    ScheduleRecord,
    micros_of,
    slot_action_key,
    trigger_action_key,
)
from tideflow.server._cron import CompiledSpec, CronError, CronExpression
from tideflow.worker_sdk import Client, Worker, WorkflowExecutionStatus, workflow
from tideflow.worker_sdk.client import WorkflowExecution
from tideflow.worker_sdk.exceptions import InvalidArgumentError, NotFoundError
from tideflow.worker_sdk.schedules import (
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleDescription,
    ScheduleHandle,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
)

SECOND = timedelta(seconds=1)
CONDITION_TIMEOUT_S = 30.0


def _utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, sec: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, sec, tzinfo=UTC)


# ========================================================================== cron

CRON_CASES: list[tuple[str, datetime, list[datetime]]] = [
    (
        "*/5 * * * *",
        _utc(2024, 1, 31, 23, 58, 30),
        [_utc(2024, 2, 1, 0, 0), _utc(2024, 2, 1, 0, 5), _utc(2024, 2, 1, 0, 10)],
    ),
    (
        "0 0 * * *",
        _utc(2024, 2, 28, 0, 0),  # exactly on a slot: the next one is strictly after
        [_utc(2024, 2, 29), _utc(2024, 3, 1), _utc(2024, 3, 2)],
    ),
    (
        "30 2 29 2 *",  # leap days only
        _utc(2024, 3, 1),
        [_utc(2028, 2, 29, 2, 30), _utc(2032, 2, 29, 2, 30)],
    ),
    (
        "0 9 * * MON-FRI",
        _utc(2024, 2, 2, 9, 0),  # a Friday
        [_utc(2024, 2, 5, 9), _utc(2024, 2, 6, 9), _utc(2024, 2, 7, 9)],
    ),
    (
        # Both day fields restricted: a day matching either one (Vixie cron).
        "0 0 1,15 * 5",
        _utc(2024, 1, 31, 12),
        [_utc(2024, 2, 1), _utc(2024, 2, 2), _utc(2024, 2, 9), _utc(2024, 2, 15)],
    ),
    (
        "15,45 8-10/2 * jan,JUL 0",  # lists, range with step, month names, Sunday 0
        _utc(2024, 1, 6, 0, 0),
        [_utc(2024, 1, 7, 8, 15), _utc(2024, 1, 7, 8, 45), _utc(2024, 1, 7, 10, 15)],
    ),
    (
        "0 12 * * 7",  # 7 is Sunday too
        _utc(2024, 1, 1),
        [_utc(2024, 1, 7, 12), _utc(2024, 1, 14, 12)],
    ),
    (
        "5/20 * * 12 *",  # a/n: from a to the end of the range
        _utc(2024, 11, 30, 23, 59, 59),
        [_utc(2024, 12, 1, 0, 5), _utc(2024, 12, 1, 0, 25), _utc(2024, 12, 1, 0, 45)],
    ),
    ("@hourly", _utc(2024, 1, 1, 0, 30), [_utc(2024, 1, 1, 1), _utc(2024, 1, 1, 2)]),
    ("@monthly", _utc(2024, 1, 1, 0, 0, 1), [_utc(2024, 2, 1), _utc(2024, 3, 1)]),
    ("@weekly", _utc(2024, 1, 1), [_utc(2024, 1, 7), _utc(2024, 1, 14)]),
]


@pytest.mark.parametrize(("expression", "after", "expected"), CRON_CASES)
def test_cron_next_after(expression: str, after: datetime, expected: list[datetime]) -> None:
    cron = CronExpression.parse(expression)
    got = []
    moment: int | None = micros_of(after)
    for _ in expected:
        assert moment is not None
        moment = cron.next_after(moment)
        assert moment is not None, expression
        got.append(moment)
    assert got == [micros_of(e) for e in expected]


def test_cron_without_matching_day_is_refused() -> None:
    with pytest.raises(CronError, match="never fires: day-of-month '30' does not occur"):
        CronExpression.parse("0 0 30 2 *")


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("* * * *", "has 4 fields; expected 5"),
        ("60 * * * *", "bad minute field '60' \\(values 0-59"),
        ("* 24 * * *", "bad hour field '24' \\(values 0-23"),
        ("* * 0 * *", "bad day-of-month field '0' \\(values 1-31"),
        ("* * * 13 *", "bad month field '13' \\(values 1-12"),
        ("* * * * 8", "bad day-of-week field '8' \\(values 0-7"),
        ("*/0 * * * *", "bad minute field '\\*/0'"),
        ("5-1 * * * *", "bad minute field '5-1'"),
        ("1,,2 * * * *", "bad minute field '1,,2'"),
        ("L * * * *", "bad minute field 'L'"),
        ("* * * FOO *", "bad month field 'FOO'"),
    ],
)
def test_cron_errors(expression: str, message: str) -> None:
    with pytest.raises(CronError, match=message):
        CronExpression.parse(expression)


def test_interval_spec_with_offset_and_bounds() -> None:
    spec = service_pb2.ScheduleSpec()
    interval = spec.intervals.add()
    interval.interval.FromSeconds(90)
    interval.phase.FromSeconds(30)
    compiled = CompiledSpec.compile(spec)
    base = micros_of(_utc(2024, 1, 1))  # a multiple of 90 s since the epoch
    assert compiled.upcoming(base, 3) == [base + s * 1_000_000 for s in (30, 120, 210)]
    # Crons and intervals combine; start/end bound the slots (inclusive).
    spec.cron_expressions.append("0 * * * *")
    spec.start_time.FromMicroseconds(base + 100 * 1_000_000)
    spec.end_time.FromMicroseconds(base + 3600 * 1_000_000)
    compiled = CompiledSpec.compile(spec)
    slots = compiled.upcoming(base, 100)
    assert slots[0] == base + 120 * 1_000_000
    assert slots[-1] == base + 3600 * 1_000_000  # the cron slot at 01:00, also the end
    assert all(b > a for a, b in itertools.pairwise(slots))
    assert compiled.next_after(slots[-1]) is None


# =================================================================== store level


def _record(namespace: str, schedule_id: str, now: int) -> ScheduleRecord:
    return ScheduleRecord(
        namespace=namespace,
        schedule_id=schedule_id,
        definition=b"",
        paused=False,
        notes="",
        last_slot=now,
        next_fire_at=now + 1_000_000,
        version=1,
        created_at=now,
        updated_at=now,
        create_request_id="create-1",
        action_count=0,
        missed_catchup_count=0,
        overlap_skipped_count=0,
    )


def _action(
    record: ScheduleRecord, key: str, slot: int, state: ScheduleActionState
) -> ScheduleActionRecord:
    return ScheduleActionRecord(
        namespace=record.namespace,
        schedule_id=record.schedule_id,
        action_key=key,
        kind=ScheduleActionKind.SCHEDULED,
        slot_time=slot,
        state=state,
        overlap=1,
        decided_at=slot,
    )


async def test_schedule_store_decides_each_slot_once(store: HistoryStore) -> None:
    db = store.schedules
    now = 1_700_000_000_000_000
    record = _record("default", "s1", now)
    assert await db.create(record) == record
    assert await db.create(record) is None  # the id is taken
    assert [r.schedule_id for r in await db.due(now + 1_000_000)] == ["s1"]
    assert await db.next_due() == now + 1_000_000

    slot = now + 1_000_000
    decided = [_action(record, slot_action_key(slot), slot, ScheduleActionState.PENDING)]
    kwargs: dict[str, Any] = {
        "last_slot": slot,
        "next_fire_at": slot + 1_000_000,
        "missed_catchup": 0,
        "overlap_skipped": 0,
        "now": slot,
    }
    assert await db.decide(record, decided, **kwargs)
    # A second decision from the same (now stale) version writes nothing.
    assert not await db.decide(record, decided, **kwargs)
    current = await db.get("default", "s1")
    assert current is not None and current.version == 2 and current.last_slot == slot
    assert len(await db.actions("default", "s1")) == 1

    # A trigger is recorded once per request id.
    trigger = ScheduleActionRecord(
        namespace="default",
        schedule_id="s1",
        action_key=trigger_action_key("req-1"),
        kind=ScheduleActionKind.TRIGGERED,
        slot_time=slot + 10,
        state=ScheduleActionState.PENDING,
        overlap=1,
        decided_at=slot + 10,
    )
    assert await db.add_action(trigger)
    assert not await db.add_action(trigger)
    assert await db.count_actions("default", "s1", (ScheduleActionState.PENDING,)) == 2
    assert await db.schedules_with_actions((ScheduleActionState.PENDING,)) == [("default", "s1")]

    # Moving a row on is conditional on its state; counters move with it.
    (first,) = await db.actions("default", "s1", states=(ScheduleActionState.PENDING,), limit=1)
    assert await db.set_action(
        first,
        expected_state=ScheduleActionState.PENDING,
        count_action=True,
        state=ScheduleActionState.STARTED,
        workflow_id="w",
        run_id="r",
    )
    assert not await db.set_action(
        first, expected_state=ScheduleActionState.PENDING, state=ScheduleActionState.FAILED
    )
    current = await db.get("default", "s1")
    assert current is not None and current.action_count == 1

    # Finished rows beyond the newest `keep` are pruned; open ones stay.
    many = [
        _action(current, slot_action_key(slot + i), slot + i, ScheduleActionState.SKIPPED_OVERLAP)
        for i in range(1, 11)
    ]
    assert await db.decide(current, many, **kwargs)
    assert await db.prune("default", "s1", keep=3) >= 8
    left = await db.actions("default", "s1")
    assert trigger.action_key in {a.action_key for a in left}  # still PENDING
    assert len(left) <= 4

    assert await db.delete("default", "s1")
    assert not await db.delete("default", "s1")
    assert await db.actions("default", "s1") == []


# ==================================================================== end to end


@workflow.defn
class Quick:
    @workflow.run
    async def run(self, n: int) -> int:
        return n + 1


async def _wait_for_clock(moment: float) -> None:
    """Wait until the wall clock reaches ``moment`` (time.time()): slots come due."""
    await eventually(lambda: time.time() >= moment, "the clock", timeout=moment - time.time() + 5)


async def _describe_when(
    handle: ScheduleHandle, check: Callable[[ScheduleDescription], bool], what: str
) -> ScheduleDescription:
    async def probe() -> ScheduleDescription | None:
        description = await handle.describe()
        return description if check(description) else None

    found: ScheduleDescription = await eventually(probe, what)
    return found


async def _runs(client: Client, schedule_id: str) -> list[WorkflowExecution]:
    query = f"TemporalScheduledById = '{schedule_id}' ORDER BY WorkflowId"
    return [wf async for wf in client.list_workflows(query)]


def _slot_of(workflow_id: str, prefix: str) -> datetime:
    assert workflow_id.startswith(prefix + "-"), workflow_id
    return datetime.fromisoformat(workflow_id[len(prefix) + 1 :])


def _assert_consecutive(slots: Sequence[datetime], step: timedelta = SECOND) -> None:
    ordered = sorted(slots)
    assert len(ordered) == len(set(ordered)), f"a slot fired twice: {ordered}"
    gaps = [(a, b) for a, b in itertools.pairwise(ordered) if b - a != step]
    assert not gaps, f"slots missing between {gaps}"


async def test_interval_schedule_fires_each_slot_once(client: Client) -> None:
    queue = f"sched-{uuid.uuid4()}"
    schedule_id = f"every-second-{uuid.uuid4()}"
    prefix = f"tick-{uuid.uuid4()}"
    created = datetime.now(UTC)
    async with Worker(client, task_queue=queue, workflows=[Quick]):
        handle = await client.create_schedule(
            schedule_id,
            action=ScheduleActionStartWorkflow(
                Quick.run,
                41,
                id=prefix,
                task_queue=queue,
                memo={"why": "test"},
                search_attributes={"Team": "ops"},
            ),
            spec=ScheduleSpec(interval=SECOND),
            policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
        )
        description = await _describe_when(
            handle, lambda d: d.info.num_actions >= 3, "three actions"
        )
        runs = await _runs(client, schedule_id)
        for run in runs:
            assert await client.get_workflow_handle(run.id, run_id=run.run_id).result() == 42

    ids = Counter(run.id for run in runs)
    assert all(n == 1 for n in ids.values()), ids
    slots = [_slot_of(run.id, prefix) for run in runs]
    _assert_consecutive(slots)
    assert all(s > created and s.microsecond == 0 for s in slots)
    for run, slot in zip(runs, slots, strict=True):
        assert run.workflow_type == "Quick" and run.task_queue == queue
        assert run.memo == {"why": "test"}
        assert run.search_attributes["Team"] == "ops"
        assert run.search_attributes["TemporalScheduledById"] == schedule_id
        assert run.search_attributes["TemporalScheduledStartTime"] == slot

    info = description.info
    assert description.id == schedule_id and not description.paused
    assert info.num_actions_missed_catchup_window == 0
    recent = info.recent_actions
    assert [r.scheduled_at for r in recent] == sorted(r.scheduled_at for r in recent)
    assert all(not r.triggered and r.started_at >= r.scheduled_at for r in recent)
    assert {r.action.workflow_id for r in recent} <= set(ids)
    assert info.next_action_times == sorted(info.next_action_times)
    assert info.next_action_times[0] > recent[-1].scheduled_at
    assert info.created_at >= created - SECOND
    action = description.schedule.action
    assert (action.workflow, action.args, action.id, action.task_queue) == (
        "Quick",
        [41],
        prefix,
        queue,
    )
    assert description.schedule.spec.interval == SECOND
    assert description.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
    listed = [s async for s in client.list_schedules()]
    assert schedule_id in [s.id for s in listed]
    await handle.delete()


async def test_pause_unpause_trigger_describe_delete(client: Client) -> None:
    queue = f"nobody-{uuid.uuid4()}"  # no worker: started runs stay open
    schedule_id = f"controls-{uuid.uuid4()}"
    prefix = f"ctl-{uuid.uuid4()}"
    handle = await client.create_schedule(
        schedule_id,
        action=ScheduleActionStartWorkflow("Nothing", id=prefix, task_queue=queue),
        spec=ScheduleSpec(interval=SECOND),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.ALLOW_ALL),
        request_id="create-once",
    )
    # A retried create (same request id) is fine; another create of the id is not.
    await client.create_schedule(
        schedule_id,
        action=ScheduleActionStartWorkflow("Nothing", id=prefix, task_queue=queue),
        spec=ScheduleSpec(interval=SECOND),
        request_id="create-once",
    )
    with pytest.raises(ScheduleAlreadyRunningError, match="already exists"):
        await client.create_schedule(
            schedule_id,
            action=ScheduleActionStartWorkflow("Nothing", id=prefix, task_queue=queue),
            spec=ScheduleSpec(interval=SECOND),
        )
    await _describe_when(handle, lambda d: d.info.num_actions >= 1, "a first action")

    await handle.pause("maintenance window")
    paused_at = datetime.now(UTC)
    description = await handle.describe()
    assert description.paused and description.schedule.state.note == "maintenance window"
    await _wait_for_clock(time.time() + 2.2)  # at least two slots pass while paused

    # Trigger works while paused, and a retried trigger (same request id) fires once.
    await handle.trigger(request_id="trigger-once")
    await handle.trigger(request_id="trigger-once")
    description = await _describe_when(
        handle, lambda d: any(r.triggered for r in d.info.recent_actions), "the triggered action"
    )
    triggered = [r for r in description.info.recent_actions if r.triggered]
    assert len(triggered) == 1 and triggered[0].scheduled_at >= paused_at
    scheduled = [r for r in description.info.recent_actions if not r.triggered]
    assert all(r.scheduled_at <= paused_at for r in scheduled), "a slot fired while paused"

    unpause_called_at = datetime.now(UTC)
    await handle.unpause("back")
    unpaused_at = datetime.now(UTC)
    description = await _describe_when(
        handle,
        lambda d: any(
            not r.triggered and r.scheduled_at > unpaused_at for r in d.info.recent_actions
        ),
        "a slot after unpausing",
    )
    assert not description.paused and description.schedule.state.note == "back"
    # Slots that passed while paused were not caught up.
    assert not [
        r
        for r in description.info.recent_actions
        if not r.triggered and paused_at < r.scheduled_at <= unpause_called_at
    ]
    runs = await _runs(client, schedule_id)
    assert len(runs) == len({r.id for r in runs}) >= 3
    assert all(r.status == WorkflowExecutionStatus.RUNNING for r in runs)

    await handle.delete()
    with pytest.raises(NotFoundError, match="schedule not found"):
        await handle.describe()
    with pytest.raises(NotFoundError):
        await handle.delete()
    with pytest.raises(NotFoundError):
        await client.get_schedule_handle("no-such-schedule").trigger()
    # The runs it started are not touched by the delete.
    assert await client.count_workflows(
        f"TemporalScheduledById = '{schedule_id}' AND ExecutionStatus = 'Running'"
    ) == len(runs)


async def test_overlap_skip_versus_allow_all(client: Client) -> None:
    queue = f"nobody-{uuid.uuid4()}"  # runs never close, so every slot overlaps
    handles = {}
    for policy in (ScheduleOverlapPolicy.SKIP, ScheduleOverlapPolicy.ALLOW_ALL):
        handles[policy] = await client.create_schedule(
            f"overlap-{policy.name}-{uuid.uuid4()}",
            action=ScheduleActionStartWorkflow(
                "Nothing", id=f"{policy.name}-{uuid.uuid4()}", task_queue=queue
            ),
            spec=ScheduleSpec(interval=SECOND),
            policy=SchedulePolicy(overlap=policy),
        )
    allow = await _describe_when(
        handles[ScheduleOverlapPolicy.ALLOW_ALL],
        lambda d: d.info.num_actions >= 3,
        "ALLOW_ALL to start three runs",
    )
    skip = await _describe_when(
        handles[ScheduleOverlapPolicy.SKIP],
        lambda d: d.info.num_actions_skipped_overlap >= 2,
        "SKIP to skip two slots",
    )
    assert skip.info.num_actions == 1
    assert len(skip.info.running_actions) == 1
    assert {s.reason for s in skip.info.recent_skipped} == {"overlap"}
    assert skip.info.recent_skipped[0].scheduled_at > skip.info.recent_actions[0].scheduled_at
    assert allow.info.num_actions_skipped_overlap == 0
    assert len(allow.info.running_actions) == allow.info.num_actions >= 3
    for handle in handles.values():
        await handle.delete()


async def test_overlap_buffer_one_and_terminate_other(client: Client) -> None:
    queue = f"nobody-{uuid.uuid4()}"
    buffer_handle = await client.create_schedule(
        f"buffer-one-{uuid.uuid4()}",
        action=ScheduleActionStartWorkflow("Nothing", id=f"buf-{uuid.uuid4()}", task_queue=queue),
        spec=ScheduleSpec(interval=SECOND),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.BUFFER_ONE),
    )
    terminate_handle = await client.create_schedule(
        f"terminate-other-{uuid.uuid4()}",
        action=ScheduleActionStartWorkflow("Nothing", id=f"term-{uuid.uuid4()}", task_queue=queue),
        spec=ScheduleSpec(interval=SECOND),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.TERMINATE_OTHER),
    )
    # BUFFER_ONE: one run, one buffered slot, later slots skipped. (The slots after the
    # first are decided while its start may still be on its way: a loaded machine can
    # decide the buffered and the skipped one before the first run is recorded.)
    description = await _describe_when(
        buffer_handle,
        lambda d: (
            d.info.num_actions == 1
            and d.info.num_actions_buffered == 1
            and d.info.num_actions_skipped_overlap >= 1
        ),
        "a started, a buffered and a skipped slot",
    )
    (first,) = description.info.recent_actions
    await client.get_workflow_handle(first.action.workflow_id).terminate("make room")
    # The buffered slot (the one right after the first) starts once the run closed.
    description = await _describe_when(
        buffer_handle, lambda d: d.info.num_actions == 2, "the buffered slot to start"
    )
    second = description.info.recent_actions[-1]
    assert second.scheduled_at == first.scheduled_at + SECOND
    assert second.started_at > second.scheduled_at

    # TERMINATE_OTHER: each new slot terminates the previous run.
    description = await _describe_when(
        terminate_handle, lambda d: d.info.num_actions >= 2, "two TERMINATE_OTHER actions"
    )
    older = description.info.recent_actions[-2]
    old = await client.get_workflow_handle(older.action.workflow_id).describe()
    assert old.status == WorkflowExecutionStatus.TERMINATED
    assert len(description.info.running_actions) <= 1
    for handle in (buffer_handle, terminate_handle):
        await handle.delete()


async def test_cron_schedule_describe_and_list(client: Client) -> None:
    handle = await client.create_schedule(
        f"cron-{uuid.uuid4()}",
        action=ScheduleActionStartWorkflow("Report", "eu", id="report", task_queue="reports"),
        spec=ScheduleSpec(
            cron="*/5 * * * *",
            intervals=[ScheduleIntervalSpec(every=timedelta(days=1), offset=timedelta(hours=3))],
        ),
        state=ScheduleState(paused=True, note="created paused"),
        policy=SchedulePolicy(catchup_window=timedelta(minutes=2)),
    )
    description = await handle.describe()
    assert description.paused and description.schedule.state.note == "created paused"
    spec = description.schedule.spec
    assert spec.cron == "*/5 * * * *"
    assert (spec.interval, spec.offset) == (timedelta(days=1), timedelta(hours=3))
    assert description.schedule.action.args == ["eu"]
    times = description.info.next_action_times
    assert len(times) == 10 and times == sorted(times)
    assert all((t.minute % 5 == 0 and t.second == 0) or (t.hour, t.minute) == (3, 0) for t in times)
    assert description.schedule.policy.catchup_window == timedelta(minutes=2)
    assert description.info.num_actions == 0
    listed = {s.id: s async for s in client.list_schedules(page_size=1)}
    assert listed[handle.id].schedule.state.paused
    assert listed[handle.id].info.next_action_times == times
    await handle.delete()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ScheduleSpec(cron="61 * * * *"), "bad minute field '61'"),
        (ScheduleSpec(cron="* * *"), "has 3 fields"),
        (ScheduleSpec(interval=timedelta(milliseconds=500)), "at least 1 second"),
        (
            ScheduleSpec(interval=SECOND * 10, offset=SECOND * 10),
            "offset must be at least 0 and less than the interval",
        ),
        (ScheduleSpec(), "needs a cron expression or an interval"),
        (
            ScheduleSpec(interval=SECOND, start_at=_utc(2030, 1, 1), end_at=_utc(2029, 1, 1)),
            "end_time is before start_time",
        ),
    ],
)
async def test_invalid_schedules_are_refused(
    client: Client, spec: ScheduleSpec, message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        await client.create_schedule(
            f"bad-{uuid.uuid4()}",
            action=ScheduleActionStartWorkflow("Nothing", id="x", task_queue="q"),
            spec=spec,
        )


async def test_invalid_schedule_actions_are_refused(client: Client) -> None:
    for action, message in (
        (ScheduleActionStartWorkflow("Nothing", id="", task_queue="q"), "workflow_id is empty"),
        (ScheduleActionStartWorkflow("Nothing", id="x", task_queue=""), "task_queue is empty"),
        (
            ScheduleActionStartWorkflow(
                "Nothing", id="x", task_queue="q", search_attributes={"RunId": "r"}
            ),
            "reserved for a built-in field",
        ),
    ):
        with pytest.raises(InvalidArgumentError, match=message):
            await client.create_schedule(
                f"bad-{uuid.uuid4()}", action=action, spec=ScheduleSpec(interval=SECOND)
            )
    with pytest.raises(TypeError, match="action= and spec="):
        await client.create_schedule("x", spec=ScheduleSpec(interval=SECOND))


# ======================================================= across a server restart


@dataclass(frozen=True)
class _AcrossRestart:
    """What an every-second schedule did across a server restart."""

    runs: list[WorkflowExecution]
    slots: list[datetime]  # of the runs, in their order
    description: ScheduleDescription  # paused, settled
    killed_at: datetime
    restarted_at: datetime


async def _across_restart(
    server: ServerProcess, prefix: str, catchup_window: timedelta, downtime_s: float
) -> _AcrossRestart:
    """An every-second schedule (ALLOW_ALL; runs nobody works on) takes two actions;
    the server is SIGKILLed and kept down ``downtime_s`` (slots come due meanwhile),
    then a new server process starts on the same database and port. Once slots after
    the restart fired, the schedule is paused and, when the ledger and the runs agree,
    described."""
    schedule_id = f"restart-{prefix}"
    async with await Client.connect(server.address) as client:
        handle = await client.create_schedule(
            schedule_id,
            action=ScheduleActionStartWorkflow("Nothing", id=prefix, task_queue="nobody"),
            spec=ScheduleSpec(interval=SECOND),
            policy=SchedulePolicy(
                overlap=ScheduleOverlapPolicy.ALLOW_ALL, catchup_window=catchup_window
            ),
        )
        await _describe_when(handle, lambda d: d.info.num_actions >= 2, "two actions")
        await server.kill()
        killed_at = datetime.now(UTC)
        await _wait_for_clock(time.time() + downtime_s)
        await server.start()
        restarted_at = datetime.now(UTC)
        # The client reconnects by itself; wait until slots after the restart fired.
        await _describe_when(
            handle,
            lambda d: (
                bool(d.info.recent_actions)
                and d.info.recent_actions[-1].scheduled_at > restarted_at + SECOND
            ),
            "slots after the restart",
        )
        await handle.pause()
        # Let any slot decided before the pause finish starting, then compare.
        description = await eventually(
            lambda: _settled(client, handle, schedule_id), "the ledger and the runs to agree"
        )
        runs = await _runs(client, schedule_id)
    slots = [_slot_of(run.id, prefix) for run in runs]
    return _AcrossRestart(runs, slots, description, killed_at, restarted_at)


@pytest.mark.slow
async def test_schedule_across_server_restart_fires_missed_slots_once(
    server_process: ServerProcess,
) -> None:
    seen = await _across_restart(server_process, "tick", timedelta(minutes=10), 3.5)
    ids = Counter(run.id for run in seen.runs)
    assert all(n == 1 for n in ids.values()), f"a slot started twice: {ids}"
    slots = seen.slots
    _assert_consecutive(slots)  # every slot, including those while down, exactly once
    down = [s for s in slots if seen.killed_at < s < seen.restarted_at]
    assert len(down) >= 3, (seen.killed_at, seen.restarted_at, sorted(slots))
    for run, slot in zip(seen.runs, slots, strict=True):
        assert run.search_attributes["TemporalScheduledStartTime"] == slot
    assert seen.description.info.num_actions == len(seen.runs)
    assert seen.description.info.num_actions_missed_catchup_window == 0


@pytest.mark.slow
async def test_schedule_across_server_restart_skips_slots_beyond_catchup_window(
    server_process: ServerProcess,
) -> None:
    seen = await _across_restart(server_process, "win", timedelta(seconds=2), 6.0)
    info = seen.description.info
    killed_at, restarted_at, started = seen.killed_at, seen.restarted_at, seen.slots
    skipped = [s.scheduled_at for s in info.recent_skipped]
    assert {s.reason for s in info.recent_skipped} == {"catchup_window"}
    assert len(skipped) == info.num_actions_missed_catchup_window >= 2
    # Every slot has exactly one fate: started once, or recorded as skipped.
    assert not set(started) & set(skipped)
    _assert_consecutive(started + skipped)
    # Skipped slots are all older than the slots taken while the server was down.
    fired_while_down = [s for s in started if killed_at < s < restarted_at]
    assert fired_while_down, (killed_at, restarted_at, sorted(started), sorted(skipped))
    assert max(skipped) < min(fired_while_down)
    # (A slot that came due just before the kill may not have been decided yet.)
    assert all(killed_at - SECOND < s < restarted_at for s in skipped)


async def _settled(
    client: Client, handle: ScheduleHandle, schedule_id: str
) -> ScheduleDescription | None:
    """The description of a paused schedule once no action waits to start and the
    runs listed match the actions counted (None until then)."""
    description = await handle.describe()
    runs = await client.count_workflows(f"TemporalScheduledById = '{schedule_id}'")
    info = description.info
    if info.num_actions_pending or info.num_actions_buffered or runs != info.num_actions:
        return None
    return description
