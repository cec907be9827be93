"""Placement (README "Placement"): activities and DAG tasks say where they may run,
workers advertise tier and capabilities, matching hands a task only to a worker that
meets it, and the server records where each ran.

One SQLite server serves the whole module (each test has its own task queue); the
workers are real ``Worker`` objects, in this process or (the device that goes away and
comes back) separate processes killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from helpers import Processes, bounded, eventually, new_id, running_server
from helpers_cluster import split
from helpers_dag import dag_worker, workflow_of

from tideflow.api.v1 import common_pb2, service_pb2
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.history import HistoryStore, RunKey, TaskKind, TaskRow, queue_shard_of
from tideflow.server import ServerConfig, TideflowServer
from tideflow.server._matching import Matching, RemoteTaskRow
from tideflow.server._placement import PlacementPolicy, WorkerSite, encode
from tideflow.worker_sdk import Client, Worker, activity, dag, exceptions, workflow
from tideflow.worker_sdk.dag import Task

pytestmark = pytest.mark.asyncio(loop_scope="module")
ES = common_pb2.ExecutionSite
TIMEOUT = timedelta(seconds=30)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TideflowServer]:
    async with running_server(tmp_path_factory.mktemp("placement")) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(site: TideflowServer) -> AsyncIterator[Client]:
    connected = await Client.connect(site.address)
    yield connected
    await connected.close()


@workflow.defn
class Placed:
    """Runs ``placed.where`` once per step (placement / requirements from the step),
    one after the other; returns what each returned (who ran it)."""

    @workflow.run
    async def run(self, steps: list[dict[str, Any]]) -> list[Any]:
        results = []
        for step in steps:
            handle = workflow.start_activity(
                "placed.where",
                start_to_close_timeout=TIMEOUT,
                placement=step.get("placement"),
                requirements=step.get("requirements"),
            )
            results.append(await handle)
        return results


def where_for(name: str) -> Any:
    """``placed.where`` as run by the worker ``name``: returns ``name``."""

    @activity.defn(name="placed.where")
    async def where() -> str:
        return name

    return where


async def polling(client: Client, queue: str, identities: Sequence[str]) -> None:
    """Wait until each of ``identities`` has an activity poll parked on ``queue``."""

    async def check() -> bool:
        request = service_pb2.DescribeTaskQueueRequest(
            namespace=client.namespace, task_queue_type=service_pb2.TASK_QUEUE_TYPE_ACTIVITY
        )
        request.task_queue.name = queue
        response = await client.call(client.service.DescribeTaskQueue, request)
        parked = {p.identity for p in response.pollers if p.polling}
        return set(identities) <= parked

    await eventually(check, f"{identities} polling {queue}")


def started_events(events: Sequence[HistoryEvent]) -> list[tuple[str, str, int]]:
    """(identity, site, tier) of every ActivityTaskStarted, in order."""
    return [
        (a.identity, a.site, a.tier)
        for e in events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
        for a in [e.activity_task_started_event_attributes]
    ]


async def history(client: Client, workflow_id: str) -> list[HistoryEvent]:
    return (await client.get_workflow_handle(workflow_id).fetch_history()).events


@contextlib.asynccontextmanager
async def workers(
    client: Client, queue: str, specs: dict[str, dict[str, Any]]
) -> AsyncIterator[None]:
    """A workflow worker for ``Placed`` plus one activity worker per ``specs`` entry
    (identity -> Worker options), all polling before the block runs."""
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(
            Worker(client, task_queue=queue, workflows=[Placed], identity="wf")
        )
        for identity, options in specs.items():
            await stack.enter_async_context(
                Worker(
                    client,
                    task_queue=queue,
                    activities=[where_for(identity)],
                    identity=identity,
                    **options,
                )
            )
        await polling(client, queue, list(specs))
        yield


async def test_requirements_and_tiers_choose_the_worker(client: Client) -> None:
    queue = new_id("placed")
    specs: dict[str, dict[str, Any]] = {
        "cloud-plain": {"tier": "cloud"},
        "cloud-gpu": {
            "tier": "cloud",
            "capabilities": {"labels": ["gpu"], "memory_mb": 16384, "cores": 8},
        },
        "edge-big": {
            "tier": "edge",
            "capabilities": {"labels": ["camera"], "memory_mb": 65536, "cores": 32},
        },
        "device-cam": {"tier": "device", "capabilities": {"labels": ["camera"], "memory_mb": 512}},
    }
    gpu = {"requirements": {"labels": ["gpu"]}}
    steps: list[tuple[dict[str, Any], str, int]] = [
        # (step, who must run it, the tier recorded)
        *[(gpu, "cloud-gpu", ES.EXECUTION_SITE_CLOUD)] * 3,
        ({"placement": "device"}, "device-cam", ES.EXECUTION_SITE_DEVICE),
        ({"placement": "edge"}, "edge-big", ES.EXECUTION_SITE_EDGE),
        # auto with a requirement only a cloud worker meets: the cloud
        (
            {"placement": "auto", "requirements": {"labels": ["gpu"], "min_memory_mb": 8192}},
            "cloud-gpu",
            ES.EXECUTION_SITE_CLOUD,
        ),
        (
            {"placement": "cloud", "requirements": {"min_cores": 4}},
            "cloud-gpu",
            ES.EXECUTION_SITE_CLOUD,
        ),
        (
            {"placement": "auto", "requirements": {"labels": ["camera"], "min_memory_mb": 1024}},
            "edge-big",
            ES.EXECUTION_SITE_EDGE,
        ),
    ]
    async with workers(client, queue, specs):
        handle = await client.start_workflow(
            Placed.run, [s for s, _, _ in steps], id=new_id("wf"), task_queue=queue
        )
        ran = await bounded(handle.result())
    assert ran == [who for _, who, _ in steps]
    events = await history(client, handle.id)
    # What the server recorded is who really ran it: identity, site, tier.
    assert started_events(events) == [(who, "cloud", tier) for _, who, tier in steps]
    completed = [
        (a.executed_at, a.site)
        for e in events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
        for a in [e.activity_task_completed_event_attributes]
    ]
    assert completed == [(tier, "cloud") for _, _, tier in steps]


async def test_a_task_no_worker_meets_waits_and_describe_says_why(client: Client) -> None:
    queue = new_id("placed")
    async with workers(client, queue, {"cloud-plain": {}}):
        handle = await client.start_workflow(
            Placed.run,
            [{"placement": "device", "requirements": {"labels": ["camera"]}}],
            id=new_id("wf"),
            task_queue=queue,
        )

        async def waiting() -> service_pb2.PendingActivityInfo | None:
            pending = (await handle.describe()).raw.pending_activities
            return pending[0] if pending and pending[0].waiting_reason else None

        info = await eventually(waiting, "the device task to be described as waiting")
        assert "placement device" in info.waiting_reason and "camera" in info.waiting_reason
        assert info.placement.tier == ES.EXECUTION_SITE_DEVICE
        assert list(info.placement.requirements.labels) == ["camera"]
        assert not info.HasField("last_started_time")
        # A device with a camera comes: the task runs there.
        async with Worker(
            client,
            task_queue=queue,
            activities=[where_for("device-cam")],
            identity="device-cam",
            tier="device",
            capabilities={"labels": ["camera"]},
        ):
            assert await bounded(handle.result()) == ["device-cam"]
    events = await history(client, handle.id)
    assert started_events(events) == [("device-cam", "cloud", ES.EXECUTION_SITE_DEVICE)]


async def test_device_worker_process_goes_away_and_comes_back(
    client: Client, site: TideflowServer, tmp_path: Path
) -> None:
    """Workers in their own processes: the device runs only device work; SIGKILLed, its
    task waits (described as such) until a device process polls again."""
    queue = new_id("placed")
    procs = Processes(tmp_path)
    try:
        device = await procs.start_worker(
            "device-1", site.address, queue, "placed", "--tier", "device", "--labels", "camera"
        )
        gpu = await procs.start_worker(
            "gpu-1", site.address, queue, "placed", "--tier", "cloud", "--labels", "gpu"
        )
        async with Worker(client, task_queue=queue, workflows=[Placed], identity="wf"):
            await polling(client, queue, ["device-1", "gpu-1"])
            steps: list[dict[str, Any]] = [
                {"placement": "device"},
                {"requirements": {"labels": ["gpu"]}},
                {"placement": "device", "requirements": {"labels": ["camera"]}},
            ]
            first = await client.start_workflow(
                Placed.run, steps, id=new_id("wf"), task_queue=queue
            )
            assert await bounded(first.result()) == [device.pid, gpu.pid, device.pid]
            assert [who for who, _, _ in started_events(await history(client, first.id))] == [
                "device-1",
                "gpu-1",
                "device-1",
            ]
            await procs.sigkill(device)
            second = await client.start_workflow(
                Placed.run, [{"placement": "device"}], id=new_id("wf"), task_queue=queue
            )

            async def waiting() -> bool:
                pending = (await second.describe()).raw.pending_activities
                return bool(pending and pending[0].waiting_reason)

            await eventually(waiting, "the device task to wait for a device")
            back = await procs.start_worker(
                "device-2", site.address, queue, "placed", "--tier", "device"
            )
            assert await bounded(second.result()) == [back.pid]
        recorded = started_events(await history(client, second.id))
        assert recorded == [("device-2", "cloud", ES.EXECUTION_SITE_DEVICE)]
    finally:
        procs.cleanup()


async def test_dag_tasks_record_where_the_server_saw_them_run(client: Client) -> None:
    queue = new_id("dag")

    def executor_for(name: str) -> Any:
        # The executor claims "cloud" wherever it runs: the server's record wins.
        @dag.executor("placed.step", executed_at="cloud")
        def step(params: dict[str, Any]) -> str:
            return name

        return step

    wf = workflow_of(
        Task("sense", executor="placed.step", placement="device",
             requirements={"labels": ["camera"]}),
        Task("train", executor="placed.step", depends_on=["sense"]).with_placement(
            "auto", {"labels": ["gpu"]}
        ),
        output="${tasks.train.result}",
    )  # fmt: skip
    assert Task.from_dict(wf.tasks[1].to_dict()).requirements == wf.tasks[1].requirements
    async with (
        dag_worker(client, queue, []),
        Worker(client, task_queue=queue, activities=[executor_for("plain")], identity="plain"),
        Worker(
            client,
            task_queue=queue,
            activities=[executor_for("cam")],
            identity="cam",
            tier="device",
            capabilities={"labels": ["camera"]},
        ),
        Worker(
            client,
            task_queue=queue,
            activities=[executor_for("gpu")],
            identity="gpu",
            tier="cloud",
            capabilities={"labels": ["gpu"]},
        ),
    ):
        await polling(client, queue, ["plain", "cam", "gpu"])
        handle = await client.start_dag(wf, {}, task_queue=queue)
        assert await bounded(handle.result()) == "gpu"
        states = (await handle.status()).task_states
    assert (states["sense"].result, states["sense"].executed_at) == ("cam", "device")
    assert (states["sense"].worker, states["sense"].site) == ("cam", "cloud")
    assert (states["train"].result, states["train"].executed_at) == ("gpu", "cloud")
    assert states["train"].worker == "gpu"


async def test_bad_placement_input_is_refused(client: Client) -> None:
    request = service_pb2.PollActivityTaskRequest(namespace=client.namespace, identity="w")
    request.task_queue.name = new_id("placed")
    request.worker.tier = ES.EXECUTION_SITE_AUTO
    with pytest.raises(exceptions.InvalidArgumentError, match="not auto"):
        await client.call(client.service.PollActivityTask, request)
    with pytest.raises(ValueError, match="unknown key"):
        Worker(client, task_queue="q", activities=[where_for("x")], capabilities={"gpu": True})
    with pytest.raises(ValueError, match="tier must be one of"):
        Worker(client, task_queue="q", activities=[where_for("x")], tier="auto")  # type: ignore[arg-type]
    with pytest.raises(dag.DagValidationError, match="placement must be one of"):
        Task.from_dict({"id": "t", "executor": "e", "placement": "moon"})


# ------------------------------------------------------- ranking (matching alone)


class Links:
    """A link state the test sets (the sites work feeds the real one)."""

    def __init__(self, reachable: set[str]) -> None:
        self.up = reachable

    def reachable(self, site: str) -> bool:
        return site in self.up


def auto_task(index: int, labels: Sequence[str] = ()) -> TaskRow:
    placement = common_pb2.Placement(tier=ES.EXECUTION_SITE_AUTO)
    placement.requirements.labels.extend(labels)
    return TaskRow(
        key=RunKey(namespace="default", workflow_id=f"w{index}", run_id="r"),
        task_queue="q",
        kind=TaskKind.ACTIVITY,
        ref_id=5,
        attempt=1,
        placement=encode(placement),
    )


async def test_auto_prefers_home_site_then_reachable_sites_then_free_workers() -> None:
    matching = Matching(policy=PlacementPolicy("cloud", links=Links({"cloud", "edge1"})))
    workers = {
        "edge2": WorkerSite("edge2", "edge2", ES.EXECUTION_SITE_EDGE),  # unreachable
        "edge1": WorkerSite("edge1", "edge1", ES.EXECUTION_SITE_EDGE),
        "busy": WorkerSite("busy", "cloud", ES.EXECUTION_SITE_CLOUD),
        "free": WorkerSite("free", "cloud", ES.EXECUTION_SITE_CLOUD),
    }
    polls: dict[asyncio.Task[Any], str] = {}

    def park(name: str) -> None:
        task = asyncio.create_task(
            matching.poll("default", "q", TaskKind.ACTIVITY, 60, worker=workers[name])
        )
        polls[task] = name

    for name in ("edge2", "edge1", "busy", "free", "free"):  # "free" has two slots free
        park(name)

    def parked() -> bool:
        found = {i: now for i, _, now in matching.pollers("default", "q", TaskKind.ACTIVITY)}
        return all(found.get(name) for name in workers)

    await eventually(parked, "every poll parked")
    order = []
    for index in range(5):
        matching.add(auto_task(index))
        done, _ = await bounded(asyncio.wait(polls, return_when=asyncio.FIRST_COMPLETED))
        for task in done:
            order.append(polls.pop(task))
    # The home site first: the worker with more polls parked (free slots) before the
    # one that polled earlier, then in poll order once they are even; then the
    # reachable edge, then the unreachable one.
    assert order == ["free", "busy", "free", "edge1", "edge2"]


async def test_a_worker_takes_only_backlog_tasks_it_meets() -> None:
    matching = Matching()
    matching.add(auto_task(1, ["gpu"]))
    matching.add(auto_task(2))
    plain = WorkerSite("plain", "cloud", ES.EXECUTION_SITE_CLOUD)
    gpu = WorkerSite("gpu", "cloud", ES.EXECUTION_SITE_CLOUD, frozenset({"gpu"}))
    taken = await matching.poll("default", "q", TaskKind.ACTIVITY, 0, worker=plain)
    assert isinstance(taken, TaskRow) and taken.key.workflow_id == "w2"
    assert await matching.poll("default", "q", TaskKind.ACTIVITY, 0, worker=plain) is None
    reason = matching.waiting_reason("default", "q", auto_task(1, ["gpu"]).placement)
    assert "labels gpu" in reason
    taken = await matching.poll("default", "q", TaskKind.ACTIVITY, 0, worker=gpu)
    assert isinstance(taken, TaskRow) and taken.key.workflow_id == "w1"


async def test_matching_offers_only_tasks_no_worker_of_the_home_meets() -> None:
    """Placement across sites, the matching side (server/_remote_tasks.py drives it):
    what may be offered to another site, taking an offered task out, a peer's tasks."""
    matching = Matching()
    woken: list[int] = []
    matching.on_waiting = lambda: woken.append(1)
    plain = WorkerSite("plain", "cloud", ES.EXECUTION_SITE_CLOUD)
    # A worker of the home seen polling (it went away since): what it meets stays here.
    assert await matching.poll("default", "q", TaskKind.ACTIVITY, 0, worker=plain) is None
    gpu_task, plain_task = auto_task(1, ["gpu"]), auto_task(2)
    anywhere = TaskRow(
        key=RunKey(namespace="default", workflow_id="w3", run_id="r"),
        task_queue="q",
        kind=TaskKind.ACTIVITY,
        ref_id=5,
        attempt=1,
    )
    offered = RemoteTaskRow(
        key=RunKey(namespace="default", workflow_id="w4", run_id="r"),
        task_queue="q",
        kind=TaskKind.ACTIVITY,
        ref_id=5,
        attempt=1,
        placement=gpu_task.placement,
        home="edge1",
    )
    matching.add_many([gpu_task, plain_task, anywhere, offered])
    assert len(woken) == 2  # the home's tasks with a placement, not the peer's
    assert matching.offerable() == [gpu_task]
    # A peer's poller took it: out of the backlog, once; a peer's task is not taken
    # for the home, nor a home's task as a peer's.
    assert matching.take("default", "q", gpu_task.task_key) == gpu_task
    assert matching.take("default", "q", gpu_task.task_key) is None
    assert matching.take("default", "q", plain_task.task_key, remote=True) is None
    assert matching.offerable() == []
    # The peer's tasks go when its link does (it offers them again on the next one).
    assert matching.drop_remote("edge2") == 0 and matching.drop_remote("edge1") == 1
    gpu = WorkerSite("gpu", "cloud", ES.EXECUTION_SITE_CLOUD, frozenset({"gpu"}))
    assert await matching.poll("default", "q", TaskKind.ACTIVITY, 0, worker=gpu) == plain_task
    assert matching.backlog_size("default", "q", TaskKind.ACTIVITY) == 1  # "anywhere"


