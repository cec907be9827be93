"""Crash recovery with real processes killed by SIGKILL.

A. The server process dies (SIGKILL) while 30 workflows are mid-flight (sleeping on a
   durable timer, running activities, being started). A new server process on the
   same SQLite file and port recovers tasks and timers from the store; the in-test
   client and worker reconnect by themselves. Every workflow completes with the right
   result, every history is well formed, and nothing the first server acknowledged
   (every event a client had read from it) is lost.

B. A worker process dies (SIGKILL) in the middle of an activity attempt. The server
   times the attempt out (start-to-close), retries it, and a second worker process
   completes it: attempt 2, under the second worker's identity.

Processes are started with ``subprocess.Popen`` (stdout/stderr to files in
``tmp_path``) and always killed and reaped in fixture teardown, even on failure.
Waiting polls a condition against a bounded deadline; no fixed sleeps synchronize.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tideflow.api.v1.common_pb2 import TimeoutType
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.server import TideflowServer
from tideflow.worker_sdk import (
    Client,
    RetryPolicy,
    Worker,
    WorkflowExecutionStatus,
    WorkflowHandle,
    activity,
    workflow,
)

pytestmark = pytest.mark.slow

ET = EventType

WORKER_PROC = Path(__file__).parent / "procs" / "worker_proc.py"
# Generous bounds for slow CI machines; a healthy run needs a fraction of each.
PROCESS_START_TIMEOUT_S = 30.0
CONDITION_TIMEOUT_S = 30.0
COMPLETION_TIMEOUT_S = 60.0


# --------------------------------------------------------------------- processes


@dataclass(eq=False)
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, chars: int = 3000) -> str:
        text = self.err.read_text(errors="replace") if self.err.exists() else ""
        return text[-chars:]


class _Processes:
    """Starts child processes and guarantees they are killed and reaped."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._procs: list[_Proc] = []

    def spawn(self, name: str, argv: Sequence[str]) -> _Proc:
        out, err = self._dir / f"{name}.out", self._dir / f"{name}.err"
        with out.open("wb") as out_f, err.open("wb") as err_f:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out_f,
                stderr=err_f,
                cwd=self._dir,
            )
        proc = _Proc(name, popen, out, err)
        self._procs.append(proc)
        return proc

    async def wait_for_line(self, proc: _Proc, prefix: str) -> str:
        """The first stdout line of ``proc`` starting with ``prefix``."""

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

        found: str = await _wait_until(line, PROCESS_START_TIMEOUT_S, f"{proc.name}: {prefix!r}")
        return found

    async def sigkill(self, proc: _Proc) -> None:
        """SIGKILL ``proc`` and wait until it is gone."""
        os.kill(proc.pid, signal.SIGKILL)
        await _wait_until(
            lambda: proc.popen.poll() is not None, 10.0, f"{proc.name} to die of SIGKILL"
        )
        assert proc.popen.returncode == -signal.SIGKILL, proc.popen.returncode

    def cleanup(self) -> None:
        for proc in self._procs:
            if proc.popen.poll() is None:
                proc.popen.kill()
            proc.popen.wait(timeout=10)
            # Shown by pytest only when the test failed.
            print(f"----- {proc.name} (exit {proc.popen.returncode}) stderr tail -----")
            print(proc.tail())


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[_Processes]:
    processes = _Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.cleanup()


async def _wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy, and return
    that; fail after ``timeout`` seconds."""
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
        await asyncio.sleep(0.05)


def _free_port() -> int:
    """A port that is free now. Both server runs of test A use it: the client and
    worker only reconnect to the same address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def _start_server(procs: _Processes, name: str, db: Path, port: int) -> _Proc:
    proc = procs.spawn(
        name,
        [
            sys.executable,
            "-m",
            "tideflow.server._cli",
            "server",
            "start-dev",
            "--db",
            str(db),
            "--port",
            str(port),
            "--ip",
            "127.0.0.1",
        ],
    )
    line = await procs.wait_for_line(proc, "tideflow server listening on ")
    assert line.endswith(f"127.0.0.1:{port}"), line
    return proc


# ----------------------------------------------------------------------- history


def _of_type(events: Sequence[HistoryEvent], event_type: int) -> list[HistoryEvent]:
    return [e for e in events if e.event_type == event_type]


