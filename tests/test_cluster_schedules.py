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
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection
from datetime import timedelta
from typing import Any

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


async def _wait(check: Callable[[], object], what: str) -> Any:
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


async def _owners(store: HistoryStore) -> dict[int, str]:
    """shard -> owner of every live lease."""
    now = now_micros()
    return {r.shard_id: r.owner for r in await store.read_shards() if not r.free_at(now)}


async def _owner(store: HistoryStore, schedule_id: str) -> str | None:
    """The live owner of the schedule's shard."""
    owners = await _owners(store)
    return owners.get(schedule_shard("default", schedule_id, store.shard_count))


async def _slots_after(
    store: HistoryStore, ids: list[str], moment: int, count: int, *, started: bool
) -> None:
    """Wait until every schedule has ``count`` slots after ``moment`` decided (or, if
    ``started``, started)."""
    states = (St.STARTED,) if started else ()

    async def check() -> bool:
        for schedule_id in ids:
            actions = await store.schedules.actions("default", schedule_id, states=states)
            if len([a for a in actions if a.slot_time > moment]) < count:
                return False
        return True

    what = "started" if started else "decided"
    await _wait(check, f"{count} slots of every schedule {what} after {moment}")


@contextlib.asynccontextmanager
async def _three_nodes(
    procs: Processes, pg_url: str, *flags: str
) -> AsyncIterator[tuple[HistoryStore, dict[str, ServerProcess]]]:
    """Nodes a, b and c on the test's database, and the test's own (unfenced) view of
    the database."""
    nodes: dict[str, ServerProcess] = {}
    for name in ("node-a", "node-b", "node-c"):
        node_flags = ("--node-id", name, "--lease-seconds", str(LEASE_S), "--auth", "off")
        nodes[name] = ServerProcess(
            procs, pg_url, name=name, command="start", flags=(*node_flags, *flags)
        )
        await nodes[name].start()
    store = await HistoryStore.open(pg_url)
    try:
        yield store, nodes
    finally:
        await store.close()


async def _create(address: str, ids: list[str]) -> None:
    async with await Client.connect(address) as client:
        for schedule_id in ids:
            await client.create_schedule(
                schedule_id,
                action=ScheduleActionStartWorkflow(
                    Nobody.run, id=schedule_id, task_queue=f"nobody-{uuid.uuid4()}"
                ),
                spec=ScheduleSpec(interval=timedelta(seconds=1)),
                policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.ALLOW_ALL),
            )


async def _sigterm(node: ServerProcess) -> None:
    """SIGTERM: the node hands its shards over at once and exits cleanly."""
    node.proc.popen.send_signal(signal.SIGTERM)
    await _wait(lambda: node.proc.popen.poll() is not None, f"{node.name} to exit")
    assert node.proc.popen.returncode == 0, node.proc.tail()


async def _check_after_pause(
    store: HistoryStore, address: str, ids: list[str], *moments: int
) -> None:
    """Pause the schedules (no slot is decided any more), wait until every decided
    slot is started, and check each was started once, as one run."""
    async with await Client.connect(address) as client:
        for schedule_id in ids:
            await client.get_schedule_handle(schedule_id).pause("checking")

        async def settled() -> bool:
            open_states = (St.PENDING, St.REQUESTED)
            counts = [await store.schedules.count_actions("default", i, open_states) for i in ids]
            return not any(counts)

        await _wait(settled, "every decided slot started")
        for schedule_id in ids:
            await _assert_each_slot_started_once(store, schedule_id, *moments)
            runs = await client.count_workflows(f"TemporalScheduledById = '{schedule_id}'")
            started = len(await _started(store, schedule_id))
            assert runs == started, (schedule_id, runs, started)  # no run without its slot


