"""Architecture rules that the folder layout promises (README "Folder map", CONTRIBUTING.md):

- ``tideflow.history`` imports neither ``tideflow.server`` nor ``tideflow.worker_sdk``;
- the worker SDK never imports the server;
- only the ``tideflow`` namespace is installed;
- each package's public names are pinned, so changing them is a deliberate act.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tideflow.history
import tideflow.server
import tideflow.worker_sdk

ROOT = Path(__file__).resolve().parent.parent


def _imports(folder: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / folder).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
    return found


def test_history_imports_neither_server_nor_sdk() -> None:
    bad = {
        m for m in _imports("history") if m.startswith(("tideflow.server", "tideflow.worker_sdk"))
    }
    assert not bad, f"history must not import {bad}"


def test_sdk_never_imports_server() -> None:
    bad = {m for m in _imports("worker_sdk") if m.startswith("tideflow.server")}
    assert not bad, f"worker_sdk must not import {bad}"


def test_only_the_tideflow_namespace_is_packaged() -> None:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "tideflow" or p.startswith("tideflow.") for p in config["packages"])
    assert set(config["package-dir"]) <= set(config["packages"])


def test_public_api_is_pinned() -> None:
    assert tideflow.worker_sdk.__all__ == [
        "Client",
        "DataConverter",
        "JSONPayloadConverter",
        "PayloadConverter",
        "ReplayResult",
        "Replayer",
        "RetryPolicy",
        "Worker",
        "WorkerInterceptor",
        "WorkflowExecutionDescription",
        "WorkflowExecutionStatus",
        "WorkflowHandle",
        "WorkflowHistory",
        "WorkflowIDConflictPolicy",
        "WorkflowIDReusePolicy",
        "activity",
        "exceptions",
        "workflow",
    ]
    assert tideflow.server.__all__ == ["Clock", "ServerConfig", "SystemClock", "TideflowServer"]
    assert sorted(tideflow.history.__all__) == tideflow.history.__all__
    for package in (tideflow.worker_sdk, tideflow.server, tideflow.history):
        for name in package.__all__:
            assert hasattr(package, name), f"{package.__name__}.{name} is exported but missing"


def test_issue_contract_imports() -> None:
    from tideflow.worker_sdk import Client, RetryPolicy, Worker, activity, workflow  # noqa: F401
    from tideflow.worker_sdk.exceptions import (  # noqa: F401
        ActivityError,
        ApplicationError,
        NonDeterminismError,
        WorkflowFailureError,
    )

    assert callable(workflow.defn) and callable(workflow.run) and callable(activity.defn)
    for name in ("sleep", "execute_activity", "start_activity", "now", "random", "uuid4", "info"):
        assert callable(getattr(workflow, name))
    for name in ("info", "heartbeat", "is_cancelled"):
        assert callable(getattr(activity, name))
