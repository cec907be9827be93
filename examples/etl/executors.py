"""Executors of the ETL DAG (examples/etl/etl.yaml): real work on SQLite files.

- ``data-connector`` runs the task's query against the source database and returns
  the rows (as JSON objects);
- ``data-transformer`` applies the task's operations: ``filter.removeNull`` drops
  rows with a null in a required column, ``format.timestamp`` rewrites timestamps
  (epoch seconds, ISO-8601 with any offset, ``YYYY-MM-DD HH:MM[:SS]``,
  ``MM/DD/YYYY HH:MM``) as ISO-8601 UTC (``2024-03-01T09:15:00Z``) and drops rows whose
  timestamp cannot be read, ``enrich.geoip`` adds a country from the IP address (a
  small offline prefix table);
- ``data-writer`` creates the target table if needed and upserts the rows by id in
  one transaction, so a retried or repeated load writes each row once.

``seed_source`` fills a source database with messy sample events; from a shell:
``python examples/etl/executors.py seed FILE``.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tideflow.worker_sdk import dag
from tideflow.worker_sdk.exceptions import ApplicationError


@dag.executor("data-connector")
def data_connector(params: dict[str, Any]) -> dict[str, Any]:
    """Extract: run ``query`` on the SQLite ``database``."""
    if params.get("source", "sqlite") != "sqlite":
        raise ApplicationError(
            f"unsupported source {params['source']!r}", type="ValueError", non_retryable=True
        )
    attempt = dag.executor_info().attempt
    if attempt <= int(params.get("fail_attempts", 0)):
        # A transient error on purpose: the DAG's retry policy takes care of it.
        raise RuntimeError(f"source database is locked (attempt {attempt})")
    query = str(params["query"])
    if not query.lstrip().upper().startswith("SELECT"):
        raise ApplicationError("only SELECT queries", type="ValueError", non_retryable=True)
    database = Path(str(params["database"]))
    if not database.is_file():
        # Retrying cannot make the file appear: fail the task at once, with the fix.
        raise ApplicationError(
            f"source database {database} does not exist (create a sample one with "
            f"`python examples/etl/executors.py seed {database}`)",
            type="FileNotFoundError",
            non_retryable=True,
        )
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(row) for row in conn.execute(query)]
    columns = list(rows[0].keys()) if rows else []
    return {"rows": rows, "count": len(rows), "columns": columns}


_GEOIP = {"81.2.": "GB", "5.9.": "DE", "8.8.": "US", "1.1.": "AU", "101.6.": "CN"}
_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%m/%d/%Y %H:%M", "%m/%d/%Y %H:%M:%S")


def normalise_timestamp(value: Any) -> str | None:
    """ISO-8601 UTC with a ``Z``, or None if ``value`` is not a timestamp."""
    moment: datetime | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        moment = datetime.fromtimestamp(value, tz=UTC)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d{9,11}(\.\d+)?", text):
            moment = datetime.fromtimestamp(float(text), tz=UTC)
        else:
            try:
                moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                for pattern in _FORMATS:
                    try:
                        moment = datetime.strptime(text, pattern)
                        break
                    except ValueError:
                        continue
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # naive timestamps are UTC
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dag.executor("data-transformer")
def data_transformer(params: dict[str, Any]) -> dict[str, Any]:
    """Transform: apply ``operations`` in order to ``rows``."""
    rows: list[dict[str, Any]] = [dict(r) for r in params["rows"]]
    required: Sequence[str] = params.get("required") or []
    ts_field = str(params.get("timestamp_field", "timestamp"))
    dropped: dict[str, int] = {}
    for operation in params.get("operations", []):
        before = len(rows)
        if operation == "filter.removeNull":
            columns = required or (list(rows[0]) if rows else [])
            rows = [r for r in rows if all(r.get(c) not in (None, "") for c in columns)]
        elif operation == "format.timestamp":
            for row in rows:
                row[ts_field] = normalise_timestamp(row.get(ts_field))
            rows = [r for r in rows if r[ts_field] is not None]
        elif operation == "enrich.geoip":
            for row in rows:
                ip = str(row.get("ip") or "")
                row["country"] = next((c for p, c in _GEOIP.items() if ip.startswith(p)), None)
        else:
            raise ApplicationError(
                f"unknown operation {operation!r}", type="ValueError", non_retryable=True
            )
        if len(rows) != before:
            dropped[operation] = before - len(rows)
    return {"rows": rows, "count": len(rows), "dropped": sum(dropped.values()), "by_op": dropped}


@dag.executor("data-writer")
def data_writer(params: dict[str, Any]) -> dict[str, Any]:
    """Load: upsert ``rows`` into table ``index`` of the SQLite ``database``."""
    table = str(params["index"])
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", table):
        raise ApplicationError(f"bad table name {table!r}", type="ValueError", non_retryable=True)
    rows: list[dict[str, Any]] = params["rows"]
    columns = sorted({c for row in rows for c in row} | {"id"})
    with sqlite3.connect(str(params["database"])) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY)")
        existing = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        for column in columns:
            if column not in existing:
                conn.execute(f'ALTER TABLE {table} ADD COLUMN "{column}"')
        names = ", ".join(f'"{c}"' for c in columns)
        marks = ", ".join("?" for _ in columns)
        conn.executemany(
            f"INSERT OR REPLACE INTO {table} ({names}) VALUES ({marks})",
            [tuple(row.get(c) for c in columns) for row in rows],
        )
        total = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    return {"rows_loaded": len(rows), "table": table, "table_rows": total}


EXECUTORS = [data_connector, data_transformer, data_writer]


def seed_source(path: Path) -> int:
    """Create ``events`` in a fresh SQLite file with messy rows; returns the count."""
    rows = [
        (1, "u1", "login", "81.2.69.160", "2024-03-01T09:15:00Z", 1.0),
        (2, "u2", "purchase", "5.9.10.1", 1709285400, 19.99),  # epoch seconds
        (3, None, "login", "8.8.8.8", "2024-03-01 10:00:00", None),  # no user: dropped
        (4, "u3", "logout", "1.1.1.1", "03/01/2024 11:30", None),  # US date format
        (5, "u1", "purchase", "101.6.0.7", "2024-03-01T12:00:00+08:00", 5.5),  # offset
        (6, "u4", None, "8.8.4.4", "2024-03-01T12:30:00Z", 2.0),  # no event type: dropped
        (7, "u2", "login", "81.2.1.1", "not a date", None),  # unreadable: dropped
        (8, "u5", "purchase", "5.9.1.1", "2024-03-02 08:05", 42.0),
        (9, "u5", "logout", "192.168.0.1", "1709370000", None),  # epoch as text
        (10, "u6", "login", "1.1.2.3", None, None),  # no timestamp: dropped
    ]
    path.unlink(missing_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE events (id INTEGER PRIMARY KEY, user_id TEXT, event_type TEXT, "
            "ip TEXT, occurred_at, value REAL)"
        )
        conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)", rows)
    return len(rows)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="ETL executors: sample data")
    commands = parser.add_subparsers(dest="command", required=True)
    seed = commands.add_parser("seed", help="create FILE with the messy sample events")
    seed.add_argument("file", type=Path)
    args = parser.parse_args()
    print(f"{args.file}: {seed_source(args.file)} events")
