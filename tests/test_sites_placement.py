"""Placement across sites (server/_remote_tasks.py): a cloud process and an edge
process linked through a TCP proxy the test cuts (tests/helpers_sites.py), a worker
attached to each. The runs are homed at the edge: a task only a cloud worker meets runs
on it (the edge records its start and completion); an ``auto`` task runs at the edge
while the cloud is unreachable; a task placed at the cloud waits while the link is
down and runs once, at the cloud, when it returns. Where a task ran is the home's
record (ActivityTaskStarted) and matches the worker that ran it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import cast

import pytest
from helpers import ET, Processes, eventually, of_type
from helpers_sites import SitePair, history_of, linked, wait_linked

from tideflow.api.v1 import common_pb2, service_pb2
from tideflow.api.v1.history_pb2 import HistoryEvent
from tideflow.worker_sdk import Client, Worker, activity, workflow
from tideflow.worker_sdk.exceptions import NotFoundError
from tideflow.worker_sdk.placement import Placement

# (site of the worker, tag) of every activity attempt the workers ran.
RAN: list[tuple[str, str]] = []


# The heartbeat details the second attempt of a GPU task found.
DETAILS: list[list[object]] = []
# The task token the cloud's worker completed a GPU task with (the cloud's own,
# carrying the edge's).
TOKENS: dict[str, bytes] = {}
# Set by the test once the home shows the first attempt's heartbeat.
HEARTBEAT_AT_HOME = asyncio.Event()


@activity.defn(name="where")
async def where_cloud(tag: str) -> str:
    RAN.append(("cloud", tag))
    info = activity.info()
    if tag.startswith("g-"):  # its failure and heartbeat travel to the home too
        if info.attempt == 1:
            activity.heartbeat("halfway")
            await HEARTBEAT_AT_HOME.wait()
            raise RuntimeError("the first attempt fails")
        DETAILS.append(info.heartbeat_details)
        TOKENS[tag] = info.task_token
    return "cloud"


@activity.defn(name="where")
async def where_edge(tag: str) -> str:
    RAN.append(("edge1", tag))
    return "edge1"


@workflow.defn
class Placed:
    """Runs the activity ``where`` with the placement and labels it is given."""

    @workflow.run
    async def run(self, placement: str, labels: list[str]) -> str:
        result: str = await workflow.execute_activity(
            "where",
            workflow.info().workflow_id,
            start_to_close_timeout=timedelta(seconds=30),
            placement=cast(Placement, placement),
            requirements={"labels": labels},
        )
        return result


@pytest.fixture
async def sites(procs: Processes, pg_url: str, tmp_path: Path) -> AsyncIterator[SitePair]:
    pair = SitePair(procs, pg_url, tmp_path / "edge.db")
    await pair.start_edge()
    await pair.cloud.start()
    try:
        yield pair
    finally:
        await pair.close()


def _cloud_worker(cloud: Client, tq: str) -> Worker:
    return Worker(
        cloud,
        task_queue=tq,
        workflows=[Placed],
        activities=[where_cloud],
        tier="cloud",
        capabilities={"labels": ["gpu", "vision"]},
        identity="cloud-worker",
    )


def _edge_activity_worker(edge: Client, tq: str) -> Worker:
    return Worker(
        edge,
        task_queue=tq,
        activities=[where_edge],
        capabilities={"labels": ["vision"]},
        identity="edge-worker",
    )


def _activity_polled(client: Client, tq: str, identity: str) -> Callable[[], Awaitable[bool]]:
    """A check: ``identity`` polls the activity queue ``tq`` at that site now."""

    async def check() -> bool:
        request = service_pb2.DescribeTaskQueueRequest(
            namespace=client.namespace, task_queue_type=service_pb2.TASK_QUEUE_TYPE_ACTIVITY
        )
        request.task_queue.name = tq
        response = await client.call(client.service.DescribeTaskQueue, request)
        return any(p.identity == identity and p.polling for p in response.pollers)

    return check


def _scheduled(client: Client, workflow_id: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        events = await history_of(client, workflow_id, "")
        return bool(of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED))

    return check


def _heartbeat_at(client: Client, workflow_id: str) -> Callable[[], Awaitable[bool]]:
    """A check: the run's pending activity has heartbeat details (at its home: only
    the forwarded RecordActivityHeartbeat can have put them there)."""

    async def check() -> bool:
        description = await client.get_workflow_handle(workflow_id).describe()
        pending = description.raw.pending_activities
        return bool(pending) and pending[0].HasField("heartbeat_details")

    return check


def _waiting(client: Client, workflow_id: str, reason: str) -> Callable[[], Awaitable[bool]]:
    """A check: describe says the run's pending activity waits for ``reason``."""

    async def check() -> bool:
        description = await client.get_workflow_handle(workflow_id).describe()
        pending = description.raw.pending_activities
        return bool(pending) and reason in pending[0].waiting_reason

    return check


