"""Architecture rules that the folder layout promises (README "Folder map", CONTRIBUTING.md):

- ``tideflow.history`` imports neither ``tideflow.server`` nor ``tideflow.worker_sdk``;
- the worker SDK never imports the server, and a client that imports the SDK loads
  neither the server nor SQLAlchemy (checked in a fresh interpreter);
- the server never imports the SDK;
- the modules of ``tideflow.worker_sdk`` import each other without cycles;
- only the ``tideflow`` namespace is installed;
- each package's public names are pinned, so changing them is a deliberate act.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import tideflow.history
import tideflow.server
import tideflow.worker_sdk
from tideflow.worker_sdk import common

ROOT = Path(__file__).resolve().parent.parent


def _imports(folder: str, skip: set[str] | None = None) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / folder).rglob("*.py"):
        if skip and str(path.relative_to(ROOT / folder)) in skip:
            continue
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


# SDK modules that import the server on purpose, inside a function, with the reason.
SERVER_IMPORTED_ON_PURPOSE: dict[str, str] = {
    "testing.py": (
        "WorkflowEnvironment.start_local / start_time_skipping run a server in this "
        "process (issue 15), imported when called: importing the module loads no server "
        "(test_importing_the_sdk_loads_neither_sqlalchemy_nor_the_server)"
    ),
}


def test_sdk_never_imports_server() -> None:
    bad = {
        m
        for m in _imports("worker_sdk", skip=set(SERVER_IMPORTED_ON_PURPOSE))
        if m.startswith("tideflow.server")
    }
    assert not bad, f"worker_sdk must not import {bad}"
    tree = ast.parse((ROOT / "worker_sdk" / "testing.py").read_text())
    top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert not [n for n in top_level if "server" in ast.unparse(n)], "testing.py: lazily only"


def test_server_never_imports_sdk() -> None:
    # Any import counts, in a function or under TYPE_CHECKING too: the server is
    # deployed without the SDK's users in mind, and the CLI that joins them lives above.
    bad = {m for m in _imports("server") if m.startswith("tideflow.worker_sdk")}
    assert not bad, f"server must not import {bad}"


def _modules_loaded_by(module: str) -> set[str]:
    """``sys.modules`` after importing ``module`` in a fresh interpreter (this process
    has long imported everything)."""
    code = f"import sys\nimport {module}\nprint(*sorted(sys.modules), sep='\\n')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"importing {module} failed:\n{result.stderr}"
    return set(result.stdout.split())


def _under(modules: set[str], *packages: str) -> set[str]:
    return {m for m in modules if any(m == p or m.startswith(p + ".") for p in packages)}


@pytest.mark.parametrize(
    "module",
    [
        "tideflow.worker_sdk",
        "tideflow.worker_sdk.client",
        "tideflow.worker_sdk.worker",
        "tideflow.worker_sdk.workflow",
        "tideflow.worker_sdk.dag",
        "tideflow.worker_sdk.testing",
    ],
)
def test_importing_the_sdk_loads_neither_sqlalchemy_nor_the_server(module: str) -> None:
    loaded = _modules_loaded_by(module)
    assert module in loaded
    bad = _under(loaded, "sqlalchemy", "asyncpg", "tideflow.server", "tideflow.history")
    assert not bad, f"importing {module} loads {sorted(bad)[:10]}"


@pytest.mark.parametrize("module", ["tideflow.server", "tideflow.history"])
def test_importing_the_server_loads_no_sdk(module: str) -> None:
    loaded = _modules_loaded_by(module)
    assert module in loaded
    bad = _under(loaded, "tideflow.worker_sdk")
    assert not bad, f"importing {module} loads {sorted(bad)}"


# ------------------------------------------------------------- import cycles

SDK = "tideflow.worker_sdk"

# Imports inside a function that close a cycle on purpose, with the reason. Such an
# import runs when the function is called, long after both modules finished loading,
# so it cannot fail half-way; it is still a dependency the wrong way round, which is
# why each one is listed here instead of every function-level import being exempt.
# The same edge at module level is a cycle all the same.
LAZY_ON_PURPOSE: dict[tuple[str, str], str] = {
    (f"{SDK}.client", f"{SDK}.dag"): (
        "Client.start_dag / get_dag_handle are thin aliases of the DAG layer, which "
        "sits on top of the client (issue 10)"
    ),
}


@dataclass(frozen=True, slots=True)
class _Edge:
    importer: str
    imported: str
    line: int
    in_function: bool


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT / "worker_sdk").with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([SDK, *parts])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(
    node: ast.AST, in_function: bool = False
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Import statements that run, with whether they run inside a function. Code under
    ``if TYPE_CHECKING:`` never runs, so its imports cannot form a cycle."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, in_function
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for orelse in child.orelse:
                yield from _runtime_imports(orelse, in_function)
        else:
            nested = in_function or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            yield from _runtime_imports(child, nested)


def _sdk_import_graph() -> tuple[set[str], list[_Edge]]:
    files = {_module_name(p): p for p in (ROOT / "worker_sdk").rglob("*.py")}
    edges: list[_Edge] = []
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, in_function in _runtime_imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    # ``from .x``: relative to the package the module is in (a
                    # package's ``__init__`` is in the package itself).
                    anchor = name.split(".")
                    drop = node.level - 1 if is_package else node.level
                    base = ".".join(anchor[: len(anchor) - drop])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                # ``from pkg import sub`` imports the submodule; ``from mod import name``
                # the module.
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names
                ]
            for target in targets:
                # The deepest SDK module named: ``import a.b.c`` loads a.b.c.
                while target not in files and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in files and target != name:
                    edges.append(_Edge(name, target, node.lineno, in_function))
    return set(files), edges


def _counted(edges: list[_Edge]) -> dict[str, dict[str, _Edge]]:
    """The import graph as the cycle check sees it: the edges of LAZY_ON_PURPOSE are
    left out where every import of that pair is inside a function."""
    module_level = {(e.importer, e.imported) for e in edges if not e.in_function}
    graph: dict[str, dict[str, _Edge]] = {}
    for e in edges:
        pair = (e.importer, e.imported)
        if pair in LAZY_ON_PURPOSE and pair not in module_level:
            continue
        graph.setdefault(e.importer, {}).setdefault(e.imported, e)
    return graph


def _cycles(modules: set[str], graph: dict[str, dict[str, _Edge]]) -> list[list[_Edge]]:
    """One shortest cycle through each module that is on a cycle, without repeats."""
    found: dict[frozenset[tuple[str, str]], list[_Edge]] = {}
    for start in sorted(modules):
        # Breadth-first from ``start``: the first way back to it is a shortest cycle.
        came_by: dict[str, _Edge] = {}
        frontier = [start]
        closing: _Edge | None = None
        while frontier and closing is None:
            following: list[str] = []
            for module in frontier:
                for target, edge in sorted(graph.get(module, {}).items()):
                    if target == start:
                        closing = edge
                        break
                    if target not in came_by:
                        came_by[target] = edge
                        following.append(target)
                if closing is not None:
                    break
            frontier = following
        if closing is None:
            continue
        path = [closing]
        while path[0].importer != start:
            path.insert(0, came_by[path[0].importer])
        found.setdefault(frozenset((e.importer, e.imported) for e in path), path)
    return list(found.values())


def _describe(cycle: list[_Edge]) -> str:
    steps = [
        f"{e.importer} -> {e.imported} (line {e.line}{', in a function' if e.in_function else ''})"
        for e in cycle
    ]
    return "\n    ".join(steps)


def test_the_import_graph_sees_the_imports_that_matter() -> None:
    # Guards the checker itself: a parser that found no edges would pass trivially.
    modules, edges = _sdk_import_graph()
    pairs = {(e.importer, e.imported) for e in edges}
    assert {f"{SDK}.client", f"{SDK}.worker", f"{SDK}.workflow"} <= modules
    assert (f"{SDK}.worker", f"{SDK}.client") in pairs
    assert (f"{SDK}._workflow_instance", f"{SDK}.workflow") in pairs
    assert (f"{SDK}", f"{SDK}.workflow") in pairs  # ``from . import workflow``
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\n")
    assert [n for n, _ in _runtime_imports(tree)][1:] == []
    lazy = ast.parse("def f():\n    import x\n")
    assert [in_function for _, in_function in _runtime_imports(lazy)] == [True]


def test_no_import_cycles_in_the_sdk() -> None:
    modules, edges = _sdk_import_graph()
    cycles = _cycles(modules, _counted(edges))
    assert not cycles, "import cycles in tideflow.worker_sdk:\n  " + "\n  ".join(
        _describe(c) for c in cycles
    )


def test_the_workflow_api_imports_nothing_from_its_implementation() -> None:
    # The runtime contract (workflow._Runtime) points from the implementation to the
    # API; even a lazy import back would be a hidden cycle. The API module may use the
    # SDK's leaf modules only.
    _, edges = _sdk_import_graph()
    used = {e.imported for e in edges if e.importer == f"{SDK}.workflow"}
    leaves = ("activity", "common", "exceptions", "placement", "_workflow_inputs")
    assert used <= {f"{SDK}.{leaf}" for leaf in leaves}, used


def test_public_api_is_pinned() -> None:
    assert tideflow.worker_sdk.__all__ == [
        "AESGCMCodec",
        "Client",
        "DataConverter",
        "JSONPayloadConverter",
        "PayloadCodec",
        "PayloadCodecChain",
        "PayloadCodecError",
        "PayloadConverter",
        "ReplayResult",
        "Replayer",
        "RetryPolicy",
        "TLSConfig",
        "Worker",
        "WorkerInterceptor",
        "WorkflowExecutionDescription",
        "WorkflowExecutionStatus",
        "WorkflowHandle",
        "WorkflowHistory",
        "WorkflowIDConflictPolicy",
        "WorkflowIDReusePolicy",
        "ZlibCodec",
        "ZstdCodec",
        "activity",
        "decode_history",
        "exceptions",
        "workflow",
    ]
    assert tideflow.server.__all__ == [
        "AuthConfig",
        "AuthMode",
        "Authorizer",
        "ClaimMapper",
        "Clock",
        "DefaultAuthorizer",
        "JWTConfig",
        "PermissionsClaimMapper",
        "Principal",
        "Role",
        "ServerConfig",
        "ServerTLSConfig",
        "SkippingClock",
        "SystemClock",
        "TideflowServer",
        "TimeSkipper",
        "UpstreamTLSConfig",
    ]
    assert sorted(tideflow.worker_sdk.__all__) == tideflow.worker_sdk.__all__
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
    for name in (
        "sleep",
        "execute_activity",
        "start_activity",
        "execute_local_activity",
        "now",
        "random",
        "uuid4",
        "info",
    ):
        assert callable(getattr(workflow, name))
    for name in ("info", "heartbeat", "is_cancelled"):
        assert callable(getattr(activity, name))


def test_dag_design_names_stay_under_dag() -> None:
    # The DAG model has its own RetryPolicy (max_attempts=1: no retry) and
    # WorkflowInstance (a DAG run); at the top level the SDK's names mean the SDK's.
    import tideflow.worker_sdk.dag as dag

    assert tideflow.worker_sdk.RetryPolicy is common.RetryPolicy
    assert dag.RetryPolicy.__module__.startswith(f"{SDK}.dag")
    assert not hasattr(tideflow.worker_sdk, "WorkflowInstance")
    for name in dir(tideflow.worker_sdk):
        value = getattr(tideflow.worker_sdk, name)
        defined_in = getattr(value, "__module__", None) or ""
        if isinstance(value, type) or callable(value):
            assert not defined_in.startswith(f"{SDK}.dag"), f"{name} comes from {defined_in}"
            assert not defined_in.startswith(f"{SDK}._dag"), f"{name} comes from {defined_in}"
