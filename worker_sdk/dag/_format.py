"""The file format: YAML or JSON text of a definition."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from ._errors import DagValidationError, ValidationIssue
from ._workflow import Workflow

# ------------------------------------------------------------ load / dump


# Characters YAML reads as line breaks (or that are not printable) inside plain text.
_YAML_BREAKS = frozenset("\x85\u2028\u2029\x7f\ufeff")


def _yaml_dump(data: Any) -> str:
    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = None
        if any(ch in _YAML_BREAKS or (ord(ch) < 32 and ch != "\n") for ch in value):
            style = '"'  # escaped, so the text reads back exactly
        elif "\n" in value:
            style = "|"
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def dumps(workflow: Workflow, format: str = "yaml") -> str:
    """The definition as YAML (default) or JSON text."""
    data = workflow.to_dict()
    if format == "json":
        return json.dumps(data, indent=2) + "\n"
    if format == "yaml":
        return _yaml_dump(data)
    raise ValueError(f"unknown format {format!r}: use 'yaml' or 'json'")


def loads(text: str, format: str | None = None, *, source: str | None = None) -> Workflow:
    """Parse YAML or JSON text (JSON is YAML, so either works without ``format``).

    ``source`` names the text in error messages (``load`` passes the file name);
    a syntax error names it with the line and column."""
    try:
        data = json.loads(text) if format == "json" else yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as error:
        raise DagValidationError(
            [ValidationIssue(None, f"cannot parse {source or 'definition'}: {_syntax(error)}")]
        ) from None
    return Workflow.from_dict(data)


def _syntax(error: Exception) -> str:
    """Where and what the syntax error is, without PyYAML's ``<unicode string>``."""
    if isinstance(error, json.JSONDecodeError):
        return f"line {error.lineno}, column {error.colno}: {error.msg}"
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        what = "; ".join(part for part in (error.context, error.problem) if part)
        return f"line {mark.line + 1}, column {mark.column + 1}: {what or error}"
    return str(error)


def load(path: str | os.PathLike[str]) -> Workflow:
    """Read a definition from a ``.yaml`` / ``.yml`` / ``.json`` file."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    return loads(text, "json" if p.suffix == ".json" else None, source=str(path))


def dump(workflow: Workflow, path: str | os.PathLike[str]) -> None:
    """Write a definition; the format follows the suffix (``.json`` or YAML)."""
    p = Path(path)
    p.write_text(dumps(workflow, "json" if p.suffix == ".json" else "yaml"), encoding="utf-8")
