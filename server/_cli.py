"""The ``tideflow`` command.

``tideflow server start-dev [--db FILE] [--db-url URL] [--port 7233] [--ip 127.0.0.1]``
runs a complete single-node server until SIGINT or SIGTERM.

``tideflow dag validate|graph|run|status|list|pause|resume|cancel ...`` works with
declarative DAG workflows (``tideflow.worker_sdk._dag_cli``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from tideflow.worker_sdk import _dag_cli

from ._config import ServerConfig
from ._server import TideflowServer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tideflow", description="tideflow durable execution engine"
    )
    sub = parser.add_subparsers(dest="group", required=True)
    server = sub.add_parser("server", help="run a tideflow server")
    server_sub = server.add_subparsers(dest="command", required=True)
    dev = server_sub.add_parser("start-dev", help="start a single-node server (SQLite by default)")
    dev.add_argument("--db", default="tideflow.db", help="SQLite file (default: ./tideflow.db)")
    dev.add_argument("--db-url", default=None, help="any SQLAlchemy URL, e.g. postgresql://host/db")
    dev.add_argument("--port", type=int, default=7233)
    dev.add_argument("--ip", default="127.0.0.1")
    dev.add_argument("--log-level", default="INFO")
    dev.add_argument(
        "--sqlite-synchronous",
        default="NORMAL",
        choices=["NORMAL", "FULL"],
        help="NORMAL survives process crashes; FULL also survives power loss",
    )
    _dag_cli.add_parser(sub)
    return parser


async def _serve(args: argparse.Namespace, url: str) -> None:
    server = TideflowServer(
        url,
        host=args.ip,
        port=args.port,
        config=ServerConfig(sqlite_synchronous=args.sqlite_synchronous),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    # Tests and scripts wait for this exact line on stdout to know the port.
    print(f"tideflow server listening on {server.address}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.group == "dag":
        return _dag_cli.main(args)
    if args.group == "server" and args.command == "start-dev":
        try:
            url = args.db_url or f"sqlite:///{os.path.abspath(args.db)}"
            asyncio.run(_serve(args, url))
        except (ValueError, OSError) as exc:
            # Bad flags or an unusable address/database: a message, not a traceback.
            print(f"tideflow: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
