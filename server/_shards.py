"""Shard ownership of one node: the ShardController (tla/ShardLease.tla).

Runs are spread over the cluster's shards (``history/_cluster.py``); a node serves the
runs of the shards it holds a lease on, and only those. The controller

- acquires free and expired shards (``ReadShard`` + ``AcquireShard``: a read, then a
  compare-and-set that bumps the range id) until the node holds its share by the
  membership rows (``fair_share``: floor or ceil of shards / live nodes); a node
  holding more than its share releases the surplus so that a node that joined takes
  it at once;
- renews its leases every third of the lease (``RenewLease``); a renewal that finds
  the range id moved means another node took the shard over: it is dropped at once;
- drops a shard whose write the store's fence refused (the store calls back);
- on a graceful stop releases every lease, so other nodes take over without waiting
  for the leases to lapse.

It never steals a live lease, and never consults its own lease deadline before a
write: a paused node that comes back still believing it owns a shard is stopped by
the fence alone. Acquiring a shard recovers its tasks, timers and transfers from the
store (``on_acquired``); losing one evicts its cached runs and drops its in-memory
backlog, timers and transfers (``on_lost``).

A request for a run of a shard held elsewhere is answered UNAVAILABLE naming the
shard and its owner's advertised address (``check``); clients retry UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection

from tideflow.history import (
    HistoryStore,
    MemberRecord,
    RunKey,
    ShardOwnershipLostError,
    ShardRecord,
    StoreError,
    now_micros,
    shard_of,
)

from ._errors import UnavailableError
from ._failures import log_retry
from ._peers import Peer
from ._trace import LeaseTracer

log = logging.getLogger("tideflow.server.shards")

_US = 1_000_000
#: Default lease: a SIGKILLed node's shards are served again within 10 s (the lease
#: lapses after at most 5 s, the next acquire pass comes within a third of it, and
#: acquiring a shard reloads its backlog).
DEFAULT_LEASE_S = 5.0


def fair_share(shards: int, live: Collection[str], node_id: str) -> int:
    """How many shards ``node_id`` should hold among the ``live`` nodes: shards // n,
    and one more for the first shards % n nodes in id order. The shares add up to the
    shard count, so every node gets one while there are at least as many shards as
    nodes (ceil for all, 2 each of 4 shards over 3 nodes, let two nodes fill up and
    the third take none)."""
    ranked = sorted(live)
    base, extra = divmod(shards, len(ranked))
    return base + (1 if ranked.index(node_id) < extra else 0)


class ShardNotOwnedError(UnavailableError):
    """The request's run lives on a shard this node does not hold."""


