"""SQLite: the embedded default store (one file, WAL mode)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import QueuePool

from ._dialects import SERIALIZABLE

T = TypeVar("T")


log = logging.getLogger("tideflow.history")
#: Write transactions after which a closing runner logs its write-lock times.
_LOCK_LOG_MIN_TRANSACTIONS = 100


@dataclass(slots=True)
class WriteLockTimes:
    """The write transactions of one process and their time on the file's write lock
    (one writer at a time across every process on the file): waiting for it
    (BEGIN IMMEDIATE), and holding it (the statements and the commit, its fsync
    included). Logged when the store closes: with several nodes on one file, the
    nodes' held seconds summed against the wall clock say how busy the lock was."""

    transactions: int = 0
    waited_s: float = 0.0
    longest_wait_s: float = 0.0
    held_s: float = 0.0

    def add(self, asked: float, granted: float | None, ended: float) -> None:
        self.transactions += 1
        wait = (granted if granted is not None else ended) - asked
        self.waited_s += wait
        self.longest_wait_s = max(self.longest_wait_s, wait)
        if granted is not None:
            self.held_s += ended - granted

    def __str__(self) -> str:
        return (
            f"{self.transactions} transactions, waited {self.waited_s:.2f} s "
            f"(longest {self.longest_wait_s * 1000:.0f} ms), held {self.held_s:.2f} s"
        )


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

        # How long this process waited for the file's write lock and held it (the
        # lock is shared with every other process on the file: cluster nodes).
        self.lock_times = WriteLockTimes()
        # Taken around each write transaction by every process on the file (next to
        # it, like SQLite's -wal and -shm files; released by the kernel if the process
        # dies).
        self._turn = os.open(f"{path}-writer", os.O_RDWR | os.O_CREAT, 0o644)
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
        asked = time.perf_counter()
        granted: float | None = None
        # The queue in front of SQLite's lock: a process waiting here blocks in the
        # kernel and is woken when the holder lets go, where SQLite's busy handler
        # polls with sleeps growing to 100 ms (measured: waits of up to 440 ms between
        # two nodes' transactions of a few ms). SQLite's own lock still decides;
        # a writer that does not take this one is waited for by busy_timeout.
        fcntl.flock(self._turn, fcntl.LOCK_EX)
        try:
            with conn.begin():
                self._begin_immediate(conn)
                granted = time.perf_counter()
                return fn(conn)
        finally:
            fcntl.flock(self._turn, fcntl.LOCK_UN)
            self.lock_times.add(asked, granted, time.perf_counter())

    @staticmethod
    def _begin_immediate(conn: Connection) -> None:
        # Several server processes may share the file (cluster nodes). pysqlite would
        # begin a deferred transaction at the first INSERT/UPDATE/DELETE, so the fence's
        # SELECT (history/_cluster.py ``check_fence_txn``) would run before the
        # transaction and another process could bump the range id between that read
        # and the writes. BEGIN IMMEDIATE takes the write lock first: the whole batch,
        # fence read included, is one serial transaction, and a busy lock is waited for
        # (busy_timeout) at BEGIN, where SQLite honours the wait, rather than failing
        # at once on the read-to-write upgrade (SQLITE_BUSY_SNAPSHOT in WAL mode).
        driver = conn.connection.driver_connection
        assert driver is not None
        try:
            driver.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            # As SQLAlchemy would raise it: "database is locked" past the busy timeout
            # is a conflict the store runs again (``is_conflict``).
            raise DBAPIError.instance("BEGIN IMMEDIATE", (), exc, sqlite3.Error) from exc

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
        # Only after serving: a refused start or a one-off command writes a handful
        # of transactions, and its error must stay the one line on stderr.
        if self.lock_times.transactions >= _LOCK_LOG_MIN_TRANSACTIONS:
            log.info("sqlite write lock: %s", self.lock_times)
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        if self._write_conn is not None:  # the writer thread has ended: no race
            self._write_conn.close()
            self._write_conn = None
        self._engine.dispose()
        os.close(self._turn)
