"""Merge the replication traces of a cloud and its edges and let TLC judge each run's
steps against tla/Replication.tla (through tla/TraceReplication.tla).

With ``TIDEFLOW_TRACE_DIR`` set every site writes its replication steps to
``<dir>/replication/<site>.ndjson`` (server/_replication_trace.py). This module reads
all of them, folds each step with its outcome (a batch the store refused is dropped; so is
a step with no outcome: an engine commit that aborted writes none, a crash may leave
one), splits them by run, merges the sites' lines
by the time they were written and writes one TLA+ model per run
(``ReplicationTraceData.tla``: the entries; a cfg; copies of TraceReplication.tla and
Replication.tla), then runs TLC on it:

    python tla/replication_trace_to_tla.py TRACE_DIR             # every run
    python tla/replication_trace_to_tla.py TRACE_DIR --out DIR --no-check

**The order.** Lines are merged by ``time_us``: the sites of the tests run on one
machine, so one clock. Each line is written ahead of the write it describes, hence
before any peer could observe that write (pull the events, apply the forwarded
signal): an observation is always later in the merged order than what it observed.
Sites on different machines would need their clocks' skew below the link's latency.

Exit status: 0 every run's log is a behaviour, 1 TLC rejected one (the run, line and
reason are printed; lines are numbered in the merged order, which ``--out`` writes as
``merged.ndjson`` next to the model), 2 the converter refused the input or TLC failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The sibling module, found through sys.path (tla/ is not a package).
from lease_trace_to_tla import check_all, report
from trace_to_tla import (
    Model,
    TraceError,
    tla_bool,
    tla_int,
    tla_record,
    tla_seq,
    tla_set,
    tla_str,
)

TLA_DIR = Path(__file__).resolve().parent
SPEC_MODULE = "TraceReplication"
SPEC_FILES = ("TraceReplication.tla", "Replication.tla")
DATA_MODULE = "ReplicationTraceData"
FORMAT = 1  # server/_replication_trace.py FORMAT
ACTIONS = (
    "HomeAppend",
    "ApplyBatch",
    "TakeOver",
    "InboxStored",
    "InboxForwarded",
    "InboxRetired",
)
# Replication.tla's event types; every other event of a real history is "OTHER".
# Every closing event but a terminate is the model's COMPLETED (the run closed).
_TYPES = {
    "WORKFLOW_EXECUTION_STARTED": "STARTED",
    "WORKFLOW_EXECUTION_SIGNALED": "SIGNALED",
    "WORKFLOW_EXECUTION_HANDOFF": "HANDOFF",
    "WORKFLOW_EXECUTION_COMPLETED": "COMPLETED",
    "WORKFLOW_EXECUTION_FAILED": "COMPLETED",
    "WORKFLOW_EXECUTION_CANCELED": "COMPLETED",
    "WORKFLOW_EXECUTION_TIMED_OUT": "COMPLETED",
    "WORKFLOW_EXECUTION_CONTINUED_AS_NEW": "COMPLETED",
    "WORKFLOW_EXECUTION_CANCEL_REQUESTED": "CANCEL_REQUESTED",
    "WORKFLOW_EXECUTION_TERMINATED": "TERMINATED",
}


# ------------------------------------------------------------------ reading


def load_lines(directory: Path) -> list[dict[str, Any]]:
    """Every step of every site under ``directory`` (a TIDEFLOW_TRACE_DIR or its
    ``replication`` folder) that happened, each with its outcome as ``commit``."""
    folder = directory / "replication" if (directory / "replication").is_dir() else directory
    steps: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.ndjson")):
        pending: dict[int, dict[str, Any]] = {}
        for index, text in enumerate(path.read_text().splitlines(), start=1):
            if not text.strip():
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{path.name}:{index}: not JSON ({exc})") from exc
            if raw.get("format") != FORMAT:
                raise TraceError(f"{path.name}:{index}: format {raw.get('format')!r}")
            if "commit" in raw:
                step = pending.pop(raw["seq"], None)
                if step is None:
                    raise TraceError(f"{path.name}:{index}: an outcome of no pending step")
                step["commit"] = raw["commit"]
                steps.append(step)
            else:
                if raw.get("action") not in ACTIONS:
                    raise TraceError(f"{path.name}:{index}: unknown action {raw.get('action')!r}")
                pending[raw["seq"]] = {**raw, "_file": path.name, "_index": index}
    return steps


def happened(step: Mapping[str, Any]) -> bool:
    """Committed, or (a batch) applied by the store."""
    return step.get("commit") in ("ok", "applied")


def by_run(lines: Iterable[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """run -> the steps that happened, in the merged order (module docstring)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for raw in lines:
        if happened(raw):
            runs.setdefault(str(raw["run"]), []).append(dict(raw))
    key = lambda r: (r["time_us"], r["site"], r["seq"])  # noqa: E731
    return {run: sorted(found, key=key) for run, found in sorted(runs.items())}


