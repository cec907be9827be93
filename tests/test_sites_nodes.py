"""A cloud site of two nodes on one PostgreSQL database, an edge (its own SQLite file)
linked to it through one TCP proxy per node (``--upstream proxyA,proxyB``): the site
acts as one (server/_site_nodes.py).

The edge links to one node; the runs it replicates, and those the requests it forwards
act on, live on the shards of both. Cloud clients signal and cancel the edge's runs
through the node not holding the link; the cloud's own runs, on both nodes' shards,
are replicated to the edge and signalled from it. Then the node holding the link is
SIGKILLed: the edge links to the other node, which takes the dead node's shards over,
and everything converges: every replica equals its home's history event for event,
every signal and cancel applied once, nothing forked. Children homed across the
sites start and report from the node not holding the link, both ways.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import ET, Processes, ServerProcess, of_type
from helpers_cluster import CONDITION_TIMEOUT_S, split, start_node, wait, workflow_ids
from helpers_sites import TcpProxy, handed, history_of, same_history, site_status
from test_sites import Collector, _signal
from test_sites_placement import RAN, Placed, _cloud_worker, _edge_activity_worker, _started

from tideflow.api.v1 import common_pb2
from tideflow.api.v1.history_pb2 import HistoryEvent
from tideflow.api.v1.replication_pb2 import DescribeSiteResponse
from tideflow.history import HistoryStore, TaskKind, queue_shard_of
from tideflow.worker_sdk import Client, Worker, WorkflowExecutionStatus, workflow

pytestmark = pytest.mark.postgres

LEASE_S = 2.0
EDGE_RUNS = 6  # homed at the edge, half on each cloud node's shards
CLOUD_RUNS = 4  # homed at the cloud, half on each node's shards
SIGNALS_PER_RUN = 2
CANCELLED_EVERY = 3


@workflow.defn
class Kid:
    @workflow.run
    async def run(self, value: str) -> str:
        return f"kid:{value}"


@workflow.defn
class ParentOfKid:
    """Runs a child homed at ``home`` with the id ``kid_id`` (a shard chosen by the
    test)."""

    @workflow.run
    async def run(self, kid_id: str, home: str) -> str:
        result: str = await workflow.execute_child_workflow(
            Kid.run, args=[home], id=kid_id, home=home
        )
        return f"parent:{result}"


@dataclass
class Site:
    nodes: dict[str, ServerProcess]
    proxies: dict[str, TcpProxy]
    edge: ServerProcess

    def node_behind(self, proxy_address: str) -> str:
        """The cloud node the edge reaches at ``proxy_address``."""
        (name,) = [n for n, p in self.proxies.items() if p.address == proxy_address]
        return name


@pytest.fixture
def store_url(pg_url: str) -> str:
    return pg_url


@pytest.fixture
async def site(procs: Processes, pg_url: str, tmp_path: Path) -> AsyncIterator[Site]:
    # Each node's connections capped: PostgreSQL's are shared with the other tests.
    url = f"{pg_url}?max_connections=6"
    nodes = {
        name: await start_node(procs, url, name, LEASE_S, "--cluster-name", "cloud")
        for name in ("node-a", "node-b")
    }
    proxies = {name: TcpProxy(node.port) for name, node in nodes.items()}
    for proxy in proxies.values():
        await proxy.start()
    upstreams = ",".join(p.address for p in proxies.values())
    edge = ServerProcess(
        procs,
        f"sqlite:///{tmp_path / 'edge.db'}",
        name="edge",
        flags=("--cluster-name", "edge1", "--upstream", upstreams),
    )
    await edge.start()
    try:
        yield Site(nodes, proxies, edge)
    finally:
        for proxy in proxies.values():
            await proxy.close()


async def _link_address(edge: Client) -> str:
    """The upstream node address the edge's link is up with ("" while down)."""
    status = await site_status(edge)
    return next((p.address for p in status.peers if p.site == "cloud" and p.connected), "")