def _check_history(events: Sequence[HistoryEvent], *, activities: int, timers: int) -> None:
    """A completed run's history: gap-free, closed once, every activity completed once."""
    ids = [e.event_id for e in events]
    assert ids == list(range(1, len(events) + 1)), f"event ids not 1..n: {ids}"
    assert events[0].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED
    assert len(_of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED)) == 1
    assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED

    scheduled = [e.event_id for e in _of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)]
    assert len(scheduled) == activities
    once_each = Counter(scheduled)
    started = Counter(
        e.activity_task_started_event_attributes.scheduled_event_id
        for e in _of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_STARTED)
    )
    completed = Counter(
        e.activity_task_completed_event_attributes.scheduled_event_id
        for e in _of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)
    )
    assert started == once_each, f"ActivityTaskStarted per scheduled id: {started}"
    assert completed == once_each, f"ActivityTaskCompleted per scheduled id: {completed}"
    for bad in (
        ET.EVENT_TYPE_ACTIVITY_TASK_FAILED,
        ET.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT,
        ET.EVENT_TYPE_ACTIVITY_TASK_CANCELED,
    ):
        assert not _of_type(events, bad), ET.Name(bad)

    assert len(_of_type(events, ET.EVENT_TYPE_TIMER_STARTED)) == timers
    assert len(_of_type(events, ET.EVENT_TYPE_TIMER_FIRED)) == timers


# ------------------------------------------------- A: the server dies mid-flight

QUEUE_A = "crash-recovery-server"
WORKFLOWS_A = 30
# Short enough that a task lost in the crash (recorded started, response never
# delivered) is retried quickly; long enough not to fire on a loaded machine.
ACTIVITY_TIMEOUT_A = timedelta(seconds=5)
WORKFLOW_TASK_TIMEOUT_A = timedelta(seconds=5)
FAST_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=100))


@activity.defn
async def reserve_stock(n: int) -> int:
    return n * 10


@activity.defn
async def confirm_order(reserved: int) -> str:
    return f"confirmed-{reserved}"


@workflow.defn
class SleepyOrder:
    @workflow.run
    async def run(self, n: int) -> str:
        reserved: int = await workflow.execute_activity(
            reserve_stock, n, start_to_close_timeout=ACTIVITY_TIMEOUT_A, retry_policy=FAST_RETRY
        )
        await workflow.sleep(timedelta(seconds=1.0 + (n % 3) * 0.5))
        result: str = await workflow.execute_activity(
            confirm_order,
            reserved + 1,
            start_to_close_timeout=ACTIVITY_TIMEOUT_A,
            retry_policy=FAST_RETRY,
        )
        return result


def _expected_a(n: int) -> str:
    return f"confirmed-{n * 10 + 1}"


async def test_server_sigkill_mid_flight_recovers_every_workflow(
    tmp_path: Path, procs: _Processes
) -> None:
    db = tmp_path / "tideflow.db"
    port = _free_port()
    first = await _start_server(procs, "server-1", db, port)
    client = await Client.connect(f"127.0.0.1:{port}")
    worker = Worker(
        client,
        task_queue=QUEUE_A,
        workflows=[SleepyOrder],
        activities=[reserve_stock, confirm_order],
    )
    worker.start()
    starter: asyncio.Task[None] | None = None
    try:

        async def start(n: int) -> WorkflowHandle:
            return await client.start_workflow(
                SleepyOrder.run,
                n,
                id=f"order-{n}",
                task_queue=QUEUE_A,
                task_timeout=WORKFLOW_TASK_TIMEOUT_A,
            )

        # Two thirds start before the crash; the rest are started one after another
        # from a background task that the crash interrupts (the StartWorkflow call
        # in flight is retried against the new server with the same request id).
        early = WORKFLOWS_A * 2 // 3
        handles = list(await asyncio.gather(*(start(n) for n in range(early))))

        async def some_sleeping() -> list[list[HistoryEvent]] | None:
            histories = await asyncio.gather(*(h.fetch_history() for h in handles))
            sleeping = sum(
                1
                for h in histories
                if _of_type(h.events, ET.EVENT_TYPE_TIMER_STARTED)
                and not _of_type(h.events, ET.EVENT_TYPE_TIMER_FIRED)
            )
            return [h.events for h in histories] if sleeping >= 5 else None

        acknowledged: list[list[HistoryEvent]] = await _wait_until(
            some_sleeping, CONDITION_TIMEOUT_S, "5 workflows sleeping on their timer"
        )
        late: list[WorkflowHandle] = []

        async def start_late() -> None:
            for n in range(early, WORKFLOWS_A):
                late.append(await start(n))

        starter = asyncio.create_task(start_late())
        await _wait_until(lambda: late, CONDITION_TIMEOUT_S, "a late workflow to start")
        await procs.sigkill(first)
        killed_at_us = time.time_ns() // 1000

        await _start_server(procs, "server-2", db, port)
        async with asyncio.timeout(COMPLETION_TIMEOUT_S):
            await starter
            handles += late
            results = await asyncio.gather(*(h.result() for h in handles))
        assert results == [_expected_a(n) for n in range(WORKFLOWS_A)]
        assert len(late) == WORKFLOWS_A - early

        fired_after_crash = 0
        for n, handle in enumerate(handles):
            assert handle.id == f"order-{n}"
            history = (await handle.fetch_history()).events
            _check_history(history, activities=2, timers=1)
            if n < early:
                # Everything a client read from the first server survived its death.
                before = acknowledged[n]
                assert history[: len(before)] == before, f"order-{n}: acknowledged events lost"
            [fired] = _of_type(history, ET.EVENT_TYPE_TIMER_FIRED)
            fired_after_crash += fired.event_time.ToMicroseconds() > killed_at_us
            description = await handle.describe()
            assert description.status == WorkflowExecutionStatus.COMPLETED
            assert description.run_id == handle.run_id
        # The workflows sleeping at the crash were woken by the second server, from
        # the timer rows the first one had committed.
        assert fired_after_crash >= 5, fired_after_crash
        await worker.shutdown()
    finally:
        # On failure a server may be gone: closing the channel first ends the calls
        # that would otherwise keep retrying for minutes, so shutdown returns at once.
        await client.close()
        await worker.shutdown()
        if starter is not None:
            starter.cancel()
            await asyncio.gather(starter, return_exceptions=True)


