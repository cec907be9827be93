"""The shared metadata document (server/_site_metadata.py, server/_metadata_sync.py):
two stores exchanging diffs in any order, with duplicates, converge to the same
last-writer-wins state; the client id and the state survive a restart; schedules and
namespaces written on one real server reach another one's store through the exchange
API the sites' link calls."""

from __future__ import annotations

import asyncio
import random
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from helpers import eventually, new_id, running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tideflow.api.v1 import service_pb2
from tideflow.history import HistoryStore
from tideflow.server import ServerConfig
from tideflow.server._site_metadata import SiteMetadata
from tideflow.worker_sdk import Client
from tideflow.worker_sdk.schedules import ScheduleActionStartWorkflow, ScheduleSpec

# One operation of a scenario: a local write on side 0 or 1 ("put", side, key, value),
# or "ship" (side, delay): side's diff for the other, against the state vector the
# other had when the diff was cut, delivered later (after ``delay`` more operations,
# in any order, possibly twice).
_KEYS = st.sampled_from(["a", "b", "c"])
_VALUES = st.one_of(st.none(), st.integers(-(2**40), 2**40), st.text(max_size=3))
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 1), _KEYS, _VALUES),
        st.tuples(st.just("ship"), st.integers(0, 1), st.integers(0, 3), st.booleans()),
    ),
    max_size=25,
)


async def _open_pair(directory: Path) -> tuple[list[HistoryStore], list[SiteMetadata]]:
    stores = [
        await HistoryStore.open(f"sqlite:///{directory / f'{name}.db'}")
        for name in ("cloud", "edge1")
    ]
    names = ("cloud", "edge1")
    docs = [await SiteMetadata.open(s, name) for s, name in zip(stores, names, strict=True)]
    return stores, docs


async def _scenario(ops: list[tuple[Any, ...]], seed: int) -> None:
    shuffle = random.Random(seed)
    with tempfile.TemporaryDirectory() as directory:
        stores, docs = await _open_pair(Path(directory))
        try:
            writes: dict[str, list[tuple[tuple[int, int, str], Any]]] = {}
            in_flight: list[tuple[int, int, bytes]] = []  # (due step, to side, update)
            for step, op in enumerate(ops):
                if op[0] == "put":
                    _, side, key, value = op
                    # None: a deletion.
                    payload = None if value is None else {"v": value}
                    stamp = await docs[side].put("sites", key, payload)
                    writes.setdefault(key, []).append(((*stamp, docs[side].site), payload))
                else:
                    _, side, delay, twice = op
                    other = 1 - side
                    update = docs[side].diff(docs[other].state_vector())
                    for _ in range(2 if twice else 1):
                        in_flight.append((step + delay, other, update))
                due = [m for m in in_flight if m[0] <= step]
                in_flight = [m for m in in_flight if m[0] > step]
                shuffle.shuffle(due)
                for _, to, update in due:
                    await docs[to].apply_remote(update)
            shuffle.shuffle(in_flight)
            for _, to, update in in_flight:  # late deliveries, in any order
                await docs[to].apply_remote(update)
            # A final exchange both ways (what a reconnected link does).
            await docs[1].apply_remote(docs[0].diff(docs[1].state_vector()))
            await docs[0].apply_remote(docs[1].diff(docs[0].state_vector()))
            views = [d.snapshot() for d in docs]
            assert views[0] == views[1]
            # Last writer wins by (hybrid clock, site); a deletion (None) removes the key.
            winners = {key: max(stamped, key=lambda w: w[0])[1] for key, stamped in writes.items()}
            expected = {key: value for key, value in winners.items() if value is not None}
            assert views[0]["sites"] == expected
            for key, value in expected.items():
                # Integers stay integers (a Yrs map alone would give floats back).
                assert type(views[0]["sites"][key]["v"]) is type(value["v"])
            # What each side stored is what it holds.
            for store, doc in zip(stores, docs, strict=True):
                reopened = await SiteMetadata.open(store, doc.site)
                assert reopened.snapshot() == views[0]
        finally:
            for store in stores:
                await store.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS, seed=st.integers(0, 2**32))
