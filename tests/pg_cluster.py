"""A private PostgreSQL cluster for tests that stop and restart the database.

Tests that take the database down must never touch the shared server on port 5432
(other tests and other people use it), so they run their own: ``initdb`` into a
temporary directory, a free port, trust authentication, started and stopped with
``pg_ctl``. PostgreSQL refuses to run as root, so as root every command runs as the
``postgres`` OS user (``runuser``).

Without the binaries the tests are skipped, except with ``CI=true``, where a missing
database is a failure (CI must never pass by silently skipping).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import free_port


def _bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: ``TIDEFLOW_PG_BIN``, Debian's place, or PATH."""
    directory = Path(os.environ.get("TIDEFLOW_PG_BIN", "/usr/lib/postgresql/15/bin"))
    if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
        return directory
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and shutil.which("initdb") else None


class PrivatePostgres:
    """One throwaway cluster; ``url`` is its database ``postgres`` over TCP."""

    def __init__(self, bin_dir: Path) -> None:
        self._bin = bin_dir
        self._as_root = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="tideflow-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        if self._as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self._bin / tool), *args]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"{tool} {' '.join(args)} failed ({done.returncode}): "
                f"{done.stdout[-2000:]}{done.stderr[-2000:]}\n{self.server_log()}"
            )

    def server_log(self) -> str:
        log = self.dir / "server.log"
        return log.read_text(errors="replace")[-4000:] if log.exists() else ""

    def start(self) -> None:
        """Start and wait until it accepts connections (``pg_ctl -w``)."""
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} "
            "-c fsync=off -c max_connections=100"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-o", options, "-w",
            "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """``fast`` ends every session with SQLSTATE 57P01 (admin shutdown), as a
        service restart does; ``immediate`` is a crash of the server."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def private_postgres() -> PrivatePostgres:
    """A new, started cluster (skip, or fail with CI=true, without the binaries)."""
    if os.environ.get("TIDEFLOW_TEST_DB", "").strip().lower() == "sqlite":
        pytest.skip("PostgreSQL not selected (TIDEFLOW_TEST_DB)")
    bin_dir = _bin_dir()
    if bin_dir is None or (os.geteuid() == 0 and shutil.which("runuser") is None):
        message = "PostgreSQL server binaries (initdb, pg_ctl) not found for a private cluster"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI=true: these tests must run)")
        pytest.skip(message)
    cluster = PrivatePostgres(bin_dir)
    try:
        cluster.start()
    except BaseException:
        cluster.destroy()
        raise
    return cluster
