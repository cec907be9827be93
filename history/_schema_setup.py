"""Creating the schema and upgrading a database from before a column existed.

Run by ``HistoryStore.open_on`` before the store serves anything; every step may race
another node opening the same database at the same moment, and each tolerates losing.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from . import _cluster as cluster
from . import _pg_commit_function as pg_commit_function
from . import _schema as s
from ._dialects import Runner, is_created_meanwhile

log = logging.getLogger("tideflow.history")

_SCHEMA_ATTEMPTS = 10
_SCHEMA_RETRY_S = 0.1


async def create_schema(runner: Runner) -> None:
    """Create the tables that do not exist yet. Nodes started at once on an empty
    database race: PostgreSQL refuses all but one CREATE of each table (a unique
    violation in its catalog, or "already exists"). The loser's transaction rolls
    back whole, and its next attempt finds the winner's tables and skips them. No
    lock: an advisory lock is PostgreSQL's alone (CockroachDB has none), and a
    lock on a row needs a table to exist first."""
    for attempt in range(_SCHEMA_ATTEMPTS):
        try:
            await runner.write(lambda conn: s.metadata.create_all(conn))
            break
        except Exception as exc:
            if attempt == _SCHEMA_ATTEMPTS - 1 or not is_created_meanwhile(exc):
                raise
            log.info("another node created part of the schema meanwhile; looking again")
            await asyncio.sleep(_SCHEMA_RETRY_S * (attempt + 1))
    if runner.name == "postgresql" and getattr(runner, "direct", None) is not None:
        # The one-round-trip batch commit (CockroachDB keeps BEGIN ... COMMIT).
        await pg_commit_function.install(runner)


async def upgrade_columns(runner: Runner, shard_count: int) -> None:
    """Upgrade a database created before shards (tasks and timers without a
    ``shard_id``). Two nodes upgrading at once: the second one's ALTER fails, and
    finds the column there."""
    count = shard_count
    for name in await runner.read(cluster.missing_shard_columns_txn):
        upgrade = functools.partial(cluster.add_shard_column_txn, name=name, shard_count=count)
        try:
            rows = await runner.write(upgrade)
        except Exception:
            if name in await runner.read(cluster.missing_shard_columns_txn):
                raise
            continue
        log.info("upgraded %s: shard_id added to %d rows", name, rows)
    if await runner.read(cluster.missing_queue_shard_column_txn):
        upgrade_tasks = functools.partial(cluster.add_queue_shard_column_txn, shard_count=count)
        try:
            rows = await runner.write(upgrade_tasks)
        except Exception:
            if await runner.read(cluster.missing_queue_shard_column_txn):
                raise
        else:
            log.info("upgraded tasks: queue_shard added to %d rows", rows)
    if await runner.read(cluster.missing_placement_column_txn):
        try:
            await runner.write(cluster.add_placement_column_txn)
        except Exception:
            if await runner.read(cluster.missing_placement_column_txn):
                raise
        else:
            log.info("upgraded tasks: placement added")