# ------------------------------------------------------------------ writing


def _event(e: Mapping[str, Any]) -> str:
    return tla_record(
        [
            ("id", tla_int(e["id"])),
            ("type", tla_str(_TYPES.get(str(e["type"]), "OTHER"))),
            ("epoch", tla_int(e["epoch"])),
            ("sid", tla_str(str(e.get("sid", "")))),
            ("from", tla_str(str(e.get("from", "")))),
            ("to", tla_str(str(e.get("to", "")))),
            ("newEpoch", tla_int(e.get("new_epoch", 0))),
        ]
    )


@dataclass(frozen=True)
class Entry:
    line: int
    act: str
    site: str
    peer: str = ""
    sid: str = ""
    events: tuple[Mapping[str, Any], ...] = ()
    basis: int = 0
    state: bool = False
    buffered: tuple[str, ...] = ()
    kind: str = ""  # an inbox step's request kind: signal, cancel, terminate
    home: str = ""  # InboxStored: the home the request was addressed to

    def tla(self) -> str:
        start = self.events[0]["id"] if self.events else 0
        return tla_record(
            [
                ("line", tla_int(self.line)),
                ("act", tla_str(self.act)),
                ("site", tla_str(self.site)),
                ("peer", tla_str(self.peer)),
                ("sid", tla_str(self.sid)),
                ("home", tla_str(self.home)),
                ("basis", tla_int(self.basis)),
                ("state", tla_bool(self.state)),
                ("buffered", tla_set(tla_str(b) for b in self.buffered)),
                ("start", tla_int(start)),
                ("events", tla_seq(_event(e) for e in self.events)),
            ]
        )


def entries_of(ordered: Sequence[Mapping[str, Any]]) -> tuple[str, list[Entry]]:
    """The run's initial home and the spec's steps. Replication.tla's Init is the
    run's first commit (its STARTED event at the initial home), so the first step
    starts at event 2."""
    if not ordered or ordered[0]["action"] != "HomeAppend":
        raise TraceError("a run's trace must start with the home's first commit")
    first = ordered[0]["events"]
    if not first or first[0]["id"] != 1 or first[0]["type"] != "WORKFLOW_EXECUTION_STARTED":
        raise TraceError("a run's first commit must append WORKFLOW_EXECUTION_STARTED")
    if first[0]["epoch"] != 1:
        raise TraceError(f"the run starts with epoch {first[0]['epoch']}, the model with 1")
    out: list[Entry] = []
    for number, raw in enumerate(ordered, start=1):
        events = tuple(raw.get("events", ()))
        if number == 1:
            events = events[1:]
        peer = str(raw.get("peer", raw.get("to", "")))
        sid, basis = str(raw.get("sid", "")), int(raw.get("basis", 0))
        # A home transition always shows its state's buffered signals; a batch only
        # when it carried the state.
        state = raw["action"] == "HomeAppend" or bool(raw.get("state"))
        buffered = tuple(str(b) for b in raw.get("buffered", ()))
        kind = str(raw.get("kind", ""))
        if kind not in ("", "signal", "cancel", "terminate"):
            raise TraceError(f"step {number}: unknown request kind {kind!r}")
        out.append(
            Entry(
                number,
                raw["action"],
                raw["site"],
                peer,
                sid,
                events,
                basis,
                state,
                buffered,
                kind,
                str(raw.get("home", "")),
            )
        )
    return str(ordered[0]["site"]), out


def to_tla(entries: Sequence[Entry], source: str = "") -> str:
    body = ",\n    ".join(e.tla() for e in entries)
    return (
        f"{'-' * 4} MODULE {DATA_MODULE} {'-' * 4}\n"
        f"(* Generated by tla/replication_trace_to_tla.py from {source or 'traces'}; "
        "do not edit. *)\n"
        "EXTENDS Naturals, Sequences\n\n"
        f"TraceLog == <<\n    {body}\n    >>\n"
        f"{'=' * 8}\n"
    )


