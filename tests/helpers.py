"""The test harness every engine suite shares (fixtures live in ``conftest.py``).

Not a test module: test files import it by name (``from helpers import ...``), since
pytest puts ``tests/`` on ``sys.path``.

Waiting
    ``bounded(awaitable, timeout)``: await with a bound, so a run that never finishes
    fails its test at the line that waited instead of hanging the session.
    ``eventually(check, what, timeout=)``: poll ``check`` (sync or async) until it
    returns something truthy and return that. Nothing in the suite synchronizes with
    a fixed sleep, and nothing asserts on how long something took.

Logs
    ``log_handler(logger_name, handler)``: a context manager that attaches a
    ``logging.Handler`` at DEBUG for the block (to count or inspect what is logged).

Ids
    ``new_id(prefix)``: a uuid-suffixed workflow id / task queue name.

Histories
    ``events_of(handle)``, ``of_type(events, type)``, ``has_event(handle, type)``
    (a check for ``eventually``), ``status_of(client, id, run_id)`` (a run's status),
    ``assert_gap_free(events)`` (event ids 1..n) and ``assert_well_formed(events)``
    (gap-free, started first, at most one close last).

Servers
    ``running_server(store_url, config)``: an in-process server on an ephemeral port
    for a test that needs its own ``ServerConfig``; the ``server`` fixture is this
    with the default config, once per database under test (``store_url``).
    ``SteppedClock``: the system clock plus an offset the test moves on (pass it as
    ``running_server(..., clock=)``): a timer armed for an hour fires when the test
    says so, never before.
    ``ServerProcess`` (the ``server_process`` fixture, started): the server as a real
    process, to SIGKILL (``kill()``) and start again (``start()``) on the same
    database and port. A ``Client`` is an async context manager that closes itself.

Processes (the ``procs`` fixture)
    ``Processes`` starts child processes with stdout/stderr in files, waits for a
    line they print, SIGKILLs them and, at teardown, kills and reaps what is left
    and prints each one's stderr tail (pytest shows it when the test failed).
    ``start_server(name, store_url, port)`` runs ``tideflow server start-dev`` on any
    store (SQLite file or PostgreSQL database) and waits until it listens (what
    ``ServerProcess`` uses);
    ``start_worker(name, address, queue, flavour, ...)`` runs ``procs/worker_proc.py``
    and waits until its pollers run; ``read_marker(marker, attempt)`` is what an
    activity attempt in such a worker wrote. ``free_port()`` is a port to restart a
    server on.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.server import Clock, ServerConfig, TideflowServer
from tideflow.worker_sdk import Client, WorkflowExecutionStatus, WorkflowHandle

ET = EventType
T = TypeVar("T")
H = TypeVar("H", bound=logging.Handler)

# Generous for a loaded machine; a healthy run needs a fraction of each.
WAIT_S = 30.0
# A server process needs ~1.5 s of CPU to start (imports, shards, the Temporal door);
# at load 16 on 2 cores that took 17 s of wall time, and restarts under the chaos
# suites' kills missed a 30 s wait.
PROCESS_START_S = 90.0

# How a test runs the ``tideflow`` command (the installed entry point's module).
TIDEFLOW_CLI = [sys.executable, "-m", "tideflow.cli"]
WORKER_PROC = Path(__file__).parent / "procs" / "worker_proc.py"

CLOSE_EVENTS = frozenset(
    {
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
    }
)


# ------------------------------------------------------------------ waiting


async def bounded(awaitable: Awaitable[T], timeout: float = WAIT_S) -> T:
    """Await with a bound: a workflow that never finishes fails its test, not the run."""
    return await asyncio.wait_for(awaitable, timeout)


async def eventually(
    check: Callable[[], Any], what: str = "a condition", *, timeout: float = WAIT_S
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; return that."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.contextmanager
def log_handler(logger_name: str, handler: H) -> Iterator[H]:
    """``handler`` attached to logger ``logger_name`` at DEBUG for the block (what a
    test inspects of the lines a component logs); the logger's level is restored."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4()}"


# ---------------------------------------------------------------- histories


async def events_of(handle: WorkflowHandle) -> list[HistoryEvent]:
    return list((await handle.fetch_history()).events)


def of_type(events: Sequence[HistoryEvent], event_type: int) -> list[HistoryEvent]:
    return [e for e in events if e.event_type == event_type]


