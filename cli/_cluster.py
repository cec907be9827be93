"""``tideflow cluster ...``: look at a cluster of server nodes.

    tideflow cluster describe [--address HOST:PORT] [-o table|json] [--api-key KEY]

``describe`` asks any node (``DescribeCluster``) for the nodes (id, advertised
address, last heartbeat and its age, start time, live or not, the shards each holds)
and every shard's lease (owner, range id, when the lease expires or how long ago it
did). Ages are measured against the answering node's clock, not this machine's.
With auth on the caller needs the admin role on every namespace (``*:admin``).
Exit codes: 0 success, 2 bad usage or an error talking to the server (one line on
stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import datetime
from typing import Any

from tideflow.worker_sdk import exceptions as exc
from tideflow.worker_sdk.client import Client
from tideflow.worker_sdk.cluster import ClusterDescription, ShardLease

DEFAULT_ADDRESS = "127.0.0.1:7233"
CONNECT_TIMEOUT_S = 5.0


def add_parser(groups: Any) -> None:
    """Register the ``cluster`` command group on the ``tideflow`` parser's subparsers."""
    parser = groups.add_parser("cluster", help="look at a cluster of server nodes")
    parser.set_defaults(log_level="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    describe = sub.add_parser("describe", help="nodes, their shards, leases and range ids")
    describe.add_argument("--address", default=DEFAULT_ADDRESS, help="any node's HOST:PORT")
    describe.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="output format"
    )
    describe.add_argument(
        "--api-key",
        default=os.environ.get("TIDEFLOW_API_KEY"),
        help="API key or JWT of a server with --auth on (default: $TIDEFLOW_API_KEY)",
    )


def main(args: argparse.Namespace) -> int:
    """Run a parsed ``tideflow cluster ...`` command; returns the exit code."""
    try:
        cluster = asyncio.run(_describe(args.address, args.api_key))
    except (exc.RPCError, OSError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"tideflow cluster {args.command}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(render_json(cluster) if args.output == "json" else render_table(cluster))
    return 0


async def _describe(address: str, api_key: str | None) -> ClusterDescription:
    client = await Client.connect(address, api_key=api_key, connect_timeout=CONNECT_TIMEOUT_S)
    try:
        return await client.describe_cluster()
    finally:
        await client.close()


def _seconds(later: datetime, earlier: datetime) -> float:
    return round((later - earlier).total_seconds(), 3)


def _lease_state(shard: ShardLease, now: datetime) -> str:
    if shard.lease_expiry_time is None:
        return "never acquired" if shard.range_id <= 1 else "released"
    left = _seconds(shard.lease_expiry_time, now)
    return f"expires in {left:.1f}s" if left >= 0 else f"expired {-left:.1f}s ago"


def render_json(cluster: ClusterDescription) -> str:
    now = cluster.read_time
    document = {
        "read_time": now.isoformat(),
        "lease_seconds": cluster.lease.total_seconds(),
        "nodes": [
            {
                "node_id": n.node_id,
                "address": n.address,
                "live": n.live,
                "heartbeat_time": n.heartbeat_time.isoformat(),
                "heartbeat_age_seconds": _seconds(now, n.heartbeat_time),
                "start_time": n.start_time.isoformat(),
                "shards": cluster.shards_of(n.node_id),
            }
            for n in cluster.nodes
        ],
        "shards": [
            {
                "shard_id": s.shard_id,
                "owner": s.owner,
                "range_id": s.range_id,
                "lease_expiry_time": None
                if s.lease_expiry_time is None
                else s.lease_expiry_time.isoformat(),
                "expires_in_seconds": None
                if s.lease_expiry_time is None
                else _seconds(s.lease_expiry_time, now),
                "expired": s.expired,
            }
            for s in cluster.shards
        ],
    }
    return json.dumps(document, indent=2)


def _columns(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def render_table(cluster: ClusterDescription) -> str:
    now = cluster.read_time
    nodes = [["NODE", "ADDRESS", "LIVE", "HEARTBEAT", "STARTED", "SHARDS"]]
    for n in cluster.nodes:
        held = cluster.shards_of(n.node_id)
        nodes.append(
            [
                n.node_id,
                n.address,
                "yes" if n.live else "no",
                f"{_seconds(now, n.heartbeat_time):.1f}s ago",
                n.start_time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                ",".join(map(str, held)) if held else "-",
            ]
        )
    shards = [["SHARD", "OWNER", "RANGE", "LEASE"]]
    for s in cluster.shards:
        shards.append([str(s.shard_id), s.owner or "-", str(s.range_id), _lease_state(s, now)])
    lease = f"lease {cluster.lease.total_seconds():g}s, read at {now.isoformat()}"
    return f"{_columns(nodes)}\n\n{_columns(shards)}\n\n{lease}"