def _closed(client: Client, wid: str, rid: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        status = (await client.get_workflow_handle(wid, run_id=rid).describe()).status
        return bool(status != WorkflowExecutionStatus.RUNNING)

    return check


def _link_held_by(cloud: Client, node: str) -> Callable[[], Awaitable[bool]]:
    """The cloud node ``cloud`` names ``node`` as the one holding the edge's link."""

    async def check() -> bool:
        status = await site_status(cloud)
        held = [p for p in status.peers if p.site == "edge1" and p.connected]
        return bool(held) and held[0].address.startswith(f"node {node} (")

    return check


def _linked_to(edge: Client, address: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await _link_address(edge) == address

    return check


def _signals_once(events: list[HistoryEvent], sent: list[str]) -> bool:
    """Each of ``sent`` signalled exactly once, and no other signal."""
    signalled = [
        e.workflow_execution_signaled_event_attributes.request_id
        for e in of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)
    ]
    return sorted(signalled) == sorted(sent)


async def test_a_site_of_two_nodes_acts_as_one(site: Site, store: HistoryStore) -> None:
    owners = await wait(lambda: split(store, "node-a", "node-b"), "a balanced split")
    tq = f"nodes-{uuid.uuid4().hex[:8]}"
    shards = store.shard_count
    edge_ids = [
        *workflow_ids(owners, "node-a", EDGE_RUNS // 2, f"e-{tq}-a", shards),
        *workflow_ids(owners, "node-b", EDGE_RUNS // 2, f"e-{tq}-b", shards),
    ]
    cloud_ids = [
        *workflow_ids(owners, "node-a", CLOUD_RUNS // 2, f"c-{tq}-a", shards),
        *workflow_ids(owners, "node-b", CLOUD_RUNS // 2, f"c-{tq}-b", shards),
    ]
    edge = await Client.connect(site.edge.address)
    clouds = {name: await Client.connect(node.address) for name, node in site.nodes.items()}
    holder = site.node_behind(await wait(lambda: _link_address(edge), "the edge linked"))
    other = next(n for n in clouds if n != holder)
    via = clouds[other]  # the cloud node not holding the link
    # The cloud's worker polls either node (it moves on when its node dies).
    polling = await Client.connect(",".join(node.address for node in site.nodes.values()))
    async with (
        Worker(edge, task_queue=tq, workflows=[Collector]),
        Worker(polling, task_queue=tq, workflows=[Collector]),
    ):
        runs = {}
        for wid in edge_ids:
            started = await edge.start_workflow(
                Collector.run, SIGNALS_PER_RUN, id=wid, task_queue=tq
            )
            runs[wid] = started.run_id or ""
        for wid in cloud_ids:
            started = await via.start_workflow(Collector.run, 1, id=wid, task_queue=tq)
            runs[wid] = started.run_id or ""
        # Replicas both ways, whichever node holds each run's shard.
        for wid in edge_ids:
            await wait(await same_history(edge, via, wid, runs[wid]), f"{wid} at the cloud")
        for wid in cloud_ids:
            await wait(await same_history(via, edge, wid, runs[wid]), f"{wid} at the edge")

        # Signals through the node not holding the link: half while linked, the rest
        # (and the cancels) while the edge is cut off and runs on its own.
        sent: dict[str, list[str]] = {}
        cancelled = set()
        for index, wid in enumerate(edge_ids):
            if index % CANCELLED_EVERY == 0:
                cancelled.add(wid)
                continue
            await _signal(via, wid, runs[wid], "s0", f"{wid}-0")
            sent[wid] = [f"{wid}-0"]
        for proxy in site.proxies.values():
            proxy.cut()
        offline = await edge.start_workflow(Collector.run, 0, id=f"off-{tq}", task_queue=tq)
        assert await offline.result() == []
        runs[offline.id] = offline.run_id or ""
        for wid in edge_ids:
            if wid in cancelled:
                for _ in range(2):
                    await via.get_workflow_handle(wid, run_id=runs[wid]).cancel()
                continue
            for _ in range(2):  # each sent twice: applied once
                assert await _signal(via, wid, runs[wid], "s1", f"{wid}-1") is True
            sent[wid].append(f"{wid}-1")
        for proxy in site.proxies.values():
            proxy.restore()
        holder = site.node_behind(await wait(lambda: _link_address(edge), "the edge relinked"))

        # The cloud's runs signalled from the edge: forwarded over the link, applied by
        # the owner of each run's shard.
        for wid in cloud_ids:
            await _signal(edge, wid, runs[wid], "from-edge", f"{wid}-edge")
        # The other node knows which node holds the link (its site status says so).
        bystander = clouds[next(n for n in clouds if n != holder)]
        await wait(_link_held_by(bystander, holder), f"the link shown held by {holder}")
        await site.nodes[holder].kill()
        survivor_name = next(n for n in clouds if n != holder)
        survivor = clouds[survivor_name]
        await wait(_linked_to(edge, site.proxies[survivor_name].address), "linked to the survivor")
        for wid, rid in runs.items():
            home = survivor if wid in cloud_ids else edge
            await wait(_closed(home, wid, rid), f"{wid} closed at home")
        for wid, rid in runs.items():
            home, replica = (survivor, edge) if wid in cloud_ids else (edge, survivor)
            await wait(await same_history(home, replica, wid, rid), f"{wid} replicated")

    for wid in edge_ids:
        events = await history_of(edge, wid, runs[wid])
        assert [e.event_id for e in events] == list(range(1, len(events) + 1))
        cancels = of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED)
        if wid in cancelled:
            assert len(cancels) == 1 and _signals_once(events, []), wid
            assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED
        else:
            assert not cancels and _signals_once(events, sent[wid]), wid
            assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
        assert {e.version for e in events} == {1}  # never handed anywhere: no fork
    for wid in cloud_ids:
        events = await history_of(survivor, wid, runs[wid])
        assert _signals_once(events, [f"{wid}-edge"]), wid
        assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
    for client in (edge, survivor):
        status = await wait(functools.partial(_drained, client), "inboxes drained")
        assert status.replication_alarms == 0
    assert await _link_held_by(survivor, survivor_name)()


async def _drained(client: Client) -> DescribeSiteResponse | None:
    status = await site_status(client)
    return status if status.inbox_depth == 0 else None


def _queue_served_by(owners: dict[int, str], node: str, tag: str, shards: int) -> str:
    """A task queue name whose activity queue ``node`` serves (``owners``)."""
    for i in range(10_000):
        name = f"{tag}-{i}"
        if owners.get(queue_shard_of("default", name, TaskKind.ACTIVITY, shards)) == node:
            return name
    raise AssertionError(f"no queue served by {node}")


async def test_placement_and_handoff_across_the_nodes_of_a_site(
    site: Site, store: HistoryStore
) -> None:
    """Placement between the edge and a queue served by the cloud node that does not
    hold the link: its tasks are offered over the link, the edge's offers reach its
    pollers, and every start and outcome is recorded by the run's home. Then a handoff
    asked of that node moves an edge run on its shard to the cloud."""
    owners = await wait(lambda: split(store, "node-a", "node-b"), "a balanced split")
    edge = await Client.connect(site.edge.address)
    holder = site.node_behind(await wait(lambda: _link_address(edge), "the edge linked"))
    other = next(n for n in site.nodes if n != holder)
    tq = _queue_served_by(owners, other, f"placed-{uuid.uuid4().hex[:8]}", store.shard_count)
    cloud = await Client.connect(",".join(node.address for node in site.nodes.values()))
    async with (
        _cloud_worker(cloud, tq),
        Worker(edge, task_queue=tq, workflows=[Placed]),
        _edge_activity_worker(edge, tq),
    ):
        # A cloud run's task placed at the edge, waiting at the node serving its queue.
        from_cloud = await cloud.start_workflow(
            Placed.run, args=["edge", []], id=f"e-{tq}", task_queue=tq
        )
        # An edge run's task placed at the cloud, held by the node serving its queue.
        from_edge = await edge.start_workflow(
            Placed.run, args=["cloud", []], id=f"c-{tq}", task_queue=tq
        )
        assert await asyncio.wait_for(from_cloud.result(), CONDITION_TIMEOUT_S) == "edge1"
        assert await asyncio.wait_for(from_edge.result(), CONDITION_TIMEOUT_S) == "cloud"
    cloud_events = await history_of(cloud, from_cloud.id, "")
    assert _started(cloud_events) == [("edge1", common_pb2.EXECUTION_SITE_EDGE, "edge-worker")]
    edge_events = await history_of(edge, from_edge.id, "")
    assert _started(edge_events) == [("cloud", common_pb2.EXECUTION_SITE_CLOUD, "cloud-worker")]
    assert RAN.count(("edge1", from_cloud.id)) == 1 and RAN.count(("cloud", from_edge.id)) == 1
    await _handed_to_the_cloud(site, owners, store.shard_count, other)


async def _handed_to_the_cloud(site: Site, owners: dict[int, str], shards: int, other: str) -> None:
    """An edge run on the shard of the node not holding the link, handed to the cloud
    through that node: the handoff travels over the other node's link, the HANDOFF is
    applied and the run taken over by the shard's owner, which runs it on."""
    edge = await Client.connect(site.edge.address)
    via = await Client.connect(site.nodes[other].address)
    tq = f"handed-{uuid.uuid4().hex[:8]}"
    (wid,) = workflow_ids(owners, other, 1, tq, shards)
    async with (
        Worker(edge, task_queue=tq, workflows=[Collector]),
        Worker(via, task_queue=tq, workflows=[Collector]),
    ):
        started = await edge.start_workflow(Collector.run, 2, id=wid, task_queue=tq)
        rid = started.run_id or ""
        assert await _signal(edge, wid, rid, "a", f"{wid}-a") is False  # applied at home
        await wait(await same_history(edge, via, wid, rid), "the cloud's replica")
        await wait(handed(via.get_workflow_handle(wid, run_id=rid), "cloud"), "handed")
        await wait(_homed(via, wid, rid, "cloud"), "the cloud took the run over")
        await _signal(via, wid, rid, "b", f"{wid}-b")
        assert await asyncio.wait_for(started.result(), CONDITION_TIMEOUT_S) == ["a", "b"]
        await wait(await same_history(via, edge, wid, rid), "the edge's replica")
    events = await history_of(via, wid, rid)
    assert _signals_once(events, [f"{wid}-a", f"{wid}-b"])
    assert len(of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_HANDOFF)) == 1
    assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED


def _homed(client: Client, wid: str, rid: str, home: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        description = await client.get_workflow_handle(wid, run_id=rid).describe()
        return bool(description.home_cluster == home)

    return check


async def test_children_homed_across_the_site_from_the_node_without_the_link(
    site: Site, store: HistoryStore
) -> None:
    """A cloud parent on the shard of the node not holding the link starts a child
    homed at the edge: its START_CHILD row calls over the other node's link, and the
    child's close comes back to the parent's node. An edge parent's child homed at
    the cloud on that node's shard: started by its owner, its CHILD_CLOSED row sent
    over the other node's link."""
    owners = await wait(lambda: split(store, "node-a", "node-b"), "a balanced split")
    edge = await Client.connect(site.edge.address)
    holder = site.node_behind(await wait(lambda: _link_address(edge), "the edge linked"))
    other = next(n for n in site.nodes if n != holder)
    via = await Client.connect(site.nodes[other].address)
    await wait(_link_held_by(via, holder), f"{other} told that {holder} holds the link")
    tq = f"kids-{uuid.uuid4().hex[:8]}"
    cloud_parent, cloud_kid = workflow_ids(owners, other, 2, tq, store.shard_count)
    polling = await Client.connect(",".join(node.address for node in site.nodes.values()))
    async with (
        Worker(edge, task_queue=tq, workflows=[ParentOfKid, Kid]),
        Worker(polling, task_queue=tq, workflows=[ParentOfKid, Kid]),
    ):
        from_cloud = await via.start_workflow(
            ParentOfKid.run, args=[f"edge-kid-{tq}", "edge1"], id=cloud_parent, task_queue=tq
        )
        from_edge = await edge.start_workflow(
            ParentOfKid.run, args=[cloud_kid, "cloud"], id=f"edge-parent-{tq}", task_queue=tq
        )
        assert await asyncio.wait_for(from_cloud.result(), CONDITION_TIMEOUT_S) == (
            "parent:kid:edge1"
        )
        assert await asyncio.wait_for(from_edge.result(), CONDITION_TIMEOUT_S) == (
            "parent:kid:cloud"
        )
    homes = ((via, from_cloud, edge, f"edge-kid-{tq}"), (edge, from_edge, via, cloud_kid))
    for parent_home, parent, kid_home, kid in homes:
        described = await kid_home.get_workflow_handle(kid).describe()
        assert described.status == WorkflowExecutionStatus.COMPLETED, kid
        events = await history_of(parent_home, parent.id, parent.run_id or "")
        (started,) = of_type(events, ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED)
        execution = started.child_workflow_execution_started_event_attributes.workflow_execution
        assert execution.run_id == described.run_id
        assert len(of_type(events, ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED)) == 1
    assert (await edge.get_workflow_handle(f"edge-kid-{tq}").describe()).home_cluster == "edge1"
    assert (await via.get_workflow_handle(cloud_kid).describe()).home_cluster == "cloud"