def has_event(handle: WorkflowHandle, event_type: int) -> Callable[[], Awaitable[bool]]:
    """A check for ``eventually``: the run's history holds an event of that type."""

    async def check() -> bool:
        return bool(of_type(await events_of(handle), event_type))

    return check


async def status_of(
    client: Client, workflow_id: str, run_id: str | None = None
) -> WorkflowExecutionStatus:
    """The status of a run (the latest one of ``workflow_id`` without ``run_id``)."""
    return (await client.get_workflow_handle(workflow_id, run_id=run_id).describe()).status


def assert_gap_free(events: Sequence[HistoryEvent]) -> None:
    assert [e.event_id for e in events] == list(range(1, len(events) + 1))


def assert_well_formed(events: Sequence[HistoryEvent]) -> None:
    """Gap-free ids, one WorkflowExecutionStarted first, at most one close event last."""
    assert_gap_free(events)
    assert events[0].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED
    assert len(of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED)) == 1
    closes = [e for e in events if e.event_type in CLOSE_EVENTS]
    assert len(closes) <= 1
    if closes:
        assert closes[0] is events[-1]


# ------------------------------------------------------------------ servers


class SteppedClock:
    """The system clock plus an offset that only the test moves on (``advance``), for a
    server whose timers must fire at a moment the test chooses: one armed for an hour
    never fires by itself during a test, and fires once the clock is advanced past it
    (the timer queue sees it at its next refill, within half of ``timer_window_s``)."""

    def __init__(self) -> None:
        self._offset_us = 0

    def now_micros(self) -> int:
        return time.time_ns() // 1000 + self._offset_us

    def advance(self, by: timedelta) -> None:
        self._offset_us += int(by.total_seconds() * 1_000_000)


@contextlib.asynccontextmanager
async def running_server(
    store: str | Path, config: ServerConfig | None = None, *, clock: Clock | None = None
) -> AsyncIterator[TideflowServer]:
    """A server on an ephemeral port. ``store`` is a database URL (the ``store_url``
    fixture), or a directory for a fresh SQLite file; ``clock``: the engine's time
    (default the system clock)."""
    url = f"sqlite:///{store / 'tideflow.db'}" if isinstance(store, Path) else store
    server = TideflowServer(url, port=0, config=config or ServerConfig(), clock=clock)
    async with server:
        yield server


