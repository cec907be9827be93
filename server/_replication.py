"""Pulled incremental replication between sites (tla/Replication.tla).

Each site pulls from its peer the events it lacks of the runs homed there: the
replica asks, from its last event id, in batches (``ShipEvents``); it applies a
batch only where it continues its replica, in one fenced transaction
(``HistoryStore.replication.append_replicated``, ``DeliverEvents``). A batch that
would overwrite a different event is never applied: it is an alarm (a log line, a
counter, a row ``tideflow site status`` shows).

What drives the pulls: a full pass over the peer's runs each time the link comes up
and every ``sync_interval_s`` after (the peer lists its runs with their last event
ids; a replica behind pulls), and, in between, the peer's hints: after each commit a
site tells its peers which runs changed, and they pull those at once. A hint lost
with the link costs nothing: the next pass finds the run behind. Every pull starts
from what the store holds, so a pass is resumable at any batch boundary and survives
a SIGKILL of either side.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tideflow.api.v1 import replication_pb2 as rp
from tideflow.api.v1.state_pb2 import MutableState
from tideflow.history import HistoryStore, ReplicaVerdict, RunKey, home_of, now_micros

from ._replication_trace import ReplicationTracer, buffered_signals
from ._site_link import LinkDown, SiteLink, message_of

log = logging.getLogger("tideflow.server.replication")

_LIST_PAGE = 500
_BATCH_EVENTS = 200


def run_ref(key: RunKey) -> rp.RunRef:
    return rp.RunRef(namespace=key.namespace, workflow_id=key.workflow_id, run_id=key.run_id)


def key_of(ref: rp.RunRef) -> RunKey:
    return RunKey(namespace=ref.namespace, workflow_id=ref.workflow_id, run_id=ref.run_id)


@dataclass
class PeerStats:
    """What ``tideflow site status`` shows of one peer (this process's counts)."""

    events_pulled: int = 0
    requests_forwarded: int = 0
    last_sync: int = 0
    alarms: int = 0
    hinted: set[RunKey] = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Replicator:
    """Serves this site's runs to peers and pulls the peers' runs into replicas.

    ``applied(key, ms)`` is told of every batch applied with the replica's new state
    (the engine forgets its cached copy; the inbox retires what the state shows; a
    run handed to this site is taken over)."""

    def __init__(
        self,
        store: HistoryStore,
        site: str,
        applied: Callable[[RunKey, MutableState | None], Awaitable[None]],
        *,
        sync_interval_s: float = 5.0,
        tracer: ReplicationTracer | None = None,
    ) -> None:
        self._store = store
        self._site = site
        self._applied = applied
        self._sync_interval_s = sync_interval_s
        self._tracer = tracer or ReplicationTracer(None, "")
        self.stats: dict[str, PeerStats] = {}
        # Who applies a pulled batch: here, or the owner of the run's shard on a site
        # of several nodes (server/_site_nodes.py).
        self.apply: Callable[
            [RunKey, str, rp.ReadEventsResponse], Awaitable[tuple[ReplicaVerdict, str]]
        ] = self.apply_batch

    def peer_stats(self, peer: str) -> PeerStats:
        return self.stats.setdefault(peer, PeerStats())

    # ------------------------------------------------------------ serving

    async def serve_runs(self, link: SiteLink, body: bytes) -> rp.ListRunsResponse:
        """A page of the runs this site serves to ``link.peer``: homed here, or homed
        at the peer (handed off to it: the peer may still lack the HANDOFF event)."""
        request = message_of(body, rp.ListRunsRequest)
        after = key_of(request.after) if request.HasField("after") else None
        limit = max(1, min(request.limit or _LIST_PAGE, 5_000))
        served, cursor = await self._store.replication.runs_served(
            {self._site, link.peer}, self._site, after, limit
        )
        response = rp.ListRunsResponse(more=cursor is not None)
        for run in served:
            response.runs.add(
                run=run_ref(run.key), last_event_id=run.last_event_id, home_cluster=run.home_cluster
            )
        if cursor is not None:
            response.next.CopyFrom(run_ref(cursor))
        return response

    async def serve_events(self, link: SiteLink, body: bytes) -> rp.ReadEventsResponse:
        request = message_of(body, rp.ReadEventsRequest)
        limit = max(1, min(request.max_events or _BATCH_EVENTS, 1_000))
        events, state, last = await self._store.replication.read_batch(
            key_of(request.run), max(1, request.first_event_id), limit
        )
        response = rp.ReadEventsResponse(events=events, last_event_id=last)
        if state is not None:
            response.state.MergeFromString(state)
        return response

    async def hinted(self, link: SiteLink, body: bytes) -> rp.RunsChanged:
        request = message_of(body, rp.RunsChanged)
        stats = self.peer_stats(link.peer)
        stats.hinted.update(key_of(ref) for ref in request.runs)
        stats.wake.set()
        return rp.RunsChanged()

    # ------------------------------------------------------------ pulling

    async def pull_loop(self, link: SiteLink) -> None:
        """Keep this site's replicas of ``link.peer``'s runs up to date while the
        link lasts: a full pass now and every sync interval, hinted runs at once."""
        stats = self.peer_stats(link.peer)
        next_pass = 0.0
        loop = asyncio.get_running_loop()
        while not link.closed.is_set():
            if loop.time() >= next_pass:
                await self.full_pass(link)
                next_pass = loop.time() + self._sync_interval_s
            while stats.hinted:
                batch = list(stats.hinted)
                stats.hinted.clear()
                for key in batch:
                    await self.pull_run(link, key)
            stats.wake.clear()
            if stats.hinted:
                continue
            try:
                async with asyncio.timeout(max(0.0, next_pass - loop.time())):
                    await stats.wake.wait()
            except TimeoutError:
                pass

    async def full_pass(self, link: SiteLink) -> None:
        """Pull every run of the peer's listing that is behind here."""
        replication = self._store.replication
        after: rp.RunRef | None = None
        while True:
            request = rp.ListRunsRequest(limit=_LIST_PAGE)
            if after is not None:
                request.after.CopyFrom(after)
            page = await link.call("runs", request, rp.ListRunsResponse)
            keys = [key_of(r.run) for r in page.runs]
            have = await replication.last_event_ids(keys)
            for run, key in zip(page.runs, keys, strict=True):
                if run.last_event_id > have[key]:
                    await self.pull_run(link, key)
                elif run.home_cluster != self._site:
                    await replication.note_listing(key, link.peer, run.last_event_id)
            if not page.more:
                break
            after = page.next
        self.peer_stats(link.peer).last_sync = now_micros()

    async def pull_run(self, link: SiteLink, key: RunKey) -> None:
        """Pull ``key``'s events this site lacks from the peer, batch by batch, each
        applied (or refused) in its own transaction, by the owner of the run's shard
        (``apply``: this node, or another node of a site of several)."""
        replication = self._store.replication
        stats = self.peer_stats(link.peer)
        while True:
            have = (await replication.last_event_ids([key]))[key]
            request = rp.ReadEventsRequest(
                run=run_ref(key), first_event_id=have + 1, max_events=_BATCH_EVENTS
            )
            batch = await link.call("events", request, rp.ReadEventsResponse)
            if not batch.events:
                return
            verdict, detail = await self.apply(key, link.peer, batch)
            if verdict is ReplicaVerdict.MISMATCH:
                stats.alarms += 1
                log.error("replication alarm: run %s from %s: %s", key, link.peer, detail)
                return
            if verdict is not ReplicaVerdict.APPLIED:
                return  # a gap (pulled again next pass) or nothing new
            stats.events_pulled += sum(1 for e in batch.events if e.event_id > have)
            if batch.events[-1].event_id >= batch.last_event_id:
                return

    async def apply_batch(
        self, key: RunKey, peer: str, batch: rp.ReadEventsResponse
    ) -> tuple[ReplicaVerdict, str]:
        """Apply a batch of ``key`` pulled from ``peer`` (on the node holding the run's
        shard), and tell ``applied`` if it was."""
        state = batch.state if batch.HasField("state") else None
        seq = self._tracer.ahead(
            "ApplyBatch",
            key,
            peer=peer,
            events=self._tracer.events(batch.events),
            state=state is not None,
            buffered=[] if state is None else buffered_signals(state),
        )
        verdict, detail = await self._store.replication.append_replicated(
            key,
            batch.events,
            None if state is None else state.SerializeToString(),
            local=self._site,
            peer=peer,
            home_last_event_id=batch.last_event_id,
            now=now_micros(),
        )
        self._tracer.outcome(seq, verdict.value)
        if verdict is ReplicaVerdict.APPLIED:
            await self._applied(key, state)
        return verdict, detail


async def hint_loop(
    links: Callable[[], list[SiteLink]],
    changed: asyncio.Queue[RunKey],
    relay: Callable[[rp.RunsChanged], Awaitable[None]] | None = None,
) -> None:
    """Tell the peers which runs changed here (coalesced), so they pull at once: over
    this node's links, and through ``relay`` to the other nodes of this site that hold
    links."""
    while True:
        first = await changed.get()
        keys = {first}
        while not changed.empty():
            keys.add(changed.get_nowait())
        peers = links()
        if not peers:
            continue  # a site without peers: every commit lands here, nobody to tell
        hint = rp.RunsChanged(runs=[run_ref(k) for k in keys])
        for link in peers:
            try:
                await link.call("changed", hint, rp.RunsChanged)
            except LinkDown:
                continue  # the next full pass finds what the hint said
        if relay is not None:
            await relay(hint)


def takes_over(ms: MutableState, site: str) -> bool:
    """This site is the run's home by its replica but has not taken it over yet."""
    return home_of(ms, site) == site and ms.activated_version < ms.version
