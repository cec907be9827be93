"""``cockroachdb://`` URLs without a CockroachDB server (none can be installed here).

The dialect package loads on asyncpg and the URL selects SERIALIZABLE; the isolation
parameter is checked; without the ``cockroachdb`` extra the error names it in one
line; an unreachable CockroachDB is UNAVAILABLE for the store and, after ``--db-wait``,
a one-line exit 2 for ``tideflow server start``; the time-ordered indexes are created
hash-sharded in CockroachDB's DDL and as before in PostgreSQL's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.schema import CreateIndex

from tideflow.history import HistoryStore, StoreUnavailableError
from tideflow.history import _schema as schema
from tideflow.history._dialects import READ_COMMITTED, SERIALIZABLE, open_runner
from tideflow.history._postgres import COCKROACH_EXTRA, server_target

_BOUND_S = 120.0


@pytest.mark.parametrize(
    "url", ["cockroachdb://root@db.example:26257/tideflow", "cockroachdb+asyncpg://root@db/t"]
)
async def test_a_cockroachdb_url_loads_the_dialect_on_asyncpg_at_serializable(url: str) -> None:
    target = server_target(make_url(url))
    assert (target.name, target.isolation) == ("cockroachdb", SERIALIZABLE)
    assert target.url.drivername == "cockroachdb+asyncpg"
    engine = create_async_engine(target.url)
    try:
        assert engine.dialect.name == "cockroachdb"
        assert type(engine.dialect).__name__ == "CockroachDBDialect_asyncpg"
    finally:
        await engine.dispose()
    runner = open_runner(url)  # what HistoryStore.open and the server use
    try:
        assert (runner.name, runner.isolation) == ("cockroachdb", SERIALIZABLE)
    finally:
        await runner.close()


@pytest.mark.parametrize(
    ("url", "name", "isolation"),
    [
        ("postgresql://u@h/db", "postgresql", READ_COMMITTED),
        ("postgresql://u@h/db?isolation_level=serializable", "postgresql", SERIALIZABLE),
        ("postgres://u@h/db?isolation_level=SERIALIZABLE", "postgresql", SERIALIZABLE),
        ("postgresql://u@h/db?isolation_level=read_committed", "postgresql", READ_COMMITTED),
        ("cockroachdb://u@h/db?isolation_level=serializable", "cockroachdb", SERIALIZABLE),
    ],
)
def test_the_isolation_parameter_selects_the_code_path(url: str, name: str, isolation: str) -> None:
    target = server_target(make_url(url))
    assert (target.name, target.isolation) == (name, isolation)
    assert "isolation_level" not in target.url.query  # the driver never sees it


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://u@h/db?isolation_level=repeatable_read", "expected serializable or"),
        ("cockroachdb://u@h/db?isolation_level=read_committed", "at SERIALIZABLE only"),
        ("postgresql://u@h/db?isolation_level=a&isolation_level=b", "given more than once"),
    ],
)
def test_a_bad_isolation_is_refused_in_one_line(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_runner(url)


def test_without_the_extra_the_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("sqlalchemy_cockroachdb", "sqlalchemy_cockroachdb.asyncpg"):
        monkeypatch.setitem(sys.modules, module, None)  # an import of it fails
    with pytest.raises(ValueError) as refused:
        open_runner("cockroachdb://root@db:26257/tideflow")
    assert str(refused.value) == (
        f"a cockroachdb:// URL needs the CockroachDB dialect: {COCKROACH_EXTRA}"
    )
    assert COCKROACH_EXTRA == 'pip install "tideflow[cockroachdb]"'


def _start(tmp_path: Path, url: str, *, hide_the_extra: bool = False) -> list[str]:
    """``tideflow server start --db-url URL --db-wait 1``, expected to fail: stderr's
    lines (exit code 2 checked)."""
    hide = (
        "sys.modules['sqlalchemy_cockroachdb'] = None; "
        "sys.modules['sqlalchemy_cockroachdb.asyncpg'] = None; "
        if hide_the_extra
        else ""
    )
    argv = ["server", "start", "--port", "0", "--db-url", url, "--db-wait", "1"]
    code = f"import sys; {hide}from tideflow.cli._main import main; sys.exit(main({argv!r}))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=_BOUND_S,
    )
    assert proc.returncode == 2, proc.stderr
    return proc.stderr.strip().splitlines()


async def test_an_unreachable_cockroachdb_is_unavailable() -> None:
    url = f"cockroachdb://root@127.0.0.1:{free_port()}/defaultdb"
    with pytest.raises(StoreUnavailableError, match="database unavailable"):
        await HistoryStore.open(url)


def test_server_start_on_an_unreachable_cockroachdb_waits_then_says_so(tmp_path: Path) -> None:
    url = f"cockroachdb://root:secret@127.0.0.1:{free_port()}/defaultdb"
    *attempts, error = _start(tmp_path, url)
    assert attempts and all("opening the store (attempt" in line for line in attempts)
    assert error.startswith("tideflow server start: --db-url cockroachdb://root:***@127.0.0.1:")
    assert "cannot open the database: database unavailable" in error
    assert "still unavailable after" in error and "secret" not in error


def test_server_start_without_the_extra_says_which_to_install(tmp_path: Path) -> None:
    url = f"cockroachdb://root@127.0.0.1:{free_port()}/defaultdb"
    (error,) = _start(tmp_path, url, hide_the_extra=True)  # no waiting: nothing to wait for
    assert error.startswith("tideflow server start: --db-url cockroachdb://root@127.0.0.1:")
    assert error.endswith(
        "cannot open the database: a cockroachdb:// URL needs the CockroachDB dialect: "
        'pip install "tideflow[cockroachdb]"'
    )


def test_time_ordered_indexes_are_hash_sharded_on_cockroachdb_only() -> None:
    cockroach = create_async_engine("cockroachdb+asyncpg://root@db/t").dialect
    plain = create_async_engine("postgresql+asyncpg://u@db/t").dialect
    flagged = {
        index.name
        for table in schema.metadata.sorted_tables
        for index in table.indexes
        if index.info.get(schema.HASH_SHARDED)
    }
    assert flagged == {
        "executions_by_status",
        "executions_by_start_time",
        "tasks_by_queue",
        "timers_by_due_time",
    }
    for table in schema.metadata.sorted_tables:
        for index in table.indexes:
            on_cockroach = str(CreateIndex(index).compile(dialect=cockroach))
            on_postgres = str(CreateIndex(index).compile(dialect=plain))
            assert on_cockroach.endswith(" USING HASH") == (index.name in flagged), on_cockroach
            assert "HASH" not in on_postgres.upper()
            assert on_cockroach.removesuffix(" USING HASH") == on_postgres
