"""What differs between SQLite, PostgreSQL and CockroachDB.

The store writes its statements once, as synchronous SQLAlchemy Core functions of a
``Connection``. A ``Runner`` runs such a function in a transaction (``write``) or on
a plain connection (``read``):

- SQLite (``_sqlite.py``): a dedicated writer thread and a small reader pool on
  pysqlite connections. A whole group-commit batch costs one thread hop; driving
  SQLite through an async driver costs a hop per statement, which under load is
  dominated by event-loop latency (measured: ~3x lower throughput).
- PostgreSQL / CockroachDB (``_postgres.py``): the asyncpg-based async engine, running
  the same function through ``AsyncConnection.run_sync``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from sqlalchemy import Connection
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

T = TypeVar("T")

# SQLSTATEs worth retrying: serialization failure, deadlock, and lost connections.
_RETRYABLE_SQLSTATES = {"40001", "40P01", "08000", "08003", "08006", "57P01"}


class Runner(Protocol):
    name: str  # "sqlite", "postgresql" or "cockroachdb"
    writer_lanes: int  # concurrent group-commit writers

    async def write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in one transaction; committed if it returns, rolled back if it raises."""
        ...

    async def read(self, fn: Callable[[Connection], T]) -> T: ...

    async def close(self) -> None: ...


def open_runner(url: str, *, sqlite_synchronous: str = "NORMAL") -> Runner:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        from ._sqlite import SQLiteRunner

        return SQLiteRunner(parsed.database or "", synchronous=sqlite_synchronous)
    if backend in ("postgresql", "postgres", "cockroachdb"):
        from ._postgres import AsyncEngineRunner

        return AsyncEngineRunner(parsed)
    raise ValueError(f"unsupported database URL scheme {parsed.drivername!r}")


def is_retryable(exc: BaseException) -> bool:
    """True for errors after which the same transaction may simply run again."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
        code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        if code is None and orig is not None:
            code = getattr(getattr(orig, "__cause__", None), "sqlstate", None)
        if code in _RETRYABLE_SQLSTATES:
            return True
        text = str(orig).lower()
        return "database is locked" in text or "could not serialize" in text
    return False
