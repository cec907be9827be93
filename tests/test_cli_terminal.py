"""The workflow CLI at a terminal (issue 15: "tables fit the terminal; progress shown
for long operations"): ``execute`` with stderr on a real pseudo-terminal draws the
run's progress in place (state, time, history length, the activity it waits on) and
erases it before the result; with stderr a pipe it draws nothing; tables of ``list``,
``show`` (also ``--follow``) and ``describe`` stay within a 60-column terminal.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import struct
import termios
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import TIDEFLOW_CLI, bounded, new_id, running_server
from test_cli_workflow import ok, tideflow

from tideflow.cli._progress import CLEAR_LINE
from tideflow.server import TideflowServer
from tideflow.worker_sdk import Client, Worker, activity, workflow

RELEASE: dict[str, asyncio.Event] = {}
TERMINAL_COLUMNS = 100


@activity.defn
async def hold(key: str) -> str:
    await RELEASE.setdefault(key, asyncio.Event()).wait()
    return f"released {key}"


@workflow.defn
class Holding:
    @workflow.run
    async def run(self, key: str) -> str:
        return await workflow.execute_activity(
            hold, key, start_to_close_timeout=timedelta(seconds=60)
        )


@pytest.fixture
async def sqlite_server(tmp_path: Path) -> AsyncIterator[TideflowServer]:
    async with running_server(tmp_path) as server:
        yield server


class Terminal:
    """The master side of a pseudo-terminal: what the program wrote, as it comes."""

    def __init__(self, columns: int) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        self.data = b""
        self.changed = asyncio.Event()
        self.closed = False
        asyncio.get_running_loop().add_reader(self.master, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self.master, 4096)
        except OSError:  # EIO: every writer is gone
            chunk = b""
        if not chunk:
            self.closed = True
            asyncio.get_running_loop().remove_reader(self.master)
        self.data += chunk
        self.changed.set()

    async def wait_for(self, text: str) -> None:
        while text.encode() not in self.data:
            assert not self.closed, self.data
            self.changed.clear()
            await self.changed.wait()

    async def drained(self) -> str:
        while not self.closed:
            self.changed.clear()
            await self.changed.wait()
        return self.data.decode()

    def close_slave(self) -> None:
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1

    def close(self) -> None:
        self.close_slave()
        if not self.closed:
            asyncio.get_running_loop().remove_reader(self.master)
        os.close(self.master)


async def test_execute_shows_progress_on_a_terminal_only(sqlite_server: TideflowServer) -> None:
    # A short id: the whole status line fits the terminal (a longer one is cut).
    address, queue, wid = sqlite_server.address, new_id("q"), f"held-{uuid.uuid4().hex[:8]}"
    client = await Client.connect(address)
    async with client, Worker(client, task_queue=queue, workflows=[Holding], activities=[hold]):
        terminal = Terminal(TERMINAL_COLUMNS)
        try:
            proc = await asyncio.create_subprocess_exec(
                *TIDEFLOW_CLI,
                *("workflow", "--address", address, "execute", "-t", queue),
                *("--type", "Holding", "-w", wid, "-i", json.dumps(wid), "-o", "json"),
                stdout=asyncio.subprocess.PIPE,
                stderr=terminal.slave,
                env={k: v for k, v in os.environ.items() if k != "COLUMNS"},
            )
            terminal.close_slave()  # the child holds its own copy
            await bounded(terminal.wait_for(f"waiting for {wid} (Holding): running"))
            await bounded(terminal.wait_for("activities: hold (attempt 1)"))
            RELEASE.setdefault(wid, asyncio.Event()).set()
            out, _ = await bounded(proc.communicate())
            assert proc.returncode == 0
            drawn = await bounded(terminal.drained())
        finally:
            terminal.close()
        assert json.loads(out)["result"] == f"released {wid}"
        # Redrawn in place, never wider than the terminal, erased at the end.
        assert drawn.endswith(CLEAR_LINE) and "\n" not in drawn
        lines = [line for line in drawn.split(CLEAR_LINE) if line]
        assert lines and all(len(line) < TERMINAL_COLUMNS for line in lines)
        # The same wait with stderr a pipe: the result and not a byte more.
        code, printed, err = await tideflow("workflow", "--address", address, "result", "-w", wid)
        assert (code, json.loads(printed), err) == (0, f"released {wid}", "")


async def test_tables_fit_a_narrow_terminal(sqlite_server: TideflowServer) -> None:
    address, queue = sqlite_server.address, new_id("q")
    client = await Client.connect(address)
    async with client, Worker(client, task_queue=queue, workflows=[Holding], activities=[hold]):
        ids = [new_id("a-rather-long-workflow-id") for _ in range(2)]
        for wid in ids:
            RELEASE.setdefault(wid, asyncio.Event()).set()
            await client.execute_workflow(Holding.run, wid, id=wid, task_queue=queue)
    narrow = {"COLUMNS": "60"}
    wf = ["workflow", "--address", address]
    tables = {
        "list": await ok(*wf, "list", "-q", f"TaskQueue = '{queue}'", env=narrow),
        "show": await ok(*wf, "show", "-w", ids[0], env=narrow),
        "show --follow": await ok(*wf, "show", "-w", ids[0], "--follow", env=narrow),
        "describe": await ok(*wf, "describe", "-w", ids[0], env=narrow),
    }
    for name, table in tables.items():
        lines = table.splitlines()
        assert len(lines) >= 3, (name, table)
        assert all(len(line) <= 60 for line in lines), (name, table)
    # Squeezed, not dropped: both runs listed, their ids cut with an ellipsis.
    assert len(tables["list"].splitlines()) == 2 + len(ids)
    assert "…" in tables["list"]
    assert "WorkflowExecutionCompleted"[:8] in tables["show --follow"]
