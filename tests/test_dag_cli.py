"""``tideflow dag ...`` as a user runs it: a subprocess against a real server.

The server (port 0, over SQLite and over PostgreSQL: conftest's ``server``) and,
where a test needs one, a worker run in the test's event loop; the CLI runs as
``python -m tideflow.cli dag ...`` (helpers.TIDEFLOW_CLI) through
``asyncio.create_subprocess_exec`` so the loop keeps serving while it works.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import sqlite3
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

from helpers import TIDEFLOW_CLI, eventually

from tideflow.server import TideflowServer
from tideflow.worker_sdk import Client, Worker, dag

ROOT = Path(__file__).resolve().parent.parent
ETL = ROOT / "examples" / "etl"


async def cli(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *TIDEFLOW_CLI,
        "dag",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _etl_executors() -> ModuleType:
    spec = importlib.util.spec_from_file_location("etl_executors_for_tests", ETL / "executors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


async def test_validate_and_graph(tmp_path: Path) -> None:
    code, out, err = await cli("validate", str(ETL / "etl.yaml"))
    assert code == 0, err
    assert "valid: DAG 'data-etl-process' v1.0.0, 3 tasks, 2 edges" in out
    code, out, err = await cli(
        "validate", str(ETL / "etl.yaml"), "--executors", str(ETL / "executors.py")
    )
    assert code == 0, err

    cyclic = _write(
        tmp_path / "cyclic.yaml",
        "id: c\nversion: '1'\ntasks:\n"
        "  - {id: a, executor: x, depends_on: [b]}\n"
        "  - {id: b, executor: x, depends_on: [a]}\n"
        "  - {id: c, executor: x, depends_on: [ghost], timeout: -3s}\n",
    )
    code, out, err = await cli("validate", str(cyclic))
    assert code == 1
    assert "task 'a': cycle: a -> b -> a" in err
    assert "task 'c': depends on unknown task 'ghost'" in err
    assert "task 'c': bad timeout -3s" in err

    typo = _write(
        tmp_path / "typo.yaml",
        (ETL / "etl.yaml").read_text().replace("executor: data-writer", "executor: data-writter"),
    )
    code, out, err = await cli("validate", str(typo), "--executors", str(ETL / "executors.py"))
    assert code == 1
    assert "task 'load-data': unknown executor 'data-writter'" in err

    code, out, err = await cli("graph", str(ETL / "etl.yaml"))
    assert code == 0, err
    assert "stage 1:\n  transform-data [data-transformer] <- extract-data" in out
    code, out, err = await cli("graph", str(ETL / "etl.yaml"), "--dot")
    assert code == 0, err
    assert out.startswith('digraph "data-etl-process" {')
    assert '"transform-data" -> "load-data";' in out


async def test_run_etl_with_live_progress_then_status(
    tmp_path: Path, server: TideflowServer
) -> None:
    source, target = tmp_path / "source.db", tmp_path / "target.db"
    seeded = _etl_executors().seed_source(source)
    payload = {
        "source_db": str(source),
        "target_db": str(target),
        "target_table": "events_processed",
        "simulate_failures": 1,
    }
    run_id = f"etl-{uuid.uuid4().hex[:8]}"
    code, out, err = await cli(
        "run", str(ETL / "etl.yaml"),
        "--input", json.dumps(payload),
        "--address", server.address,
        "--task-queue", f"etl-{uuid.uuid4().hex}",
        "--executors", str(ETL / "executors.py"),
        "--id", run_id,
    )  # fmt: skip
    assert code == 0, out + err
    assert f"as run {run_id}" in out
    # Live progress: each transition of each task, the retried extract included.
    for fragment in (
        "extract-data             SCHEDULED attempt 1/3",
        "extract-data             FAILED    attempt 1/3  RuntimeError: source database is locked",
        "extract-data             RETRY     attempt 1/3  backoff 1s",
        "extract-data             COMPLETED attempt 2/3",
        # Where it ran: the placement is known only once the progress poll sees the
        # attempt's report, so the line may name the worker alone (the table below
        # shows the placement).
        "transform-data           RUNNING   attempt 1/1 on ",
        "load-data                COMPLETED attempt 1/3",
        "workflow                 COMPLETED",
        '"rows_loaded": 6',
    ):
        assert fragment in out, out
    assert re.search(r"^transform-data +COMPLETED +1/1 .* cloud ", out, re.MULTILINE), out
    with sqlite3.connect(target) as conn:
        assert conn.execute("SELECT COUNT(*) FROM events_processed").fetchone()[0] == 6
    assert seeded == 10

    # With no worker left, the status comes from a replay of the history in the CLI.
    code, out, err = await cli("status", run_id, "--address", server.address, "--from-history")
    assert code == 0, err
    assert "status COMPLETED" in out.splitlines()[0]
    assert "extract-data    COMPLETED  2/3" in out
    # The default asks a worker (the status query; it replays the closed run).
    async with (
        await Client.connect(server.address) as client,
        Worker(
            client,
            task_queue=await _queue_of(client, run_id),
            workflows=[dag.DagWorkflow],
            activities=_etl_executors().EXECUTORS,
        ),
    ):
        code, out, err = await cli("status", run_id, "--address", server.address)
        assert code == 0, err
        lines = out.splitlines()
        assert "status COMPLETED" in lines[0]
        assert lines[1].split() == [
            "TASK", "STATUS", "ATTEMPTS", "STARTED", "ENDED", "WHERE", "RESULT", "/", "ERROR"
        ]  # fmt: skip
        assert lines[2].split()[:3] == ["extract-data", "COMPLETED", "2/3"]
        assert lines[3].split()[:3] == ["transform-data", "COMPLETED", "1/1"]
        assert lines[4].split()[:3] == ["load-data", "COMPLETED", "1/3"]
        code, out, err = await cli("status", run_id, "--address", server.address, "--json")
        assert code == 0, err
        assert json.loads(out)["output"]["rows_loaded"] == 6


async def _queue_of(client: Client, run_id: str) -> str:
    return (await client.get_workflow_handle(run_id).describe()).task_queue


async def test_run_without_wait_then_pause_list_status_resume(
    tmp_path: Path, server: TideflowServer
) -> None:
    queue = f"cli-{uuid.uuid4().hex}"
    release = asyncio.Event()

    @dag.executor("gate")
    async def gate(params: dict[str, Any]) -> str:
        if params["wait"]:
            await release.wait()
        return str(params["name"])

    definition = _write(
        tmp_path / "two.yaml",
        "id: two\nversion: '3'\ntasks:\n"
        "  - {id: first, executor: gate, parameters: {name: one, wait: true}}\n"
        "  - {id: second, executor: gate, parameters: {name: two, wait: false},"
        " depends_on: [first]}\n",
    )
    address = server.address
    async with (
        await Client.connect(address) as client,
        Worker(client, task_queue=queue, workflows=[dag.DagWorkflow], activities=[gate]),
    ):
        code, out, err = await cli(
            "run", str(definition), "--address", address, "--task-queue", queue, "--id", "r1"
        )
        assert code == 0, err
        assert "started DAG 'two' v3 as run r1" in out
        code, out, err = await cli("pause", "r1", "--address", address)
        assert code == 0, err
        handle = client.get_dag_handle("r1")

        async def paused() -> bool:
            return (await handle.status()).status is dag.WorkflowStatus.PAUSED

        await eventually(paused, "the run to be PAUSED")

        async def listed() -> bool:
            # Visibility follows once the workflow task that handled the signal commits.
            code, out, err = await cli("list", "--status", "paused", "--address", address)
            assert code == 0, err
            lines = out.splitlines()
            return len(lines) > 1 and lines[1].split()[:4] == ["r1", "two", "3", "PAUSED"]

        await eventually(listed, "tideflow dag list to show the run PAUSED")
        code, out, err = await cli("status", "r1", "--address", address)
        assert code == 0, err
        assert "status PAUSED" in out.splitlines()[0]
        assert out.splitlines()[3].split()[:2] == ["second", "PENDING"]
        release.set()
        code, out, err = await cli("resume", "r1", "--address", address)
        assert code == 0, err
        assert await handle.result() == {"second": "two"}
        code, out, err = await cli("list", "--address", address)
        assert out.splitlines()[1].split()[:4] == ["r1", "two", "3", "COMPLETED"]


async def test_run_rejects_input_that_violates_the_schema(server: TideflowServer) -> None:
    code, _out, err = await cli(
        "run", str(ETL / "etl.yaml"), "--address", server.address,
        "--input", '{"source_db": "x", "target_db": "y", "target_table": "bad name"}',
    )  # fmt: skip
    assert code == 1
    assert "input does not match input_schema" in err and "INVALID_ARGUMENT" in err
    assert "does not match '^[A-Za-z_][A-Za-z0-9_]*$'" in err
    async with await Client.connect(server.address) as client:
        assert await client.count_workflows() == 0
    code, _, err = await cli("run", str(ETL / "etl.yaml"), "--input", "{oops")
    assert code == 2 and "--input is not valid JSON" in err
    code, _, err = await cli("status", "x", "--address", "127.0.0.1:1")
    assert code == 2 and "cannot reach a tideflow server at 127.0.0.1:1" in err
