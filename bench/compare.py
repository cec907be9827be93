"""tideflow against DBOS Transact, in one run, alternating, medians of 3.

Runs ``bench/throughput.py`` (tideflow) and the DBOS peer program (its path in
``--dbos-program``, by default ``/work/shared/peers/bench_dbos.py``; threads mode, DBOS's
best on this machine) one after the other, ``--rounds`` times per store, and prints
the ratio table of issue 13: ten-step workflows (activities/s against DBOS steps/s),
one-step workflows, and the start-to-result p50 of one-step workflows started one at
a time. Each side runs on a fresh database per round (a new SQLite file; a new
PostgreSQL database next to ``--pg-url``'s, dropped afterwards).

DBOS is not a dependency of tideflow: it lives in a virtualenv of its own, whose
interpreter ``--dbos-python`` names. tideflow's SQLite server runs with
``--sqlite-synchronous FULL`` unless told otherwise (the durability the issue asks for;
DBOS's SQLite database runs synchronous=FULL too)::

    python3 -m venv build/dbos-venv
    build/dbos-venv/bin/pip install dbos==3.4.0
    .venv/bin/python bench/compare.py --dbos-python build/dbos-venv/bin/python
    .venv/bin/python bench/compare.py --stores sqlite --rounds 1 --workflows 100

The table is Markdown on stdout; each measurement is also printed as a JSON line on
stderr as it finishes. tideflow's per-role CPU (milliseconds per activity in the
server, worker and client processes) comes with it: on a shared machine it is the
figure that moves least with other load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
_DEFAULT_DBOS_PROGRAM = "/work/shared/peers/bench_dbos.py"

Measurement = dict[str, Any]


def _last_json(output: str) -> Measurement:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError("no JSON line in the output")
    parsed: Measurement = json.loads(lines[-1])
    return parsed


def run_tideflow(store_url: str | None, args: argparse.Namespace) -> Measurement:
    argv = [sys.executable, str(_HERE / "throughput.py"), "--workflows", str(args.workflows)]
    argv += ["--concurrency", str(args.concurrency)]
    if store_url:
        argv += ["--db-url", store_url]
    if args.nodes:
        argv += ["--nodes", str(args.nodes)]
    if args.workers:
        argv += ["--workers", str(args.workers)]
    if not store_url:
        argv += ["--sqlite-synchronous", args.sqlite_synchronous]
    if args.local_activities:
        argv.append("--local-activities")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"throughput.py failed with {done.returncode}")
    return _last_json(done.stdout)


def run_dbos(store_url: str | None, args: argparse.Namespace) -> Measurement:
    argv = [args.dbos_python, args.dbos_program, "--mode", "threads", "--runs", "1"]
    argv += ["--db", store_url or "sqlite", "--n1", str(args.dbos_n1)]
    argv += ["--n10", str(args.workflows), "--nlat", "50", "--nlat10", "10"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"the DBOS program failed with {done.returncode}")
    run: Measurement = _last_json(done.stdout)["per_run"][0]
    return run


# What the table compares: (row, tideflow figure, DBOS figure, higher is better).
_Row = tuple[str, Callable[[Measurement], float], Callable[[Measurement], float], bool]
_ROWS: list[_Row] = [
    (
        "10-step workflows: activities/s vs steps/s",
        lambda t: float(t["ten_activities"]["activities_per_s"]),
        lambda d: float(d["tput10_steps_per_s"]),
        True,
    ),
    (
        "1-step workflows: workflows/s",
        lambda t: float(t["one_activity"]["workflows_per_s"]),
        lambda d: float(d["tput1_wf_per_s"]),
        True,
    ),
    (
        "1-step, one at a time: start-to-result p50 ms",
        lambda t: float(t["one_activity_serial"]["p50_ms"]),
        lambda d: float(d["lat1_p50_ms"]),
        False,
    ),
    (
        "1-step, one at a time, eager workflow start: start-to-result p50 ms",
        lambda t: float(t["one_activity_serial_eager_start"]["p50_ms"]),
        lambda d: float(d["lat1_p50_ms"]),
        False,
    ),
]


# With --local-activities: the same shapes with the steps as local activities (the
# counterpart of a DBOS step: run in the worker inside the workflow task, recorded as
# a marker), in rows of their own.
_LOCAL_ROWS: list[_Row] = [
    (
        "10-step workflows of local activities: activities/s vs steps/s",
        lambda t: float(t["ten_local_activities"]["activities_per_s"]),
        lambda d: float(d["tput10_steps_per_s"]),
        True,
    ),
    (
        "1-step local activity, one at a time: start-to-result p50 ms",
        lambda t: float(t["one_local_activity_serial"]["p50_ms"]),
        lambda d: float(d["lat1_p50_ms"]),
        False,
    ),
]


def _cpu_row(runs: Sequence[Measurement]) -> str:
    """tideflow's median CPU ms per activity by role, for the ten-step shape."""
    per_run = [r["ten_activities"].get("cpu_ms_per_activity", {}) for r in runs]
    parts = [f"{role} {statistics.median(cpu[role] for cpu in per_run):.2f}" for role in per_run[0]]
    return ", ".join(parts)


