"""The shared metadata document (server/_site_metadata.py) exchanged over a sites' link
(server/_sites.py): each side pulls what it lacks, like replication.

Over the stream the edge dialled, each side calls ``metadata`` on the other with its
own state vector and merges the update it gets back (server/_metadata_sync.py applies
what changed to its store). It pulls on link-up, then every ``interval_s`` seconds:
the document is small (namespaces, schedules, search attributes, site records), an
update with nothing new is a few bytes, and a merge is idempotent, so a pull that
races another or repeats one changes nothing. Each side also keeps its own site record
current: whether its link to the peer is up, and since when.
"""

from __future__ import annotations

import asyncio
import logging

from google.protobuf import wrappers_pb2

from ._metadata_sync import MetadataSync
from ._site_link import LinkDown, SiteLink, message_of

log = logging.getLogger("tideflow.server.metadata")

#: How often a linked site pulls the peer's metadata document.
PULL_INTERVAL_S = 2.0


class MetadataExchange:
    """This site's side of the metadata exchange on each of its links."""

    def __init__(self, sync: MetadataSync, *, interval_s: float = PULL_INTERVAL_S) -> None:
        self._sync = sync
        self._interval_s = interval_s

    def sites(self) -> set[str]:
        """The sites whose records the document holds (every site that ever linked
        with this one, or with its peers, publishes one)."""
        return set(self._sync.metadata.snapshot()["sites"])

    async def serve(self, link: SiteLink, body: bytes) -> wrappers_pb2.BytesValue:
        """The ``metadata`` call: the update the caller lacks, given its state vector."""
        state_vector = message_of(body, wrappers_pb2.BytesValue).value
        # Several nodes of this site may share its store: read their writes first.
        await self._sync.metadata.refresh()
        return wrappers_pb2.BytesValue(value=self._sync.metadata.diff(state_vector))

    async def pull_loop(self, link: SiteLink) -> None:
        """Pull the peer's document while ``link`` is up (cancelled when it goes down)."""
        await self._sync.publish_site(**{f"link_{link.peer}": "up"})
        try:
            while True:
                await self.pull_once(link)
                await asyncio.sleep(self._interval_s)
        finally:
            # Best effort on the way down (the store may be what failed): the record
            # says the link went away.
            try:
                await self._sync.publish_site(**{f"link_{link.peer}": "down"})
            except Exception:
                log.debug("site record of the link to %s not updated", link.peer, exc_info=True)

    async def pull_once(self, link: SiteLink) -> int:
        """One pull: the number of entries the peer's update changed here."""
        await self._sync.metadata.refresh()
        request = wrappers_pb2.BytesValue(value=self._sync.metadata.state_vector())
        try:
            reply = await link.call("metadata", request, wrappers_pb2.BytesValue)
        except LinkDown:
            return 0
        changes = await self._sync.merge(reply.value) if reply.value else []
        if changes:
            log.info("site metadata: %d entries from %s", len(changes), link.peer)
        return len(changes)
