"""Cloud, edge and device: a DAG that keeps running while the edge is offline.

    make demo-edge        (or: .venv/bin/python examples/edge/run.py [--workdir DIR])

Two tideflow processes on this machine, each on its own SQLite file: the cloud
(``--cluster-name cloud``) and an edge (``--cluster-name edge1 --upstream ...``) whose
link to the cloud goes through a TCP proxy in this script, so the script can cut it.
Workers (in this process): a cloud-tier worker attached to the cloud, an edge-tier
worker attached to the edge, and a camera device (``tier="device"``) that attaches to
the edge while it is offline.

The DAG (``inspect-line``): ``capture`` (placement device, needs a camera) ->
``detect`` (edge) -> ``report`` (cloud). The run is homed at the edge from start to
end: its cloud step runs on a cloud worker over the link (placement across sites),
with no handoff:

1. the run starts at the edge and the cloud receives its replica; the link is cut;
2. offline, the camera attaches and captures, the edge detects; the DAG is paused
   before its cloud step (``report`` waits for a go-ahead from the cloud);
3. the ``resume`` signal is sent through the cloud: it waits in the cloud's inbox
   (``pending_delivery``), since the run's home, the edge, is unreachable;
4. the link is restored: the inbox delivers the resume to the edge, the DAG schedules
   ``report`` there, no edge worker meets its placement, so the edge offers it over
   the link and the cloud's worker runs it; the run completes at the edge and the
   cloud's replica catches up with the end.

It prints a timeline: each task with where it ran (tier, site, worker: the server's
record in the DAG status) and when, the link and signal events, and when each side
caught up (from ``tideflow site status`` data: replication lag, inbox depth).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sites import LinkProxy, Site, status  # noqa: E402

from tideflow.api.v1 import service_pb2  # noqa: E402
from tideflow.worker_sdk import Client, Worker, dag  # noqa: E402
from tideflow.worker_sdk.exceptions import RPCError  # noqa: E402
from tideflow.worker_sdk.placement import Tier  # noqa: E402

QUEUE = "inspection"
# Seconds any one step may take before the demo gives up. Now and then, on a loaded
# machine, the cloud never received a new edge run although both sides reported the
# link up (README, Sites, "Demo": a known issue of the sites code, not of the demo).
WAIT = 60.0


class Story:
    """What the demo has done so far, in seconds since it started."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.lines: list[tuple[float, str]] = []
        self.detecting = asyncio.Event()
        self.paused = asyncio.Event()  # detect finishes only once the DAG is paused

    def note(self, text: str) -> None:
        at = time.monotonic() - self.t0
        self.lines.append((at, text))
        print(f"  [{at:6.2f}s] {text}", flush=True)


STORY = Story()


@dag.executor("capture")
async def capture(params: dict[str, Any]) -> dict[str, Any]:
    return {"frames": int(params["frames"])}