def test_two_stores_converge_whatever_the_order_and_duplicates(
    ops: list[tuple[Any, ...]], seed: int
) -> None:
    asyncio.run(_scenario(ops, seed))


async def test_a_later_write_wins_whatever_the_client_ids(tmp_path: Path) -> None:
    """Concurrent writes to one entry: the greater hybrid clock wins on both sides
    (Yrs alone would pick by client id)."""
    stores, _ = await _open_pair(tmp_path)
    try:
        early = await SiteMetadata.open(stores[0], "cloud", wall=lambda: 1_000)
        late = await SiteMetadata.open(stores[1], "edge1", wall=lambda: 2_000)
        await late.put("namespaces", "ns", {"description": "later"})
        await early.put("namespaces", "ns", {"description": "earlier"})
        await early.apply_remote(late.diff(early.state_vector()))
        await late.apply_remote(early.diff(late.state_vector()))
        assert (
            early.get("namespaces", "ns")
            == late.get("namespaces", "ns")
            == {"description": "later"}
        )
        # Having seen the later write, the early side's next write is later still,
        # although its wall clock has not moved.
        await early.put("namespaces", "ns", {"description": "after seeing it"})
        await late.apply_remote(early.diff(late.state_vector()))
        assert late.get("namespaces", "ns") == {"description": "after seeing it"}
        # Deleting is a write too.
        await late.put("namespaces", "ns", None)
        await early.apply_remote(late.diff(early.state_vector()))
        assert early.get("namespaces", "ns") is None
    finally:
        for store in stores:
            await store.close()


async def test_restart_keeps_the_client_id_and_the_state(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'site.db'}"
    store = await HistoryStore.open(url)
    doc = await SiteMetadata.open(store, "edge1")
    await doc.put("search_attributes", "Team", {"type": "keyword", "max": 2**40 + 1})
    client_id, vector = doc.client_id, doc.state_vector()
    await store.close()
    store = await HistoryStore.open(url)
    try:
        again = await SiteMetadata.open(store, "edge1")
        assert again.client_id == client_id
        assert again.state_vector() == vector
        assert again.get("search_attributes", "Team") == {"type": "keyword", "max": 2**40 + 1}
        # A write after the restart is newer than the one before it.
        await again.put("search_attributes", "Team", {"type": "text"})
        assert again.get("search_attributes", "Team") == {"type": "text"}
    finally:
        await store.close()


async def test_schedules_and_namespaces_travel_between_two_servers(tmp_path: Path) -> None:
    """Two real servers (sites "cloud" and "edge1"); the exchange API the sites' link
    calls carries a namespace and a schedule across, and a deletion back."""
    (tmp_path / "cloud").mkdir()
    (tmp_path / "edge").mkdir()
    async with (
        running_server(tmp_path / "cloud", ServerConfig(cluster_name="cloud")) as cloud,
        running_server(
            tmp_path / "edge", ServerConfig(cluster_name="edge1", site_tier="edge")
        ) as edge,
    ):
        assert cloud.metadata is not None and cloud.metadata_sync is not None
        assert edge.metadata is not None and edge.metadata_sync is not None

        async def exchange() -> None:
            pairs = ((cloud, edge), (edge, cloud))
            for source, target in pairs:
                assert source.metadata is not None and target.metadata_sync is not None
                vector = target.metadata_sync.metadata.state_vector()
                await target.metadata_sync.merge(source.metadata.diff(vector))

        cloud_client = await Client.connect(cloud.address)
        edge_client = await Client.connect(edge.address, namespace="shared-ns")
        try:
            register = service_pb2.RegisterNamespaceRequest(
                namespace="shared-ns", description="both sites"
            )
            await cloud_client.call(cloud_client.service.RegisterNamespace, register)
            schedule_id = new_id("sched")
            cloud_ns = await Client.connect(cloud.address, namespace="shared-ns")
            await cloud_ns.create_schedule(
                schedule_id,
                action=ScheduleActionStartWorkflow("Nothing", id=new_id("run"), task_queue="q"),
                spec=ScheduleSpec(interval=timedelta(hours=1)),
            )
            await exchange()
            await exchange()  # again: nothing changes twice
            assert await edge.store.namespace_exists("shared-ns")
            described = await edge_client.get_schedule_handle(schedule_id).describe()
            assert described.id == schedule_id
            assert described.schedule.action.task_queue == "q"
            # Deleted at the edge: gone from the cloud after the next exchange.
            await edge_client.get_schedule_handle(schedule_id).delete()
            await exchange()
            assert await cloud.store.schedules.get("shared-ns", schedule_id) is None
            assert edge.metadata.snapshot() == cloud.metadata.snapshot()
            # Each site's record (published at start) reached the other.
            assert cloud.metadata.get("sites", "edge1") == {"tier": "edge"}
            assert edge.metadata.get("sites", "cloud") == {"tier": "cloud"}
            await cloud_ns.close()
        finally:
            await cloud_client.close()
            await edge_client.close()


