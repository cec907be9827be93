"""The code keeps a shape a reader can hold: no module past ~900 lines (one that long
usually holds two concerns), no function past ~80. What outgrows a limit is split by
meaning, not mechanically; generated code is exempt.

To cover another package, add it to the lists below. A function that genuinely reads
best long goes into ``LONG_FUNCTIONS`` with the reason; keep that list very short.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 900
MAX_FUNCTION_LINES = 80
# Where modules must stay under MAX_MODULE_LINES: packages (every module below them)
# and, for the hand-written modules among generated ones, single files by pattern.
MODULE_LIMIT_PACKAGES = ("server", "history", "worker_sdk", "cli", "tests", "bench", "examples")
MODULE_LIMIT_GLOBS = ("proto/tideflow/api/*.py",)
# Packages whose functions and methods must stay under MAX_FUNCTION_LINES.
FUNCTION_LIMIT_PACKAGES = ("server", "history", "worker_sdk", "cli")
# ``path:name`` of functions allowed past MAX_FUNCTION_LINES, each with its reason.
LONG_FUNCTIONS: dict[str, str] = {}
# Generated files (protoc and its gRPC plugin) say so in their first lines.
_GENERATED_MARKER = "DO NOT EDIT"


def _sources(packages: tuple[str, ...], globs: tuple[str, ...] = ()) -> list[Path]:
    found = {p for package in packages for p in (ROOT / package).rglob("*.py")}
    found |= {p for pattern in globs for p in ROOT.glob(pattern)}
    return [p for p in sorted(found) if not _generated(p)]


def _generated(path: Path) -> bool:
    return _GENERATED_MARKER in path.read_text(encoding="utf-8")[:300]


def _line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def _long_functions(path: Path, limit: int) -> list[str]:
    """``file:line name (n lines)`` for every function or method longer than
    ``limit`` lines, decorators and docstring included; nested ones count on their own
    (and inside the function that holds them)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            assert node.end_lineno is not None
            length = node.end_lineno - first + 1
            allowed = f"{path.relative_to(ROOT)}:{node.name}" in LONG_FUNCTIONS
            if length > limit and not allowed:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_the_checked_packages_exist() -> None:
    # A renamed package must not turn the checks below into checks of nothing.
    for package in {*MODULE_LIMIT_PACKAGES, *FUNCTION_LIMIT_PACKAGES}:
        assert _sources((package,)), f"no Python files under {package}/"
    for pattern in MODULE_LIMIT_GLOBS:
        assert _sources((), (pattern,)), f"no hand-written Python files match {pattern}"


def test_every_allowed_long_function_exists_and_is_long() -> None:
    # An entry outlives its reason once the function is split, renamed or gone.
    for entry in LONG_FUNCTIONS:
        path, name = entry.split(":")
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        lengths = [
            node.end_lineno - node.lineno + 1
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name == name
            and node.end_lineno is not None
        ]
        assert lengths, f"{entry} is allowed to be long but does not exist"
        assert max(lengths) > MAX_FUNCTION_LINES, f"{entry} is short now: drop its entry"


def test_no_module_exceeds_the_line_limit() -> None:
    too_long = [
        f"{p.relative_to(ROOT)} ({n} lines)"
        for p in _sources(MODULE_LIMIT_PACKAGES, MODULE_LIMIT_GLOBS)
        if (n := _line_count(p)) > MAX_MODULE_LINES
    ]
    assert not too_long, (
        f"modules over {MAX_MODULE_LINES} lines (split them by concern): {too_long}"
    )


def test_no_function_exceeds_the_line_limit() -> None:
    too_long = [
        entry
        for p in _sources(FUNCTION_LIMIT_PACKAGES)
        for entry in _long_functions(p, MAX_FUNCTION_LINES)
    ]
    assert not too_long, (
        f"functions over {MAX_FUNCTION_LINES} lines (split them by meaning): {too_long}"
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def f():\n" + "    x = 1\n" * 80, ["f (81 lines)"]),
        ("def f():\n" + "    x = 1\n" * 79, []),
        (
            "class C:\n    @property\n    async def m(self):\n" + "        x = 1\n" * 80,
            ["m (82 lines)"],
        ),
    ],
)
def test_the_function_check_counts_what_it_claims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, expected: list[str]
) -> None:
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    path = tmp_path / "m.py"
    path.write_text(source, encoding="utf-8")
    found = [entry.split(" ", 1)[1] for entry in _long_functions(path, MAX_FUNCTION_LINES)]
    assert found == expected


def test_generated_code_is_exempt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "pkg").mkdir()
    body = "def f():\n" + "    x = 1\n" * 100
    (tmp_path / "pkg" / "gen_pb2.py").write_text("# Generated. DO NOT EDIT!\n" + body)
    (tmp_path / "pkg" / "mine.py").write_text(body)
    assert [p.name for p in _sources(("pkg",))] == ["mine.py"]
