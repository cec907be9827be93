"""Trace validation, shared by the ``tla`` suites (test_tla_traces.py,
test_tla_activity_traces.py, test_tla_crash_and_dag_traces.py).

Each test runs a real end-to-end scenario against a real server (over SQLite and
over PostgreSQL: conftest's ``server`` / ``store_url``) with ``TIDEFLOW_TRACE_DIR``
set (server/_trace.py writes every transition of each run ahead of its commit, then
the commit's outcome), converts the run's trace with tla/trace_to_tla.py and runs
TLC on tla/TraceEngine.tla. A trace is accepted when TLC reports the invariant
``TraceConsumed`` violated (exit 12): every line was a step of the spec, with the
logged events, rows and state. Real traces corrupted on purpose must be rejected
(TLC exit 0, the line and reason printed).

A test module imports the fixtures ``jar`` (the TLC jar; without ``java`` the tests
skip, except with ``CI=true``, where they fail) and ``trace_dir`` (autouse: trace
mode on for every server the test starts) from here. Waiting polls conditions (no
fixed sleeps synchronize anything).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tideflow.api.v1.history_pb2 import EventType
from tideflow.worker_sdk import (
    activity,
)

ROOT = Path(__file__).resolve().parent.parent


ET = EventType


def _load_converter() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trace_to_tla", ROOT / "tla" / "trace_to_tla.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


t2t = _load_converter()


@pytest.fixture(scope="session")
def jar() -> Path:
    """The TLC jar; needs java (CI=true: a missing java fails, elsewhere it skips)."""
    if shutil.which("java") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("java is not installed: TLC cannot validate traces (CI=true)")
        pytest.skip("java is not installed: TLC cannot validate traces (install a JRE 11+)")
    path: Path = t2t.tla2tools_jar()
    return path


@pytest.fixture(autouse=True)
def trace_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Trace mode on for servers started by this test (in this process or children);
    autouse, so it is on before conftest's ``server`` starts."""
    directory = tmp_path / "traces"
    monkeypatch.setenv("TIDEFLOW_TRACE_DIR", str(directory))
    return directory


def traces_of(directory: Path, workflow_id: str) -> list[Path]:
    """The traces of every run of ``workflow_id`` (one file per run)."""
    return sorted(directory.glob(f"{workflow_id}__*.ndjson"))


def trace_of(directory: Path, workflow_id: str) -> Path:
    found = traces_of(directory, workflow_id)
    assert len(found) == 1, f"traces of {workflow_id!r}: {found}"
    return found[0]


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The transitions of a trace, one per line (written ahead of their commit, with
    the commit's outcome on a line of its own, folded here as the converter does)."""
    lines: list[dict[str, Any]] = t2t.load_trace(path)
    return lines


def write_lines(path: Path, lines: Sequence[Mapping[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def actions(path: Path) -> Counter[str]:
    return Counter(line["action"] for line in read_lines(path))


Job = tuple[Path, Mapping[str, set[str]] | None]


def validate(jar: Path, workdir: Path, jobs: Sequence[Job]) -> list[Any]:
    """Convert each trace and run TLC on it, two JVMs at a time; returns the verdicts."""

    def one(index: int) -> Any:
        trace, deps = jobs[index]
        model = t2t.write_model(trace, workdir / f"model-{index}-{trace.stem[:40]}", deps=deps)
        return t2t.check(model, jar=jar)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(one, range(len(jobs))))


def assert_accepted(verdict: Any, trace: Path, *, one_path: bool = True) -> None:
    lines = len(read_lines(trace))
    assert verdict.status == "accepted", (
        f"{trace.name}: {verdict.status} at line {verdict.line} ({verdict.action}):\n"
        f"{verdict.reason or verdict.output[-4000:]}"
    )
    assert verdict.exit_code == 12 and "TraceConsumed" in verdict.output
    if one_path:
        # One state per line plus the initial one: TLC walked the whole trace.
        assert verdict.states == lines + 1, (verdict.states, lines)


def assert_rejected(verdict: Any, line: int, *reason: str) -> None:
    assert verdict.status == "rejected", f"{verdict.status}: {verdict.output[-3000:]}"
    assert verdict.exit_code == 0 and "TraceConsumed" not in verdict.output
    assert verdict.line == line, (verdict.line, verdict.reason)
    for part in reason:
        assert part in verdict.reason, verdict.reason


def real_accepted_corrupted_rejected(
    jar: Path,
    workdir: Path,
    trace: Path,
    corrupted: Sequence[Mapping[str, Any]],
    name: str,
    line: int,
    *reason: str,
) -> None:
    """The real trace is accepted and the corrupted copy of it (written as ``name``)
    is rejected at ``line`` for ``reason``; both checked in one ``validate`` call."""
    copy = write_lines(workdir / f"{name}.ndjson", corrupted)
    accepted, rejected = validate(jar, workdir, [(trace, None), (copy, None)])
    assert_accepted(accepted, trace)
    assert_rejected(rejected, line, *reason)


def first_index(
    lines: Sequence[Mapping[str, Any]], test: Callable[[Mapping[str, Any]], bool]
) -> int:
    for index, line in enumerate(lines):
        if test(line):
            return index
    raise AssertionError("no such line in the trace")


class Gates:
    """Events the activities wait on, made anew by each test (an asyncio.Event must
    not outlive the event loop of the test that used it)."""

    stalled = asyncio.Event()
    running = asyncio.Event()
    release = asyncio.Event()

    @classmethod
    def reset(cls) -> None:
        cls.stalled, cls.running, cls.release = asyncio.Event(), asyncio.Event(), asyncio.Event()


@activity.defn
async def hangs(key: str) -> str:
    """Every attempt outlives its timeouts; released when the test ends."""
    await Gates.release.wait()
    return "too late"
