"""`tideflow server start-dev`: a real process on a real port."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from helpers import TIDEFLOW_CLI

from tideflow.api.v1 import service_pb2
from tideflow.worker_sdk import Client


def _start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*TIDEFLOW_CLI, "server", "start-dev", "--port", "0", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
async def test_start_dev_serves_and_stops_cleanly(tmp_path: Path, stop_signal: int) -> None:
    proc = _start(cwd=tmp_path)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("tideflow server listening on 127.0.0.1:"), line
        address = line.rsplit(" ", 1)[1].strip()
        client = await Client.connect(address)
        info = await client.service.GetSystemInfo(service_pb2.GetSystemInfoRequest())
        assert info.store == "sqlite"
        await client.close()
        # The default database is ./tideflow.db in the working directory.
        assert (tmp_path / "tideflow.db").exists()
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None
        assert "tideflow server stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_bad_database_url_is_a_clear_error(tmp_path: Path) -> None:
    proc = _start("--db-url", "mysql://nowhere/x", cwd=tmp_path)
    _, err = proc.communicate(timeout=60)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    assert proc.returncode == 2
    assert "unsupported database URL scheme" in err
