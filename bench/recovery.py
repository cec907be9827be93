"""Recovery time after SIGKILL of a cluster node: how long a killed node's runs go
unserved.

Starts two ``tideflow server start`` nodes on a fresh PostgreSQL database (default
lease, ``--lease-seconds`` to change it), waits until they split the shards, SIGKILLs
one, and measures through the survivor the time from the kill until a workflow whose
shard the dead node held is started and has run its activity to completion (a worker
polls the survivor). That is the lease lapsing, the next acquire pass, the shard's
recovery, and one run. Repeated ``--rounds`` times (a fresh database each); prints each
time and the median as one JSON line.

    python bench/recovery.py --db-url postgresql://postgres@127.0.0.1/postgres --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from datetime import timedelta

from throughput import _balanced, _database, _free_port, _listening, _stop

from tideflow.history import HistoryStore, now_micros, shard_of
from tideflow.worker_sdk import Client, Worker, activity, workflow

QUEUE = "recovery"


@activity.defn
async def echo(value: str) -> str:
    return value


@workflow.defn
class Echo:
    @workflow.run
    async def run(self, value: str) -> str:
        return str(
            await workflow.execute_activity(
                echo, value, start_to_close_timeout=timedelta(seconds=30)
            )
        )


async def _dead_node_workflow_id(db_url: str, dead: str) -> str:
    """A workflow id whose shard node ``dead`` holds now."""
    store = await HistoryStore.open(db_url)
    try:
        now = now_micros()
        held = {
            r.shard_id for r in await store.read_shards() if r.owner == dead and not r.free_at(now)
        }
        for i in range(100_000):
            workflow_id = f"recover-{uuid.uuid4().hex[:8]}-{i}"
            if shard_of("default", workflow_id, store.shard_count) in held:
                return workflow_id
        raise RuntimeError(f"no workflow id on {dead}'s shards {held}")
    finally:
        await store.close()


async def one_round(db_url_base: str, lease_s: float | None) -> float:
    """Seconds from the SIGKILL to a dead node's run completed through the survivor."""
    async with _database(db_url_base) as db_url:
        ports = [_free_port() for _ in range(2)]
        servers = []
        for index, port in enumerate(ports):  # one at a time: the first creates the schema
            servers.append(_spawn_node(index, db_url, port, lease_s))
            await _listening(servers[-1])
        try:
            await _balanced(db_url, ["bench-node-0", "bench-node-1"])
            survivor = f"127.0.0.1:{ports[1]}"
            client = await Client.connect(survivor)
            worker = Worker(client, task_queue=QUEUE, workflows=[Echo], activities=[echo])
            worker.start()
            try:
                # Warm: the survivor serves a run of its own.
                await client.execute_workflow(
                    Echo.run, "warm", id=uuid.uuid4().hex, task_queue=QUEUE
                )
                workflow_id = await _dead_node_workflow_id(db_url, "bench-node-0")
                killed_at = time.monotonic()
                servers[0].send_signal(signal.SIGKILL)
                result = await client.execute_workflow(
                    Echo.run, "after", id=workflow_id, task_queue=QUEUE
                )
                assert result == "after", result
                return time.monotonic() - killed_at
            finally:
                await worker.shutdown()
                await client.close()
        finally:
            _stop(servers)


def _spawn_node(
    index: int, db_url: str, port: int, lease_s: float | None
) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "tideflow.cli", "server", "start", "--db-url", db_url]
    argv += ["--port", str(port), "--ip", "127.0.0.1", "--log-level", "WARNING"]
    argv += ["--node-id", f"bench-node-{index}", "--auth", "off"]
    if lease_s is not None:
        argv += ["--lease-seconds", str(lease_s)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)


async def main(args: argparse.Namespace) -> None:
    times = []
    for _ in range(args.rounds):
        seconds = await one_round(args.db_url, args.lease_seconds)
        times.append(round(seconds, 2))
        print(f"recovered in {seconds:.2f} s", file=sys.stderr, flush=True)
    print(
        json.dumps(
            {
                "lease_s": args.lease_seconds or "default",
                "rounds": times,
                "median_s": statistics.median(times),
            }
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db-url", default="postgresql://postgres@127.0.0.1/postgres")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lease-seconds", type=float, default=None)
    asyncio.run(main(parser.parse_args()))
