"""PostgreSQL and CockroachDB through asyncpg: one code path for both.

What a URL selects (``server_target``):

- ``postgresql://...`` (or ``postgres://``): PostgreSQL at its default isolation, READ
  COMMITTED; ``?isolation_level=serializable`` runs every transaction SERIALIZABLE.
- ``cockroachdb://...`` (or ``cockroachdb+asyncpg://``): CockroachDB through the
  ``sqlalchemy-cockroachdb`` dialect (``pip install "tideflow[cockroachdb]"``), always
  SERIALIZABLE (CockroachDB's default; READ COMMITTED is refused).

A SERIALIZABLE PostgreSQL and CockroachDB run the same code: the same statements, the
same fence (a plain read of the shard row, ``_cluster.check_fence_txn``) and the same
retries of SQLSTATE 40001 (``_dialects.GuardedRunner``). The group-commit batch goes
straight to asyncpg on a few connections of its own (``DirectConnections``,
``_pg_batch.py``); everything else goes through SQLAlchemy's async engine. What differs is only what
differs between the two databases: the dialect name and its SQLAlchemy dialect class
(CockroachDB's reflects its catalog its own way), and the DDL of the indexes that
CockroachDB creates hash-sharded (``_schema.py``). So the PostgreSQL tests at
SERIALIZABLE exercise the CockroachDB path, short of a CockroachDB server.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import Connection
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

from ._dialects import READ_COMMITTED, SERIALIZABLE

T = TypeVar("T")

_CONNECT_TIMEOUT_S = 10.0

#: The URL query parameter that selects the isolation (tideflow's own: it is taken off
#: the URL before the driver sees it).
ISOLATION_PARAMETER = "isolation_level"
#: The URL query parameter that caps one process's connections to the database
#: (tideflow's own, taken off the URL like the isolation): several nodes, each with its
#: pool, share the database's ``max_connections``.
MAX_CONNECTIONS_PARAMETER = "max_connections"
#: The environment variable giving the cap when the URL does not.
MAX_CONNECTIONS_ENV = "TIDEFLOW_DB_MAX_CONNECTIONS"
#: Without it: a pool of 10 (10 more on demand) and the group commit's 4 direct lanes.
_DEFAULT_POOL = (10, 10)
_DEFAULT_LANES = 4
# What asyncpg says, before sending anything, on a connection still running a statement
# ("another operation is in progress", or "cannot switch to state ...; another operation
# (N) is in progress" from its protocol).
_BUSY = "another operation"
COCKROACH_EXTRA = 'pip install "tideflow[cockroachdb]"'


@dataclass(frozen=True, slots=True)
class ServerTarget:
    """What a ``postgresql://`` or ``cockroachdb://`` URL asks for."""

    name: str  # "postgresql" or "cockroachdb" (``Runner.name``)
    url: URL  # on the asyncpg driver, without tideflow's own parameters
    isolation: str  # SERIALIZABLE or READ_COMMITTED
    max_connections: int | None = None  # None: the defaults above (24 at most)


def server_target(url: URL) -> ServerTarget:
    """Parse a PostgreSQL or CockroachDB URL; ValueError (one line, saying what to
    change) for an isolation other than the two supported, or a CockroachDB URL
    without the dialect package installed."""
    cockroach = url.get_backend_name() == "cockroachdb"
    name = "cockroachdb" if cockroach else "postgresql"
    raw = url.query.get(ISOLATION_PARAMETER)
    if raw is not None and not isinstance(raw, str):
        raise ValueError(f"{ISOLATION_PARAMETER} given more than once in the database URL")
    if raw is None:
        isolation = SERIALIZABLE if cockroach else READ_COMMITTED
    else:
        isolation = raw.strip().lower().replace("_", " ").replace("-", " ")
        if isolation not in (SERIALIZABLE, READ_COMMITTED):
            raise ValueError(
                f"{ISOLATION_PARAMETER}={raw!r}: expected serializable or read_committed"
            )
    if cockroach and isolation != SERIALIZABLE:
        raise ValueError(
            f"{ISOLATION_PARAMETER}={raw!r}: tideflow runs CockroachDB at SERIALIZABLE only"
        )
    if cockroach:
        _require_cockroach_dialect()
    driver = "cockroachdb+asyncpg" if cockroach else "postgresql+asyncpg"
    bare = url.set(drivername=driver).difference_update_query(
        [ISOLATION_PARAMETER, MAX_CONNECTIONS_PARAMETER]
    )
    return ServerTarget(
        name=name, url=bare, isolation=isolation, max_connections=_max_connections(url)
    )


