"""``${...}`` expressions in parameters and output, and JSON Schema checks."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema

from ._errors import ExpressionError

_EXPR_RE = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True, slots=True)
class Reference:
    """One parsed ``${...}``: ``root`` is input, tasks or workflow; ``default`` is
    the value after ``??`` (``has_default`` says whether there is one)."""

    text: str
    root: str
    path: tuple[str, ...]
    has_default: bool = False
    default: Any = None

    @property
    def task_id(self) -> str | None:
        return self.path[0] if self.root == "tasks" and self.path else None


def _parse_reference(body: str) -> Reference:
    text = "${" + body + "}"
    expression, marker, fallback = body.partition("??")
    default: Any = None
    if marker:
        try:
            default = json.loads(fallback)
        except ValueError:
            raise ExpressionError(
                f"malformed expression {text}: the default after ?? must be JSON "
                '(0, "text", null, [], ...)'
            ) from None
    parts = expression.strip().split(".")
    if not parts or not all(_SEGMENT_RE.match(p) for p in parts):
        raise ExpressionError(f"malformed expression {text}: use dot-separated names")
    root, path = parts[0], tuple(parts[1:])
    ref = Reference(text, root, path, bool(marker), default)
    if root == "input":
        return ref
    if root == "tasks":
        if len(path) < 2 or path[1] != "result":
            raise ExpressionError(f"malformed expression {text}: use ${{tasks.<id>.result...}}")
        return ref
    if root == "workflow":
        if len(path) != 1 or path[0] not in ("id", "version", "instance_id"):
            raise ExpressionError(
                f"malformed expression {text}: workflow.id, workflow.version or "
                "workflow.instance_id"
            )
        return ref
    raise ExpressionError(f"unknown expression root in {text}: use input, tasks or workflow")


def _templates(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _templates(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _templates(item)


def references(value: Any) -> list[Reference]:
    """Every ``${...}`` in ``value`` (strings, at any depth of dicts and lists)."""
    found = []
    for text in _templates(value):
        for match in _EXPR_RE.finditer(text):
            if match.group(0) != "$${":
                found.append(_parse_reference(match.group(1)))
    return found


class _Missing(ExpressionError):
    """A key or index that is not there (an expression's ``??`` default applies)."""


def _lookup(ref: Reference, context: Mapping[str, Any]) -> Any:
    try:
        return _walk(ref, context)
    except _Missing:
        if ref.has_default:
            return ref.default
        raise


def _walk(ref: Reference, context: Mapping[str, Any]) -> Any:
    if ref.root == "tasks":
        task_id = ref.path[0]
        tasks = context.get("tasks", {})
        if task_id not in tasks:
            raise ExpressionError(f"{ref.text}: task {task_id!r} has no result (yet)")
        current: Any = tasks[task_id]
        steps = ref.path[1:]
        walked = f"tasks.{task_id}"
    else:
        current = context.get(ref.root)
        steps = ref.path
        walked = ref.root
    for step in steps:
        if isinstance(current, Mapping):
            if step not in current:
                raise _Missing(f"{ref.text}: {walked} has no key {step!r}")
            current = current[step]
        elif isinstance(current, list) and step.isdigit():
            index = int(step)
            if index >= len(current):
                raise _Missing(f"{ref.text}: {walked} has {len(current)} items, no index {index}")
            current = current[index]
        else:
            raise ExpressionError(
                f"{ref.text}: {walked} is {type(current).__name__}, cannot take {step!r}"
            )
        walked += f".{step}"
    return current


def _resolve_string(text: str, context: Mapping[str, Any]) -> Any:
    matches = list(_EXPR_RE.finditer(text))
    if not matches:
        return text
    if len(matches) == 1 and matches[0].group(0) != "$${" and matches[0].span() == (0, len(text)):
        return _lookup(_parse_reference(matches[0].group(1)), context)
    out = []
    position = 0
    for match in matches:
        out.append(text[position : match.start()])
        if match.group(0) == "$${":
            out.append("${")
        else:
            value = _lookup(_parse_reference(match.group(1)), context)
            out.append(value if isinstance(value, str) else json.dumps(value))
        position = match.end()
    out.append(text[position:])
    return "".join(out)


def resolve(value: Any, context: Mapping[str, Any]) -> Any:
    """Replace the ``${...}`` expressions in ``value`` (see the module docstring).

    ``context`` is ``{"input": ..., "tasks": {id: {"result": ...}}, "workflow": {...}}``.
    Raises ``ExpressionError``."""
    if isinstance(value, str):
        return _resolve_string(value, context)
    if isinstance(value, Mapping):
        return {k: resolve(v, context) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [resolve(v, context) for v in value]
    return value


# ---------------------------------------------------------------- schemas


def schema_problem(schema: Mapping[str, Any] | None, value: Any) -> str | None:
    """Why ``value`` violates ``schema`` (the most relevant error), or None."""
    if schema is None:
        return None
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = validator_cls(schema)
    best = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if best is None:
        return None
    where = "/".join(str(p) for p in best.absolute_path)
    return f"{best.message}" + (f" (at /{where})" if where else "")


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