def table(results: dict[str, tuple[list[Measurement], list[Measurement]]]) -> str:
    lines = [
        "| store | measure | tideflow | DBOS | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for store, (ours, theirs) in results.items():
        local = _LOCAL_ROWS if all("one_local_activity_serial" in r for r in ours) else []
        for label, of_ours, of_theirs, higher_better in [*_ROWS, *local]:
            mine = statistics.median(of_ours(r) for r in ours)
            peer = statistics.median(of_theirs(r) for r in theirs)
            ratio = mine / peer if higher_better else peer / mine
            lines.append(f"| {store} | {label} | {mine:.1f} | {peer:.1f} | {ratio:.2f}x |")
        lines.append(f"| {store} | tideflow CPU ms/activity (10-step) | {_cpu_row(ours)} | | |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    stores = {"sqlite": None, "postgresql": args.pg_url}
    results: dict[str, tuple[list[Measurement], list[Measurement]]] = {}
    for name in args.stores.split(","):
        if name not in stores:
            raise SystemExit(f"--stores: {name!r} is neither sqlite nor postgresql")
        ours: list[Measurement] = []
        theirs: list[Measurement] = []
        for round_ in range(args.rounds):
            # Alternating, so slow phases of a shared machine hit both sides alike.
            for side, runner, into in (
                ("tideflow", run_tideflow, ours),
                ("dbos", run_dbos, theirs),
            ):
                measured = runner(stores[name], args)
                into.append(measured)
                line = {"store": name, "round": round_ + 1, "engine": side, **measured}
                print(json.dumps(line), file=sys.stderr, flush=True)
        results[name] = (ours, theirs)
    configuration = "start-dev" if not args.nodes else f"{args.nodes} node(s)"
    print(
        f"tideflow {configuration}, {args.workers or 'one per node'} worker process(es), "
        f"concurrency {args.concurrency}, SQLite synchronous={args.sqlite_synchronous}; "
        f"DBOS threads mode; medians of {args.rounds}\n"
    )
    print(table(results), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dbos-python", default="build/dbos-venv/bin/python")
    parser.add_argument("--dbos-program", default=_DEFAULT_DBOS_PROGRAM)
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workflows", type=int, default=200, help="ten-step workflows per run")
    parser.add_argument("--dbos-n1", type=int, default=200, help="DBOS one-step workflows")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument(
        "--local-activities",
        action="store_true",
        help="also ten-step workflows of local activities (a row of their own)",
    )
    parser.add_argument(
        "--sqlite-synchronous",
        choices=["NORMAL", "FULL"],
        default="FULL",
        help="tideflow's SQLite durability: FULL (the issue's bar, DBOS's SQLite runs FULL "
        "too) or NORMAL (the server's default: survives SIGKILL, not a power cut)",
    )
    main(parser.parse_args())
