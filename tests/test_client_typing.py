"""The client's typed API, checked by mypy: ``tests/typing/check_client_types.py``
pins inferred result types with ``assert_type`` and marks misuse that must stay a
type error (strict mode's unused-ignore check makes those markers assertions)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ROOT / "tests" / "typing" / "check_client_types.py"


def _package_tree(root: Path) -> Path:
    """mypy cannot follow the editable install's import hook: lay the sources out as
    the installed ``tideflow`` package (as ``make typecheck`` does)."""
    package = root / "tideflow"
    package.mkdir(parents=True)
    for name in ("__init__.py", "py.typed"):
        (package / name).symlink_to(ROOT / "proto" / "tideflow" / name)
    (package / "api").symlink_to(ROOT / "proto" / "tideflow" / "api")
    for folder in ("server", "history", "worker_sdk"):
        (package / folder).symlink_to(ROOT / folder)
    return root


@pytest.mark.slow
def test_mypy_infers_results_and_rejects_misuse(tmp_path: Path) -> None:
    tree = _package_tree(tmp_path / "tree")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            str(CHECKED),
        ],
        cwd=tree,
        env={**os.environ, "MYPYPATH": str(tree)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found in 1 source file" in result.stdout
