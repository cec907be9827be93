"""Text views of definitions and runs: graph, DOT, status table, progress lines."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from . import _graph
from ._durations import format_duration
from ._model import Task, TaskStatus, WorkflowStatus
from ._state import StepState, Transition, WorkflowInstance
from ._workflow import Workflow

# ------------------------------------------------------------- rendering


def _short(value: Any, width: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def _clock(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3]


def render_table(instance: WorkflowInstance) -> str:
    """A text table of the task states (what ``tideflow dag status`` prints)."""
    header = (
        f"DAG {instance.workflow_id} v{instance.workflow_version}  run {instance.id}  "
        f"status {instance.status.value}"
        + (f" ({instance.phase})" if instance.phase not in ("executing", "done") else "")
    )
    rows = [("TASK", "STATUS", "ATTEMPTS", "STARTED", "ENDED", "WHERE", "RESULT / ERROR")]
    for tid, st in instance.task_states.items():
        detail = (
            str(st.error)
            if st.error is not None and st.status is not TaskStatus.COMPLETED
            else ("" if st.result is None else _short(st.result, 48))
        )
        if st.status is TaskStatus.RETRY and st.next_retry_time is not None:
            detail = f"retry at {_clock(st.next_retry_time)}; last: {st.error}"
        rows.append(
            (
                tid,
                st.status.value,
                f"{st.attempts}/{st.max_attempts}",
                _clock(st.start_time),
                _clock(st.end_time),
                st.executed_at or "-",
                _short(detail, 60),
            )
        )
        if st.compensation is not None:
            comp = st.compensation
            rows.append(
                (
                    f"  ↳ compensate ({comp.executor})",
                    comp.status.value,
                    f"{comp.attempts}/{comp.max_attempts}",
                    _clock(comp.start_time),
                    _clock(comp.end_time),
                    comp.executed_at or "-",
                    _short(str(comp.error) if comp.error else "", 60),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [header]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if instance.failed_tasks:
        lines.append(f"failed tasks: {', '.join(instance.failed_tasks)}")
    if instance.skipped_tasks:
        lines.append(f"skipped tasks: {', '.join(instance.skipped_tasks)}")
    if instance.error is not None:
        lines.append(f"error: {instance.error}")
    if instance.status is WorkflowStatus.COMPLETED:
        lines.append(f"output: {_short(instance.output, 200)}")
    return "\n".join(lines)


def _levels(wf: Workflow) -> dict[str, int]:
    return _graph.depths({t.id: t.dependencies for t in wf.tasks}, wf.topological_order())


def render_graph(wf: Workflow) -> str:
    """The DAG as text, one line per task grouped by depth, with its dependencies."""
    level = _levels(wf)
    lines = [
        f"{wf.id} v{wf.version}: {len(wf.tasks)} tasks, failure policy {wf.failure_policy.value}"
    ]
    stages: dict[int, list[Task]] = {}
    for task in wf.tasks:  # one pass: a deep chain has as many stages as tasks
        stages.setdefault(level[task.id], []).append(task)
    for depth in sorted(stages):
        lines.append(f"stage {depth}:")
        for task in stages[depth]:
            extras = []
            if task.timeout is not None:
                extras.append(f"timeout {format_duration(task.timeout)}")
            if task.retry_policy.max_attempts > 1:
                extras.append(f"{task.retry_policy.max_attempts} attempts")
            if task.compensation is not None:
                extras.append(f"compensation {task.compensation.executor}")
            after = f" <- {', '.join(task.dependencies)}" if task.dependencies else ""
            suffix = f"  ({'; '.join(extras)})" if extras else ""
            lines.append(f"  {task.id} [{task.executor}]{after}{suffix}")
    edges = [(d, t.id) for t in wf.tasks for d in t.dependencies]
    lines.append("edges:")
    lines.extend(f"  {a} -> {b}" for a, b in edges)
    if not edges:
        lines.append("  (none)")
    return "\n".join(lines)


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_dot(wf: Workflow) -> str:
    """The DAG in Graphviz DOT (compensations as dashed nodes)."""
    lines = [
        f"digraph {_dot_quote(wf.id)} {{",
        "  rankdir=LR;",
        f"  label={_dot_quote(f'{wf.id} v{wf.version}')};",
        "  node [shape=box, style=rounded];",
    ]
    for task in wf.tasks:
        label = f"{task.id}\\n[{task.executor}]"
        lines.append(f'  {_dot_quote(task.id)} [label="{label}"];')
    for task in wf.tasks:
        for dep in task.dependencies:
            lines.append(f"  {_dot_quote(dep)} -> {_dot_quote(task.id)};")
    for task in wf.tasks:
        if task.compensation is not None:
            node = f"{task.id}/compensation"
            lines.append(
                f'  {_dot_quote(node)} [label="undo {task.id}\\n[{task.compensation.executor}]"'
                ", style=dashed];"
            )
            lines.append(f"  {_dot_quote(task.id)} -> {_dot_quote(node)} [style=dashed];")
    lines.append("}")
    return "\n".join(lines)


class ProgressPrinter:
    """Turns successive ``WorkflowInstance`` snapshots into progress lines: every
    transition of the run, its tasks and their compensations, once, in the order the
    interpreter made them (what ``tideflow dag run --wait`` prints)."""

    def __init__(self) -> None:
        self._printed: dict[str, int] = {}
        self._observed: set[tuple[str, int | None]] = set()
        self._closed = False

    def update(self, instance: WorkflowInstance) -> list[str]:
        """Lines for what changed since the previous call."""
        origin = instance.start_time
        entries: list[tuple[float, str]] = []

        def stamp(moment: datetime | None) -> str:
            if moment is None or origin is None:
                return "   ...  "
            return f"{(moment - origin).total_seconds():7.2f}s"

        def collect(label: str, transitions: list[Transition], step: StepState | None) -> None:
            recorded = [t for t in transitions if not t.observed]
            done = self._printed.get(label, 0)
            for t in recorded[done:]:
                if t.status == TaskStatus.RUNNING and (label, t.attempt) in self._observed:
                    continue
                entries.append((float(t.seq or 0), self._line(stamp(t.time), label, t, step)))
            self._printed[label] = len(recorded)
            last_seq = float(recorded[-1].seq or 0) if recorded else 0.0
            for t in transitions:
                if t.observed and (label, t.attempt) not in self._observed:
                    self._observed.add((label, t.attempt))
                    entries.append((last_seq + 0.5, self._line(stamp(t.time), label, t, step)))

        collect("workflow", instance.transitions, None)
        for tid, st in instance.task_states.items():
            collect(tid, st.transitions, st)
            if st.compensation is not None:
                collect(f"{tid} (undo)", st.compensation.transitions, st.compensation)
        entries.sort(key=lambda entry: entry[0])
        lines = [line for _, line in entries]
        if instance.done and not self._closed:
            self._closed = True
            if instance.status is WorkflowStatus.COMPLETED:
                lines.append(f"output: {_short(instance.output, 200)}")
            elif instance.error is not None:
                lines.append(f"error: {instance.error}")
        return lines

    @staticmethod
    def _line(when: str, label: str, t: Transition, step: StepState | None) -> str:
        line = f"[{when}] {label:<24} {t.status:<9}"
        if step is not None and t.attempt is not None:
            line += f" attempt {t.attempt}/{step.max_attempts}"
        if step is not None and t.status == TaskStatus.RUNNING:
            where = [w for w in (step.executed_at, step.worker) if w]
            if where:
                line += f" on {' / '.join(where)}"
        if t.note:
            line += f"  {t.note}"
        return line.rstrip()
