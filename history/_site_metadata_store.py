"""The persisted form of the sites' shared metadata document (server/_site_metadata.py).

One row per document and server node: the CRDT client id the node writes with and the
document as that node last saved it (a Yjs update that rebuilds it). The client id is
kept across restarts (a new id after each restart would look like a new writer every
time, and the state vector would grow without bound), and it is the node's own: two
writers sharing a client id would corrupt the document. A node's copy of the document
is the merge of every node's row (merging CRDT updates loses nothing), and it saves
only its own row, so nodes never overwrite each other. The table lives in its own
``MetaData`` and is created on first use: an older database gains it without a
migration.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from pycrdt import merge_updates
from sqlalchemy import BigInteger, Column, Connection, LargeBinary, MetaData, String, Table, select
from sqlalchemy.exc import IntegrityError

from ._records import now_micros
from ._token_keys import OwnTableStore

metadata = MetaData()

site_metadata = Table(
    "site_metadata",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("node_id", String(255), primary_key=True),
    Column("client_id", BigInteger, nullable=False),
    Column("state", LargeBinary, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteMetadataRecord:
    """A node's client id, and the document: every node's saved state merged."""

    name: str
    node_id: str
    client_id: int
    state: bytes


class SiteMetadataStore(OwnTableStore):
    """The ``site_metadata`` table; every method is one transaction or one read."""

    _metadata = metadata

    async def load(self, name: str, node_id: str) -> SiteMetadataRecord | None:
        """The node's row with the document merged from every node's; None if the
        node has none yet."""
        await self._ensure_table()
        return await self._runner.read(lambda conn: _load_txn(conn, name, node_id))

    async def create(self, record: SiteMetadataRecord) -> SiteMetadataRecord:
        """Insert the node's row (a new client id); if it has one already (created
        meanwhile), that one."""
        await self._ensure_table()
        with contextlib.suppress(IntegrityError):
            await self._runner.write(lambda conn: _insert_txn(conn, record))
        existing = await self.load(record.name, record.node_id)
        assert existing is not None
        return existing

    async def save(self, name: str, node_id: str, state: bytes) -> None:
        """Replace the node's saved state (its client id never changes)."""
        await self._ensure_table()
        t = site_metadata
        query = (
            t.update()
            .where(t.c.name == name, t.c.node_id == node_id)
            .values(state=state, updated_at=now_micros())
        )
        await self._runner.write(lambda conn: conn.execute(query))


def _load_txn(conn: Connection, name: str, node_id: str) -> SiteMetadataRecord | None:
    t = site_metadata
    rows = conn.execute(select(t.c.node_id, t.c.client_id, t.c.state).where(t.c.name == name)).all()
    own = next((r for r in rows if r.node_id == node_id), None)
    if own is None:
        return None
    states = [bytes(r.state) for r in rows]
    return SiteMetadataRecord(
        name=name,
        node_id=node_id,
        client_id=own.client_id,
        state=states[0] if len(states) == 1 else merge_updates(*states),
    )


def _insert_txn(conn: Connection, record: SiteMetadataRecord) -> None:
    conn.execute(
        site_metadata.insert().values(
            name=record.name,
            node_id=record.node_id,
            client_id=record.client_id,
            state=record.state,
            updated_at=now_micros(),
        )
    )
