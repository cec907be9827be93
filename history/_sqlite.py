"""SQLite: the embedded default store (one file, WAL mode)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, create_engine, event
from sqlalchemy.pool import QueuePool

from ._dialects import SERIALIZABLE

T = TypeVar("T")


class SQLiteRunner:
    name = "sqlite"
    # One writer at a time: SQLite's transactions are serializable.
    isolation = SERIALIZABLE
    # SQLite has one writer at a time: a single lane, and group commit fills it.
    writer_lanes = 1

    def __init__(self, path: str, *, synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(
                f"sqlite synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}"
            )
        if not path or path == ":memory:":
            raise ValueError(
                "the SQLite store needs a file path (an in-memory database is not durable)"
            )
        self._engine = create_engine(
            f"sqlite:///{path}",
            poolclass=QueuePool,
            pool_size=5,
            max_overflow=0,
            pool_timeout=60,
            connect_args={"check_same_thread": False, "timeout": 30},
        )

        @event.listens_for(self._engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL: readers never block the writer. synchronous=NORMAL in WAL mode keeps
            # every committed transaction across a process crash (SIGKILL); FULL also
            # across power loss, at the price of an fsync per commit.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")
            cursor.execute("PRAGMA busy_timeout=30000")
            # 2,000 KiB of page cache per connection (SQLite's usual default, fixed
            # here): the pool's 5 connections hold at most about 10 MB of pages.
            cursor.execute("PRAGMA cache_size=-2000")
            cursor.close()

        self._writer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="tideflow-sqlite-w"
        )
        # Used by the writer thread only (``_write_sync``).
        self._write_conn: Connection | None = None
        self._readers = concurrent.futures.ThreadPoolExecutor(
            4, thread_name_prefix="tideflow-sqlite-r"
        )

    def _write_sync(self, fn: Callable[[Connection], T]) -> T:
        # The writer thread keeps its connection: a pool checkout and check-in (with
        # its reset) per transaction cost more than a small batch's statements. One
        # that an error invalidated is replaced.
        conn = self._write_conn
        if conn is None or conn.invalidated or conn.closed:
            if conn is not None:
                conn.close()
            conn = self._write_conn = self._engine.connect()
        with conn.begin():
            return fn(conn)

    def _read_sync(self, fn: Callable[[Connection], T]) -> T:
        with self._engine.connect() as conn:
            return fn(conn)

    async def write(self, fn: Callable[[Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, functools.partial(self._write_sync, fn))

    async def read(self, fn: Callable[[Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, functools.partial(self._read_sync, fn))

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        if self._write_conn is not None:  # the writer thread has ended: no race
            self._write_conn.close()
            self._write_conn = None
        self._engine.dispose()
