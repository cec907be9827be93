"""Merge the shard-lease traces of several server nodes and let TLC judge each shard's
log against tla/ShardLease.tla (through tla/TraceShardLease.tla).

With ``TIDEFLOW_TRACE_DIR`` set every node writes its lease steps to
``<dir>/shards/<node id>.ndjson`` (server/_trace.py ``LeaseTracer``). This module reads
all of them, splits them by shard, puts each shard's lines in the store's order and
writes one TLA+ model per shard (``LeaseTraceData.tla``: the entries; a cfg; copies of
TraceShardLease.tla and ShardLease.tla), then runs TLC on it:

    python tla/lease_trace_to_tla.py TRACE_DIR                # every shard
    python tla/lease_trace_to_tla.py TRACE_DIR --shard 3 --out DIR --no-check

**The order.** Nodes' clocks order nothing here (they may be skewed, and a line is
written after its commit returned, so even one clock would not give the commit order).
What the store orders is the shard row: each acquisition bumps its range id, and every
traced step records the range id the store had when the step committed (an
acquisition the one it read and replaced; a renewal or release the one its ``WHERE
range_id`` matched; an append, a fenced write or a refused renewal the one the store
read in that transaction). So the lines of a shard are sorted by that range id (an
"epoch"), and within an epoch: the appends, renewals and refusals (they commute: none
changes what another one reads; one node's lines keep their file order), then the
release (an append a node submitted before it released may commit after the release:
it commutes with it, the release changing nothing the fence reads), then the
acquisition that ends the epoch. A refused release happened in a later epoch (the range
id moved): it goes after the next acquisition.

Exit status: 0 every shard's log is a behaviour of the spec, 1 TLC rejected one (the
shard, line and reason are printed; lines are numbered in the merged order, which
``--out`` writes as ``merged.ndjson`` next to the model), 2 the converter refused the
input (an unknown action or format, a missing field) or TLC failed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The sibling module, found through sys.path (tla/ is not a package).
from trace_to_tla import (
    Model,
    TraceError,
    Verdict,
    tla2tools_jar,
    tla_int,
    tla_record,
    tla_set,
    tla_str,
    tlc_command,
)

TLA_DIR = Path(__file__).resolve().parent
SPEC_MODULE = "TraceShardLease"
SPEC_FILES = ("TraceShardLease.tla", "ShardLease.tla")
DATA_MODULE = "LeaseTraceData"
LEASE_FORMAT = 2  # server/_trace.py LeaseTracer.FORMAT
NO_NODE = "none"  # ShardLease.tla NoNode
# Within one epoch (range id): the steps that commute, the release, the acquisition.
_BODY, _RELEASE, _ACQUIRE = 1, 2, 3
_REJECTED = re.compile(r'<<\s*"TRACE REJECTED",\s*"line",\s*(\d+),\s*"([^"]*)"')
_VIOLATED = re.compile(r"(?:Invariant|Action property) (\w+) is violated")
_STATE_L = re.compile(r"/\\ l = (\d+)")
_STATES = re.compile(r"([\d,]+) distinct states found")


@dataclass(frozen=True)
class Entry:
    """One step of TraceShardLease: ``line`` is the lease line's number in the
    shard's merged order (an acquisition gives up to three entries)."""

    line: int
    act: str
    node: str
    read: int = 0
    range: int = 0
    current: int = 0

    def tla(self) -> str:
        return tla_record(
            [
                ("line", tla_int(self.line)),
                ("act", tla_str(self.act)),
                ("node", tla_str(self.node)),
                ("read", tla_int(self.read)),
                ("range", tla_int(self.range)),
                ("current", tla_int(self.current)),
            ]
        )


# ------------------------------------------------------------------ reading


def load_lines(directory: Path) -> list[dict[str, Any]]:
    """Every lease line of every node under ``directory`` (a TIDEFLOW_TRACE_DIR or its
    ``shards`` folder), each with ``_index``: its position in its node's file."""
    folder = directory / "shards" if (directory / "shards").is_dir() else directory
    lines: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.ndjson")):
        for index, text in enumerate(path.read_text().splitlines(), start=1):
            if not text.strip():
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{path.name}:{index}: not JSON ({exc})") from exc
            lines.append({**raw, "_index": index, "_file": path.name})
    return lines