@pytest.mark.slow
@pytest.mark.postgres
async def test_schedules_fire_each_slot_once_across_node_kills(
    procs: Processes, pg_url: str
) -> None:
    """One shard: the schedules and every slot's run live on the same node, so runs
    start throughout, across a SIGKILL of the owner and a SIGTERM of its successor."""
    async with _three_nodes(procs, pg_url, "--shards", "1") as (store, nodes):
        ids = [f"tick-{uuid.uuid4()}" for _ in range(3)]
        first: str = await _wait(lambda: _owner(store, ids[0]), "an owner of the shard")
        # Created through a node that does not fire them: the owner notices on its own.
        await _create(next(n.address for n in nodes.values() if n.name != first), ids)
        await _slots_after(store, ids, 0, 2, started=True)

        # SIGKILL the owner mid-way: another node takes the shard once the lease lapses
        # and fires the slots that came due meanwhile, once.
        killed_at = now_micros()
        await nodes[first].kill()
        second: str = await _wait(lambda: _other_owner(store, ids[0], first), "a new owner")
        await _slots_after(store, ids, killed_at + SECOND_US, 2, started=True)

        # SIGTERM the new owner: it hands the shard over at once.
        stopped_at = now_micros()
        await _sigterm(nodes[second])
        third: str = await _wait(lambda: _other_owner(store, ids[0], first, second), "a third")
        await _slots_after(store, ids, stopped_at + SECOND_US, 2, started=True)
        await _check_after_pause(store, nodes[third].address, ids, killed_at, stopped_at)


@pytest.mark.slow
@pytest.mark.postgres
async def test_schedules_move_with_their_shards(procs: Processes, pg_url: str) -> None:
    """Sixteen shards over three nodes, one schedule on a shard of each. The owner of
    the first schedule's shard is SIGKILLed, then the owner of the second's SIGTERMed:
    the schedules go on at the new owners, each slot decided once. While the nodes
    share the shards a slot's run may live on another node than its schedule (its
    start waits: nothing forwards it yet); the last node holds every shard and starts
    them all, once."""
    async with _three_nodes(procs, pg_url) as (store, nodes):
        owners = await _wait(lambda: _spread(store, set(nodes)), "the shards spread")
        ids = [_schedule_id_on(owners, name, store.shard_count) for name in sorted(nodes)]
        await _create(nodes["node-a"].address, ids)
        await _slots_after(store, ids, 0, 2, started=False)

        killed_at = now_micros()
        await nodes["node-a"].kill()
        await _wait(lambda: _other_owner(store, ids[0], "node-a"), "a new owner")
        await _slots_after(store, ids, killed_at + SECOND_US, 2, started=False)

        stopped_at = now_micros()
        second: str = await _wait(lambda: _other_owner(store, ids[1], "node-a"), "b's owner")
        await _sigterm(nodes[second])
        (last,) = set(nodes) - {"node-a", second}
        await _wait(lambda: _spread(store, {last}), f"{last} to hold every shard")
        await _slots_after(store, ids, stopped_at + SECOND_US, 2, started=False)
        await _check_after_pause(store, nodes[last].address, ids, killed_at, stopped_at)


async def _spread(store: HistoryStore, names: set[str]) -> dict[int, str] | None:
    """The owners once every shard is held by one of ``names``, each holding its
    share (balanced: no node sheds shards any more)."""
    owners = await _owners(store)
    counts = Counter(owners.values())
    share = -(-store.shard_count // len(names))
    held_by_them = len(owners) == store.shard_count and set(counts) == names
    if held_by_them and all(counts[name] <= share for name in names):
        return owners
    return None


def _schedule_id_on(owners: dict[int, str], node: str, shard_count: int) -> str:
    while True:
        schedule_id = f"tick-{uuid.uuid4()}"
        if owners[schedule_shard("default", schedule_id, shard_count)] == node:
            return schedule_id


async def _other_owner(store: HistoryStore, schedule_id: str, *not_these: str) -> str | None:
    """The live owner of the schedule's shard, unless it is one of ``not_these``."""
    owner = await _owner(store, schedule_id)
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