class ShardController:
    """Acquires, renews, balances and releases this node's shard leases."""

    def __init__(
        self,
        store: HistoryStore,
        node_id: str,
        address: str,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        on_acquired: Callable[[int], Awaitable[None]],
        on_lost: Callable[[int], None],
        tracer: LeaseTracer | None = None,
    ) -> None:
        if lease_s <= 0:
            raise ValueError("the lease must last a positive number of seconds")
        self.node_id = node_id
        self.address = address
        self._store = store
        self._lease_us = int(lease_s * _US)
        self._interval_s = lease_s / 3
        self._on_acquired = on_acquired
        self._on_lost = on_lost
        self._tracer = tracer or LeaseTracer(None, node_id)
        self._started_at = now_micros()
        # Shards acquired whose recovery failed (the store went away): tried again.
        self._unrecovered: set[int] = set()
        # The last read of every shard row and membership row (for the owner's address
        # in a refusal, and for balancing).
        self._view: list[ShardRecord] = []
        self._members: dict[str, MemberRecord] = {}
        self._wakeup = asyncio.Event()

    # ------------------------------------------------------------------ queries

    def shard_of(self, key: RunKey) -> int:
        return self._store.shard_of(key)

    def owns(self, key: RunKey) -> bool:
        """Whether this node holds the shard of ``key``'s run now."""
        return self._store.holds(self._store.shard_of(key))

    def owned(self) -> Collection[int]:
        """The shards this node holds now."""
        return self._store.held_shards.keys()

    def check(self, namespace: str, workflow_id: str) -> None:
        """Raise ShardNotOwnedError unless this node serves ``workflow_id``'s runs."""
        # Asked on every load of a run: the hash straight, without a RunKey built.
        shard = shard_of(namespace, workflow_id, self._store.shard_count)
        if self._store.holds(shard):
            return
        raise ShardNotOwnedError(
            f"workflow {workflow_id!r} lives on shard {shard}, which node {self.node_id} "
            f"({self.address}) does not own: {self._owner_of(shard)}; retry there"
        )

    def owner(self, shard: int) -> Peer | None:
        """The node holding ``shard``'s lease by the last read of the shard rows (this
        node included), with its advertised address; None while the shard has no live
        owner or the owner's address is unknown. A view at most a third of a lease old:
        ``refresh`` reads it again (a caller refused by the owner named here)."""
        if self._store.holds(shard):
            return Peer(self.node_id, self.address)
        row = self._view[shard] if shard < len(self._view) else None
        if row is None or row.unowned or row.owner == self.node_id or row.free_at(now_micros()):
            return None
        member = self._members.get(row.owner)
        return None if member is None else Peer(row.owner, member.address)

    def peers(self) -> list[Peer]:
        """The other nodes whose heartbeat is younger than a lease, by the last read."""
        horizon = now_micros() - self._lease_us
        return [
            Peer(m.node_id, m.address)
            for m in self._members.values()
            if m.node_id != self.node_id and m.heartbeat_at >= horizon
        ]

    async def refresh(self) -> None:
        """Read the shard rows and membership again now (a forwarded call met a node
        that no longer owns the shard): the next ``owner`` answers from the store."""
        self._members = {m.node_id: m for m in await self._store.list_members()}
        self._view = await self._store.read_shards()

    def _owner_of(self, shard: int) -> str:
        row = self._view[shard] if shard < len(self._view) else None
        now = now_micros()
        if row is None or row.unowned or row.owner == self.node_id or row.free_at(now):
            return "it is being moved between nodes (no owner yet)"
        member = self._members.get(row.owner)
        where = member.address if member is not None else "address unknown"
        return f"node {row.owner} at {where} owns it"

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Join the cluster and take this node's share of the shards (the first
        acquire pass runs before the node serves anything)."""
        self._store.enable_fencing()
        self._store.on_fenced = self._fenced
        if self._tracer.enabled:
            self._store.on_committed = self._tracer.appended
        await self._heartbeat()
        await self._balance()
        log.info(
            "node %s (%s) holds %d of %d shards",
            self.node_id,
            self.address,
            len(self.owned()),
            self._store.shard_count,
        )

    async def run(self) -> None:
        """Renew, heartbeat and balance every third of the lease, until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self._renew_all()
                await self._heartbeat()
                await self._balance()
            except StoreError as exc:
                # The store is away: leases are renewed once it answers, or lapse; the
                # fence keeps a node that lost one from writing meanwhile.
                log_retry(log, "the shard lease pass", exc)

    async def stop(self) -> None:
        """Release every lease (others take over at once) and leave the cluster. The
        node must have stopped writing: nothing serves requests any more."""
        for shard, token in sorted(self._store.held_shards.items()):
            self._store.drop_shard(shard)
            try:
                released = await self._store.release_shard(shard, token)
            except StoreError as exc:
                log.warning("releasing shard %d failed (%s): its lease will lapse", shard, exc)
                continue
            self._tracer.release(shard, token, ok=released)
        with contextlib.suppress(StoreError):
            await self._store.leave(self.node_id)

    # -------------------------------------------------------------------- steps

    async def _heartbeat(self) -> None:
        await self._store.heartbeat(
            MemberRecord(self.node_id, self.address, now_micros(), self._started_at)
        )

    async def _renew_all(self) -> None:
        """Renew every held lease in one transaction (one commit per pass: on SQLite
        each commit is an fsync the writers wait behind)."""
        tokens = dict(sorted(self._store.held_shards.items()))
        if not tokens:
            return
        lost = await self._store.renew_shards(tokens, self._lease_us)
        for shard, token in tokens.items():
            exc = lost.get(shard)
            if exc is None:
                self._tracer.renew(shard, token)
                continue
            self._tracer.renew(shard, token, current=exc.current)
            if self._store.held_shards.get(shard) == token:
                self._lose(shard, str(exc))

    async def _balance(self) -> None:
        """One acquire pass: take free or expired shards up to this node's share,
        release the surplus above it."""
        now = now_micros()
        members = await self._store.list_members()
        self._members = {m.node_id: m for m in members}
        live = {m.node_id for m in members if m.heartbeat_at >= now - self._lease_us}
        live.add(self.node_id)
        count = self._store.shard_count
        target = fair_share(count, live, self.node_id)
        self._view = await self._store.read_shards()
        held = self._store.held_shards
        for shard in sorted(self._unrecovered & held.keys()):
            await self._recover(shard)
        if len(held) > target:
            await self._shed(len(held) - target)
            return
        # Start the scan at a place of the node's own, so that nodes starting together
        # do not all race for shard 0 first.
        start = sum(self.node_id.encode()) % count
        order = [self._view[(start + i) % count] for i in range(count)]
        wanted = target - len(held)
        free = [
            row
            for row in order
            if row.shard_id not in held and (row.free_at(now) or row.owner == self.node_id)
        ]
        # Up to ``wanted`` at once (each an acquire and a recovery read: a node's start
        # took seconds one shard after the other); a compare-and-set lost to another
        # node leaves room for the next free one.
        while wanted > 0 and free:
            batch, free = free[:wanted], free[wanted:]
            outcomes = await asyncio.gather(
                *(self._acquire(row, now) for row in batch), return_exceptions=True
            )
            wanted -= sum(outcome is True for outcome in outcomes)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome

    async def _acquire(self, row: ShardRecord, now: int) -> bool:
        stolen = not row.unowned and row.owner != self.node_id and row.lease_expires_at < now
        new_range = await self._store.acquire_shard(row, self.node_id, self._lease_us)
        self._tracer.acquire(row, new_range, now=now)
        if new_range is None:
            return False
        self._store.hold_shard(row.shard_id, new_range)
        log.info(
            "acquired shard %d (range id %d%s)",
            row.shard_id,
            new_range,
            f", taken over from {row.owner}" if stolen else "",
        )
        await self._recover(row.shard_id)
        return True

    async def _recover(self, shard: int) -> None:
        try:
            await self._on_acquired(shard)
        except StoreError as exc:
            log_retry(log, f"recovering shard {shard}", exc)
            self._unrecovered.add(shard)
        else:
            self._unrecovered.discard(shard)

    async def _shed(self, surplus: int) -> None:
        """Release ``surplus`` shards for a node below its share to take."""
        for shard, token in sorted(self._store.held_shards.items(), reverse=True)[:surplus]:
            self._lose(shard, "released for balance")
            released = await self._store.release_shard(shard, token)
            self._tracer.release(shard, token, ok=released)

    def _lose(self, shard: int, why: str) -> None:
        """Stop serving ``shard`` at once: no write of it is sent any more."""
        if shard not in self._store.held_shards:
            return
        self._store.drop_shard(shard)
        self._unrecovered.discard(shard)
        log.warning("dropped shard %d: %s", shard, why)
        self._on_lost(shard)

    def _fenced(self, error: ShardOwnershipLostError) -> None:
        """The store's fence refused a write of ours (ShardLease.tla ``AppendEvent``
        rejected): another node owns the shard now."""
        self._tracer.fenced(error.shard_id, error.held, error.current)
        if self._store.held_shards.get(error.shard_id) == error.held:
            self._lose(error.shard_id, str(error))
            self._wakeup.set()
