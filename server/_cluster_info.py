"""``DescribeCluster``: the cluster's nodes and shard leases, read from the store.

Any node answers, from the rows every node shares (``history/_cluster.py``): the
membership rows (node id, advertised address, last heartbeat, start) and every
shard's lease row (owner, range id, lease expiry). Nothing comes from the answering
node's memory, so two nodes asked at once give the same rows; "live" and "expired"
are judged by the answering node's clock and lease, the way its ShardController
judges them when it balances (``server/_shards.py``). The reply carries that clock
reading (``read_time``) so that a client shows ages against it, not against its own
clock.
"""

from __future__ import annotations

from tideflow.api.v1 import service_pb2
from tideflow.history import HistoryStore, now_micros

_US = 1_000_000


async def describe_cluster(
    store: HistoryStore, lease_s: float
) -> service_pb2.DescribeClusterResponse:
    """The membership rows and every shard's lease row, as of now."""
    members = await store.list_members()
    shards = await store.read_shards()
    now = now_micros()
    lease_us = int(lease_s * _US)
    response = service_pb2.DescribeClusterResponse()
    response.read_time.FromMicroseconds(now)
    response.lease.FromMicroseconds(lease_us)
    for member in members:
        node = response.nodes.add(
            node_id=member.node_id,
            address=member.address,
            live=member.heartbeat_at >= now - lease_us,
        )
        node.heartbeat_time.FromMicroseconds(member.heartbeat_at)
        node.start_time.FromMicroseconds(member.started_at)
    for row in shards:
        lease = response.shards.add(
            shard_id=row.shard_id,
            owner=row.owner,
            range_id=row.range_id,
            expired=row.free_at(now),
        )
        if not row.unowned:
            lease.lease_expiry_time.FromMicroseconds(row.lease_expires_at)
    return response
