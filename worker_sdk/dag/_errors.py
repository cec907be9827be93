"""What is wrong with a definition or an expression."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ValidationIssue:
    """One problem with a definition; ``task_id`` is None for workflow-level ones."""

    task_id: str | None
    message: str

    def __str__(self) -> str:
        return self.message


class DagValidationError(ValueError):
    """A definition is invalid. ``issues`` lists every problem; each message names
    its task (``task 'load-data': depends on unknown task 'extract'``)."""

    def __init__(self, issues: Sequence[ValidationIssue], workflow_id: str | None = None) -> None:
        self.issues = list(issues)
        self.workflow_id = workflow_id
        head = f"invalid DAG {workflow_id!r}" if workflow_id else "invalid DAG"
        lines = "\n".join(f"  - {issue.message}" for issue in self.issues)
        super().__init__(f"{head}:\n{lines}")


class ExpressionError(ValueError):
    """A ``${...}`` expression is malformed or cannot be resolved."""
