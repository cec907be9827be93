"""Schedules on several server nodes (issue 11): each schedule lives on a shard (its
namespace and id hashed like a run's workflow id) and is fired by the node holding
that shard, and by no other; it moves with the shard.

- In process, on SQLite and PostgreSQL: a scheduler fires only the schedules of the
  shards it holds, picks a schedule up when its shard is added and lets it go when
  the shard is gone; a scheduler whose shard was taken over commits nothing for it
  (the fence refuses the decision, and the store tells the node).
- Real processes on PostgreSQL: three ``tideflow server start`` nodes, schedules with
  a one-second interval created through a node that does not own them; the owner is
  SIGKILLed, then its successor SIGTERMed: every slot of the window is started exactly
  once, as one run with the slot's workflow id, and the schedules go on at the new
  owner. The cluster has one shard here, so a slot's run lives on the node that fires
  the schedule: a node does not yet forward a start to the owner of another shard
  (that is the routing part of issue 11), and across shards the slots would be
  decided but their runs refused until then.

Waits poll conditions against deadlines; the slots come from the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from datetime import timedelta

import pytest
from google.protobuf.duration_pb2 import Duration
from helpers import Processes, ServerProcess, eventually

from tideflow.api.v1 import service_pb2
from tideflow.history import (
    HistoryStore,
    ScheduleActionRecord,
    ScheduleActionState,
    ShardOwnershipLostError,
    TaskRow,
    TimerRow,
    format_rfc3339,
    now_micros,
    schedule_shard,
)
from tideflow.server._config import ServerConfig, SystemClock
from tideflow.server._engine import Dispatcher, HistoryEngine
from tideflow.server._schedules import Scheduler
from tideflow.worker_sdk import Client, workflow
from tideflow.worker_sdk.schedules import (
    ScheduleActionStartWorkflow,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
)

St = ScheduleActionState
SECOND_US = 1_000_000
CONDITION_TIMEOUT_S = 40.0
LEASE_S = 2.0


async def _wait(check: Callable[[], object], what: str) -> object:
    return await eventually(check, what, timeout=CONDITION_TIMEOUT_S)


# ===================================================================== in process


class _NoDispatch(Dispatcher):
    """Started runs' task and timer rows stay in the store: nobody works on them."""

    def add_tasks(self, tasks: list[TaskRow]) -> None:
        pass

    def add_timers(self, timers: list[TimerRow]) -> None:
        pass


def _every_second(action_id: str) -> service_pb2.Schedule:
    schedule = service_pb2.Schedule()
    schedule.spec.intervals.add(interval=Duration(seconds=1))
    start = schedule.action.start_workflow
    start.workflow_id = action_id
    start.workflow_type.name = "Nobody"
    start.task_queue.name = f"nobody-{uuid.uuid4()}"  # the runs stay open
    schedule.policies.overlap_policy = service_pb2.SCHEDULE_OVERLAP_POLICY_ALLOW_ALL
    return schedule


def _ids_on_distinct_shards(count: int, shard_count: int) -> list[str]:
    ids: list[str] = []
    shards: set[int] = set()
    for i in itertools.count():
        schedule_id = f"sched-{uuid.uuid4()}-{i}"
        shard = schedule_shard("default", schedule_id, shard_count)
        if shard not in shards:
            ids.append(schedule_id)
            shards.add(shard)
            if len(ids) == count:
                return ids
    raise AssertionError("unreachable")


async def _started(store: HistoryStore, schedule_id: str) -> list[ScheduleActionRecord]:
    return await store.schedules.actions("default", schedule_id, states=(St.STARTED,))


async def _version(store: HistoryStore, schedule_id: str) -> int:
    record = await store.schedules.get("default", schedule_id)
    assert record is not None
    return record.version


