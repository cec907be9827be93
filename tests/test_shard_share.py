"""The shares of the shards the balancer aims at (server/_shards.py ``fair_share``):
they add up to the shard count, differ by one at most, and give every node a shard
while there are at least as many shards as nodes."""

from __future__ import annotations

from tideflow.server._shards import fair_share


def test_shares_add_up_and_leave_no_node_without_shards() -> None:
    for shards in range(1, 40):
        for count in range(1, 9):
            live = [f"node-{i}" for i in range(count)]
            shares = [fair_share(shards, set(live), node) for node in live]
            assert sum(shares) == shards, (shards, count, shares)
            assert max(shares) - min(shares) <= 1, (shards, count, shares)
            if shards >= count:
                assert min(shares) >= 1, (shards, count, shares)


def test_four_shards_over_three_nodes_is_two_one_one() -> None:
    live = {"c", "a", "b"}
    assert [fair_share(4, live, n) for n in ("a", "b", "c")] == [2, 1, 1]
