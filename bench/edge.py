"""Cloud/edge replication (issue 12): catch-up after offline work, bytes per event on
the wire, and the added latency of a signal sent through the cloud to an edge run.

1. Starts an edge (``start-dev --cluster-name edge1 --upstream``, SQLite) whose cloud
   is not running: the edge is offline. ``--runs`` runs are started at the edge and
   ``--events`` signals sent to them there (no worker: each signal is one event), so
   that many events wait for the cloud. With ``--offline-s N`` the edge stays offline
   at least N seconds from its start (its redial backoff at its cap, as after an
   outage of that length) before the cloud is started.
2. Starts the cloud (``start-dev``, SQLite or ``--db-url``) and measures the time until
   the edge's redial reaches it (backoff up to 2 s) and until the cloud holds every
   event (``SiteService.DescribeSite``: events pulled), hence events/s shipped once the
   link is up, and the compressed bytes per event the link carried.
3. With the link up, sends ``--signals`` signals one at a time to one edge run, half
   at the edge and half through the cloud (stored in its inbox, forwarded over the
   link, applied at the edge), and prints p50/p99 of both and of the difference.

Prints one JSON line.

    python bench/edge.py --events 10000 --runs 20 --signals 200 --offline-s 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

from throughput import _free_port, _listening, _stop

from tideflow.api.v1 import replication_pb2, service_pb2
from tideflow.worker_sdk import Client

_CLI = [sys.executable, "-m", "tideflow.cli", "server", "start-dev", "--no-ui"]


def _server(url: str, port: int, *flags: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*_CLI, "--db-url", url, "--port", str(port), "--log-level", "WARNING", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


async def _signal(client: Client, workflow_id: str, rid: str) -> float:
    request = service_pb2.SignalWorkflowRequest(
        namespace=client.namespace, signal_name="tick", identity="bench", request_id=rid
    )
    request.workflow_execution.workflow_id = workflow_id
    started = time.perf_counter()
    await client.call(client.service.SignalWorkflow, request)
    return time.perf_counter() - started


async def _load_offline(edge: Client, runs: int, events: int, prefix: str) -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(runs)]
    for workflow_id in ids:
        await edge.start_workflow("Sink", id=workflow_id, task_queue=f"{prefix}-nobody")
    limiter = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        async with limiter:
            await _signal(edge, ids[i % runs], f"{prefix}-s{i}")

    await asyncio.gather(*(one(i) for i in range(events)))
    return ids


async def _peer(client: Client) -> replication_pb2.SitePeer | None:
    status = await client.call(client.sites.DescribeSite, replication_pb2.DescribeSiteRequest())
    return next((p for p in status.peers if p.connected), None)


async def _catch_up(cloud: Client, total: int) -> tuple[float, float, int]:
    """Seconds from the cloud's start until the edge's link is up and until the cloud
    pulled ``total`` events, and the bytes the cloud received on the link."""
    started = time.perf_counter()
    linked = 0.0
    while True:
        peer = await _peer(cloud)
        if peer is not None and not linked:
            linked = time.perf_counter() - started
        if peer is not None and peer.events_pulled >= total:
            return linked, time.perf_counter() - started, peer.link_bytes_received
        await asyncio.sleep(0.02)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _latency(edge: Client, cloud: Client, workflow_id: str, count: int) -> dict[str, float]:
    direct, forwarded = [], []
    for i in range(count):
        if i % 2:
            forwarded.append(await _signal(cloud, workflow_id, f"lat-c{i}-{uuid.uuid4()}"))
        else:
            direct.append(await _signal(edge, workflow_id, f"lat-e{i}-{uuid.uuid4()}"))
    return {
        "edge_signal_p50_ms": _pct(direct, 0.5),
        "edge_signal_p99_ms": _pct(direct, 0.99),
        "cloud_signal_p50_ms": _pct(forwarded, 0.5),
        "cloud_signal_p99_ms": _pct(forwarded, 0.99),
        "added_p50_ms": _pct(forwarded, 0.5) - _pct(direct, 0.5),
        "added_p99_ms": _pct(forwarded, 0.99) - _pct(direct, 0.99),
    }


async def main(args: argparse.Namespace) -> dict[str, object]:
    folder = tempfile.mkdtemp(prefix="tideflow-bench-edge-")
    cloud_url = args.db_url or f"sqlite:///{os.path.join(folder, 'cloud.db')}"
    cloud_port, edge_port = _free_port(), _free_port()
    edge_proc = _server(
        f"sqlite:///{os.path.join(folder, 'edge.db')}",
        edge_port,
        "--cluster-name",
        "edge1",
        "--upstream",
        f"127.0.0.1:{cloud_port}",
    )
    procs = [edge_proc]
    offline_from = time.perf_counter()
    try:
        await _listening(edge_proc)
        edge = await Client.connect(f"127.0.0.1:{edge_port}")
        prefix = uuid.uuid4().hex[:8]
        ids = await _load_offline(edge, args.runs, args.events, prefix)
        total = args.events + 2 * args.runs  # each run: started, its first task scheduled
        await asyncio.sleep(max(0.0, args.offline_s - (time.perf_counter() - offline_from)))
        offline_s = time.perf_counter() - offline_from
        cloud_proc = _server(cloud_url, cloud_port, "--cluster-name", "cloud")
        procs.append(cloud_proc)
        await _listening(cloud_proc)
        cloud = await Client.connect(f"127.0.0.1:{cloud_port}")
        linked, seconds, received = await _catch_up(cloud, total)
        result: dict[str, object] = {
            "bench": "edge",
            "events": total,
            "runs": args.runs,
            "offline_s": round(offline_s, 1),
            "link_up_s": round(linked, 3),
            "catch_up_s": round(seconds, 3),
            "events_per_s_after_link_up": round(total / (seconds - linked), 1),
            "bytes_per_event": round(received / total, 1),
        }
        latency = await _latency(edge, cloud, ids[0], args.signals)
        result.update({k: round(v, 2) for k, v in latency.items()})
        return result
    finally:
        _stop(procs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000, help="signals sent offline")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--signals", type=int, default=200, help="latency samples")
    parser.add_argument("--db-url", default=None, help="the cloud's database (default SQLite)")
    parser.add_argument(
        "--offline-s", type=float, default=0.0, help="keep the edge offline this long first"
    )
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