@dag.executor("detect")
async def detect(params: dict[str, Any]) -> dict[str, Any]:
    STORY.detecting.set()
    await STORY.paused.wait()
    return {"defects": int(params["frames"]) // 4}


@dag.executor("report")
def report(params: dict[str, Any]) -> dict[str, Any]:
    return {"summary": f"{params['defects']} defects in {params['frames']} frames"}


DEFINITION = dag.Workflow(
    "inspect-line",
    "1.0.0",
    tasks=[
        dag.Task(
            "capture",
            executor="capture",
            parameters={"frames": "${input.frames}"},
            placement="device",
            requirements={"labels": ["camera"]},
        ),
        dag.Task(
            "detect",
            executor="detect",
            parameters={"frames": "${tasks.capture.result.frames}"},
            placement="edge",
            depends_on=["capture"],
        ),
        dag.Task(
            "report",
            executor="report",
            parameters={
                "frames": "${tasks.capture.result.frames}",
                "defects": "${tasks.detect.result.defects}",
            },
            placement="cloud",
            depends_on=["detect"],
        ),
    ],
    output="${tasks.report.result.summary}",
)


async def until(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` until it holds; RuntimeError after ``WAIT`` seconds."""
    deadline = time.monotonic() + WAIT
    while True:
        with contextlib.suppress(RPCError):
            if await check():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting until {what}")
        await asyncio.sleep(0.1)


async def linked(client: Client, peer: str) -> bool:
    return any(p.site == peer and p.connected for p in (await status(client)).peers)


async def task_status(handle: dag.DagHandle, task: str) -> str:
    instance = await handle.status()
    return str(instance.task_states[task].status.value)


async def run_offline(cloud: Client, edge: Client, proxy: LinkProxy, dag_id: str) -> None:
    """Steps 1 to 3: start at the edge, cut, run offline, pause, signal."""
    handle = await dag.start_dag(edge, DEFINITION, {"frames": 24}, id=dag_id, task_queue=QUEUE)
    STORY.note(f"DAG {dag_id} started at edge1 (its home)")
    replica = dag.DagHandle(cloud, dag_id)
    await until("the cloud holds the run's replica", lambda: _has_replica(replica))
    STORY.note("the cloud holds a replica of the run (home_cluster=edge1)")
    proxy.cut()
    STORY.note("LINK CUT: the edge is offline")
    # The camera attaches to the edge only now: its task waited in the edge's backlog.
    async with Worker(
        edge,
        task_queue=QUEUE,
        activities=[capture],
        tier="device",
        capabilities={"labels": ["camera"]},
        identity="camera-1",
    ):
        STORY.note("device camera-1 attached to edge1")
        await STORY.detecting.wait()
    await handle.pause("the cloud step waits for a go-ahead from the cloud")
    await until("the DAG is paused", lambda: _paused(handle))
    STORY.note("the edge paused the DAG (report is not scheduled while paused)")
    STORY.paused.set()
    await until("detect is done", lambda: _done(handle, "detect"))
    STORY.note("offline: capture (device) and detect (edge) are done")
    await _signal_through_cloud(cloud, dag_id)
    seen = await status(cloud)
    connected = any(p.connected for p in seen.peers)
    STORY.note(f"cloud site status: inbox depth {seen.inbox_depth}, edge1 connected {connected}")


async def _has_replica(handle: dag.DagHandle) -> bool:
    return (await handle.describe()).home_cluster == "edge1"


async def _paused(handle: dag.DagHandle) -> bool:
    return (await handle.status()).status is dag.WorkflowStatus.PAUSED


async def _done(handle: dag.DagHandle, task: str) -> bool:
    return await task_status(handle, task) == "COMPLETED"


async def _signal_through_cloud(cloud: Client, dag_id: str) -> None:
    """``resume`` sent to the cloud; it is not the run's home and cannot reach it, so
    the request waits in its inbox and the reply says so (``pending_delivery``)."""
    request = service_pb2.SignalWorkflowRequest(
        namespace=cloud.namespace, signal_name="resume", request_id=str(uuid.uuid4())
    )
    request.workflow_execution.workflow_id = dag_id
    reply: service_pb2.SignalWorkflowResponse = await cloud.call(
        cloud.service.SignalWorkflow, request
    )
    STORY.note(
        f"signal 'resume' sent through the cloud: pending_delivery={reply.pending_delivery} "
        f"(home {reply.home_cluster or '?'})"
    )


async def catch_up(cloud: Client, edge: Client, proxy: LinkProxy, dag_id: str) -> Any:
    """Step 4: restore the link; the resume reaches the edge, the cloud's worker runs
    ``report`` for it; the cloud's replica catches up."""
    proxy.restore()
    STORY.note("LINK RESTORED")
    at_edge = dag.DagHandle(edge, dag_id)
    output = await at_edge.result()
    home = (await at_edge.describe()).home_cluster
    STORY.note(f"DAG completed at {home} (its home, no handoff): {output!r}")
    await until("the cloud caught up", lambda: _cloud_caught_up(cloud, edge, dag_id))
    seen = await status(cloud)
    edge_peer = next(p for p in seen.peers if p.site == "edge1")
    STORY.note(
        f"CLOUD CAUGHT UP: inbox depth {seen.inbox_depth}, "
        f"{edge_peer.events_behind} events behind edge1, connected {edge_peer.connected}; "
        "its replica of the run equals the edge's history"
    )
    seen = await status(edge)
    cloud_peer = next(p for p in seen.peers if p.site == "cloud")
    described = await dag.DagHandle(cloud, dag_id).describe()
    STORY.note(
        f"EDGE CAUGHT UP: the cloud's replica is {described.replica_events_behind or 0} "
        f"events behind, edge inbox depth {seen.inbox_depth}, connected {cloud_peer.connected}"
    )
    return output


async def _cloud_caught_up(cloud: Client, edge: Client, dag_id: str) -> bool:
    seen = await status(cloud)
    edges = [p for p in seen.peers if p.site == "edge1"]
    if seen.inbox_depth != 0 or not edges or not edges[0].connected:
        return False
    home = await dag.DagHandle(edge, dag_id).workflow.fetch_history()
    replica = await dag.DagHandle(cloud, dag_id).workflow.fetch_history()
    return list(home.events) == list(replica.events)


def print_timeline(instance: dag.WorkflowInstance) -> None:
    """Where each task ran (the server's record: tier, site, worker) and when, then
    every task step and demo step in time order. A task is scheduled when the DAG
    reaches it; it starts when a worker that meets its placement takes it."""
    print("\nwhere each task ran (seconds since the demo started)")
    header = ("task", "tier", "site", "scheduled", "started", "ended")
    print("  {:<8} {:<7} {:<6} {:>9} {:>8} {:>8}  worker".format(*header))
    entries = list(STORY.lines)
    for task_id, task in instance.task_states.items():
        runs = [t.time for t in task.transitions if t.status == "RUNNING" and t.time]
        scheduled, ended = _since(task.start_time), _since(task.end_time)
        started = _since(runs[-1]) if runs else scheduled
        print(
            f"  {task_id:<8} {task.executed_at or '-':<7} {task.site or '-':<6} "
            f"{scheduled:>9.2f} {started:>8.2f} {ended:>8.2f}  {task.worker or '-'}"
        )
        where = f"{task.executed_at} worker {task.worker} at site {task.site}"
        entries += [
            (scheduled, f"task {task_id} scheduled"),
            (started, f"task {task_id} started on the {where}"),
            (ended, f"task {task_id} ended"),
        ]
    print("\ntimeline")
    for at, text in sorted(entries, key=lambda entry: entry[0]):
        print(f"  {at:6.2f}s  {text}")


def _since(moment: datetime | None) -> float:
    return float("nan") if moment is None else moment.timestamp() - STORY.wall0


async def main(workdir: Path) -> int:
    print(f"edge demo: databases and logs in {workdir}")
    # SIGTERM ends the demo like Ctrl-C: the main task is cancelled, ``finally`` stops
    # both sites.
    this = asyncio.current_task()
    assert this is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, this.cancel)
    cloud_site = Site("cloud", workdir / "cloud.db")
    proxy: LinkProxy | None = None
    edge_site: Site | None = None
    try:
        cloud = await cloud_site.start()
        proxy = LinkProxy(cloud_site.port)
        await proxy.start()
        edge_site = Site("edge1", workdir / "edge1.db", upstream=proxy.address)
        edge = await edge_site.start()
        STORY.note(
            f"cloud at {cloud_site.address}, edge1 at {edge_site.address} "
            f"(link through the proxy at {proxy.address}); web UIs on ports "
            f"{cloud_site.ui_port} and {edge_site.ui_port}"
        )
        await until("the sites are linked", lambda: linked(edge, "cloud"))
        STORY.note("edge1 linked to the cloud")
        async with contextlib.AsyncExitStack() as workers:
            sites: list[tuple[Client, Any, Tier]] = [
                (cloud, report, "cloud"),
                (edge, detect, "edge"),
            ]
            for client, executor, tier in sites:
                worker = Worker(
                    client,
                    task_queue=QUEUE,
                    workflows=[dag.DagWorkflow],
                    activities=[executor],
                    tier=tier,
                    identity=f"{tier}-worker",
                )
                await workers.enter_async_context(worker)
            dag_id = f"inspect-line-{uuid.uuid4().hex[:8]}"
            await run_offline(cloud, edge, proxy, dag_id)
            await catch_up(cloud, edge, proxy, dag_id)
            final = await dag.DagHandle(edge, dag_id).status()
        print_timeline(final)
        await cloud.close()
        await edge.close()
        return 0
    except RuntimeError:
        # What each site says about its link, for the report (if both clients exist).
        with contextlib.suppress(Exception):
            for name, client in (("cloud", cloud), ("edge1", edge)):
                print(f"site status of {name} at the failure:\n{await status(client)}")
        raise
    finally:
        if proxy is not None:
            await proxy.close()
        if edge_site is not None:
            edge_site.stop()
        cloud_site.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="cloud + edge + device DAG, offline and back")
    parser.add_argument("--workdir", type=Path, default=None, help="where the databases go")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    directory = args.workdir or Path(tempfile.mkdtemp(prefix="tideflow-edge-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        code = asyncio.run(main(directory))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: both sites stopped", file=sys.stderr)
        code = 130
    raise SystemExit(code)