def request_sets(entries: Sequence[Entry]) -> dict[str, set[str]]:
    """The run's request ids by kind (Replication.tla's Signals, Cancels and
    Terminates), from its inbox steps and the events that carry one."""
    found: dict[str, set[str]] = {"signal": set(), "cancel": set(), "terminate": set()}
    for e in entries:
        if e.sid:
            found[e.kind or "signal"].add(e.sid)
        for ev in e.events:
            if ev.get("sid"):
                kind = "cancel" if str(ev["type"]).endswith("CANCEL_REQUESTED") else "signal"
                found[kind].add(str(ev["sid"]))
    # Buffered ids are signals unless the log shows them cancel requests.
    buffered = {b for e in entries for b in e.buffered}
    found["signal"].update(buffered - found["cancel"] - found["terminate"])
    mixed = (found["signal"] & (found["cancel"] | found["terminate"])) | (
        found["cancel"] & found["terminate"]
    )
    if mixed:
        raise TraceError(f"request ids of two kinds: {sorted(mixed)}")
    return found


def to_cfg(home: str, entries: Sequence[Entry], sites: Iterable[str], source: str = "") -> str:
    requests = request_sets(entries)
    handoffs = sum(1 for e in entries for ev in e.events if ev["type"].endswith("HANDOFF"))
    return (
        f"\\* Generated by tla/replication_trace_to_tla.py from {source or 'traces'}\n"
        "CONSTANTS\n"
        '    Mutant = "none"\n'
        f"    Clusters = {tla_set(tla_str(s) for s in sorted(sites))}\n"
        f"    InitialHome = {tla_str(home)}\n"
        f"    Signals = {tla_set(tla_str(s) for s in sorted(requests['signal']))}\n"
        f"    Cancels = {tla_set(tla_str(s) for s in sorted(requests['cancel']))}\n"
        f"    Terminates = {tla_set(tla_str(s) for s in sorted(requests['terminate']))}\n"
        # The trace's own counts: the bounds never bind, the trace alone decides.
        f"    MaxHandoffs = {handoffs}\n"
        "    NetCapacity = 1\n"
        "INIT TraceInit\n"
        "NEXT TraceNext\n"
        "INVARIANTS SingleHome ReplicaIsPrefix NoForkOnHandoff SignalsAtMostOnce "
        "CancelAtMostOnce ClosedIsLast TraceConsumed\n"
    )


@dataclass(frozen=True)
class RunModel:
    model: Model
    run: str
    entries: tuple[Entry, ...]
    lines: tuple[dict[str, Any], ...]


def write_model(
    ordered: Sequence[Mapping[str, Any]],
    run: str,
    directory: Path,
    sites: Iterable[str],
    source: str = "",
) -> RunModel:
    """One run's merged steps as a TraceReplication model in ``directory`` (also
    ``merged.ndjson``: the steps in the order TLC numbers them)."""
    home, entries = entries_of(ordered)
    directory.mkdir(parents=True, exist_ok=True)
    what = f"{source or 'replication traces'}, run {run}"
    (directory / f"{DATA_MODULE}.tla").write_text(to_tla(entries, what))
    cfg = directory / f"{SPEC_MODULE}.cfg"
    cfg.write_text(to_cfg(home, entries, sites, what))
    (directory / "merged.ndjson").write_text(
        "".join(
            json.dumps({k: v for k, v in raw.items() if not k.startswith("_")}) + "\n"
            for raw in ordered
        )
    )
    for name in SPEC_FILES:
        shutil.copyfile(TLA_DIR / name, directory / name)
    model = Model(directory=directory, module=SPEC_MODULE, cfg=cfg, lines=len(entries))
    return RunModel(model, run, tuple(entries), tuple(dict(r) for r in ordered))


# -------------------------------------------------------------------- TLC
# verdict_of, check and check_all are tla/lease_trace_to_tla.py's (the same verdicts).


def write_models(
    lines: Sequence[Mapping[str, Any]], workdir: Path, source: str = ""
) -> list[RunModel]:
    """A model per run of ``lines`` (every site's), under ``workdir``."""
    sites = {str(raw["site"]) for raw in lines}
    return [
        write_model(steps, run, workdir / f"run-{n}", sites, source)
        for n, (run, steps) in enumerate(by_run(lines).items(), start=1)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", type=Path, help="a TIDEFLOW_TRACE_DIR or its replication/")
    parser.add_argument("--out", type=Path, help="write the models here (one folder a run)")
    parser.add_argument("--no-check", action="store_true", help="only write the models")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="replication-trace-"))
    try:
        models = write_models(load_lines(args.traces), out, str(args.traces))
        if args.no_check:
            print(f"models written to {out}")
            return 0
        verdicts = check_all(models)
    except (TraceError, FileNotFoundError, KeyError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    return report((model.run, verdict) for model, verdict in zip(models, verdicts, strict=True))


if __name__ == "__main__":
    sys.exit(main())