def _started(events: list[HistoryEvent]) -> list[tuple[str, int, str]]:
    """(site, tier, worker identity) of each ActivityTaskStarted: the home's record."""
    return [
        (a.site, a.tier, a.identity)
        for e in of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_STARTED)
        for a in [e.activity_task_started_event_attributes]
    ]


async def _linked_pair(sites: SitePair) -> tuple[Client, Client]:
    cloud = await Client.connect(sites.cloud.address)
    edge = await Client.connect(sites.edge.address)
    await wait_linked(cloud, edge)
    return cloud, edge


async def _cut(sites: SitePair, edge: Client) -> None:
    sites.proxy.cut()
    await eventually(lambda: _unlinked(edge), "the edge sees the link down")


async def _unlinked(edge: Client) -> bool:
    return not await linked(edge, "cloud")


async def test_tasks_run_at_the_site_their_placement_names(sites: SitePair) -> None:
    """One pair of sites for both parts (starting two servers is most of the time)."""
    cloud, edge = await _linked_pair(sites)
    await _only_cloud_workers_meet_it(cloud, edge)
    await _link_down(sites, cloud, edge)


async def _only_cloud_workers_meet_it(cloud: Client, edge: Client) -> None:
    """The link is up: a task only the cloud's worker meets runs there."""
    tq = f"placed-{uuid.uuid4()}"
    async with (
        _cloud_worker(cloud, tq),
        Worker(edge, task_queue=tq, workflows=[Placed]),
        _edge_activity_worker(edge, tq),
    ):
        await eventually(_activity_polled(cloud, tq, "cloud-worker"), "the cloud worker polls")
        # The edge's worker polls: an ``auto`` task it meets stays at the home.
        await eventually(_activity_polled(edge, tq, "edge-worker"), "the edge worker polls")
        local = await edge.start_workflow(
            Placed.run, args=["auto", []], id=f"l-{tq}", task_queue=tq
        )
        assert await local.result() == "edge1"
        # Only the cloud worker has a GPU: the edge's task runs there.
        gpu = await edge.start_workflow(
            Placed.run, args=["auto", ["gpu"]], id=f"g-{tq}", task_queue=tq
        )
        await eventually(_heartbeat_at(edge, gpu.id), "the heartbeat reached the home")
        HEARTBEAT_AT_HOME.set()
        assert await gpu.result() == "cloud"
        # The other way: a cloud run's task placed at the edge runs on the edge's worker
        # (the cloud's calls travel on the stream the edge dialled).
        from_cloud = await cloud.start_workflow(
            Placed.run, args=["edge", []], id=f"e-{tq}", task_queue=tq
        )
        assert await from_cloud.result() == "edge1"
        # A task no worker meets waits at its home, offered only to a site whose
        # advertised workers could meet it: none has a TPU, and the cloud's record
        # (shared metadata) advertises its worker's GPU and vision labels.
        nobody = await edge.start_workflow(
            Placed.run, args=["auto", ["tpu"]], id=f"n-{tq}", task_queue=tq
        )
        declined = "; not offered to site cloud: no worker it advertises meets it"
        await eventually(_waiting(edge, nobody.id, declined), "describe: not offered")
        reason = (await edge.get_workflow_handle(nobody.id).describe()).raw
        assert "; offered to site" not in reason.pending_activities[0].waiting_reason
        await nobody.terminate()
        # One a cloud worker meets (a GPU, no worker for it at the edge) is offered.
        offered = await edge.start_workflow(
            Placed.run, args=["cloud", ["gpu"]], id=f"o-{tq}", task_queue=tq
        )
        assert await offered.result() == "cloud"
    # The same completion again, as a worker retrying a lost reply would: the home
    # refuses it (the attempt is closed) and records nothing more.
    again = service_pb2.RespondActivityTaskCompletedRequest(
        task_token=TOKENS[gpu.id], identity="cloud-worker"
    )
    with pytest.raises(NotFoundError):
        await cloud.call(cloud.service.RespondActivityTaskCompleted, again)
    gpu_events = await history_of(edge, gpu.id, "")
    assert _started(gpu_events) == [("cloud", common_pb2.EXECUTION_SITE_CLOUD, "cloud-worker")]
    # The failed first attempt (retries write no events) and its heartbeat reached
    # the home, which offered the retry to the cloud again.
    (started,) = of_type(gpu_events, ET.EVENT_TYPE_ACTIVITY_TASK_STARTED)
    attributes = started.activity_task_started_event_attributes
    assert attributes.attempt == 2
    assert "the first attempt fails" in attributes.last_failure.message
    assert DETAILS == [["halfway"]]
    completed = of_type(gpu_events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)
    assert [e.activity_task_completed_event_attributes.site for e in completed] == ["cloud"]
    assert gpu_events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
    assert (await edge.get_workflow_handle(gpu.id).describe()).home_cluster == "edge1"
    assert _started(await history_of(edge, local.id, ""))[0][0] == "edge1"
    assert RAN.count(("cloud", gpu.id)) == 2 and ("edge1", local.id) in RAN
    cloud_events = await history_of(cloud, from_cloud.id, "")
    assert _started(cloud_events) == [("edge1", common_pb2.EXECUTION_SITE_EDGE, "edge-worker")]
    assert RAN.count(("edge1", from_cloud.id)) == 1


