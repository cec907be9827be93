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

Their fixtures live in conftest.py: ``jar`` (the TLC jar; without ``java`` the tests
skip, except with ``CI=true``, where they fail) and ``trace_dir`` (trace mode on for
every server the test starts: each module marks ``usefixtures("trace_dir")``, so it is
on before conftest's ``server`` starts). Waiting polls conditions (no
fixed sleeps synchronize anything).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from tideflow.worker_sdk import (
    activity,
)

ROOT = Path(__file__).resolve().parent.parent


def load_tla_module(name: str) -> ModuleType:
    """The script ``tla/<name>.py`` as a module (tla/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tla" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


t2t = load_tla_module("trace_to_tla")


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


@dataclass(frozen=True, slots=True)
class Corrupted:
    """A corrupted copy of a real trace (written as ``name``.ndjson) and where TLC must
    reject it: at ``line``, for a reason containing each of ``reason``."""

    name: str
    lines: Sequence[Mapping[str, Any]]
    line: int
    reason: tuple[str, ...] = ()


def real_accepted_all_corrupted_rejected(
    jar: Path,
    workdir: Path,
    trace: Path,
    corrupted: Sequence[Corrupted],
    deps: Mapping[str, set[str]] | None = None,
) -> None:
    """The real trace is accepted and each corrupted copy of it is rejected where it
    says; all checked in one ``validate`` call (``deps``: the DAG's dependencies)."""
    copies = [(write_lines(workdir / f"{c.name}.ndjson", c.lines), deps) for c in corrupted]
    verdicts = validate(jar, workdir, [(trace, deps), *copies])
    assert_accepted(verdicts[0], trace)
    for verdict, copy in zip(verdicts[1:], corrupted, strict=True):
        assert_rejected(verdict, copy.line, *copy.reason)


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
    copy = Corrupted(name, corrupted, line, reason)
    real_accepted_all_corrupted_rejected(jar, workdir, trace, [copy])


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
