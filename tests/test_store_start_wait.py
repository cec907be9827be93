"""A server started before its database waits for it (issue 10 follow-up).

``TideflowServer.start()`` failed at once when the database was down, so a server and
its database started together (a reboot, a compose file) raced, and the server lost.
Now the start tries again for ``ServerConfig.store_start_timeout_s``, one log line per
attempt; ``tideflow server start-dev`` then says in one line that the database is
unreachable (exit code 2). The database comes up in a private PostgreSQL cluster
(tests/pg_cluster.py), never the shared one; "unreachable" is a port nobody listens on.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import eventually, free_port
from pg_cluster import private_postgres

from tideflow.history import StoreUnavailableError
from tideflow.server import ServerConfig, TideflowServer
from tideflow.worker_sdk import Client, Worker, workflow

_BOUND_S = 120.0


@workflow.defn
class Hello:
    @workflow.run
    async def run(self, name: str) -> str:
        return f"hello {name}"


def _attempt_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "tideflow.server" and r.getMessage().startswith("opening the store (attempt")
    ]


@pytest.mark.postgres
async def test_a_server_started_before_its_database_waits_for_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tideflow.server")
    cluster = private_postgres()
    try:
        await asyncio.to_thread(cluster.stop)
        server = TideflowServer(
            cluster.url, port=0, config=ServerConfig(store_start_timeout_s=10 * _BOUND_S)
        )
        starting = asyncio.create_task(server.start())
        try:
            await eventually(
                lambda: len(_attempt_lines(caplog)) >= 2, "two attempts logged", timeout=_BOUND_S
            )
            assert not starting.done()
            first = _attempt_lines(caplog)[0]
            assert "(attempt 1," in first and "database unavailable" in first, first
            await asyncio.to_thread(cluster.start)
            await asyncio.wait_for(starting, _BOUND_S)

            # The server works: a run starts and completes.
            client = await Client.connect(server.address)
            try:
                tq = f"tq-{uuid.uuid4()}"
                async with Worker(client, task_queue=tq, workflows=[Hello]):
                    result = await asyncio.wait_for(
                        client.execute_workflow(
                            Hello.run, "db", id=f"w-{uuid.uuid4()}", task_queue=tq
                        ),
                        _BOUND_S,
                    )
                assert result == "hello db"
            finally:
                await client.close()
        finally:
            starting.cancel()
            await asyncio.wait({starting})
            await server.stop()
    finally:
        await asyncio.to_thread(cluster.destroy)


async def test_the_start_gives_up_after_the_period(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tideflow.server")
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    server = TideflowServer(url, port=0, config=ServerConfig(store_start_timeout_s=0))
    with pytest.raises(StoreUnavailableError, match="still unavailable after 1 attempt"):
        await server.start()
    # No period: one attempt, logged like any failed attempt, and no retry.
    (line,) = _attempt_lines(caplog)
    assert "(attempt 1, 0 s left)" in line, line
    await server.stop()


def test_start_dev_says_in_one_line_that_the_database_is_unreachable(tmp_path: Path) -> None:
    url = f"postgresql://postgres:secret@127.0.0.1:{free_port()}/postgres"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "tideflow.cli", "server", "start-dev", "--port", "0"),
            *("--db-url", url, "--db-wait", "1.5"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=_BOUND_S,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    *attempts, error = lines
    # One log line per attempt (at least the first, before the 1.5 s ran out) ...
    assert attempts and all("opening the store (attempt" in line for line in attempts), lines
    # ... then the one-line error, the password masked.
    assert error.startswith("tideflow server start-dev: --db-url postgresql://postgres:***@")
    assert "cannot open the database: database unavailable" in error
    assert "still unavailable after" in error and "secret" not in proc.stderr


def test_start_dev_waiting_for_the_database_stops_on_sigint(tmp_path: Path) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "tideflow.cli", "server", "start-dev", "--port", "0"),
            *("--db-url", url, "--db-wait", "600"),
        ],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # blocks until the first attempt is logged
        assert "opening the store (attempt 1," in first, first
        proc.send_signal(signal.SIGINT)
        # It stops now, not after the 600 s it would have waited.
        assert proc.wait(timeout=_BOUND_S) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
