"""The cluster as the store has it: what ``Client.describe_cluster`` returns.

    cluster = await client.describe_cluster()
    for node in cluster.nodes:
        print(node.node_id, node.address, "live" if node.live else "silent")
    for shard in cluster.shards:
        print(shard.shard_id, shard.owner or "-", shard.range_id)

Any node answers, from the membership and lease rows every node shares. Times are the
answering node's (``read_time`` is its clock when it read the rows): measure ages
against ``read_time``, not against this machine's clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tideflow.api.v1 import service_pb2


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterNode:
    """A server node (its membership row; a node stopped gracefully has none)."""

    node_id: str
    address: str
    heartbeat_time: datetime
    start_time: datetime
    #: It heartbeated within one lease: the nodes count it when they balance shards.
    live: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardLease:
    """A shard's lease row. ``owner`` is "" when released or never acquired (then
    ``lease_expiry_time`` is None); ``range_id`` is the fencing token, bumped by every
    acquisition (1: never acquired); ``expired``: any node may take the shard."""

    shard_id: int
    owner: str
    range_id: int
    lease_expiry_time: datetime | None
    expired: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterDescription:
    nodes: Sequence[ClusterNode]
    shards: Sequence[ShardLease]
    #: The answering node's clock when it read the rows.
    read_time: datetime
    #: The lease the answering node uses.
    lease: timedelta

    def shards_of(self, node_id: str) -> list[int]:
        """The shards ``node_id`` holds a lease on (expired or not)."""
        return [s.shard_id for s in self.shards if s.owner == node_id]


def _time(micros: int) -> datetime:
    return datetime.fromtimestamp(micros / 1_000_000, tz=UTC)


def cluster_description(response: service_pb2.DescribeClusterResponse) -> ClusterDescription:
    """``DescribeCluster``'s reply (``Client.describe_cluster``) as dataclasses."""
    return ClusterDescription(
        nodes=[
            ClusterNode(
                node_id=n.node_id,
                address=n.address,
                heartbeat_time=_time(n.heartbeat_time.ToMicroseconds()),
                start_time=_time(n.start_time.ToMicroseconds()),
                live=n.live,
            )
            for n in response.nodes
        ],
        shards=[
            ShardLease(
                shard_id=s.shard_id,
                owner=s.owner,
                range_id=s.range_id,
                lease_expiry_time=_time(s.lease_expiry_time.ToMicroseconds())
                if s.HasField("lease_expiry_time")
                else None,
                expired=s.expired,
            )
            for s in response.shards
        ],
        read_time=_time(response.read_time.ToMicroseconds()),
        lease=response.lease.ToTimedelta(),
    )