async def test_a_run_handed_over_replaces_its_old_homes_offer_with_its_own_task() -> None:
    """After a handoff the new home dispatches the run's waiting activity itself,
    while its old home's offer of that very task may still be queued here: the home's
    own row takes its place (else the task would wait as an offer the old home no
    longer starts); an offer never displaces a home's row."""
    matching = Matching()
    key = RunKey(namespace="default", workflow_id="w", run_id="r")
    fields: dict[str, Any] = {
        "key": key,
        "task_queue": "q",
        "kind": TaskKind.ACTIVITY,
        "ref_id": 5,
        "attempt": 1,
        "placement": auto_task(1, ["gpu"]).placement,
    }
    offer = RemoteTaskRow(home="edge1", **fields)
    own = TaskRow(**fields)
    matching.add(offer)
    matching.add(own)
    assert matching.backlog_size("default", "q", TaskKind.ACTIVITY) == 1
    assert matching.take("default", "q", own.task_key, remote=True) is None  # not an offer
    matching.add(offer)
    assert matching.offerable() == [own]  # the home's row (no worker here meets it)
    gpu = WorkerSite("gpu", "cloud", ES.EXECUTION_SITE_CLOUD, frozenset({"gpu"}))
    taken = await matching.poll("default", "q", TaskKind.ACTIVITY, 0, worker=gpu)
    assert taken is own and not isinstance(taken, RemoteTaskRow)