def _need(raw: Mapping[str, Any], *names: str) -> None:
    for name in names:
        if not isinstance(raw.get(name), int) or isinstance(raw.get(name), bool):
            raise TraceError(
                f"{raw.get('_file', '?')}:{raw.get('_index', '?')}: {raw.get('action')} "
                f"without an integer {name!r}"
            )


def order_key(raw: Mapping[str, Any]) -> tuple[int, int, str, int]:
    """Where the store put the step: (epoch, place within it, node, file position)."""
    if raw.get("format") != LEASE_FORMAT:
        raise TraceError(
            f"{raw.get('_file', '?')}:{raw.get('_index', '?')}: lease trace format "
            f"{raw.get('format')!r}, expected {LEASE_FORMAT}"
        )
    action = raw.get("action")
    node = str(raw.get("node", ""))
    if not node or node == NO_NODE:
        raise TraceError(f"{raw.get('_file')}:{raw.get('_index')}: node id {node!r}")
    tail = (node, int(raw.get("_index", 0)))
    if action == "AcquireShard":
        _need(raw, "read_range", "expires_at", "now")
        if raw.get("range") is None:
            return (raw["read_range"], _BODY, *tail)
        _need(raw, "range")
        return (raw["read_range"], _ACQUIRE, *tail)
    if action == "RenewLease":
        _need(raw, "range")
        if raw.get("ok"):
            return (raw["range"], _BODY, *tail)
        _need(raw, "current")
        return (raw["current"], _BODY, *tail)
    if action == "ReleaseShard":
        _need(raw, "range")
        if raw.get("ok"):
            return (raw["range"], _RELEASE, *tail)
        return (raw["range"] + 1, _BODY, *tail)
    if action == "AppendEvent":
        _need(raw, "range", "current")
        return (raw["current"], _BODY, *tail)
    if action == "FencedWrite":
        _need(raw, "held", "current")
        return (raw["current"], _BODY, *tail)
    raise TraceError(f"{raw.get('_file')}:{raw.get('_index')}: unknown lease action {action!r}")


