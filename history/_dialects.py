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

``GuardedRunner`` runs a function again when the database aborted its transaction to
keep transactions serializable or to break a deadlock (SQLSTATE 40001, 40P01): every
write and every read, on every dialect. CockroachDB and a SERIALIZABLE PostgreSQL
abort transactions that way in normal operation, not only under contention, so every
function a runner runs must be safe to run again: it may only act on the database
through its connection (no in-memory state changed before the commit is known), and
the store changes its own state only once ``write`` returned.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from sqlalchemy import Connection
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError

from ._errors import (
    InvalidValueError,
    RetryableStoreError,
    StoreError,
    StoreUnavailableError,
    TransactionConflictError,
)

T = TypeVar("T")

#: ``Runner.isolation`` values: how the database isolates transactions.
SERIALIZABLE = "serializable"
READ_COMMITTED = "read committed"

log = logging.getLogger("tideflow.history")

# Reads are idempotent, so a read that lost its connection (a pooled connection the
# database closed while restarting, say) is simply run again a few times.
_READ_ATTEMPTS = 4

# SQLSTATEs after which the same transaction may simply run again: serialization
# failure and deadlock (a concurrent writer won). The transaction was rolled back, so
# running it again cannot apply it twice.
_CONFLICT_SQLSTATES = {"40001", "40P01"}
# How often a transaction the database aborted for a conflict is run again before the
# caller gets RetryableStoreError (and the client UNAVAILABLE, which it retries).
_CONFLICT_ATTEMPTS = 12
# SQLSTATE classes and codes that mean the database cannot be reached or is going away:
# connection exceptions (08xxx), insufficient resources (53xxx: too many connections,
# out of memory, disk full), and an administrator's or a crash's shutdown and a server
# still starting (57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now).
# 40003 (statement_completion_unknown) is CockroachDB's ambiguous result: a node went
# away while committing, and the transaction may or may not have committed. Like a
# connection lost around a commit it is in doubt: the store marks its writes in doubt,
# and a retry finds its own commit as a race (the version guard and the unique keys).
_UNAVAILABLE_CLASSES = ("08", "53")
_LOCK_NOT_AVAILABLE = "55P03"
_UNAVAILABLE_SQLSTATES = {"57P01", "57P02", "57P03", "57P05", "40003"}
# Classes that mean a value of the statement is at fault: data exception (22xxx: out of
# range, too long for its column, a NUL byte in text) and program limit exceeded
# (54xxx: an index row too large for its key, say). Retrying the same values cannot help.
_INVALID_VALUE_CLASSES = ("22", "54")
_UNAVAILABLE_TEXT = (
    "cannot connect now",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "terminating connection",
    "connection was closed",
    "connection is closed",
    "server closed the connection",
    "could not connect to server",
    # asyncpg's "cannot switch to state N; another operation (M) is in progress": the
    # database ended the connection (pg_terminate_backend, a restart) and asyncpg was
    # still taking in its goodbye when the next statement came (the COMMIT after a
    # batch, in test_store_direct under load). Nothing was sent: the connection is
    # lost, and a write's outcome is in doubt like any lost COMMIT's.
    "another operation",
)


