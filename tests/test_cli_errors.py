"""``tideflow server start-dev`` that cannot start says why in one line, exit code 2
(it printed a 40-100-line traceback), and the ``tideflow`` entry point composes the
command groups of the layers."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tideflow import cli


def start_dev(*args: str, cwd: Path) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "tideflow.cli", "server", "start-dev", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tideflow server start-dev: "), err
    return lines[0]


def test_port_in_use(tmp_path: Path, busy_port: int) -> None:
    code, out, err = start_dev("--port", str(busy_port), cwd=tmp_path)
    assert code == 2 and out == ""
    assert _one_line(err).endswith(f"cannot listen on 127.0.0.1:{busy_port}: the port is in use")
    # Nothing was created: the address is checked before the database is opened.
    assert not (tmp_path / "tideflow.db").exists()


@pytest.mark.parametrize("ip", ["999.1.1.1", "not-an-ip"])
def test_invalid_ip(tmp_path: Path, ip: str) -> None:
    code, _, err = start_dev("--ip", ip, "--port", "0", cwd=tmp_path)
    assert code == 2
    assert _one_line(err).endswith(f"--ip {ip!r} is not an IP address")


def test_ip_of_another_machine(tmp_path: Path) -> None:
    # 192.0.2.0/24 is reserved for documentation: never an address of this machine.
    code, _, err = start_dev("--ip", "192.0.2.7", "--port", "7999", cwd=tmp_path)
    assert code == 2
    assert "192.0.2.7 is not an address of this machine" in _one_line(err)


def test_unwritable_db(tmp_path: Path) -> None:
    # /proc refuses new files even to root (who may write anywhere else).
    code, _, err = start_dev("--db", "/proc/tideflow-test.db", "--port", "0", cwd=tmp_path)
    assert code == 2
    line = _one_line(err)
    assert line.startswith("tideflow server start-dev: --db /proc/tideflow-test.db: cannot ")


def test_db_in_a_missing_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = start_dev("--db", str(blocker / "x.db"), "--port", "0", cwd=tmp_path)
    assert code == 2
    assert _one_line(err).endswith(f"folder {blocker} does not exist")


def test_db_that_is_not_a_database(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database " * 100)
    code, _, err = start_dev("--db", str(garbage), "--port", "0", cwd=tmp_path)
    assert code == 2
    assert "file is not a database" in _one_line(err)
    assert garbage.read_bytes() == b"not a database " * 100  # left as it was


def test_groups_compose_into_one_parser() -> None:
    assert list(cli.GROUPS) == ["server", "dag", "cluster", "workflow", "site", "schedule"]
    parser = cli.build_parser()
    args = parser.parse_args(["server", "start-dev", "--port", "0"])
    assert args.group == "server" and args.command == "start-dev" and args.port == 0
    args = parser.parse_args(["dag", "status", "run-1", "--json"])
    assert args.group == "dag" and args.command == "status" and args.json
    args = parser.parse_args(["cluster", "describe", "-o", "json"])
    assert args.group == "cluster" and args.command == "describe" and args.output == "json"


def test_server_package_does_not_import_the_sdk() -> None:
    # The server's command group runs on its own: a fresh interpreter that imports it
    # must not load the worker SDK.
    probe = (
        "import sys, tideflow.server._cli; "
        "print(sorted(m for m in sys.modules if m.startswith('tideflow.worker_sdk')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.strip() == "[]"


def test_no_module_level_import_of_the_sdk_in_server_or_of_dag_in_client() -> None:
    import ast

    root = Path(__file__).resolve().parent.parent

    def module_level_imports(path: Path) -> set[str]:
        found: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If):  # if TYPE_CHECKING: counts too
                nodes: list[ast.stmt] = [*node.body, *node.orelse]
            else:
                nodes = [node]
            for inner in nodes:
                if isinstance(inner, ast.Import):
                    found.update(alias.name for alias in inner.names)
                elif isinstance(inner, ast.ImportFrom):
                    found.add("." * inner.level + (inner.module or ""))
        return found

    for path in (root / "server").rglob("*.py"):
        assert not {m for m in module_level_imports(path) if "worker_sdk" in m}, path
    client_imports = module_level_imports(root / "worker_sdk" / "client.py")
    assert not {m for m in client_imports if m in (".dag", "tideflow.worker_sdk.dag")}
