"""Handoff of a run with activities in flight (server/_handoff.py), real processes: a
cloud and an edge, each on its own SQLite file, the link through a TCP proxy
the test cuts during the handoff (tests/helpers_sites.py).

As in Temporal's failover between clusters, the new home owns the run's pending
activities: one waiting for a worker is dispatched there; one started at the old
home runs on, and the worker's answer, which reaches the old home after the
HANDOFF, is forwarded to the new home (UNAVAILABLE to the worker while that cannot
be done, which it retries); if that worker goes away, the activity's timeout fires
at the new home and the retry runs there.
"""

from __future__ import annotations

import asyncio
import importlib.util
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import ET, WORKER_PROC, Processes, bounded, eventually, of_type, read_marker
from helpers_sites import SitePair, handed, history_of, same_history, site_status

from tideflow.worker_sdk import Worker, activity, workflow
from tideflow.worker_sdk.exceptions import NotFoundError

_spec = importlib.util.spec_from_file_location("worker_proc", WORKER_PROC)
assert _spec is not None and _spec.loader is not None
_proc_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_proc_module)
CrashyWorkflow = _proc_module.CrashyWorkflow
stall_on_first_attempt = _proc_module.stall_on_first_attempt


class Gate:
    """The held activity's state, seen by the test: started, released, returned."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.returned = asyncio.Event()
        self.runs = 0


GATE = Gate()


@activity.defn
async def held(value: str) -> str:
    """Runs at the edge until the test releases it."""
    GATE.runs += 1
    GATE.started.set()
    await GATE.release.wait()
    GATE.returned.set()
    return f"held:{value}:{activity.info().attempt}"


@activity.defn
async def elsewhere(value: str) -> str:
    """Polled for only at the cloud: waits at the edge, unstarted, until the handoff."""
    return f"elsewhere:{value}"


@workflow.defn
class TwoActivities:
    @workflow.run
    async def run(self, value: str, other_queue: str) -> list[str]:
        first = workflow.execute_activity(held, value, start_to_close_timeout=timedelta(minutes=5))
        second = workflow.execute_activity(
            elsewhere,
            value,
            task_queue=other_queue,
            start_to_close_timeout=timedelta(minutes=5),
        )
        return list(await asyncio.gather(first, second))


@activity.defn
async def held_in_the_cloud(value: str) -> str:
    """Placed at the cloud: offered by the edge (the home), run by the cloud's worker
    until the test releases it."""
    GATE.runs += 1
    GATE.started.set()
    await GATE.release.wait()
    return f"cloud:{value}"


@workflow.defn
class PlacedInTheCloud:
    @workflow.run
    async def run(self, value: str) -> str:
        result: str = await workflow.execute_activity(
            held_in_the_cloud,
            value,
            start_to_close_timeout=timedelta(minutes=5),
            placement="cloud",
        )
        return result


@pytest.fixture
async def sites(procs: Processes, tmp_path: Path) -> AsyncIterator[SitePair]:
    pair = SitePair(procs, f"sqlite:///{tmp_path / 'cloud.db'}", tmp_path / "edge.db")
    await pair.start_edge()
    try:
        yield pair
    finally:
        await pair.close()


def _started(events: list[Any]) -> list[Any]:
    return of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_STARTED)


def _type_of(events: list[Any], started: Any) -> str:
    """The activity type of an ActivityTaskStarted event (from its scheduled event)."""
    scheduled = events[started.activity_task_started_event_attributes.scheduled_event_id - 1]
    return str(scheduled.activity_task_scheduled_event_attributes.activity_type.name)


async def _pending_activities(handle: Any, count: int) -> bool:
    return len((await handle.describe()).raw.pending_activities) == count


async def test_activities_in_flight_follow_a_handoff_made_with_the_link_cut(
    sites: SitePair,
) -> None:
    cloud, edge = await sites.start_linked()
    tq = f"handoff-acts-{uuid.uuid4()}"
    other = f"{tq}-cloud-only"
    global GATE
    GATE = Gate()
    async with (
        Worker(edge, task_queue=tq, workflows=[TwoActivities], activities=[held]),
        Worker(cloud, task_queue=tq, workflows=[TwoActivities]),
        Worker(cloud, task_queue=other, activities=[elsewhere]),
    ):
        started = await edge.start_workflow(
            TwoActivities.run, args=["v", other], id=tq, task_queue=tq
        )
        wid, rid = started.id, started.run_id or ""
        at_edge = edge.get_workflow_handle(wid, run_id=rid)
        at_cloud = cloud.get_workflow_handle(wid, run_id=rid)
        await bounded(GATE.started.wait())
        await eventually(lambda: _pending_activities(at_edge, 2), "both activities scheduled")
        await eventually(await same_history(edge, cloud, wid, rid), "the cloud's replica")

        # The edge hands the run over with the link down: ``held`` is started at the
        # edge, ``elsewhere`` waits there for a worker the edge does not have.
        sites.proxy.cut()
        await eventually(handed(at_edge, "cloud"), "handoff at the edge")
        frozen = await history_of(edge, wid, rid)
        assert frozen[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_HANDOFF
        # ``held`` completes after the HANDOFF: its answer reaches the edge, which no
        # longer writes the run and cannot reach the cloud: the worker retries.
        GATE.release.set()
        await bounded(GATE.returned.wait())
        assert (await at_cloud.describe()).home_cluster == "edge1"  # the cloud cannot know

        sites.proxy.restore()
        # The cloud takes over, runs ``elsewhere`` with its own worker and gets
        # ``held``'s result forwarded by the edge: the run completes at the cloud.
        assert await bounded(at_cloud.result()) == ["held:v:1", "elsewhere:v"]
        await eventually(await same_history(cloud, edge, wid, rid), "the edge's replica")

    assert GATE.runs == 1  # the started attempt's answer was used, not a re-run
    assert "forwarded to its new home cloud" in sites.edge.proc.err.read_text()
    events = await history_of(cloud, wid, rid)
    handoff = of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_HANDOFF)
    assert [e.event_id for e in handoff] == [frozen[-1].event_id]
    completed = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)
    assert len(completed) == 2
    assert all(e.event_id > handoff[0].event_id and e.version == 2 for e in completed)
    # ``held`` ran once, attempt 1, by the edge's worker.
    (held_started,) = [e for e in _started(events) if _type_of(events, e) == "held"]
    assert held_started.activity_task_started_event_attributes.attempt == 1
    assert held_started.activity_task_started_event_attributes.identity == edge.identity
    assert (await site_status(cloud)).replication_alarms == 0
    assert (await site_status(edge)).replication_alarms == 0


async def test_an_activity_whose_worker_died_is_retried_at_the_new_home(
    sites: SitePair, procs: Processes, tmp_path: Path
) -> None:
    cloud, edge = await sites.start_linked()
    tq = f"handoff-retry-{uuid.uuid4()}"
    marker = tmp_path / "marker"
    edge_worker = await procs.start_worker("edge-worker", sites.edge.address, tq, "crashy")
    started = await edge.start_workflow(
        CrashyWorkflow.run, {"marker": str(marker), "value": "x"}, id=tq, task_queue=tq
    )
    wid, rid = started.id, started.run_id or ""
    at_edge = edge.get_workflow_handle(wid, run_id=rid)
    at_cloud = cloud.get_workflow_handle(wid, run_id=rid)
    await eventually(lambda: read_marker(marker, 1) is not None, "attempt 1 at the edge")
    first = read_marker(marker, 1)
    assert first is not None and first["pid"] == edge_worker.pid

    await eventually(await same_history(edge, cloud, wid, rid), "the cloud's replica")
    # The edge's worker dies mid attempt, and the run is handed over with the link cut.
    await procs.sigkill(edge_worker)
    sites.proxy.cut()
    await eventually(handed(at_edge, "cloud"), "handoff at the edge")
    sites.proxy.restore()
    # The start-to-close timeout (2 s) fires at the cloud, which retries the activity
    # per its retry policy on its own worker.
    async with Worker(
        cloud, task_queue=tq, workflows=[CrashyWorkflow], activities=[stall_on_first_attempt]
    ):
        assert await bounded(at_cloud.result()) == "x:done-on-attempt-2"
    second = read_marker(marker, 2)
    assert second is not None and second["pid"] != edge_worker.pid
    assert read_marker(marker, 3) is None
    events = await history_of(cloud, wid, rid)
    (activity_started,) = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_STARTED)
    assert activity_started.activity_task_started_event_attributes.attempt == 2
    assert activity_started.version == 2
    assert (await at_cloud.describe()).home_cluster == "cloud"


async def test_a_task_run_over_the_link_follows_its_run_handed_to_the_worker_site(
    sites: SitePair,
) -> None:
    """An edge-homed run's task placed at the cloud runs on the cloud's worker, with a
    token carrying the edge's; the run is then handed to the cloud. The worker's
    completion goes to the edge (the token's home), which no longer writes the run
    and sends it back to the cloud, its new home: applied once."""
    cloud, edge = await sites.start_linked()
    tq = f"handoff-placed-{uuid.uuid4()}"
    global GATE
    GATE = Gate()
    async with (
        Worker(edge, task_queue=tq, workflows=[PlacedInTheCloud]),
        Worker(
            cloud,
            task_queue=tq,
            workflows=[PlacedInTheCloud],
            activities=[held_in_the_cloud],
            tier="cloud",
        ),
    ):
        started = await edge.start_workflow(PlacedInTheCloud.run, "v", id=tq, task_queue=tq)
        wid, rid = started.id, started.run_id or ""
        at_edge = edge.get_workflow_handle(wid, run_id=rid)
        at_cloud = cloud.get_workflow_handle(wid, run_id=rid)
        await bounded(GATE.started.wait())
        await eventually(handed(at_edge, "cloud"), "handoff at the edge")

        async def cloud_home() -> bool:
            try:
                return bool((await at_cloud.describe()).home_cluster == "cloud")
            except NotFoundError:  # no replica there yet
                return False

        await eventually(cloud_home, "the cloud took the run over")
        GATE.release.set()
        assert await bounded(at_cloud.result()) == "cloud:v"
    assert GATE.runs == 1
    events = await history_of(cloud, wid, rid)
    (completed,) = of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)
    assert completed.version == 2
    assert "forwarded to its new home cloud" in sites.edge.proc.err.read_text()