async def test_placement_survives_a_server_restart(store_url: str) -> None:
    """The task row keeps its placement in the store (SQLite and PostgreSQL): after a
    restart (the backlog rebuilt from the store) a worker that does not meet it still
    does not get it."""
    queue, workflow_id = new_id("placed"), new_id("wf")
    async with running_server(store_url) as first:
        connected = await Client.connect(first.address)
        # No sticky cache: the next workflow task goes to the normal queue at once.
        async with Worker(
            connected, task_queue=queue, workflows=[Placed], identity="wf", max_cached_workflows=0
        ):
            handle = await connected.start_workflow(
                Placed.run, [{"placement": "device"}], id=workflow_id, task_queue=queue
            )

            async def activity_row() -> TaskRow | None:
                rows = await first.store.list_tasks()
                return next((r for r in rows if r.kind == TaskKind.ACTIVITY), None)

            row = await eventually(activity_row, "the activity task row to be written")
            assert common_pb2.Placement.FromString(row.placement).tier == ES.EXECUTION_SITE_DEVICE
        await connected.close()
    async with running_server(store_url) as second:
        connected = await Client.connect(second.address)
        handle = connected.get_workflow_handle(workflow_id)
        async with workers(connected, queue, {"cloud-plain": {}}):

            async def waiting() -> bool:
                pending = (await handle.describe()).raw.pending_activities
                return bool(pending and pending[0].waiting_reason)

            await eventually(waiting, "the recovered device task to wait")
            async with Worker(
                connected,
                task_queue=queue,
                activities=[where_for("device")],
                identity="device",
                tier="device",
            ):
                assert await bounded(handle.result()) == ["device"]
        await connected.close()


