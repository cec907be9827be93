"""Two builds of the server side by side: their CPU per activity, measured interleaved.

On a machine shared with other work, two runs of ``throughput.py`` one after the other
differ by 20% and more with the load alone, more than most single changes save. This
runs both servers at once, each start-dev on a database of its own with a worker of its
own, and sends batches of ten-step workflows (``throughput.py``'s shape) to one then the
other, alternating which goes first, so a drift of the load falls on both alike. Each
batch reports the server's CPU milliseconds per activity (``/proc/<pid>/stat``), the
worker's and activities/s; the end prints the medians per build.

    git worktree add /tmp/base <commit> && (cd /tmp/base && make venv)
    .venv/bin/python bench/ab_servers.py --base-python /tmp/base/.venv/bin/python
    .venv/bin/python bench/ab_servers.py --base-python /tmp/base/.venv/bin/python \\
        --db-url postgresql://postgres@127.0.0.1/postgres --rounds 8 --workflows 150

``--base-python`` and ``--new-python`` are interpreters whose ``tideflow`` is the build
to run (an editable install each); the workers and this client run this checkout's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
from pathlib import Path

import throughput as tp

from tideflow.worker_sdk import Client

_START_TIMEOUT_S = 60.0


async def _serve(
    python: str, db_url: str, synchronous: str
) -> tuple[list[subprocess.Popen[bytes]], Client, tp.Roles]:
    """A start-dev server run by ``python`` on ``db_url``, a worker and a client."""
    port = tp._free_port()
    argv = [python, "-m", "tideflow.cli", "server", "start-dev", "--db-url", db_url]
    if db_url.startswith("sqlite"):
        argv += ["--sqlite-synchronous", synchronous]
    argv += ["--port", str(port), "--ip", "127.0.0.1", "--log-level", "WARNING", "--no-ui"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    procs = [server]
    try:
        await asyncio.wait_for(tp._listening(server), _START_TIMEOUT_S)
        address = f"127.0.0.1:{port}"
        worker_argv = [sys.executable, str(Path(tp.__file__)), "--worker", address]
        procs.append(subprocess.Popen(worker_argv, env=env))
        client = await Client.connect(address)
    except BaseException:
        tp._stop(procs)
        raise
    return procs, client, tp.Roles([server.pid], [procs[1].pid])


async def main(args: argparse.Namespace) -> None:
    builds = {"base": args.base_python, "new": args.new_python}
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in builds}
    async with tp._database(args.db_url) as url_base, tp._database(args.db_url) as url_new:
        try:
            served = {}
            for name, url in (("base", url_base), ("new", url_new)):
                started, client, roles = await _serve(builds[name], url, args.sqlite_synchronous)
                procs += started
                served[name] = (client, roles)
            for client, _ in served.values():  # warm up: connections, code paths
                await tp._measure([client], tp.TenActivities, 20, 20)
            for round_ in range(args.rounds):
                order = ("base", "new") if round_ % 2 == 0 else ("new", "base")
                for name in order:
                    client, roles = served[name]
                    m = await tp._measure(
                        [client], tp.TenActivities, args.workflows, args.concurrency, roles
                    )
                    cpu = m["cpu_ms_per_activity"]
                    assert isinstance(cpu, dict)
                    row = (float(str(m["activities_per_s"])), cpu["server"], cpu["worker"])
                    results[name].append(row)
                    print(
                        f"round {round_} {name}: activities/s, server and worker CPU "
                        f"ms/activity {row}",
                        file=sys.stderr,
                        flush=True,
                    )
            for client, _ in served.values():
                await client.close()
        finally:
            tp._stop(procs)
    for name, rows in results.items():
        print(
            f"{name}: activities/s {statistics.median(r[0] for r in rows):.1f}, "
            f"server CPU ms/activity {statistics.median(r[1] for r in rows):.3f}, "
            f"worker {statistics.median(r[2] for r in rows):.3f} "
            f"(medians of {len(rows)})",
            flush=True,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-python", required=True)
    parser.add_argument("--new-python", default=sys.executable)
    parser.add_argument("--db-url", default=None)
    parser.add_argument("--sqlite-synchronous", choices=["NORMAL", "FULL"], default="FULL")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--workflows", type=int, default=150, help="ten-step workflows per batch")
    parser.add_argument("--concurrency", type=int, default=100)
    asyncio.run(main(parser.parse_args()))