def _max_connections(url: URL) -> int | None:
    """The URL's cap, else ``TIDEFLOW_DB_MAX_CONNECTIONS`` (a deployment's default for
    every process it starts), else None."""
    raw, source = url.query.get(MAX_CONNECTIONS_PARAMETER), MAX_CONNECTIONS_PARAMETER
    if raw is None:
        raw, source = os.environ.get(MAX_CONNECTIONS_ENV), MAX_CONNECTIONS_ENV
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw.strip().isdigit() or int(raw) < 2:
        raise ValueError(f"{source}={raw!r}: expected one whole number of at least 2")
    return int(raw)


def connection_budget(max_connections: int | None) -> tuple[int, int, int]:
    """(pool size, pool overflow, direct lanes) of one process. A cap keeps a third of
    it (1 to 4) for the group commit's direct lanes and the rest as a fixed pool."""
    if max_connections is None:
        return (*_DEFAULT_POOL, _DEFAULT_LANES)
    lanes = max(1, min(_DEFAULT_LANES, max_connections // 3))
    return max_connections - lanes, 0, lanes


def _require_cockroach_dialect() -> None:
    try:
        importlib.import_module("sqlalchemy_cockroachdb.asyncpg")
    except ImportError:
        raise ValueError(
            f"a cockroachdb:// URL needs the CockroachDB dialect: {COCKROACH_EXTRA}"
        ) from None


class AsyncEngineRunner:
    def __init__(self, target: ServerTarget) -> None:
        self.name = target.name
        self.isolation = target.isolation
        # pool_pre_ping replaces pooled connections a database restart closed; the connect
        # timeout bounds how long a request waits on a database that does not answer at
        # all (asyncpg's default is a minute), so the caller gets UNAVAILABLE and retries.
        pool_size, overflow, lanes = connection_budget(target.max_connections)
        options: dict[str, object] = {
            "pool_size": pool_size,
            "max_overflow": overflow,
            "pool_pre_ping": True,
            "connect_args": {"timeout": _CONNECT_TIMEOUT_S},
        }
        if target.isolation == SERIALIZABLE:
            # Reads too: a read of several statements sees one snapshot, and is retried
            # like a write if the database aborts it (GuardedRunner).
            options["isolation_level"] = "SERIALIZABLE"
        self._engine = create_async_engine(target.url, **options)
        # Several lanes: the server runs transactions of different runs in parallel.
        self.writer_lanes = lanes
        # The group-commit writes go straight to asyncpg (_pg_batch.py), on both
        # databases: a SERIALIZABLE PostgreSQL still runs CockroachDB's statements.
        self.direct = DirectConnections(target, keep=self.writer_lanes)

    async def write(self, fn: Callable[[Connection], T]) -> T:
        async with self._engine.begin() as conn:
            return await conn.run_sync(fn)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        if self.isolation == SERIALIZABLE:
            # Committed, not rolled back: at SERIALIZABLE what a transaction read is
            # only known to be consistent once it committed (PostgreSQL checks its
            # reads against concurrent writers until then, and drops the checks of a
            # transaction rolled back). A fenced recovery scan relies on it
            # (_cluster.held_shards_txn); a read failing there with 40001 is run again.
            async with self._engine.begin() as conn:
                return await conn.run_sync(fn)
        async with self._engine.connect() as conn:
            return await conn.run_sync(fn)

    async def close(self) -> None:
        await self.direct.close()
        await self._engine.dispose()


class DirectConnections:
    """asyncpg connections of the store's group-commit writes, one transaction at a
    time each (the writer lanes use at most ``keep`` at once).

    No pre-ping: an idle connection the database closed is noticed by asyncpg (it
    reads the server's goodbye) and dropped when taken; one that fails its ``BEGIN``
    (nothing written yet) is replaced by a fresh one once. A connection lost later in
    the transaction fails it as unavailable, and one lost around the ``COMMIT`` is a
    write in doubt (``HistoryStore.writes_in_doubt``), as on SQLAlchemy's path."""

    def __init__(self, target: ServerTarget, *, keep: int) -> None:
        self._dsn = target.url.set(drivername="postgresql").render_as_string(False)
        self._keep = keep
        self._begin = "BEGIN ISOLATION LEVEL SERIALIZABLE"
        # A statement outside an explicit transaction runs at the session's default.
        self._settings = {"default_transaction_isolation": "serializable"}
        if target.isolation != SERIALIZABLE:
            self._begin = "BEGIN"  # the database's default: READ COMMITTED
            self._settings = {}
        self._idle: list[Any] = []
        # The one-round-trip batch function, once installed (_pg_commit_function.py).
        self.batch_function: str | None = None

    async def transaction(self, fn: Callable[[Any], Awaitable[T]], *, implicit: bool = False) -> T:
        """Run ``fn`` on a connection in one transaction: committed if it returns,
        rolled back if it raises. ``implicit``: ``fn`` runs a single statement, no
        BEGIN or COMMIT around it (its implicit transaction commits it). A constraint
        violation is raised as SQLAlchemy's ``IntegrityError`` (what the store maps to
        a race); other errors as asyncpg's."""
        conn = await (self._taken() if implicit else self._begun())
        try:
            try:
                result = await fn(conn)
            except (asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
                if not implicit or _BUSY not in str(exc):
                    raise
                # An idle connection left mid-operation: asyncpg refused the statement
                # before sending it, so a fresh connection takes its place.
                conn.terminate()
                conn = await self._connect()
                result = await fn(conn)
            if not implicit:
                await conn.execute("COMMIT")
        except BaseException as exc:
            await self._settle(conn, exc)
            if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
                raise IntegrityError("direct batch write", None, exc) from exc
            raise
        self._give_back(conn)
        return result

    async def _begun(self) -> Any:
        """An idle (or new) connection with a transaction begun on it."""
        while self._idle:
            conn = self._idle.pop()
            if conn.is_closed():
                continue
            try:
                await conn.execute(self._begin)
            except Exception:
                # Closed while idle (a database restart), or left mid-operation: BEGIN
                # wrote nothing, so a fresh connection below takes its place.
                conn.terminate()
                break
            return conn
        conn = await self._connect()
        try:
            await conn.execute(self._begin)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _taken(self) -> Any:
        """An idle (or new) connection, nothing begun on it. One the database closed
        while idle is dropped here if asyncpg read the goodbye; if not, the statement
        meets a closed connection and the write is in doubt (the store retries it)."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
        return await self._connect()

    async def _connect(self) -> Any:
        return await asyncpg.connect(
            self._dsn, timeout=_CONNECT_TIMEOUT_S, server_settings=self._settings
        )

    async def _settle(self, conn: Any, failure: BaseException) -> None:
        """After a failure: roll back and keep the connection, or drop it if it broke
        or the failure may have cut a statement short: a cancellation, a timeout, or
        an error of asyncpg's own rather than the database's (a connection given back
        mid-operation made the next BEGIN fail with "another operation is in
        progress": the chaos suite)."""
        from_driver = type(failure).__module__.startswith("asyncpg")
        cut_short = isinstance(failure, TimeoutError | OSError) or (
            from_driver and not isinstance(failure, asyncpg.PostgresError)
        )
        if not isinstance(failure, Exception) or cut_short or conn.is_closed():
            conn.terminate()
            return
        try:
            if conn.is_in_transaction():
                await conn.execute("ROLLBACK")
        except Exception:
            conn.terminate()  # the failure being reported is the first one
            return
        self._give_back(conn)

    def _give_back(self, conn: Any) -> None:
        if len(self._idle) < self._keep:
            self._idle.append(conn)
        else:
            conn.terminate()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.close(timeout=_CONNECT_TIMEOUT_S)