async def test_tasks_table_gains_the_placement_column_in_place(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = await HistoryStore.open(url)
    await store.close()
    # A database from before placement: no such column.
    with sqlite3.connect(tmp_path / "old.db") as conn:
        conn.execute("ALTER TABLE tasks DROP COLUMN placement")
    store = await HistoryStore.open(url)
    await store.close()
    with sqlite3.connect(tmp_path / "old.db") as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(tasks)")}
    assert "placement" in columns


@pytest.mark.postgres
async def test_placement_holds_when_polls_are_forwarded_between_nodes(pg_url: str) -> None:
    """Two nodes on one database; the workers poll node A, the queue is node B's: polls
    travel to B with what the worker advertised, and the run's owner records it."""
    config = ServerConfig(lease_s=1.0)
    async with (
        TideflowServer(pg_url, port=0, node_id="node-a", config=config) as a,
        TideflowServer(pg_url, port=0, node_id="node-b", config=config) as b,
    ):
        owned = await eventually(lambda: split(a.store, a.node_id, b.node_id), "both nodes")
        shards = a.store.shard_count

        def served_by_b(queue: str) -> bool:
            return all(
                owned[queue_shard_of("default", queue, kind, shards)] == b.node_id
                for kind in (TaskKind.WORKFLOW, TaskKind.ACTIVITY)
            )

        queue = next(q for q in (new_id("placed") for _ in range(1000)) if served_by_b(q))
        connected = await Client.connect(a.address)
        specs = {"plain": {}, "cam": {"tier": "device", "capabilities": {"labels": ["camera"]}}}
        try:
            async with workers(connected, queue, specs):
                steps = [{"placement": "device", "requirements": {"labels": ["camera"]}}] * 2
                handles = [
                    await connected.start_workflow(
                        Placed.run, steps, id=new_id("wf"), task_queue=queue
                    )
                    for _ in range(4)  # runs owned by either node
                ]
                for handle in handles:
                    assert await bounded(handle.result()) == ["cam", "cam"]
            for handle in handles:
                recorded = started_events(await history(connected, handle.id))
                assert recorded == [("cam", "cloud", ES.EXECUTION_SITE_DEVICE)] * 2
        finally:
            await connected.close()