@contextlib.asynccontextmanager
async def _running(scheduler: Scheduler) -> AsyncIterator[None]:
    task = asyncio.create_task(scheduler.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _more_started(store: HistoryStore, schedule_id: str, beyond: int) -> None:
    async def check() -> bool:
        return len(await _started(store, schedule_id)) >= beyond + 2

    await _wait(check, f"two more slots of {schedule_id} started")


async def test_scheduler_fires_only_the_schedules_of_its_shards(store: HistoryStore) -> None:
    mine, theirs = _ids_on_distinct_shards(2, store.shard_count)
    owned = {schedule_shard("default", mine, store.shard_count)}
    engine = HistoryEngine(store, _NoDispatch(), SystemClock(), ServerConfig())
    scheduler = Scheduler(store, engine, SystemClock(), owned=lambda: owned)
    for schedule_id in (mine, theirs):
        await scheduler.create("default", schedule_id, _every_second(schedule_id), "create")

    async with _running(scheduler):
        await _more_started(store, mine, 0)
        # Both were due at every one of those passes: only the one of our shard fired.
        assert await store.schedules.actions("default", theirs) == []
        assert await _version(store, theirs) == 1

        # Its shard comes to this node: it fires from where it was left (the slots
        # since it was created are within the catch-up window).
        owned.add(schedule_shard("default", theirs, store.shard_count))
        scheduler.wake()
        await _more_started(store, theirs, 0)

        # Our first shard goes: once a pass that began without it has passed (two
        # more slots of the other one), the schedule does not move any more.
        owned.discard(schedule_shard("default", mine, store.shard_count))
        await _more_started(store, theirs, len(await _started(store, theirs)))
        left_at = await _version(store, mine)
        await _more_started(store, theirs, len(await _started(store, theirs)))
        assert await _version(store, mine) == left_at

    for schedule_id in (mine, theirs):
        slots = [a.slot_time for a in await store.schedules.actions("default", schedule_id)]
        assert slots == list(range(slots[0], slots[-1] + 1, SECOND_US)), slots
        for action in await _started(store, schedule_id):
            run = await store.get_current("default", action.workflow_id)
            assert run is not None and run.run_id == action.run_id
            assert action.workflow_id == f"{schedule_id}-{format_rfc3339(action.slot_time)}"


async def test_a_trigger_served_by_another_node_is_decided_by_the_owner(
    store: HistoryStore,
) -> None:
    """Any node records a trigger; only the schedule's owner gives it its fate, under
    the overlap policy and the schedule's lock (SKIP here: the second trigger finds the
    first one's run pending and is skipped). One pass of each scheduler, driven here."""
    (schedule_id,) = _ids_on_distinct_shards(1, store.shard_count)
    shard = schedule_shard("default", schedule_id, store.shard_count)
    engine = HistoryEngine(store, _NoDispatch(), SystemClock(), ServerConfig())
    owner = Scheduler(store, engine, SystemClock(), owned=lambda: {shard})
    other = Scheduler(store, engine, SystemClock(), owned=lambda: set())
    schedule = _every_second(schedule_id)
    schedule.state.paused = True  # triggers only
    schedule.policies.overlap_policy = service_pb2.SCHEDULE_OVERLAP_POLICY_SKIP
    await other.create("default", schedule_id, schedule, "create")
    trigger = service_pb2.SchedulePatch()
    trigger.trigger_immediately.SetInParent()
    await other.patch("default", schedule_id, trigger, "trigger-1")
    await other.patch("default", schedule_id, trigger, "trigger-1")  # a retry: recorded once
    await other.patch("default", schedule_id, trigger, "trigger-2")

    async def states() -> list[ScheduleActionState]:
        return [a.state for a in await store.schedules.actions("default", schedule_id)]

    await other._decide_due()
    await other._act_on_decided()
    assert await states() == [St.REQUESTED, St.REQUESTED]
    await owner._decide_due()
    assert await states() == [St.PENDING, St.SKIPPED_OVERLAP]
    await owner._act_on_decided()
    assert await states() == [St.STARTED, St.SKIPPED_OVERLAP]
    record = await store.schedules.get("default", schedule_id)
    assert record is not None
    assert (record.action_count, record.overlap_skipped_count) == (1, 1)


async def test_a_schedule_of_a_shard_taken_over_is_not_written(store_url: str) -> None:
    """Node a held the schedule's shard; node b took it over (a's lease lapsed). a's
    scheduler, still believing it owns the shard, commits no decision for it: the
    fence refuses it in the transaction and the store tells the node."""
    a = await HistoryStore.open(store_url)
    b = await HistoryStore.open(store_url)
    try:
        (schedule_id,) = _ids_on_distinct_shards(1, a.shard_count)
        shard = schedule_shard("default", schedule_id, a.shard_count)
        token_a = await a.acquire_shard(await a.read_shard(shard), "node-a", lease_us=1)
        assert token_a is not None
        a.hold_shard(shard, token_a)
        refused: list[ShardOwnershipLostError] = []
        a.on_fenced = refused.append
        token_b = await b.acquire_shard(await b.read_shard(shard), "node-b", lease_us=60_000_000)
        assert token_b == token_a + 1

        engine = HistoryEngine(a, _NoDispatch(), SystemClock(), ServerConfig())
        held: Collection[int] = a.held_shards.keys()
        scheduler = Scheduler(a, engine, SystemClock(), owned=lambda: held)
        await scheduler.create("default", schedule_id, _every_second(schedule_id), "create")
        async with _running(scheduler):
            await _wait(lambda: refused, "the fence to refuse a's decision")
        assert refused[0].shard_id == shard and refused[0].current == token_b
        assert await a.schedules.actions("default", schedule_id) == []
        assert await _version(a, schedule_id) == 1  # created, never decided
    finally:
        await a.close()
        await b.close()


# ====================================================================== processes


@workflow.defn
class Nobody:
    """Never run: the scheduled runs stay open (ALLOW_ALL starts every slot anyway)."""

    @workflow.run
    async def run(self) -> None:
        raise AssertionError("no worker polls this queue")


async def _owner(store: HistoryStore) -> str | None:
    """The live owner of the cluster's only shard."""
    (row,) = await store.read_shards()
    return None if row.free_at(now_micros()) else row.owner


async def _all_started_after(store: HistoryStore, ids: list[str], moment: int, count: int) -> None:
    """Wait until every schedule has ``count`` slots after ``moment`` started."""

    async def check() -> bool:
        for schedule_id in ids:
            after = [a for a in await _started(store, schedule_id) if a.slot_time > moment]
            if len(after) < count:
                return False
        return True

    await _wait(check, f"{count} slots of every schedule started after {moment}")


@pytest.mark.slow
@pytest.mark.postgres
async def test_schedules_fire_each_slot_once_across_node_kills(
    procs: Processes, pg_url: str
) -> None:
    nodes: dict[str, ServerProcess] = {}
    for name in ("node-a", "node-b", "node-c"):
        flags = ("--node-id", name, "--lease-seconds", str(LEASE_S), "--auth", "off")
        nodes[name] = ServerProcess(
            procs, pg_url, name=name, command="start", flags=(*flags, "--shards", "1")
        )
        await nodes[name].start()
    # The test's own (unfenced) view of the cluster's database.
    store = await HistoryStore.open(pg_url)
    try:
        await _kill_owners_while_firing(store, nodes)
    finally:
        await store.close()


async def _kill_owners_while_firing(store: HistoryStore, nodes: dict[str, ServerProcess]) -> None:
    first = str(await _wait(lambda: _owner(store), "an owner of the shard"))
    # Created through a node that does not fire them: the owner notices on its own.
    via = next(n for n in nodes.values() if n.name != first)
    ids = [f"tick-{uuid.uuid4()}" for _ in range(3)]
    async with await Client.connect(via.address) as client:
        for schedule_id in ids:
            await client.create_schedule(
                schedule_id,
                action=ScheduleActionStartWorkflow(
                    Nobody.run, id=schedule_id, task_queue=f"nobody-{uuid.uuid4()}"
                ),
                spec=ScheduleSpec(interval=timedelta(seconds=1)),
                policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.ALLOW_ALL),
            )
    await _all_started_after(store, ids, 0, 2)

    # SIGKILL the owner mid-way: another node takes the shard once the lease lapses
    # and fires the slots that came due meanwhile, once.
    killed_at = now_micros()
    await nodes[first].kill()
    second = str(await _wait(lambda: _other_owner(store, first), "a new owner after SIGKILL"))
    await _all_started_after(store, ids, killed_at + SECOND_US, 2)

    # SIGTERM the new owner: it hands the shard over at once.
    stopped_at = now_micros()
    nodes[second].proc.popen.send_signal(signal.SIGTERM)
    await _wait(lambda: nodes[second].proc.popen.poll() is not None, "the SIGTERMed node to exit")
    assert nodes[second].proc.popen.returncode == 0, nodes[second].proc.tail()
    third = await _wait(lambda: _other_owner(store, first, second), "the third node to own it")
    assert third not in (first, second)
    await _all_started_after(store, ids, stopped_at + SECOND_US, 2)

    async with await Client.connect(nodes[str(third)].address) as client:
        # Paused, no slot is decided any more: the ones decided all get started.
        for schedule_id in ids:
            await client.get_schedule_handle(schedule_id).pause("checking")

        async def settled() -> bool:
            open_states = (St.PENDING, St.REQUESTED)
            counts = [await store.schedules.count_actions("default", i, open_states) for i in ids]
            return not any(counts)

        await _wait(settled, "every decided slot started")
        for schedule_id in ids:
            await _assert_each_slot_started_once(store, schedule_id, killed_at, stopped_at)
            runs = await client.count_workflows(f"TemporalScheduledById = '{schedule_id}'")
            started = len(await _started(store, schedule_id))
            assert runs == started, (schedule_id, runs, started)  # no run without its slot


async def _other_owner(store: HistoryStore, *not_these: str) -> str | None:
    owner = await _owner(store)
    return None if owner is None or owner in not_these else owner


async def _assert_each_slot_started_once(
    store: HistoryStore, schedule_id: str, *moments: int
) -> None:
    """The decided slots are consecutive seconds spanning the kill and the stop (the
    ledger's key holds each once), and every one is started, as one run with the
    slot's workflow id."""
    actions = await store.schedules.actions("default", schedule_id)
    slots = [a.slot_time for a in actions]
    assert slots == list(range(slots[0], slots[-1] + 1, SECOND_US)), slots
    assert all(slots[0] < moment < slots[-1] for moment in moments)
    assert [a.state for a in actions] == [St.STARTED] * len(actions)
    for action in actions:
        assert action.workflow_id == f"{schedule_id}-{format_rfc3339(action.slot_time)}"
        run = await store.get_current("default", action.workflow_id)
        assert run is not None and run.run_id == action.run_id
