"""API keys: the identities a server in ``api-key`` auth mode accepts, with their grants.

A key is ``tfk_<key_id>_<secret>``. Only the key id (public: it names the key in
listings and revocations) and the SHA-256 of the secret are stored, so the table does
not give the keys away; the secret is 32 random bytes, so a fast hash is enough (no
dictionary to guard against, unlike a password). The table lives in its own
``MetaData`` and is created on first use, like ``task_token_keys``.

Revoking sets ``revoked_at``; the row stays so listings show what was revoked when.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    MetaData,
    Row,
    String,
    Table,
    Text,
    insert,
    select,
    update,
)

from ._token_keys import OwnTableStore

KEY_PREFIX = "tfk_"
_SECRET_BYTES = 32
_KEY_ID_BYTES = 8

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    # JSON list of "namespace:role" strings.
    Column("grants", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKeyRecord:
    """A stored key, without its secret (which is never stored)."""

    key_id: str
    name: str
    grants: tuple[str, ...]
    created_at: int
    revoked_at: int | None


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(key: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` of a key in the ``tfk_<id>_<secret>`` form; None otherwise."""
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = key[len(KEY_PREFIX) :].partition("_")
    if not sep or not key_id or not secret:
        return None
    return key_id, secret


class ApiKeyStore(OwnTableStore):
    """The ``api_keys`` table; every method is one transaction or one read."""

    _metadata = metadata

    async def create(self, name: str, grants: list[str]) -> tuple[ApiKeyRecord, str]:
        """A new key for identity ``name``: its record and the key itself, which is
        shown once and cannot be recovered later."""
        await self._ensure_table()
        key_id = secrets.token_hex(_KEY_ID_BYTES)
        secret = secrets.token_urlsafe(_SECRET_BYTES)
        record = ApiKeyRecord(
            key_id=key_id,
            name=name,
            grants=tuple(grants),
            created_at=time.time_ns() // 1000,
            revoked_at=None,
        )
        await self._runner.write(
            lambda conn: conn.execute(
                insert(api_keys).values(
                    key_id=key_id,
                    name=name,
                    secret_sha256=_sha256(secret),
                    grants=json.dumps(list(grants)),
                    created_at=record.created_at,
                )
            )
        )
        return record, f"{KEY_PREFIX}{key_id}_{secret}"

    async def verify(self, key: str) -> ApiKeyRecord | None:
        """The live key ``key`` is; None for a malformed, unknown, wrong or revoked one."""
        parts = split_key(key)
        if parts is None:
            return None
        key_id, secret = parts
        await self._ensure_table()
        found = await self._runner.read(lambda conn: _select(conn, key_id))
        if found is None:
            return None
        record, digest = found
        if not hmac.compare_digest(digest, _sha256(secret)) or record.revoked_at is not None:
            return None
        return record

    async def list(self) -> list[ApiKeyRecord]:
        """Every key, revoked ones included, oldest first."""
        await self._ensure_table()
        return await self._runner.read(_select_all)

    async def revoke(self, key_id: str) -> bool:
        """Revoke key ``key_id`` (refused from the next request on); False if there is
        no such live key."""
        await self._ensure_table()
        now = time.time_ns() // 1000
        t = api_keys
        return await self._runner.write(
            lambda conn: (
                conn.execute(
                    update(t)
                    .where(t.c.key_id == key_id, t.c.revoked_at.is_(None))
                    .values(revoked_at=now)
                ).rowcount
                > 0
            )
        )


def _record(r: Row[Any]) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=str(r.key_id),
        name=str(r.name),
        grants=tuple(json.loads(r.grants)),
        created_at=int(r.created_at),
        revoked_at=None if r.revoked_at is None else int(r.revoked_at),
    )


def _select(conn: Connection, key_id: str) -> tuple[ApiKeyRecord, str] | None:
    row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).first()
    if row is None:
        return None
    return _record(row), str(row.secret_sha256)


def _select_all(conn: Connection) -> list[ApiKeyRecord]:
    rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at, api_keys.c.key_id))
    return [_record(row) for row in rows]