def free_port() -> int:
    """A port that is free now, for a server process restarted on the same address
    (clients and workers reconnect only to the address they know)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ---------------------------------------------------------------- processes


@dataclass(eq=False)
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, chars: int = 3000) -> str:
        return self.err.read_text(errors="replace")[-chars:] if self.err.exists() else ""


#: Run a child under ``setpriv --pdeathsig KILL`` (util-linux; it execs the command, so
#: the pid is the command's): the kernel SIGKILLs it when the test process dies. A test
#: past its timeout ends its xdist worker with ``os._exit`` (pytest-timeout's thread
#: method), skipping ``cleanup()``; orphaned servers would keep their database
#: connections and CPU and starve the tests after them. Spawned from the event loop's
#: thread, which lives as long as the worker (the signal follows the forking thread).
DIE_WITH_TEST: tuple[str, ...] = (
    ("setpriv", "--pdeathsig", "KILL", "--") if shutil.which("setpriv") else ()
)


class Processes:
    """Starts child processes and guarantees they are killed and reaped (also when the
    test process itself dies: ``DIE_WITH_TEST``)."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._procs: list[Proc] = []

    def spawn(self, name: str, argv: Sequence[str]) -> Proc:
        """Start ``argv`` in the test's directory; its environment is the test's
        (so ``TIDEFLOW_TRACE_DIR`` set by a fixture reaches it)."""
        out, err = self._dir / f"{name}.out", self._dir / f"{name}.err"
        with out.open("wb") as out_f, err.open("wb") as err_f:
            popen = subprocess.Popen(
                [*DIE_WITH_TEST, *argv],
                stdin=subprocess.DEVNULL,
                stdout=out_f,
                stderr=err_f,
                cwd=self._dir,
            )
        proc = Proc(name, popen, out, err)
        self._procs.append(proc)
        return proc

    async def wait_for_line(self, proc: Proc, prefix: str) -> str:
        """The first stdout line of ``proc`` that starts with ``prefix``."""

        def line() -> str | None:
            for text in proc.out.read_text(errors="replace").splitlines():
                if text.startswith(prefix):
                    return text
            if proc.popen.poll() is not None:
                raise AssertionError(
                    f"{proc.name} exited with {proc.popen.returncode} before printing "
                    f"{prefix!r}; stderr:\n{proc.tail()}"
                )
            return None

        found: str = await eventually(line, f"{proc.name}: {prefix!r}", timeout=PROCESS_START_S)
        return found

    async def start_server(
        self,
        name: str,
        store_url: str,
        port: int,
        *flags: str,
        command: str = "start-dev",
    ) -> Proc:
        """``tideflow server start-dev`` (or ``command``, e.g. ``start`` for a cluster
        node) on ``store_url`` and ``port`` with ``flags``, listening."""
        argv = [*TIDEFLOW_CLI, "server", command, "--db-url", store_url, *flags]
        proc = self.spawn(name, [*argv, "--port", str(port), "--ip", "127.0.0.1"])
        line = await self.wait_for_line(proc, "tideflow server listening on ")
        assert line.endswith(f"127.0.0.1:{port}"), line
        return proc

    async def start_worker(
        self, name: str, address: str, task_queue: str, flavour: str, *flags: str
    ) -> Proc:
        """``procs/worker_proc.py`` of ``flavour`` with identity ``name``, polling."""
        argv = [sys.executable, str(WORKER_PROC), address, task_queue, name, flavour, *flags]
        proc = self.spawn(name, argv)
        await self.wait_for_line(proc, "worker ready")
        return proc

    async def sigkill(self, proc: Proc) -> None:
        """SIGKILL ``proc`` and wait until it is gone."""
        os.kill(proc.pid, signal.SIGKILL)
        await eventually(lambda: proc.popen.poll() is not None, f"{proc.name} to die")
        assert proc.popen.returncode == -signal.SIGKILL, proc.popen.returncode

    def cleanup(self) -> None:
        for proc in self._procs:
            if proc.popen.poll() is None:
                proc.popen.kill()
            proc.popen.wait(timeout=10)
            # Shown by pytest only when the test failed.
            print(f"----- {proc.name} (exit {proc.popen.returncode}) stderr tail -----")
            print(proc.tail())


class ServerProcess:
    """``tideflow server start-dev`` as a real process on one port and database. After
    ``kill()`` (SIGKILL), ``start()`` runs a new process on the same database and port,
    so clients and workers reconnect by themselves.

    ``command``/``flags`` run another kind of server, e.g. a cluster node
    (``command="start", flags=("--node-id", ...)``); ``name`` prefixes its processes'
    names (``server-1``, ``server-2``, ...)."""

    def __init__(
        self,
        procs: Processes,
        store_url: str,
        *,
        name: str = "server",
        command: str = "start-dev",
        flags: Sequence[str] = (),
    ) -> None:
        self._procs = procs
        self._store_url = store_url
        self.name = name
        self._command = command
        self._flags = tuple(flags)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._running: Proc | None = None
        self._starts = 0

    @property
    def proc(self) -> Proc:
        """The running process (to signal it: SIGTERM, SIGSTOP, SIGCONT)."""
        assert self._running is not None, "no server process runs"
        return self._running

    async def start(self) -> Proc:
        """Start the next process (``<name>-1``, ``<name>-2``, ...) and wait until it
        listens."""
        assert self._running is None, "the previous server process still runs"
        self._starts += 1
        self._running = await self._procs.start_server(
            f"{self.name}-{self._starts}",
            self._store_url,
            self.port,
            *self._flags,
            command=self._command,
        )
        return self._running

    async def kill(self) -> None:
        """SIGKILL the running process and wait until it is gone."""
        assert self._running is not None, "no server process runs"
        await self._procs.sigkill(self._running)
        self._running = None

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM the running process (a graceful stop) and wait until it exits;
        its exit code. ``start()`` runs it again."""
        assert self._running is not None, "no server process runs"
        popen = self._running.popen
        popen.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(popen.wait, timeout)
        self._running = None
        return code


def read_marker(marker: Path, attempt: int) -> dict[str, Any] | None:
    """What attempt ``attempt`` of a marker-writing activity of procs/worker_proc.py
    wrote (its pid, attempt and workflow id), or None while it has not run."""
    path = Path(f"{marker}.attempt{attempt}")
    if not path.exists():
        return None
    written: dict[str, Any] = json.loads(path.read_text())
    return written