def by_shard(lines: Iterable[Mapping[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """shard -> its lines in the store's order (module docstring)."""
    shards: dict[int, list[dict[str, Any]]] = {}
    for raw in lines:
        order_key(raw)  # refuses a malformed line before anything is written
        shards.setdefault(int(raw["shard"]), []).append(dict(raw))
    return {shard: sorted(found, key=order_key) for shard, found in sorted(shards.items())}


def entries_of(ordered: Sequence[Mapping[str, Any]]) -> list[Entry]:
    """The spec's steps for one shard's merged lines."""
    out: list[Entry] = []
    for number, raw in enumerate(ordered, start=1):
        node, action = str(raw["node"]), raw["action"]
        if action == "AcquireShard":
            read = raw["read_range"]
            if raw.get("range") is None:
                out.append(Entry(number, "AcquireFailed", node, read=read))
                continue
            previous = str(raw.get("previous_owner", ""))
            # It took another node's row: that lease lapsed by this node's clock.
            if previous not in ("", node) and raw["expires_at"] < raw["now"]:
                out.append(Entry(number, "Lapse", node))
            out.append(Entry(number, "ReadShard", node, read=read))
            out.append(Entry(number, "AcquireShard", node, read=read, range=raw["range"]))
        elif action == "RenewLease":
            if raw.get("ok"):
                out.append(Entry(number, "RenewLease", node, range=raw["range"]))
            else:
                act = "RenewRefused"
                out.append(Entry(number, act, node, range=raw["range"], current=raw["current"]))
        elif action == "ReleaseShard":
            act = "ReleaseShard" if raw.get("ok") else "ReleaseRefused"
            out.append(Entry(number, act, node, range=raw["range"]))
        elif action == "AppendEvent":
            out.append(Entry(number, action, node, range=raw["range"], current=raw["current"]))
        else:  # FencedWrite
            out.append(Entry(number, action, node, range=raw["held"], current=raw["current"]))
    return out


# ------------------------------------------------------------------ writing


def to_tla(entries: Sequence[Entry], source: str = "") -> str:
    body = ",\n    ".join(e.tla() for e in entries)
    return (
        f"{'-' * 4} MODULE {DATA_MODULE} {'-' * 4}\n"
        f"(* Generated by tla/lease_trace_to_tla.py from {source or 'lease traces'}; "
        "do not edit. *)\n"
        "EXTENDS Naturals, Sequences\n\n"
        f"TraceLog == <<\n    {body}\n    >>\n"
        f"{'=' * 8}\n"
    )


def to_cfg(entries: Sequence[Entry], source: str = "") -> str:
    acts = Counter(e.act for e in entries)
    nodes = tla_set(tla_str(n) for n in sorted({e.node for e in entries}))
    return (
        f"\\* Generated by tla/lease_trace_to_tla.py from {source or 'lease traces'}\n"
        "CONSTANTS\n"
        '    Mutant = "none"\n'
        f"    Nodes = {nodes}\n"
        # The trace's own counts: the budgets never bind, the trace alone decides.
        f"    MaxEvents = {acts['AppendEvent']}\n"
        f"    MaxFaults = {acts['ReleaseShard']}\n"
        f"    MaxLateRenewals = {acts['Lapse']}\n"
        "INIT TraceInit\n"
        "NEXT TraceNext\n"
        "INVARIANTS TypeOK AtMostOneWriter NoStaleAppend TraceConsumed\n"
        "PROPERTY IsShardLeaseStep\n"
    )


@dataclass(frozen=True)
class ShardModel:
    model: Model
    shard: int
    entries: tuple[Entry, ...]
    lines: tuple[dict[str, Any], ...]


def write_model(
    ordered: Sequence[Mapping[str, Any]], shard: int, directory: Path, source: str = ""
) -> ShardModel:
    """One shard's merged lines as a TraceShardLease model in ``directory`` (also
    ``merged.ndjson``: the lines in the order TLC numbers them)."""
    entries = entries_of(ordered)
    if not entries:
        raise TraceError(f"shard {shard}: no lease lines")
    directory.mkdir(parents=True, exist_ok=True)
    what = f"{source or 'lease traces'}, shard {shard}"
    (directory / f"{DATA_MODULE}.tla").write_text(to_tla(entries, what))
    cfg = directory / f"{SPEC_MODULE}.cfg"
    cfg.write_text(to_cfg(entries, what))
    (directory / "merged.ndjson").write_text(
        "".join(
            json.dumps({k: v for k, v in raw.items() if not k.startswith("_")}) + "\n"
            for raw in ordered
        )
    )
    for name in SPEC_FILES:
        shutil.copyfile(TLA_DIR / name, directory / name)
    model = Model(directory=directory, module=SPEC_MODULE, cfg=cfg, lines=len(entries))
    return ShardModel(model, shard, tuple(entries), tuple(dict(r) for r in ordered))


# -------------------------------------------------------------------- TLC


class Step(Protocol):
    """An entry of a generated trace (this module's, or
    tla/replication_trace_to_tla.py's): the line it came from and its action."""

    @property
    def line(self) -> int: ...

    @property
    def act(self) -> str: ...


class Checked(Protocol):
    """A written model and its entries, as ``check`` needs them."""

    @property
    def model(self) -> Model: ...

    @property
    def entries(self) -> Sequence[Step]: ...


def verdict_of(exit_code: int, output: str, seconds: float, entries: Sequence[Step]) -> Verdict:
    """What TLC says about a trace model (TraceShardLease, TraceReplication)."""
    counts = _STATES.findall(output)
    states = int(counts[-1].replace(",", "")) if counts else None
    violated = _VIOLATED.search(output)
    if exit_code == 12 and violated is not None and violated.group(1) == "TraceConsumed":
        return Verdict("accepted", exit_code, seconds, states=states, output=output)
    if exit_code in (12, 13) and violated is not None:
        # The error trace ends in the state the bad step reached: l is one past it.
        reached = [int(v) for v in _STATE_L.findall(output)]
        entry = entries[reached[-1] - 2] if reached and reached[-1] >= 2 else None
        return Verdict(
            "rejected",
            exit_code,
            seconds,
            states=states,
            line=entry.line if entry else None,
            action=entry.act if entry else None,
            reason=f"{violated.group(1)} violated",
            output=output,
        )
    found = _REJECTED.search(output)
    if exit_code == 0 and found is not None:
        end = output.find("\nModel checking completed", found.start())
        return Verdict(
            "rejected",
            exit_code,
            seconds,
            states=states,
            line=int(found.group(1)),
            action=found.group(2),
            reason=output[found.start() : end if end != -1 else len(output)].strip(),
            output=output,
        )
    return Verdict(
        "error", exit_code, seconds, reason=f"TLC exited with {exit_code}", output=output
    )


def check(shard_model: Checked, *, jar: Path | None = None, timeout: float = 600) -> Verdict:
    """Run TLC on a written model (needs ``java``)."""
    if shutil.which("java") is None:
        raise FileNotFoundError("java is not installed: TLC cannot run (install a JRE 11+)")
    started = time.monotonic()
    model = shard_model.model
    with tempfile.TemporaryDirectory(prefix="tlc-meta-") as metadir:
        proc = subprocess.run(
            tlc_command(jar or tla2tools_jar(), model, metadir),
            cwd=model.directory,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    seconds = time.monotonic() - started
    return verdict_of(proc.returncode, proc.stdout + proc.stderr, seconds, shard_model.entries)


def validate_lines(
    lines: Iterable[Mapping[str, Any]],
    workdir: Path,
    *,
    jar: Path | None = None,
    shards: Iterable[int] | None = None,
    jobs: int = 2,
) -> dict[int, Verdict]:
    """Merge ``lines`` (every node's), write a model per shard (or per shard of
    ``shards``) under ``workdir`` and check them, ``jobs`` TLC runs at a time."""
    merged = by_shard(lines)
    wanted = sorted(merged if shards is None else shards)
    models = [write_model(merged[s], s, workdir / f"shard-{s}") for s in wanted]
    return dict(zip(wanted, check_all(models, jar=jar, jobs=jobs), strict=True))


def check_all(
    models: Sequence[Checked], *, jar: Path | None = None, jobs: int = 2
) -> list[Verdict]:
    """Check written models, ``jobs`` TLC runs at a time; the verdicts in order."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda m: check(m, jar=jar), models))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", type=Path, help="a TIDEFLOW_TRACE_DIR or its shards/ folder")
    parser.add_argument("--shard", type=int, action="append", help="only this shard (repeat)")
    parser.add_argument("--out", type=Path, help="write the models here (one folder a shard)")
    parser.add_argument("--no-check", action="store_true", help="only write the models")
    args = parser.parse_args(argv)
    try:
        lines = load_lines(args.traces)
        if args.no_check:
            merged = by_shard(lines)
            out = args.out or Path(tempfile.mkdtemp(prefix="lease-trace-"))
            for shard in args.shard or sorted(merged):
                write_model(merged[shard], shard, out / f"shard-{shard}", str(args.traces))
            print(f"models written to {out}")
            return 0
        with tempfile.TemporaryDirectory(prefix="lease-trace-") as tmp:
            verdicts = validate_lines(lines, args.out or Path(tmp), shards=args.shard)
    except (TraceError, FileNotFoundError, KeyError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    return report((f"shard {shard}", verdict) for shard, verdict in verdicts.items())


def report(verdicts: Iterable[tuple[str, Verdict]]) -> int:
    """Print one line per labelled verdict; the command's exit code (0 all accepted,
    1 one rejected, 2 TLC failed)."""
    worst = 0
    for label, verdict in verdicts:
        if verdict.accepted:
            print(f"{label}: accepted ({verdict.states} states, {verdict.seconds:.1f} s)")
        elif verdict.status == "rejected":
            print(f"{label}: REJECTED at line {verdict.line} ({verdict.action}):")
            print(f"  {verdict.reason}")
            worst = max(worst, 1)
        else:
            print(f"{label}: TLC failed ({verdict.reason})\n{verdict.output[-3000:]}")
            worst = 2
    return worst


if __name__ == "__main__":
    sys.exit(main())
