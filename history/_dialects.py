"""What differs between SQLite, PostgreSQL and CockroachDB: engine options,
connection setup, and which database errors are transient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

# SQLSTATEs worth retrying: serialization failure, deadlock, and lost connections.
_RETRYABLE_SQLSTATES = {"40001", "40P01", "08000", "08003", "08006", "57P01"}


@dataclass(frozen=True, slots=True)
class Dialect:
    name: str
    writer_lanes: int  # concurrent group-commit writers (1 for SQLite: one writer at a time)


def normalize_url(url: str) -> str:
    """Accept plain URLs and pick the async driver for each dialect."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif backend in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif backend == "cockroachdb":
        parsed = parsed.set(drivername="cockroachdb+asyncpg")
    else:
        raise ValueError(f"unsupported database URL scheme {parsed.drivername!r}")
    return parsed.render_as_string(hide_password=False)


def create_engine(url: str, *, sqlite_synchronous: str = "NORMAL") -> tuple[AsyncEngine, Dialect]:
    url = normalize_url(url)
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL: readers never block the writer. synchronous=NORMAL in WAL mode keeps
            # every committed transaction across a process crash (SIGKILL); FULL also
            # across power loss, at the price of an fsync per commit.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={sqlite_synchronous}")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine, Dialect("sqlite", writer_lanes=1)
    engine = create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)
    name = "cockroachdb" if backend == "cockroachdb" else "postgresql"
    return engine, Dialect(name, writer_lanes=4)


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
