"""The secret keys that sign task tokens, shared by every node of one database.

The server signs each task token with an HMAC under the newest key and verifies it
under the key whose id the token names (``tideflow.server._task_tokens``); this module
only keeps the keys. A key is a row of ``task_token_keys``; the table lives in its
own ``MetaData`` and is created when first used, so a database made by an older
version gains it without a migration.

Rotation inserts the next key id (a primary key, so two rotations racing cannot both
win the same id); retiring deletes a row, after which tokens signed by it are refused.
The newest key is never retired: it is the one every node signs with.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    delete,
    func,
    insert,
    select,
)
from sqlalchemy.exc import DBAPIError, IntegrityError

from ._dialects import GuardedRunner, Runner

# Bytes of secret per key: the HMAC-SHA256 block is 64 bytes, 32 of entropy suffice.
KEY_BYTES = 32

metadata = MetaData()

task_token_keys = Table(
    "task_token_keys",
    metadata,
    Column("key_id", Integer, primary_key=True, autoincrement=False),
    Column("secret", LargeBinary, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)


async def create_tables(runner: Runner, tables: MetaData) -> None:
    """Create the tables of ``tables`` that do not exist yet (a table kept in its own
    ``MetaData``, created on first use, needs no migration of older databases)."""
    try:
        await runner.write(lambda conn: tables.create_all(conn))
    except DBAPIError:
        # Two nodes created the table at once: PostgreSQL refuses the second CREATE
        # TABLE (a duplicate table, or a unique violation in its catalog) although
        # the check before it found none. It exists now; any other error recurs.
        await runner.write(lambda conn: tables.create_all(conn))


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenKey:
    """One signing key: its id (carried in every token it signs) and its secret."""

    key_id: int
    secret: bytes
    created_at: int

    def __repr__(self) -> str:
        # Never print a secret (keys end up in logs and test failure output).
        return f"TokenKey(key_id={self.key_id}, created_at={self.created_at})"


class OwnTableStore:
    """A store of tables kept in their own ``MetaData`` (``_metadata``), created on
    first use by ``_ensure_table``."""

    _metadata: MetaData

    def __init__(self, runner: Runner) -> None:
        # A store's runner is guarded already; a raw one (the admin commands') is
        # guarded here, so their transactions are run again after a conflict (40001)
        # too and their failures are store errors.
        self._runner = runner if isinstance(runner, GuardedRunner) else GuardedRunner(runner)
        self._created = False

    async def _ensure_table(self) -> None:
        if not self._created:
            await create_tables(self._runner, self._metadata)
            self._created = True


class TokenKeyStore(OwnTableStore):
    """The ``task_token_keys`` table; every method is one transaction or one read."""

    _metadata = metadata

    async def keys(self) -> list[TokenKey]:
        """Every live key, oldest first; creates the first key when there is none (a
        new database), so a node always has one to sign with."""
        await self._ensure_table()
        keys = await self._runner.read(_all_keys)
        if keys:
            return keys
        # Another node may create it first: then theirs is used.
        with contextlib.suppress(IntegrityError):
            await self._runner.write(lambda conn: _insert_key_txn(conn, 1))
        return await self._runner.read(_all_keys)

    async def rotate(self) -> TokenKey:
        """Add a new key, which becomes the signing key of every node once it reloads
        its keys; the older keys keep verifying until retired."""
        await self._ensure_table()
        for _ in range(10):
            try:
                return await self._runner.write(_rotate_txn)
            except IntegrityError:
                continue  # a concurrent rotation took this id: take the next one
        raise RuntimeError("task token key rotation kept racing with other rotations")

    async def retire(self, key_id: int) -> bool:
        """Delete key ``key_id``; tokens it signed are refused from then on. False if
        there is no such key. The newest key (the signing key) cannot be retired."""
        await self._ensure_table()
        return await self._runner.write(lambda conn: _retire_txn(conn, key_id))


def _all_keys(conn: Connection) -> list[TokenKey]:
    t = task_token_keys
    rows = conn.execute(select(t.c.key_id, t.c.secret, t.c.created_at).order_by(t.c.key_id))
    return [
        TokenKey(key_id=int(r.key_id), secret=bytes(r.secret), created_at=int(r.created_at))
        for r in rows
    ]


def _insert_key_txn(conn: Connection, key_id: int) -> TokenKey:
    key = TokenKey(
        key_id=key_id, secret=secrets.token_bytes(KEY_BYTES), created_at=time.time_ns() // 1000
    )
    conn.execute(
        insert(task_token_keys).values(
            key_id=key.key_id, secret=key.secret, created_at=key.created_at
        )
    )
    return key


def _rotate_txn(conn: Connection) -> TokenKey:
    newest = conn.execute(select(func.max(task_token_keys.c.key_id))).scalar()
    return _insert_key_txn(conn, int(newest or 0) + 1)


def _retire_txn(conn: Connection, key_id: int) -> bool:
    t = task_token_keys
    newest = conn.execute(select(func.max(t.c.key_id))).scalar()
    if newest is not None and key_id == int(newest):
        raise ValueError(
            f"key {key_id} is the newest task token key (the one nodes sign with): "
            "rotate first, then retire it"
        )
    return conn.execute(delete(t).where(t.c.key_id == key_id)).rowcount > 0
