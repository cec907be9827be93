"""``tideflow workflow ...`` (issue 15's CLI, issue 16's codec in the CLI): the real
command in a subprocess against a real server on SQLite, with a real worker in this
process. Start, describe, signal, query, result, show (table, json, --follow),
list/count with a query, cancel and terminate; payloads encrypted with AES-GCM shown as
placeholders without the key and decoded with ``--codec-key``, and an input the CLI
encrypts read by the worker; one-line errors with exit code 2; ``--version``; the
TIDEFLOW_ADDRESS / TIDEFLOW_NAMESPACE environment variables.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import TIDEFLOW_CLI, bounded, eventually, free_port, new_id, running_server
from test_security_tls import issue, make_ca

from tideflow.cli._codec import payload_from_json, payload_to_json
from tideflow.server import ServerTLSConfig, TideflowServer
from tideflow.worker_sdk import AESGCMCodec, Client, DataConverter, Worker, workflow
from tideflow.worker_sdk.exceptions import ApplicationError

KEY = bytes.fromhex("5a" * 32)
CLI_TIMEOUT_S = 60.0


@workflow.defn
class Approval:
    """Waits for ``needed`` approvals (signals); ``approvals`` answers a query."""

    def __init__(self) -> None:
        self.approvers: list[str] = []

    @workflow.run
    async def run(self, item: str, needed: int) -> dict[str, Any]:
        await workflow.wait_condition(lambda: len(self.approvers) >= needed)
        return {"item": item, "approved_by": self.approvers}

    @workflow.signal
    def approve(self, who: str) -> None:
        self.approvers.append(who)

    @workflow.query
    def approvals(self, prefix: str) -> list[str]:
        return [f"{prefix}{who}" for who in self.approvers]


@workflow.defn
class OutOfStock:
    @workflow.run
    async def run(self) -> None:
        raise ApplicationError("out of stock: blue widgets", type="Stock", non_retryable=True)


async def tideflow(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``tideflow ARGS`` as a subprocess: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *TIDEFLOW_CLI,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def ok(*args: str, env: dict[str, str] | None = None) -> str:
    code, out, err = await tideflow(*args, env=env)
    assert code == 0, (args, out, err)
    return out


@pytest.fixture
async def sqlite_server(tmp_path: Path) -> AsyncIterator[TideflowServer]:
    async with running_server(tmp_path) as server:
        yield server


async def test_workflow_lifecycle(sqlite_server: TideflowServer) -> None:
    address = sqlite_server.address
    queue = new_id("q")
    wid = new_id("approval")
    wf = ["workflow", "--address", address]
    client = await Client.connect(address)
    async with client, Worker(client, task_queue=queue, workflows=[Approval, OutOfStock]):
        started = json.loads(
            await ok(
                *wf,
                "start",
                "-t",
                queue,
                "--type",
                "Approval",
                "-w",
                wid,
                "-i",
                '"laptop"',
                "-i",
                "2",
                "-o",
                "json",
            )
        )
        assert started["workflowId"] == wid and started["runId"]
        described = json.loads(await ok(*wf, "describe", "-w", wid, "-o", "json"))
        assert described["status"] == "RUNNING" and described["input"] == ["laptop", 2]
        assert described["type"] == "Approval" and described["taskQueue"] == queue

        await ok(*wf, "signal", "-w", wid, "--name", "approve", "-i", '"ann"')
        assert json.loads(
            await ok(*wf, "query", "-w", wid, "--name", "approvals", "-i", '"by "')
        ) == ["by ann"]
        # --follow streams events as they come: once it has shown the first signal, a
        # second one closes the run, and the stream ends with the close event.
        streamed_types = await bounded(_follow_while_signalling(wf, wid))
        assert streamed_types[0] == "WorkflowExecutionStarted"
        assert streamed_types[-1] == "WorkflowExecutionCompleted"
        assert streamed_types.count("WorkflowExecutionSignaled") == 2
        result = await ok(*wf, "result", "-w", wid)
        assert json.loads(result) == {"item": "laptop", "approved_by": ["ann", "bob"]}

        table = await ok(*wf, "show", "-w", wid)
        header, _rule, *rows = table.splitlines()
        assert header.split() == ["ID", "TIME", "TYPE", "DETAILS"]
        assert rows[0].split()[:3][0] == "1" and "WorkflowExecutionStarted" in rows[0]
        assert 'input=["laptop",2]' in rows[0]
        signaled = [r for r in rows if "WorkflowExecutionSignaled" in r]
        assert len(signaled) == 2 and 'input=["ann"]' in signaled[0]
        assert all(len(line) <= 200 for line in table.splitlines())
        events = json.loads(await ok(*wf, "show", "-w", wid, "-o", "json"))
        assert [e["eventType"] for e in events] == streamed_types
        assert events[-1]["workflowExecutionCompletedEventAttributes"]["result"] == [
            {"item": "laptop", "approved_by": ["ann", "bob"]}
        ]

        # A failed run: `result` exits non-zero with the failure message.
        code, _, err = await tideflow(*wf, "execute", "-t", queue, "--type", "OutOfStock")
        assert code == 1 and "out of stock: blue widgets" in err and len(err.splitlines()) == 1

        # Cancel and terminate two more runs, then list and count them by query.
        for name in ("cancel", "terminate"):
            await ok(
                *wf,
                "start",
                "-t",
                queue,
                "--type",
                "Approval",
                "-w",
                f"{wid}-{name}",
                "-i",
                '"x"',
                "-i",
                "5",
            )
        await ok(*wf, "cancel", "-w", f"{wid}-cancel", "--reason", "not needed")
        await ok(*wf, "terminate", "-w", f"{wid}-terminate", "--reason", "operator")
        code, _, err = await tideflow(*wf, "result", "-w", f"{wid}-terminate")
        assert code == 1 and "operator" in err
        await eventually(
            lambda: _status(wf, f"{wid}-cancel", "CANCELED"), "the cancelled run closed"
        )
        query = "WorkflowType = 'Approval'"
        listed = json.loads(await ok(*wf, "list", "-q", query, "-o", "json"))
        assert {r["workflowId"]: r["status"] for r in listed} == {
            wid: "COMPLETED",
            f"{wid}-cancel": "CANCELED",
            f"{wid}-terminate": "TERMINATED",
        }
        lines = (await ok(*wf, "list", "-q", query, "-o", "jsonl")).splitlines()
        assert sorted(json.loads(line)["workflowId"] for line in lines) == sorted(
            r["workflowId"] for r in listed
        )
        table = await ok(*wf, "list", "-q", query)
        assert table.splitlines()[0].split()[:3] == ["STATUS", "WORKFLOW", "ID"]
        assert len(table.splitlines()) == 2 + 3
        assert (await ok(*wf, "count", "-q", query)).strip() == "3"
        assert (await ok(*wf, "count", "-q", "ExecutionStatus = 'Failed'")).strip() == "1"


async def _follow_while_signalling(wf: list[str], wid: str) -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        *TIDEFLOW_CLI,
        *wf,
        "show",
        "-w",
        wid,
        "--follow",
        "-o",
        "jsonl",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    types: list[str] = []
    while "WorkflowExecutionSignaled" not in types:
        types.append(json.loads(await proc.stdout.readline())["eventType"])
    await ok(*wf, "signal", "-w", wid, "--name", "approve", "-i", '"bob"')
    async for line in proc.stdout:
        types.append(json.loads(line)["eventType"])
    assert await proc.wait() == 0
    return types


async def _status(wf: list[str], wid: str, status: str) -> bool:
    described: dict[str, Any] = json.loads(await ok(*wf, "describe", "-w", wid, "-o", "json"))
    return bool(described["status"] == status)


async def test_codec_key(sqlite_server: TideflowServer, tmp_path: Path) -> None:
    address = sqlite_server.address
    queue = new_id("q")
    wid = new_id("secret")
    key_file = tmp_path / "key.hex"
    key_file.write_text(KEY.hex() + "\n")
    codec = AESGCMCodec(keys={"k1": KEY}, active_key_id="k1")
    client = await Client.connect(address, data_converter=DataConverter(payload_codec=codec))
    wf = ["workflow", "--address", address]
    keyed = ["--codec-key", f"k1={key_file}"]
    async with client, Worker(client, task_queue=queue, workflows=[Approval]):
        handle = await client.start_workflow(
            Approval.run, args=["diamond", 2], id=wid, task_queue=queue
        )
        # The CLI sends an encrypted signal the worker reads; the key given by env.
        await ok(
            *wf,
            "signal",
            "-w",
            wid,
            "--name",
            "approve",
            "-i",
            '"carol"',
            "--codec-key",
            "k1=env:CLI_KEY",
            env={"CLI_KEY": KEY.hex()},
        )
        await eventually(lambda: _approved(handle, ["carol"]), "the worker read the signal")

        blind = json.loads(await ok(*wf, "describe", "-w", wid, "-o", "json"))
        assert blind["input"] == ["<encrypted: key id k1>"] * 2
        assert "diamond" not in await ok(*wf, "show", "-w", wid)
        assert "<encrypted: key id k1>" in await ok(*wf, "show", "-w", wid)
        assert json.loads(
            await ok(*wf, "query", "-w", wid, "--name", "approvals", "-i", '""', *keyed)
        ) == ["carol"]

        seen = json.loads(await ok(*wf, "describe", "-w", wid, "-o", "json", *keyed))
        assert seen["input"] == ["diamond", 2]
        await ok(*wf, "signal", "-w", wid, "--name", "approve", "-i", '"dan"', *keyed)
        assert json.loads(await ok(*wf, "result", "-w", wid, *keyed)) == {
            "item": "diamond",
            "approved_by": ["carol", "dan"],
        }
        shown = await ok(*wf, "show", "-w", wid, *keyed)
        assert 'input=["diamond",2]' in shown and 'input=["dan"]' in shown
        # A codec server holding the key (Temporal's POST /decode convention) decodes too.
        with codec_server(codec) as endpoint:
            remote = await ok(
                *wf, "describe", "-w", wid, "-o", "json", "--codec-endpoint", endpoint
            )
        assert json.loads(remote)["input"] == ["diamond", 2]
        assert await handle.result() == {"item": "diamond", "approved_by": ["carol", "dan"]}
        code, _, err = await tideflow(*wf, "describe", "-w", wid, "--codec-key", "k1=/nonexistent")
        assert code == 2 and len(err.splitlines()) == 1 and "/nonexistent" in err


@contextmanager
def codec_server(codec: AESGCMCodec) -> Iterator[str]:
    """An HTTP codec server on a free port that encodes and decodes with ``codec``."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            payloads = [payload_from_json(p) for p in body["payloads"]]
            verb = codec.decode if self.path == "/decode" else codec.encode
            answer = {"payloads": [payload_to_json(p) for p in asyncio.run(verb(payloads))]}
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the test's output is the CLI's."""

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


async def _approved(handle: Any, expected: list[str]) -> bool:
    return bool(await handle.query(Approval.approvals, "") == expected)


async def test_errors_are_one_line_exit_2(sqlite_server: TideflowServer) -> None:
    wf = ["workflow", "--address", sqlite_server.address]
    code, out, err = await tideflow(*wf, "describe", "-w", "no-such-workflow")
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("tideflow workflow describe: ") and "no-such-workflow" in err
    code, out, err = await tideflow(
        *wf, "start", "-t", "q", "--type", "T", "-i", "1", "-i", "{nope"
    )
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert "-i/--input #2 is not valid JSON" in err
    dead = f"127.0.0.1:{free_port()}"
    code, out, err = await tideflow(
        "workflow", "list", "--address", dead, "--connect-timeout", "0.5"
    )
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert f"cannot reach a tideflow server at {dead}" in err


async def test_version_and_environment(sqlite_server: TideflowServer) -> None:
    code, out, _ = await tideflow("--version")
    assert code == 0 and out.strip().startswith("tideflow ") and out.strip() != "tideflow"
    # Global flags given before the subcommand; address and namespace from the environment.
    env = {"TIDEFLOW_ADDRESS": sqlite_server.address, "TIDEFLOW_NAMESPACE": "default"}
    assert (await ok("workflow", "count", env=env)).strip() == "0"
    code, _, err = await tideflow(
        "workflow", "-o", "json", "count", env={**env, "TIDEFLOW_NAMESPACE": "nowhere"}
    )
    assert code == 2 and "nowhere" in err and len(err.splitlines()) == 1
    assert json.loads(await ok("workflow", "-o", "json", "count", env=env)) == {"count": 0}


def test_the_workflow_group_talks_only_through_the_sdk() -> None:
    """Like any client: its modules import the SDK and the API, never the server or
    the store (a static check, since ``tideflow.cli`` itself composes the server's
    command group)."""
    cli_dir = Path(__file__).resolve().parent.parent / "cli"
    for name in ("_workflow.py", "_output.py", "_codec.py"):
        tree = ast.parse((cli_dir / name).read_text())
        imported = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
        } | {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        tideflow = {m for m in imported if m.startswith("tideflow")}
        assert tideflow, name
        assert all(m.startswith(("tideflow.worker_sdk", "tideflow.api")) for m in tideflow), (
            name,
            sorted(tideflow),
        )


async def test_mtls_flags(tmp_path: Path) -> None:
    ca = make_ca("cli test CA")
    server_pem, client_pem = issue(ca, "localhost", server=True), issue(ca, "cli", server=False)
    files = {
        "ca.pem": ca[0].cert,
        "cert.pem": client_pem.cert,
        "key.pem": client_pem.key,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    tls = ServerTLSConfig.load(cert=server_pem.cert, key=server_pem.key, client_ca=ca[0].cert)
    async with TideflowServer(f"sqlite:///{tmp_path / 't.db'}", port=0, tls=tls) as server:
        address = f"127.0.0.1:{server.port}"
        trust = ["--tls-ca", str(tmp_path / "ca.pem"), "--tls-server-name", "localhost"]
        mine = ["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]
        assert (await ok("workflow", "count", "--address", address, *trust, *mine)).strip() == "0"
        # Without a client certificate the server refuses the handshake: one line, exit 2.
        code, _, err = await tideflow(
            "workflow", "count", "--address", address, *trust, "--connect-timeout", "1"
        )
        assert code == 2 and len(err.splitlines()) == 1
        assert err.startswith("tideflow workflow count: cannot reach")
