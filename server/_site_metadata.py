"""The metadata both sites write (schedules, namespace and search-attribute
definitions, the sites' capability and link records), as one CRDT document (pycrdt,
the Yrs binding) that each site keeps in its store and merges with its peer's.

Shape of the document: one root map per collection (``COLLECTIONS``). An entry of a
collection is a last-writer-wins register, resolved here rather than by Yrs:

- each site writes only its own slot of an entry, map key ``<key>\\x1f<site>``, so two
  sites never write the same map key (Yrs resolves concurrent writes to one key by
  client id: deterministic, but it would drop a later write in favour of a higher
  client id);
- a slot holds ``{"hlc": [wall_ms, counter], "site": site, "value": ...}`` as a JSON
  string (Yrs returns every number as a float: a JSON string keeps integers exact);
  ``value`` null is a deletion (a tombstone, so a delete beats an older write);
- an entry's value is the slot with the greatest ``(wall_ms, counter, site)``: a hybrid
  logical clock, advanced past every slot this site has seen, so a write made after
  seeing another one wins over it whatever the clocks say, and ties between sites are
  broken by site name. Every site computes the same winner from the same slots.

Exchange (what the sites work calls over its link, in either direction, any order,
any number of times): ``state_vector()`` on one side, ``diff(that)`` on the other,
``apply_remote(diff)`` back on the first. Merging is idempotent and commutative (a
CRDT); ``apply_remote`` persists the merged document and tells the listeners
(``on_change``) which entries' values changed, which map them to the store
(server/_metadata_sync.py). Local writes (``put``) come from the store's own writers.

Each server node has its own client id, stored with the document
(history/_site_metadata_store.py) and kept across restarts; nodes of one database
merge each other's saved copies (``refresh``). Two nodes of one site writing one entry
at the same moment share the site's slot: Yrs keeps one of the two by client id (the
same one on every site), the only case not decided by the clock. Garbage collection
stays on: the document is exchanged as updates and state vectors, never as pycrdt
``Snapshot``s (which need ``skip_gc``).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pycrdt import Doc, Map

from tideflow.history import HistoryStore, SiteMetadataRecord

#: The collections of the document.
# ``workers``: what each node's activity workers offer, keyed ``<site>@<node>`` (one
# entry per node: the nodes of one site share its slot of a ``sites`` record, so a
# field there written by two nodes would be lost to Yrs' client-id rule).
COLLECTIONS = ("schedules", "namespaces", "search_attributes", "sites", "workers")
DOC_NAME = "shared"
_SEP = "\x1f"
# Yrs client ids are unsigned; JavaScript peers read them as doubles: stay below 2**53.
_MAX_CLIENT_ID = 2**53 - 1


@dataclass(frozen=True, slots=True)
class Change:
    """An entry whose value changed: ``value`` None means deleted."""

    collection: str
    key: str
    value: Any


Listener = Callable[[list[Change]], Awaitable[None]]


class HybridClock:
    """A hybrid logical clock: wall-clock milliseconds plus a counter, never going
    back, and moved past every timestamp observed."""

    def __init__(self, wall: Callable[[], int] | None = None) -> None:
        self._wall = wall or (lambda: time.time_ns() // 1_000_000)
        self.last = (0, 0)

    def now(self) -> tuple[int, int]:
        wall = self._wall()
        ms, counter = self.last
        self.last = (wall, 0) if wall > ms else (ms, counter + 1)
        return self.last

    def observe(self, stamp: tuple[int, int]) -> None:
        self.last = max(self.last, stamp)


def _check_name(collection: str, key: str) -> None:
    if collection not in COLLECTIONS:
        raise ValueError(f"unknown metadata collection {collection!r}")
    if not key or _SEP in key:
        raise ValueError(f"bad metadata key {key!r}")


def _stamp(slot: dict[str, Any]) -> tuple[int, int]:
    ms, counter = slot["hlc"]
    return int(ms), int(counter)


def _slot_order(slot: dict[str, Any]) -> tuple[int, int, str]:
    ms, counter = slot["hlc"]
    return int(ms), int(counter), str(slot["site"])


class SiteMetadata:
    """This site's copy of the shared metadata document."""

    def __init__(
        self,
        store: HistoryStore,
        site: str,
        record: SiteMetadataRecord,
        wall: Callable[[], int] | None = None,
    ) -> None:
        self._store = store
        self.site = site
        self.node_id = record.node_id
        self.client_id = record.client_id
        self._doc: Doc[Any] = Doc(client_id=record.client_id)
        self._doc.apply_update(record.state)
        self._maps: dict[str, Map[Any]] = {
            name: self._doc.get(name, type=Map) for name in COLLECTIONS
        }
        self._clock = HybridClock(wall)
        self._observe_all()
        self._lock = asyncio.Lock()
        self._listeners: list[Listener] = []

    @classmethod
    async def open(
        cls,
        store: HistoryStore,
        site: str,
        *,
        node_id: str = "",
        wall: Callable[[], int] | None = None,
    ) -> SiteMetadata:
        """The document as stored, for the server node ``node_id`` of this site (its
        client id created the first time); ``wall``: the clock's milliseconds
        (default: the system's)."""
        if not site or _SEP in site:
            raise ValueError(f"bad site name {site!r}")
        record = await store.site_metadata.load(DOC_NAME, node_id)
        if record is None:
            fresh: Doc[Any] = Doc(client_id=random.randint(1, _MAX_CLIENT_ID))
            record = await store.site_metadata.create(
                SiteMetadataRecord(
                    name=DOC_NAME,
                    node_id=node_id,
                    client_id=fresh.client_id,
                    state=fresh.get_update(),
                )
            )
        return cls(store, site, record, wall)

    def on_change(self, listener: Listener) -> None:
        """``listener`` gets the entries a remote merge changed (after it persisted)."""
        self._listeners.append(listener)

    # ---------------------------------------------------------------- reads

    def _slots(self, collection: str) -> dict[str, list[dict[str, Any]]]:
        """One collection's slots, by entry key."""
        found: dict[str, list[dict[str, Any]]] = {}
        for slot_key, raw in self._maps[collection].items():
            found.setdefault(slot_key.rpartition(_SEP)[0], []).append(json.loads(raw))
        return found

    def _observe_all(self) -> None:
        """Move the clock past every slot: a write made now wins over all of them."""
        for collection in COLLECTIONS:
            for slots in self._slots(collection).values():
                for slot in slots:
                    self._clock.observe(_stamp(slot))

    def entries(self, collection: str) -> dict[str, Any]:
        """One collection's live entries (deleted ones left out): key -> value. Reads
        that collection only (the offer loops ask for theirs every round)."""
        if collection not in COLLECTIONS:
            raise ValueError(f"unknown metadata collection {collection!r}")
        view: dict[str, Any] = {}
        for key, slots in self._slots(collection).items():
            winner = max(slots, key=_slot_order)
            if winner["value"] is not None:
                view[key] = winner["value"]
        return view

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every collection's live entries (deleted ones left out): key -> value."""
        return {name: self.entries(name) for name in COLLECTIONS}

    def get(self, collection: str, key: str) -> Any:
        _check_name(collection, key)
        return self.entries(collection).get(key)

    # --------------------------------------------------------------- writes

    async def put(self, collection: str, key: str, value: Any) -> tuple[int, int]:
        """Write an entry (``value`` None deletes it): this site's slot, stamped after
        everything this site has seen; returns the stamp. ``value`` must be JSON."""
        _check_name(collection, key)
        async with self._lock:
            stamp = self._clock.now()
            slot = {"hlc": list(stamp), "site": self.site, "value": value}
            encoded = json.dumps(slot, sort_keys=True, separators=(",", ":"))
            self._maps[collection][f"{key}{_SEP}{self.site}"] = encoded
            await self._persist()
        return stamp

    # ------------------------------------------------------------- exchange

    def state_vector(self) -> bytes:
        """What this side has (send it to the peer, which answers with ``diff``)."""
        return self._doc.get_state()

    def diff(self, state_vector: bytes = b"") -> bytes:
        """What a side with ``state_vector`` lacks (empty: everything), as an update."""
        return self._doc.get_update(state_vector or None)

    async def apply_remote(self, update: bytes) -> list[Change]:
        """Merge a peer's update (any order, any number of times: the same result),
        persist the document, and return (and tell the listeners) what changed."""
        async with self._lock:
            before, had = self.snapshot(), self._doc.get_state()
            self._doc.apply_update(update)
            after = self.snapshot()
            self._observe_all()
            changes = [
                Change(collection, key, after[collection].get(key))
                for collection in COLLECTIONS
                for key in sorted(set(before[collection]) | set(after[collection]))
                if before[collection].get(key) != after[collection].get(key)
            ]
            if self._doc.get_state() != had:  # new slots, winning or not: keep them
                await self._persist()
        if changes:
            for listener in self._listeners:
                await listener(changes)
        return changes

    async def _persist(self) -> None:
        await self._store.site_metadata.save(DOC_NAME, self.node_id, self._doc.get_update())

    async def refresh(self) -> None:
        """Take in what other nodes of this database saved (call before ``diff`` or
        ``state_vector`` where several nodes share the database)."""
        async with self._lock:
            record = await self._store.site_metadata.load(DOC_NAME, self.node_id)
            if record is not None:
                self._doc.apply_update(record.state)
                self._observe_all()