async def _link_down(sites: SitePair, cloud: Client, edge: Client) -> None:
    """The link is cut: ``auto`` runs at the edge, a cloud task waits, then runs once."""
    tq = f"offline-{uuid.uuid4()}"
    async with _cloud_worker(cloud, tq), Worker(edge, task_queue=tq, workflows=[Placed]):
        await eventually(_activity_polled(cloud, tq, "cloud-worker"), "the cloud worker polls")
        await _cut(sites, edge)
        # Both sites' workers meet the ``auto`` task; the edge has none polling yet and
        # the cloud's cannot be reached: it waits at the edge for one of its own. The
        # task placed at the cloud waits for the link.
        auto = await edge.start_workflow(
            Placed.run, args=["auto", ["vision"]], id=f"a-{tq}", task_queue=tq
        )
        placed = await edge.start_workflow(
            Placed.run, args=["cloud", []], id=f"c-{tq}", task_queue=tq
        )
        await eventually(_scheduled(edge, auto.id), "the auto activity scheduled")
        await eventually(_scheduled(edge, placed.id), "the cloud activity scheduled")
        async with _edge_activity_worker(edge, tq):
            assert await auto.result() == "edge1"
            description = await edge.get_workflow_handle(placed.id).describe()
            (pending,) = description.raw.pending_activities
            assert not pending.last_worker_identity
            assert "placement cloud" in pending.waiting_reason
            assert "offered" not in pending.waiting_reason  # no link, no offer
            assert not [r for r in RAN if r[1] == placed.id]
            sites.proxy.restore()
            assert await placed.result() == "cloud"
    events = await history_of(edge, auto.id, "")
    assert _started(events) == [("edge1", common_pb2.EXECUTION_SITE_EDGE, "edge-worker")]
    assert [r for r in RAN if r[1] == auto.id] == [("edge1", auto.id)]
    # The task placed at the cloud ran there once, recorded by its home, the edge.
    events = await history_of(edge, placed.id, "")
    assert _started(events) == [("cloud", common_pb2.EXECUTION_SITE_CLOUD, "cloud-worker")]
    assert len(of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)) == 1
    assert [r for r in RAN if r[1] == placed.id] == [("cloud", placed.id)]
