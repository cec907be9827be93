"""Issue 15's "works from a fresh install": the wheel ``pip`` builds from the source
tree (in an isolated build environment, as ``pip install .`` does), unpacked on its own
and used from a folder outside the tree, runs a server with its web UI, HTTP API,
metrics and health check, a worker, and the CLI. This catches what the editable
install of the test venv cannot: a file the package does not ship (the UI's page and
script, the .proto files) or an import that only resolves inside the source tree.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest
from helpers import TIDEFLOW_CLI, Processes, bounded, free_port

REPO = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT_S = 300

HELLO = """
import asyncio, sys
from tideflow.worker_sdk import Client, Worker, workflow

@workflow.defn
class Hello:
    @workflow.run
    async def run(self, name: str) -> str:
        return f"hello {name}"

async def main() -> None:
    client = await Client.connect(sys.argv[1])
    async with client, Worker(client, task_queue="fresh", workflows=[Hello]):
        print(await client.execute_workflow(Hello.run, "wheel", id="fresh-1", task_queue="fresh"))

asyncio.run(main())
"""


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of the tree as it is now (committed or not, ignored files left out),
    built from a copy so the build leaves nothing in the tree."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.decode()
    source = tmp_path / "source"
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO / name).read_bytes())
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)],
        check=True,
        capture_output=True,
        timeout=BUILD_TIMEOUT_S,
    )
    (wheel,) = dist.glob("tideflow-*.whl")
    return wheel


def http_get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=30) as response:
        kind = response.headers.get("Content-Type", "")
        return int(response.status), kind, response.read().decode()


async def output(cwd: Path, *argv: str) -> str:
    """The stdout of ``argv`` run in ``cwd`` (outside the source tree), which must succeed."""
    done = await asyncio.to_thread(
        subprocess.run, list(argv), cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return done.stdout


@pytest.mark.slow
async def test_the_wheel_runs_server_ui_worker_and_cli(
    tmp_path: Path, procs: Processes, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = await asyncio.to_thread(build_wheel, tmp_path)
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    # The unpacked wheel first on the path; the test venv supplies only the dependencies.
    monkeypatch.setenv("PYTHONPATH", str(site))
    imports = "import tideflow.server, tideflow.cli; print(tideflow.server.__file__)"
    where = (await output(tmp_path, sys.executable, "-c", imports)).strip()
    assert Path(where).is_relative_to(site), where

    port, ui_port, metrics_port = free_port(), free_port(), free_port()
    server = procs.spawn(
        "server",
        [
            *TIDEFLOW_CLI,
            *("server", "start-dev", "--db", str(tmp_path / "fresh.db"), "--port", str(port)),
            *("--ui-port", str(ui_port), "--metrics-port", str(metrics_port)),
        ],
    )
    await procs.wait_for_line(server, "tideflow web UI on http://")
    ui = f"http://127.0.0.1:{ui_port}"
    page = await asyncio.to_thread(http_get, f"{ui}/")
    assert page[0] == 200 and "/ui/app.js" in page[2]
    script = await asyncio.to_thread(http_get, f"{ui}/ui/app.js")
    assert script[0] == 200 and "javascript" in script[1] and "function runView" in script[2]
    openapi = json.loads((await asyncio.to_thread(http_get, f"{ui}/api/v1/openapi.json"))[2])
    assert "/api/v1/namespaces/{namespace}/workflows/{workflow_id}" in openapi["paths"]
    health = await asyncio.to_thread(http_get, f"http://127.0.0.1:{metrics_port}/healthz")
    assert health[0] == 200

    address = f"127.0.0.1:{port}"
    (tmp_path / "hello.py").write_text(HELLO)
    worker = procs.spawn("hello", [sys.executable, str(tmp_path / "hello.py"), address])
    assert await bounded(asyncio.to_thread(worker.popen.wait)) == 0, worker.tail()
    assert worker.out.read_text().strip() == "hello wheel"
    cli = [*TIDEFLOW_CLI, "workflow", "--address", address]
    (run,) = json.loads(await output(tmp_path, *cli, "list", "-o", "json"))
    assert (run["workflowId"], run["status"]) == ("fresh-1", "COMPLETED")
    assert (await output(tmp_path, *TIDEFLOW_CLI, "--version")).startswith("tideflow 0.1")
