"""Shared fixtures: one history store or server per test, on every database under test.

Fixtures (helpers.py documents the functions every suite shares):

- ``store_url``: a fresh database URL, once per selected database (below);
  ``store``: a ``HistoryStore`` open on it; ``pg_url``: a fresh PostgreSQL database.
- ``server``: a ``TideflowServer`` on an ephemeral port over ``store_url``, so every
  test that takes it (or ``client``) runs on SQLite and on PostgreSQL.
  ``helpers.running_server(store_url, config)`` is the same with a ``ServerConfig``.
- ``client``: a ``Client`` connected to ``server``; ``queue``: a fresh task queue name.
- ``jar`` and ``trace_dir``, for the ``tla`` trace suites (helpers_tla.py): the TLC
  jar (needs java), and ``TIDEFLOW_TRACE_DIR`` set for the test (trace mode on).
- ``procs``: ``helpers.Processes`` for tests that run servers or workers as real
  processes (always killed and reaped at teardown); ``server_process``: a
  ``helpers.ServerProcess`` on ``store_url``, started, to kill and start again.

``TIDEFLOW_TEST_DB`` selects the databases: ``sqlite``, ``postgres``, or ``all``
(the default) for both. Tests that take ``store_url`` (or ``store``) run once per
selected database; the PostgreSQL runs carry the ``postgres`` marker, so
``-m "not postgres"`` deselects them. Tests marked ``serializable``, and the engine
suites of ``SERIALIZABLE_SUITES``, also run on PostgreSQL at SERIALIZABLE (id
``postgres-serializable``, ``?isolation_level=serializable``): the CockroachDB code
path, which a CockroachDB server cannot run here.

SQLite: a fresh database file under the test's ``tmp_path``.

PostgreSQL (127.0.0.1:5432, user ``postgres``, trust auth): each test gets its own
database, so tests never see each other's rows and need no cleanup. The session
creates two template databases: ``tideflow_test_<hex8>``, empty, for ``pg_url``
(the server's first open creates the schema, as on a new install: the multi-node
suites race that), and ``tideflow_test_<hex8>_t`` with the schema's tables made and
no rows, for ``store_url`` (a test marked ``empty_database`` gets an empty one:
it makes an old schema itself); each test gets a clone (``CREATE DATABASE ... TEMPLATE``),
made in the background a few tests ahead and dropped in the background after the test
(the session waits for all of it at its end, when the templates are dropped too).
Every drop uses ``WITH (FORCE)``, so a leaked connection cannot make cleanup fail.

If PostgreSQL is unreachable, its tests are skipped, except with ``CI=true``,
where they fail: CI must never pass by silently skipping a database (for the same
reason, CI=true refuses a ``TIDEFLOW_TEST_DB`` other than ``all``). A test of
SQL-free logic that would gain nothing from a second database starts its own
server with ``helpers.running_server(tmp_path)`` (SQLite) instead of ``server``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from helpers import Processes, ServerProcess, new_id, running_server

from tideflow.history import HistoryStore, StoreUnavailableError
from tideflow.history._dialects import GuardedRunner, open_runner
from tideflow.history._schema_setup import create_schema
from tideflow.server import TideflowServer
from tideflow.worker_sdk import Client

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
#: Every server a test starts, in process or spawned (the environment is inherited),
#: opens at most this many PostgreSQL connections unless its URL says otherwise
#: (history/_postgres.py): four xdist workers' multi-node tests must fit in the
#: database's 100 together (uncapped, a node may open 24).
os.environ.setdefault("TIDEFLOW_DB_MAX_CONNECTIONS", "8")
#: The ``store_url`` parameter of PostgreSQL at SERIALIZABLE, the CockroachDB code path
#: (history/_postgres.py); only tests marked ``serializable`` run with it.
PG_SERIALIZABLE = "postgres-serializable"
_DATABASES = {
    "sqlite": ["sqlite"],
    "postgres": ["postgres", PG_SERIALIZABLE],
    "all": ["sqlite", "postgres", PG_SERIALIZABLE],
}
# Clones of the template kept ready for the next PostgreSQL tests.
_CLONES_AHEAD = 2


def _ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _selected_databases() -> list[str]:
    choice = os.environ.get("TIDEFLOW_TEST_DB", "").strip().lower() or "all"
    if choice not in _DATABASES:
        raise pytest.UsageError(f"TIDEFLOW_TEST_DB={choice!r}: expected sqlite, postgres or all")
    if _ci() and choice != "all":
        raise pytest.UsageError(f"TIDEFLOW_TEST_DB={choice!r}: CI=true runs every database")
    return _DATABASES[choice]


async def _admin(*statements: str) -> None:
    conn = await asyncpg.connect(f"{PG_SERVER}/postgres", timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


class _PgAdmin:
    """Admin SQL on the ``postgres`` database, each call on its own loop in a worker
    thread: fixtures that outlive one test must not touch the event loop that
    pytest-asyncio gives each test.

    Creating the next tests' databases and dropping finished ones runs in the
    background (CREATE DATABASE copies the template through the WAL, DROP DATABASE
    forces a checkpoint: up to seconds each on a busy server), so no test waits for
    them. ``close()`` waits for all of it."""

    def __init__(self) -> None:
        self._now = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-admin")
        self._later = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-background")
        self._background: list[Future[None]] = []

    def run(self, *statements: str) -> None:
        self.call(_admin(*statements))

    def call(self, work: Coroutine[Any, Any, None]) -> None:
        self._now.submit(asyncio.run, work).result()

    def run_later(self, statement: str) -> Future[None]:
        """Run ``statement`` in the background, after those submitted before it."""
        done = self._later.submit(asyncio.run, _admin(statement))
        self._background.append(done)
        return done

    def close(self) -> list[BaseException]:
        """Wait for the background statements; the errors of those that failed."""
        self._later.shutdown(wait=True)
        self._now.shutdown(wait=True)
        return [error for job in self._background if (error := job.exception()) is not None]


async def _create_tables(url: str) -> None:
    """The schema's tables (and PostgreSQL's batch commit function), as a first open
    creates them; no rows (no shard count: a clone still takes any ``--shards``)."""
    runner = open_runner(url)
    try:
        await create_schema(GuardedRunner(runner, {"conflict_retries": 0}))
    finally:
        await runner.close()


class _PgTemplate:
    """The session's template database, created on first use: empty, or (``tables``)
    with the schema's tables made."""

    def __init__(self, admin: _PgAdmin, *, tables: bool = False) -> None:
        self.name = f"tideflow_test_{uuid.uuid4().hex[:8]}{'_t' if tables else ''}"
        self.tables = tables
        self.admin = admin
        self.error: str | None = None
        self.created = False
        self._clones = itertools.count(1)
        self._ahead: collections.deque[tuple[str, Future[None]]] = collections.deque()

    def create(self) -> None:
        if self.created or self.error is not None:
            return
        try:
            self.admin.run(f"CREATE DATABASE {self.name}")
            if self.tables:
                self.admin.call(_create_tables(f"{PG_SERVER}/{self.name}"))
        except (OSError, asyncpg.PostgresError, TimeoutError, StoreUnavailableError) as exc:
            self.error = f"PostgreSQL at {PG_SERVER} is unreachable: {exc!r}"
        else:
            self.created = True

    def take_clone(self) -> str:
        """The name of a fresh clone for one test. Clones are created a few tests
        ahead in the background, so a test rarely waits for its CREATE DATABASE."""
        while len(self._ahead) <= _CLONES_AHEAD:
            name = f"{self.name}_{next(self._clones)}"
            created = self.admin.run_later(f"CREATE DATABASE {name} TEMPLATE {self.name}")
            self._ahead.append((name, created))
        name, created = self._ahead.popleft()
        created.result()
        return name

    def drop_all(self) -> None:
        """At the session's end: drop the clones made ahead and the template."""
        for name, _ in self._ahead:
            self.admin.run_later(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.admin.run_later(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


class _PgTemplates:
    """The empty template (``pg_url``) and the one with tables (``store_url``)."""

    def __init__(self) -> None:
        self.admin = _PgAdmin()
        self.empty = _PgTemplate(self.admin)
        self.with_tables = _PgTemplate(self.admin, tables=True)


@pytest.fixture(scope="session")
def _pg_templates() -> Iterator[_PgTemplates]:
    templates = _PgTemplates()
    yield templates
    for template in (templates.empty, templates.with_tables):
        if template.created:
            template.drop_all()
    failed = templates.admin.close()
    if failed:
        pytest.fail(f"{len(failed)} test database statement(s) failed: {failed[0]!r}")


def _clone_of(template: _PgTemplate) -> Iterator[str]:
    if "postgres" not in _selected_databases():
        pytest.skip("PostgreSQL not selected (TIDEFLOW_TEST_DB)")
    template.create()
    if template.error is not None:
        if _ci():
            pytest.fail(f"{template.error} (CI=true: PostgreSQL tests must run)")
        pytest.skip(template.error)
    name = template.take_clone()
    yield f"{PG_SERVER}/{name}"
    template.admin.run_later(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pg_url(_pg_templates: _PgTemplates) -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database for this test only: its first open
    creates the schema (the multi-node suites race it)."""
    yield from _clone_of(_pg_templates.empty)


@pytest.fixture
def _pg_url_with_tables(_pg_templates: _PgTemplates) -> Iterator[str]:
    """A fresh PostgreSQL database with the schema's tables and no rows: what
    ``store_url`` hands out (creating the tables took a PostgreSQL test's server
    about a second of its start on two loaded cores)."""
    yield from _clone_of(_pg_templates.with_tables)


def _store_url_params() -> list[Any]:
    return [
        pytest.param(db, id=db, marks=[pytest.mark.postgres] if db != "sqlite" else [])
        for db in _selected_databases()
    ]


def serializable_url(url: str) -> str:
    """``url`` (PostgreSQL) with every transaction at SERIALIZABLE: the CockroachDB path."""
    return f"{url}{'&' if '?' in url else '?'}isolation_level=serializable"


@pytest.fixture(params=_store_url_params())
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A fresh database URL, once per selected database (PostgreSQL at SERIALIZABLE
    only for tests marked ``serializable``). A PostgreSQL database has the schema's
    tables already, unless the test is marked ``empty_database``."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'history.db'}"
    empty = request.node.get_closest_marker("empty_database") is not None
    url = str(request.getfixturevalue("pg_url" if empty else "_pg_url_with_tables"))
    return serializable_url(url) if request.param == PG_SERIALIZABLE else url


#: Engine suites that also run at SERIALIZABLE, besides the tests marked
#: ``serializable`` (the store, lease and cluster suites): a module, or one test of it.
#: A representative set, bounded: every engine test at SERIALIZABLE would add half of
#: the suite's time. Chosen for what SERIALIZABLE changes: concurrent transactions on
#: one run and across runs (signal storm, id policies, a poll racing its commit, a timer
#: fired during a task). ``TIDEFLOW_SERIALIZABLE_ALL=1`` adds the long ones: several runs
#: in one transaction (child workflows, continue-as-new) and recovery scans after a
#: SIGKILL (crash recovery), about 1.5 minutes more on two cores.
SERIALIZABLE_SUITES = frozenset(
    {
        "test_signals.py::test_signal_storm_from_ten_clients",
        "test_id_policies.py",
        "test_task_races.py::test_poll_cancelled_while_recording_start_keeps_the_task",
        "test_task_races.py::test_cancel_of_a_timer_that_fired_during_the_task_wins",
    }
) | (
    frozenset({"test_child_workflows.py", "test_continue_as_new.py", "test_crash_recovery.py"})
    if os.environ.get("TIDEFLOW_SERIALIZABLE_ALL") == "1"
    else frozenset()
)


def _runs_serializable(item: pytest.Item) -> bool:
    name = getattr(item, "originalname", item.name)
    return bool(
        item.get_closest_marker("serializable")
        or item.path.name in SERIALIZABLE_SUITES
        or f"{item.path.name}::{name}" in SERIALIZABLE_SUITES
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the SERIALIZABLE variant of ``store_url`` only for tests marked
    ``serializable`` and the suites of ``SERIALIZABLE_SUITES``."""
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        variant = callspec.params.get("store_url") if callspec is not None else None
        wanted = variant != PG_SERIALIZABLE or _runs_serializable(item)
        (kept if wanted else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = sorted(kept, key=_long_pole_rank)


#: Tests of a minute or more on two cores (module, or module::test), in the order they
#: start. Under xdist the suite lasts as long as its busiest worker: started first,
#: these run beside the short tests; met last, one of them alone would add its whole
#: length to the suite's.
LONG_POLES = (
    "test_cluster_suite.py",
    "test_chaos.py",
    "test_sites_placement.py",
    "test_security_auth.py::test_api_key_commands_and_start_dev_with_auth",
    "test_signals.py::test_signal_storm_from_ten_clients",
    "test_fuzz.py",
    "test_cluster_routing.py",
    "test_input_bounds.py::test_thousands_of_concurrent_polls_park",
    "test_cluster_nodes.py",
    "test_sites.py",
)


def _long_pole_rank(item: pytest.Item) -> int:
    """Where ``item`` starts: long poles first, in ``LONG_POLES`` order (a stable sort
    keeps every other test in collection order, the same on every xdist worker)."""
    name = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
    for rank, pole in enumerate(LONG_POLES):
        if name == pole or name.startswith(f"{pole}::"):
            return rank
    return len(LONG_POLES)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[HistoryStore]:
    """An open store on ``store_url``; closed after the test."""
    opened = await HistoryStore.open(store_url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def server(store_url: str) -> AsyncIterator[TideflowServer]:
    """A server on an ephemeral port over this test's database."""
    async with running_server(store_url) as running:
        yield running


@pytest.fixture
async def client(server: TideflowServer) -> AsyncIterator[Client]:
    """A client of ``server``, closed after the test."""
    async with await Client.connect(server.address) as connected:
        yield connected


@pytest.fixture
def queue() -> str:
    """A task queue no other test uses."""
    return new_id("q")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Child processes of this test; killed and reaped at teardown, even on failure."""
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.cleanup()


@pytest.fixture
async def server_process(procs: Processes, store_url: str) -> ServerProcess:
    """The server as a real process on this test's database, listening; SIGKILL it
    with ``kill()`` and start a new one on the same database and port with ``start()``."""
    started = ServerProcess(procs, store_url)
    await started.start()
    return started


@pytest.fixture(scope="session")
def jar() -> Path:
    """The TLC jar; needs java (CI=true: a missing java fails, elsewhere it skips)."""
    if shutil.which("java") is None:
        if _ci():
            pytest.fail("java is not installed: TLC cannot validate traces (CI=true)")
        pytest.skip("java is not installed: TLC cannot validate traces (install a JRE 11+)")
    # Imported here: only the tla suites load the trace converter.
    from helpers_tla import t2t

    path: Path = t2t.tla2tools_jar()
    return path


@pytest.fixture
def trace_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Trace mode on for servers started by this test (in this process or children);
    a trace suite marks ``usefixtures("trace_dir")`` so that it is on before
    ``server`` starts."""
    directory = tmp_path / "traces"
    monkeypatch.setenv("TIDEFLOW_TRACE_DIR", str(directory))
    return directory