async def test_the_link_carries_the_document_both_ways(tmp_path: Path) -> None:
    """A real edge linked to a real cloud (server/_metadata_link.py): a namespace
    registered at the edge and a schedule created at the cloud reach the other site
    over the link the edge dialled, with nobody calling the exchange API; each site's
    record says its link is up."""
    (tmp_path / "cloud").mkdir()
    (tmp_path / "edge").mkdir()
    async with running_server(tmp_path / "cloud", ServerConfig(cluster_name="cloud")) as cloud:
        edge_config = ServerConfig(cluster_name="edge1", site_tier="edge", upstream=cloud.address)
        async with (
            running_server(tmp_path / "edge", edge_config) as edge,
            await Client.connect(edge.address) as edge_client,
            await Client.connect(cloud.address, namespace="edge-ns") as cloud_ns,
        ):
            register = service_pb2.RegisterNamespaceRequest(namespace="edge-ns")
            await edge_client.call(edge_client.service.RegisterNamespace, register)
            await eventually(
                lambda: cloud.store.namespace_exists("edge-ns"), "the namespace at the cloud"
            )
            schedule_id = new_id("sched")
            await cloud_ns.create_schedule(
                schedule_id,
                action=ScheduleActionStartWorkflow("Nothing", id=new_id("run"), task_queue="q"),
                spec=ScheduleSpec(interval=timedelta(hours=1)),
            )

            async def at_the_edge() -> bool:
                return await edge.store.schedules.get("edge-ns", schedule_id) is not None

            await eventually(at_the_edge, "the schedule at the edge")

            async def records_linked() -> bool:
                assert cloud.metadata is not None and edge.metadata is not None
                await cloud.metadata.refresh()
                await edge.metadata.refresh()
                both = (
                    (cloud.metadata.get("sites", "cloud") or {}).get("link_edge1"),
                    (edge.metadata.get("sites", "edge1") or {}).get("link_cloud"),
                )
                return both == ("up", "up")

            await eventually(records_linked, "each site's record: link up")


async def test_nodes_of_one_database_write_with_their_own_client_ids(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cloud.db'}"
    store = await HistoryStore.open(url)
    try:
        one = await SiteMetadata.open(store, "cloud", node_id="node-1")
        two = await SiteMetadata.open(store, "cloud", node_id="node-2")
        assert one.client_id != two.client_id
        await one.put("sites", "edge1", {"link": "up", "workers": 3})
        await two.put("sites", "edge2", {"link": "down"})
        await one.refresh()
        await two.refresh()
        assert one.snapshot() == two.snapshot()
        assert set(one.snapshot()["sites"]) == {"edge1", "edge2"}
        again = await SiteMetadata.open(store, "cloud", node_id="node-1")
        assert again.client_id == one.client_id
        assert again.snapshot() == one.snapshot()
    finally:
        await store.close()