class Runner(Protocol):
    name: str  # "sqlite", "postgresql" or "cockroachdb"
    # "serializable" (SQLite, CockroachDB, PostgreSQL with ?isolation_level=serializable)
    # or "read committed" (PostgreSQL's default): how the fence reads the shard row.
    isolation: str
    writer_lanes: int  # concurrent group-commit writers

    async def write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in one transaction; committed if it returns, rolled back if it raises."""
        ...

    async def read(self, fn: Callable[[Connection], T]) -> T: ...

    async def close(self) -> None: ...


class DirectTransactions(Protocol):
    #: The one-round-trip batch function, once installed (``_pg_commit_function``).
    batch_function: str | None

    async def transaction(self, fn: Callable[[Any], Awaitable[T]], *, implicit: bool = False) -> T:
        """Run ``fn`` on the driver's own connection in one transaction: an explicit
        one, or (``implicit``) the one of the single statement ``fn`` runs."""
        ...


def open_runner(url: str, *, sqlite_synchronous: str = "NORMAL") -> Runner:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        from ._sqlite import SQLiteRunner

        return SQLiteRunner(parsed.database or "", synchronous=sqlite_synchronous)
    if backend in ("postgresql", "postgres", "cockroachdb"):
        from ._postgres import AsyncEngineRunner, server_target

        return AsyncEngineRunner(server_target(parsed))
    raise ValueError(f"unsupported database URL scheme {parsed.drivername!r}")


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes: drivers wrap the server's error (SQLAlchemy wraps
    the asyncpg adapter's error, which wraps asyncpg's, which may wrap an OSError)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < 16 and all(current is not s for s in seen):
        seen.append(current)
        current = _cause(current)
    return seen


def _cause(error: BaseException) -> BaseException | None:
    if isinstance(error, DBAPIError) and isinstance(error.orig, BaseException):
        return error.orig
    return error.__cause__ or error.__context__


def _sqlstates(chain: list[BaseException]) -> list[str]:
    codes = []
    for error in chain:
        code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if isinstance(code, str):
            codes.append(code)
    return codes


def is_lock_not_available(exc: BaseException) -> bool:
    """True if a statement gave up waiting for a row lock (PostgreSQL's and
    CockroachDB's ``lock_timeout``: SQLSTATE 55P03)."""
    return _LOCK_NOT_AVAILABLE in _sqlstates(_chain(exc))


def is_unavailable(exc: BaseException) -> bool:
    """True if the database cannot be reached now: refused or lost connection, a server
    shutting down, restarting or out of connections. Waiting and retrying helps."""
    chain = _chain(exc)
    for error in chain:
        if isinstance(error, DBAPIError) and error.connection_invalidated:
            return True
        # Refused or reset connections, connect timeouts (asyncpg raises the OS errors
        # unwrapped while connecting), and a pool with no connection to give.
        if isinstance(error, (OSError, TimeoutError, sa_exc.TimeoutError)):
            return True
    for code in _sqlstates(chain):
        if code.startswith(_UNAVAILABLE_CLASSES) or code in _UNAVAILABLE_SQLSTATES:
            return True
    return any(marker in _driver_text(chain) for marker in _UNAVAILABLE_TEXT)


def _driver_text(chain: list[BaseException]) -> str:
    """The drivers' own messages, lowercased. SQLAlchemy's wrappers are left out: their
    text holds the statement's parameters, and a request's values must never be able
    to make its failure look like an outage (which fails its whole batch)."""
    return " ".join(
        str(error).lower() for error in chain if not isinstance(error, sa_exc.SQLAlchemyError)
    )


def is_invalid_value(exc: BaseException) -> bool:
    """True if the database refused a value of the statement (out of range, too long,
    a character it cannot store): the input is at fault, not the database."""
    chain = _chain(exc)
    for error in chain:
        # SQLite raises OverflowError for an integer beyond 64 bits, asyncpg raises its
        # client-side DataError ("invalid input for query argument") before sending.
        if isinstance(error, (OverflowError, sa_exc.DataError)):
            return True
        if type(error).__name__ == "DataError" and type(error).__module__.startswith("asyncpg"):
            return True
    if any(code.startswith(_INVALID_VALUE_CLASSES) for code in _sqlstates(chain)):
        return True
    return "string or blob too big" in _driver_text(chain)


# A CREATE that lost a race with the same CREATE of another transaction: a unique
# violation in the catalog (PostgreSQL's pg_type/pg_class), or "already exists".
_CREATED_MEANWHILE_SQLSTATES = {"23505", "42P07", "42710"}


def is_created_meanwhile(exc: BaseException) -> bool:
    """True if a schema statement failed because another transaction created the same
    table, type or index at the same moment (nodes starting at once)."""
    if not isinstance(exc, DBAPIError):
        return False
    if any(code in _CREATED_MEANWHILE_SQLSTATES for code in _sqlstates(_chain(exc))):
        return True
    return "already exists" in str(exc.orig).lower()


def is_conflict(exc: BaseException) -> bool:
    """True if the database aborted the transaction for a concurrent one (a
    serialization failure or a deadlock): nothing of it was committed, and running it
    again may succeed."""
    if any(code in _CONFLICT_SQLSTATES for code in _sqlstates(_chain(exc))):
        return True  # SQLAlchemy's or asyncpg's own (the direct writes: _postgres.py)
    if isinstance(exc, DBAPIError):
        text = str(exc.orig).lower()
        return "database is locked" in text or "could not serialize" in text
    return False


def is_retryable(exc: BaseException) -> bool:
    """True for errors after which the same transaction may simply run again: a
    concurrent writer won, or the connection was lost or refused."""
    return is_unavailable(exc) or is_conflict(exc)


def _from_database(exc: BaseException) -> bool:
    """True if ``exc`` comes from the database layers (SQLAlchemy, a driver, the
    network) rather than from the store's own code, which is never reclassified."""
    if isinstance(exc, (sa_exc.SQLAlchemyError, OSError, TimeoutError, OverflowError)):
        return True
    return type(exc).__module__.split(".")[0] in ("asyncpg", "sqlite3")


def _reason(exc: BaseException) -> str:
    """The database's own message, first line (SQLAlchemy appends the SQL statement and
    its parameters, which would leak other requests' values into an error message)."""
    inner = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(inner).strip().splitlines()
    return lines[0] if lines else type(inner).__name__


def store_error_of(exc: BaseException) -> StoreError | None:
    """The store error a database exception means, or None when there is none to give:
    a unique violation (``IntegrityError``, which the caller maps to the race it means)
    or an unknown failure, which stays as it is (a defect, reported as such)."""
    if isinstance(exc, (StoreError, IntegrityError)) or not _from_database(exc):
        return None
    # A refused value first: the request's own fault is never mistaken for an outage.
    if is_invalid_value(exc):
        return InvalidValueError(f"the database refused a value: {_reason(exc)}")
    if is_unavailable(exc):
        return StoreUnavailableError(f"database unavailable: {_reason(exc)}")
    if is_conflict(exc):
        return TransactionConflictError(f"transaction conflict: {_reason(exc)}")
    return None


def _backoff_delay(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): exponential, capped, jittered."""
    return float(min(0.5, 0.005 * 2**attempt) * (0.5 + random.random()))


async def retrying(
    operation: Callable[[], Awaitable[T]],
    attempts: int,
    what: str,
    retry_on: type[RetryableStoreError] = RetryableStoreError,
) -> T:
    """Run ``operation`` and run it again after a ``retry_on`` error, up to
    ``attempts`` times in all, backing off in between; the last failure is raised."""
    for attempt in range(attempts):
        try:
            return await operation()
        except retry_on as error:
            if attempt == attempts - 1:
                raise
            log.debug("retrying %s after %s (attempt %d)", what, error, attempt + 1)
        await asyncio.sleep(_backoff_delay(attempt))
    raise AssertionError("unreachable")


async def _guarded(operation: Awaitable[T]) -> T:
    """Await a runner's operation, raising its failure as the store error it means."""
    try:
        return await operation
    except Exception as exc:
        error = store_error_of(exc)
        if error is None:
            raise
        raise error from exc


class GuardedRunner:
    """A ``Runner`` whose failures are store errors (``store_error_of``): whatever the
    dialect, a lost database surfaces as ``StoreUnavailableError`` and a refused value
    as ``InvalidValueError``, never as a driver's exception.

    A transaction the database aborted for a conflict (``TransactionConflictError``)
    is run again here, reads and writes alike, up to ``_CONFLICT_ATTEMPTS`` times; each
    run again counts in ``stats["conflict_retries"]``. Reads that lost the database
    are retried here too; writes that did are retried by the caller, which knows
    whether running the transaction again is safe (it may have committed)."""

    def __init__(self, inner: Runner, stats: dict[str, int] | None = None) -> None:
        self._inner = inner
        self.name = inner.name
        self.isolation = inner.isolation
        self.writer_lanes = inner.writer_lanes
        # The runner's driver-direct connections, if it has any (``write_direct``).
        self.direct: DirectTransactions | None = getattr(inner, "direct", None)
        self.stats = stats if stats is not None else {}
        self.stats.setdefault("conflict_retries", 0)

    async def write(self, fn: Callable[[Connection], T]) -> T:
        return await self._rerun_conflicts(lambda: _guarded(self._inner.write(fn)))

    async def write_direct(self, fn: Callable[[Any], Awaitable[T]], *, implicit: bool = False) -> T:
        """``write`` of an async function of the driver's own connection, on a runner
        with ``direct`` connections (PostgreSQL's asyncpg: ``_postgres.py``);
        ``implicit``: ``fn`` runs one statement, outside an explicit transaction."""
        direct = self.direct
        assert direct is not None
        return await self._rerun_conflicts(
            lambda: _guarded(direct.transaction(fn, implicit=implicit))
        )

    async def read(self, fn: Callable[[Connection], T]) -> T:
        return await retrying(
            lambda: self._rerun_conflicts(lambda: _guarded(self._inner.read(fn))),
            _READ_ATTEMPTS,
            "read",
            retry_on=StoreUnavailableError,
        )

    async def _rerun_conflicts(self, operation: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(_CONFLICT_ATTEMPTS):
            try:
                return await operation()
            except TransactionConflictError as error:
                if attempt == _CONFLICT_ATTEMPTS - 1:
                    raise
                self.stats["conflict_retries"] += 1
                log.debug("running a transaction again after %s", error)
            await asyncio.sleep(_backoff_delay(attempt))
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self._inner.close()
