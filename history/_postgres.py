"""PostgreSQL and CockroachDB through asyncpg."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Connection
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import create_async_engine

T = TypeVar("T")

_CONNECT_TIMEOUT_S = 10.0


class AsyncEngineRunner:
    def __init__(self, url: URL, *, isolation_level: str | None = None) -> None:
        backend = url.get_backend_name()
        self.name = "cockroachdb" if backend == "cockroachdb" else "postgresql"
        driver = "cockroachdb+asyncpg" if self.name == "cockroachdb" else "postgresql+asyncpg"
        isolation = url.query.get("isolation_level") or isolation_level
        url = url.set(drivername=driver).difference_update_query(["isolation_level"])
        # pool_pre_ping replaces pooled connections a database restart closed; the connect
        # timeout bounds how long a request waits on a database that does not answer at
        # all (asyncpg's default is a minute), so the caller gets UNAVAILABLE and retries.
        options: dict[str, object] = {
            "pool_size": 10,
            "max_overflow": 10,
            "pool_pre_ping": True,
            "connect_args": {"timeout": _CONNECT_TIMEOUT_S},
        }
        if isolation:
            options["isolation_level"] = str(isolation).upper().replace("_", " ")
        self._engine = create_async_engine(url, **options)
        # Several lanes: the server runs transactions of different runs in parallel.
        self.writer_lanes = 4

    async def write(self, fn: Callable[[Connection], T]) -> T:
        async with self._engine.begin() as conn:
            return await conn.run_sync(fn)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        async with self._engine.connect() as conn:
            return await conn.run_sync(fn)

    async def close(self) -> None:
        await self._engine.dispose()
