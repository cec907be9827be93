"""``tideflow cluster describe`` and ``Client.describe_cluster`` (``DescribeCluster``):
the nodes, their shards, lease expiries and range ids, read from the store by any node.

- two ``tideflow server start`` processes on PostgreSQL: each node, asked in table and
  JSON form, lists both nodes (live, with their addresses and shards) and every shard
  with the owner and range id the store's rows have;
- one ``start-dev`` server (in-process, on both stores): one node holding every shard;
- errors are one line with exit 2: no server at the address; with auth on, an admin
  of one namespace is refused (the cluster needs ``*:admin``), a ``*:admin`` key is not.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import pytest
from helpers import Processes, free_port
from helpers_cluster import split, start_node, wait

from tideflow.history import HistoryStore, ShardRecord
from tideflow.server import AuthConfig, AuthMode, TideflowServer
from tideflow.worker_sdk import Client

CLI = [sys.executable, "-m", "tideflow.cli", "cluster", "describe"]


def _describe(address: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--address", address, *flags], capture_output=True, text=True, timeout=60
    )


async def _json(address: str, *flags: str) -> dict[str, Any]:
    done = await asyncio.to_thread(_describe, address, "-o", "json", *flags)
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def _table_rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip()]


def _check_shards(shards: Sequence[dict[str, Any]], rows: Sequence[ShardRecord]) -> None:
    """The reply's shards are the store's rows (owner and range id), in shard order."""
    assert [s["shard_id"] for s in shards] == [r.shard_id for r in rows]
    assert [(s["owner"], s["range_id"]) for s in shards] == [(r.owner, r.range_id) for r in rows]


@pytest.mark.slow
@pytest.mark.postgres
async def test_two_nodes_each_describe_the_whole_cluster(procs: Processes, pg_url: str) -> None:
    store = await HistoryStore.open(pg_url, shards=6)
    try:
        a = await start_node(procs, pg_url, "node-a", 30.0)
        b = await start_node(procs, pg_url, "node-b", 30.0)
        owners = await wait(lambda: split(store, "node-a", "node-b"), "a balanced split")
        # 30 s leases: nothing moves while the test reads, so the rows stay as read.
        rows = await store.read_shards()
        assert {r.owner for r in rows} == {"node-a", "node-b"}
        for asked in (a, b):
            document = await _json(asked.address)
            nodes = {n["node_id"]: n for n in document["nodes"]}
            assert sorted(nodes) == ["node-a", "node-b"]
            for node in (a, b):
                entry = nodes[node.name]
                assert entry["address"] == node.address
                assert entry["live"] is True
                assert 0 <= entry["heartbeat_age_seconds"] < 30
                assert entry["shards"] == sorted(s for s, o in owners.items() if o == node.name)
            _check_shards(document["shards"], rows)
            assert all(0 < s["expires_in_seconds"] <= 30 for s in document["shards"])
            assert document["lease_seconds"] == 30.0

            done = await asyncio.to_thread(_describe, asked.address)
            assert done.returncode == 0, done.stderr
            table = _table_rows(done.stdout)
            assert table[0] == ["NODE", "ADDRESS", "LIVE", "HEARTBEAT", "STARTED", "SHARDS"]
            for node, row in zip((a, b), table[1:3], strict=True):
                held = ",".join(str(s) for s, o in sorted(owners.items()) if o == node.name)
                assert row[:3] == [node.name, node.address, "yes"]
                assert row[-1] == held
            assert table[3] == ["SHARD", "OWNER", "RANGE", "LEASE"]
            for r, row in zip(rows, table[4:10], strict=True):
                assert row[:4] == [str(r.shard_id), r.owner, str(r.range_id), "expires"]
    finally:
        await store.close()


async def test_a_start_dev_server_is_one_node_holding_every_shard(
    server: TideflowServer, client: Client
) -> None:
    cluster = await client.describe_cluster()
    assert [n.node_id for n in cluster.nodes] == [server.node_id]
    assert cluster.nodes[0].live and cluster.nodes[0].address
    assert cluster.shards_of(server.node_id) == list(range(server.store.shard_count))
    rows = await server.store.read_shards()
    assert [(s.owner, s.range_id, s.expired) for s in cluster.shards] == [
        (r.owner, r.range_id, False) for r in rows
    ]
    expiries = [s.lease_expiry_time for s in cluster.shards]
    assert all(t is not None and t > cluster.read_time for t in expiries), expiries

    done = await asyncio.to_thread(_describe, server.address)
    assert done.returncode == 0, done.stderr
    node_row = _table_rows(done.stdout)[1]
    assert node_row[0] == server.node_id and node_row[2] == "yes"
    assert node_row[-1] == ",".join(str(s) for s in range(server.store.shard_count))


async def test_no_server_at_the_address_is_one_line_exit_2() -> None:
    address = f"127.0.0.1:{free_port()}"
    done = await asyncio.to_thread(_describe, address)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(
        f"tideflow cluster describe: cannot reach a tideflow server at {address}"
    )


async def test_the_cluster_needs_admin_on_every_namespace(store_url: str) -> None:
    auth = AuthConfig(mode=AuthMode.API_KEY)
    async with TideflowServer(store_url, port=0, auth=auth) as server:
        _, root = await server.store.api_keys.create("root", ["*:admin"])
        _, local = await server.store.api_keys.create("local-admin", ["default:admin"])
        refused = await asyncio.to_thread(_describe, server.address, "--api-key", local)
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines() == [
            "tideflow cluster describe: permission denied: 'local-admin' may not call "
            "DescribeCluster on "
            "namespace '*': it needs the role admin"
        ]
        document = await _json(server.address, "--api-key", root)
        assert [n["node_id"] for n in document["nodes"]] == [server.node_id]