# ------------------------------------------- B: a worker dies mid-activity attempt

QUEUE_B = "crash-recovery-worker"


def _marker(marker: Path, attempt: int) -> dict[str, int] | None:
    """What the activity's attempt ``attempt`` wrote (worker_proc.py), or None yet."""
    path = Path(f"{marker}.attempt{attempt}")
    if not path.exists():
        return None
    written: dict[str, int] = json.loads(path.read_text())
    return written


def _worker_argv(address: str, identity: str) -> list[str]:
    return [sys.executable, str(WORKER_PROC), address, QUEUE_B, identity]


async def test_worker_sigkill_mid_activity_is_retried_on_another_worker(
    tmp_path: Path, procs: _Processes
) -> None:
    async with TideflowServer(f"sqlite:///{tmp_path / 'worker-crash.db'}", port=0) as server:
        worker1 = procs.spawn("worker-1", _worker_argv(server.address, "worker-1"))
        client = await Client.connect(server.address)
        try:
            marker = tmp_path / "activity-marker"
            handle = await client.start_workflow(
                "CrashyWorkflow",
                {"marker": str(marker), "value": "job-7"},
                id="crashy-1",
                task_queue=QUEUE_B,
            )

            attempt1 = await _wait_until(
                lambda: _marker(marker, 1), CONDITION_TIMEOUT_S, "attempt 1 to start"
            )
            assert attempt1 == {"pid": worker1.pid, "attempt": 1}
            pending = (await handle.describe()).raw.pending_activities
            assert [(p.attempt, p.last_worker_identity) for p in pending] == [(1, "worker-1")]

            await procs.sigkill(worker1)
            worker2 = procs.spawn("worker-2", _worker_argv(server.address, "worker-2"))

            async with asyncio.timeout(COMPLETION_TIMEOUT_S):
                result = await handle.result()
            assert result == "job-7:done-on-attempt-2"
            assert _marker(marker, 2) == {"pid": worker2.pid, "attempt": 2}
            assert _marker(marker, 3) is None

            events = (await handle.fetch_history()).events
            _check_history(events, activities=1, timers=0)
            [started] = _of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_STARTED)
            [completed] = _of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)
            started_attrs = started.activity_task_started_event_attributes
            assert started_attrs.attempt == 2
            assert started_attrs.identity == "worker-2"
            # Attempt 1 ended by the server's start-to-close timeout, not by a report.
            timeout_info = started_attrs.last_failure.timeout_failure_info
            assert timeout_info.timeout_type == TimeoutType.TIMEOUT_TYPE_START_TO_CLOSE
            completed_attrs = completed.activity_task_completed_event_attributes
            assert completed_attrs.identity == "worker-2"
            assert completed_attrs.identity != "worker-1"
            wft_identities = [
                e.workflow_task_completed_event_attributes.identity
                for e in _of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
            ]
            assert wft_identities == ["worker-1", "worker-2"]
        finally:
            await client.close()
