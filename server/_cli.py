"""The ``tideflow server`` command group.

``tideflow server start-dev [--db FILE] [--db-url URL] [--port 7233] [--ip 127.0.0.1]
[--db-wait SECONDS] [--cluster-name NAME] [--upstream HOST:PORT]`` runs a complete
single-node server until SIGINT or SIGTERM; ``--cluster-name`` names the site (default
"cloud"), ``--upstream`` makes it an edge site of that cloud (server/_sites.py), dialled
over TLS with ``--upstream-tls*`` (server/_tls.py). A
database that is not reachable yet is waited for (``--db-wait``, one log line per
attempt); after that, like any other start-up problem, it is one line and exit code 2.
``--tls-cert``, ``--tls-key`` and ``--tls-client-ca`` turn on TLS and mTLS
(server/_tls.py); ``--auth api-key|jwt`` authentication (server/_auth.py, off by
default in ``start-dev``). ``tideflow server rotate-token-key --db-url URL`` and
``retire-token-key`` administer the keys that sign task tokens (server/_token_cli.py);
``create-api-key``, ``list-api-keys`` and ``revoke-api-key`` the API keys
(server/_api_key_cli.py).

``tideflow server start --db-url URL [--ip IP] [--port PORT] [--node-id ID]
[--advertise HOST:PORT] [--shards N] [--lease-seconds S]`` runs one node of a cluster:
every node started on the same database joins it, and the shards are spread over the
live nodes (server/_shards.py). SIGINT or SIGTERM hands its shards over at once.

The ``tideflow`` entry point (``tideflow.cli``) composes this group with the SDK's;
the server package knows nothing of the SDK. ``python -m tideflow.server._cli server
start-dev ...`` runs the group on its own (what tests and benchmarks start).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import faulthandler
import gc
import ipaddress
import logging
import os
import re
import signal
import socket
import sys
from typing import Any

from tideflow.history import ClusterConfigError, HistoryStore

from . import _api_key_cli, _token_cli
from ._auth import AuthMode, add_auth_arguments, auth_from_args
from ._config import ServerConfig
from ._log_format import (
    add_observability_arguments,
    check_observability_arguments,
    configure_logging,
)
from ._server import TideflowServer
from ._shards import DEFAULT_LEASE_S
from ._tls import (
    add_tls_arguments,
    add_upstream_tls_arguments,
    tls_from_args,
    upstream_tls_from_args,
)

log = logging.getLogger(__name__)

#: Exit code of a usage error (argparse uses the same).
EXIT_USAGE = 2
#: The web UI's port in ``start-dev`` (Temporal's dev server uses the same).
DEFAULT_UI_PORT = 8233
_DEFAULT_DB_WAIT_S = ServerConfig().store_start_timeout_s
_DEFAULT_LOCAL_POLL_S = ServerConfig().local_poll_s
#: The server process's young-generation GC threshold (Python's default: 700).
GC_YOUNG_THRESHOLD = 10_000
#: The site name of a server started without ``--cluster-name``.
DEFAULT_CLUSTER_NAME = ServerConfig().cluster_name


class StartError(Exception):
    """The server cannot start; the message says why, in one line."""


def add_parser(groups: Any) -> None:
    """Register the ``server`` command group on the ``tideflow`` parser's subparsers."""
    server = groups.add_parser("server", help="run a tideflow server")
    server_sub = server.add_subparsers(dest="command", required=True)
    _add_start_dev(server_sub)
    _add_start(server_sub)
    _token_cli.add_parsers(server_sub)
    _api_key_cli.add_parsers(server_sub)


def _add_start_dev(server_sub: Any) -> None:
    dev = server_sub.add_parser("start-dev", help="start a single-node server (SQLite by default)")
    dev.add_argument("--db", default="tideflow.db", help="SQLite file (default: ./tideflow.db)")
    dev.add_argument("--db-url", default=None, help="any SQLAlchemy URL, e.g. postgresql://host/db")
    dev.add_argument("--port", type=int, default=7233)
    dev.add_argument("--ip", default="127.0.0.1")
    dev.add_argument(
        "--db-wait",
        type=float,
        default=_DEFAULT_DB_WAIT_S,
        metavar="SECONDS",
        help="how long to keep trying to reach an unavailable database at start "
        f"(default: {_DEFAULT_DB_WAIT_S:g})",
    )
    dev.add_argument("--log-level", default="INFO")
    _add_sqlite_synchronous(dev)
    dev.add_argument(
        "--ui-port",
        type=int,
        default=None,
        help=f"web UI and HTTP API port (default {DEFAULT_UI_PORT}; if that one is taken, "
        "the server runs without the UI)",
    )
    dev.add_argument("--no-ui", action="store_true", help="serve no web UI or HTTP API")
    add_site_arguments(dev)
    add_tls_arguments(dev)
    add_observability_arguments(dev)
    # A development server is open by default; `start` (production) defaults auth on.
    add_auth_arguments(dev, default_mode=AuthMode.OFF)


def _add_sqlite_synchronous(parser: Any) -> None:
    parser.add_argument(
        "--sqlite-synchronous",
        default="NORMAL",
        choices=["NORMAL", "FULL"],
        help="NORMAL survives process crashes; FULL also survives power loss",
    )


def _add_start(server_sub: Any) -> None:
    node = server_sub.add_parser(
        "start",
        help="start one node of a cluster on a shared database (PostgreSQL, or one "
        "SQLite file for the nodes of one machine)",
    )
    node.add_argument(
        "--db-url",
        required=True,
        help="the cluster's database, e.g. postgresql://host/db or sqlite:///path.db",
    )
    node.add_argument("--port", type=int, default=7233)
    node.add_argument("--ip", default="127.0.0.1")
    node.add_argument(
        "--node-id", default=None, help="this node's name in the cluster (default: --advertise)"
    )
    node.add_argument(
        "--advertise",
        default=None,
        help="HOST:PORT other nodes and clients reach this node at (default: IP:PORT)",
    )
    node.add_argument(
        "--shards",
        type=int,
        default=None,
        help=f"shard count of a new database (default {HistoryStore.DEFAULT_SHARD_COUNT}); "
        "an initialised database keeps its own",
    )
    node.add_argument(
        "--lease-seconds",
        type=float,
        default=DEFAULT_LEASE_S,
        help=f"shard lease; a dead node's shards move after it (default {DEFAULT_LEASE_S})",
    )
    node.add_argument(
        "--local-poll-seconds",
        type=float,
        default=_DEFAULT_LOCAL_POLL_S,
        help="local dispatch: a poll for a queue another node serves waits this long "
        "for a task committed here before it is forwarded to the queue's node, in "
        f"turns (default {_DEFAULT_LOCAL_POLL_S:g}: off, forwarded at once)",
    )
    node.add_argument(
        "--db-wait",
        type=float,
        default=60.0,
        help="seconds to wait for an unreachable database at start (default 60)",
    )
    node.add_argument("--log-level", default="INFO")
    _add_sqlite_synchronous(node)
    node.add_argument(
        "--ui-port", type=int, default=None, help="serve the web UI and HTTP API on this port"
    )
    add_site_arguments(node)
    add_tls_arguments(node)
    add_observability_arguments(node)
    add_auth_arguments(node, default_mode=AuthMode.API_KEY)


def main(args: argparse.Namespace) -> int:
    """Run a parsed ``tideflow server ...`` command; returns the exit code."""
    admin = {name: _token_cli.main for name in _token_cli.COMMANDS}
    admin.update({name: _api_key_cli.main for name in _api_key_cli.COMMANDS})
    if args.command in admin:
        try:
            print(admin[args.command](args))
        except (ValueError, OSError) as error:
            print(f"tideflow server {args.command}: {_one_line(error)}", file=sys.stderr)
            return EXIT_USAGE
        return 0
    if args.command not in ("start-dev", "start"):
        raise ValueError(f"unknown server command {args.command!r}")
    try:
        _check_ip(args.ip)
        if args.command == "start":
            _check_node_flags(args)
        _check_listen(args.ip, args.port)
        if args.ui_port is not None and not getattr(args, "no_ui", False):
            if args.ui_port == args.port != 0:
                raise StartError(f"--ui-port {args.ui_port}: the gRPC port (--port) already")
            _check_listen(args.ip, args.ui_port)

        check_observability_arguments(args)
        url = args.db_url or _sqlite_url(args.db)
        # A server process keeps many long-lived objects (up to state_cache_size runs'
        # states, locks and events): with the default young-generation threshold (700
        # allocations) the collector's passes over them cost a third of a FireTimer
        # transition's CPU (bench/fire_cost.py: 235 -> 154 us per fire at 10,000). A
        # transition's garbage is freed by reference counting; only cycles wait longer.
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        _print_stacks_on_crash()
        asyncio.run(_serve(args, url))
    except (StartError, ValueError, OSError) as error:
        # Bad flags or an unusable address/database: one line, not a traceback.
        print(f"tideflow server {args.command}: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def add_site_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cluster-name``, ``--upstream`` and how to reach it: its API key and TLS
    (server/_sites.py)."""
    parser.add_argument(
        "--cluster-name",
        default=None,
        help=f"this site's name, the home of the runs started here (default "
        f"{DEFAULT_CLUSTER_NAME!r}; required with --upstream)",
    )
    parser.add_argument(
        "--upstream",
        default="",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="make this server an edge site of the cloud at HOST:PORT: it dials the cloud "
        "(reconnecting with backoff) and replicates with it; it runs without it too. "
        "A cloud of several nodes: their addresses, comma-separated (it links to one at a "
        "time and dials the next when one cannot be reached)",
    )
    parser.add_argument(
        "--upstream-api-key",
        default=os.environ.get("TIDEFLOW_UPSTREAM_API_KEY", ""),
        help="API key or JWT (admin on every namespace) for an upstream with auth on "
        "(default: $TIDEFLOW_UPSTREAM_API_KEY)",
    )
    add_upstream_tls_arguments(parser)


def _site_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ServerConfig fields of the site flags, checked."""
    upstream = args.upstream
    if upstream:
        host, sep, port = upstream.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise StartError(f"--upstream {upstream!r}: expected HOST:PORT")
        if args.cluster_name is None:
            raise StartError("--upstream needs --cluster-name (the edge site's own name)")
    name = DEFAULT_CLUSTER_NAME if args.cluster_name is None else args.cluster_name
    if not 0 < len(name) <= 255 or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise StartError(f"--cluster-name {name!r}: 1 to 255 letters, digits, '.', '_' or '-'")
    upstream_tls = upstream_tls_from_args(args)
    if upstream and args.upstream_api_key and upstream_tls is None:
        # Allowed (a development cloud on this machine), but the key is a bearer secret.
        log.warning("--upstream-api-key is sent to %s without TLS (see --upstream-tls)", upstream)
    return {
        "cluster_name": name,
        "upstream": upstream,
        "upstream_api_key": args.upstream_api_key,
        "upstream_tls": upstream_tls,
        # Workers that do not say their tier are of their site's: an edge's, or a cloud's.
        "site_tier": "edge" if upstream else "cloud",
    }


def _check_node_flags(args: argparse.Namespace) -> None:
    if args.shards is not None and args.shards < 1:
        raise StartError(f"--shards {args.shards}: must be at least 1")
    if not args.lease_seconds > 0:
        raise StartError(f"--lease-seconds {args.lease_seconds}: must be positive")
    if not args.local_poll_seconds >= 0:
        raise StartError(
            f"--local-poll-seconds {args.local_poll_seconds}: must be 0 (off) or positive"
        )
    if args.advertise is not None:
        host, sep, port = args.advertise.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise StartError(f"--advertise {args.advertise!r}: expected HOST:PORT")
    if args.node_id is not None and not 0 < len(args.node_id) <= 255:
        raise StartError("--node-id: 1 to 255 characters")


def _or_default(value: int | None, default: int) -> int:
    return default if value is None else value


def _bare(ip: str) -> str:
    """``ip`` without the brackets an IPv6 address takes in ``HOST:PORT``."""
    return ip[1:-1] if ip.startswith("[") and ip.endswith("]") else ip


def _check_ip(ip: str) -> None:
    # gRPC reports an unusable address only as "could not bind", so name the cause.
    if ip == "localhost":
        return
    try:
        ipaddress.ip_address(_bare(ip))
    except ValueError:
        raise StartError(f"--ip {ip!r} is not an IP address") from None


def _check_listen(ip: str, port: int) -> None:
    """Fail before opening the store if ``ip:port`` cannot be bound (gRPC would say
    only that binding failed, after the store was opened)."""
    if port == 0:
        return
    if not 0 < port < 65536:
        raise StartError(f"--port {port}: not a port number (1-65535, or 0 for any free port)")
    host = _bare(ip)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise StartError(f"cannot listen on {ip}:{port}: the port is in use") from None
            if error.errno == errno.EADDRNOTAVAIL:
                raise StartError(
                    f"cannot listen on {ip}:{port}: {ip} is not an address of this machine"
                ) from None
            raise StartError(f"cannot listen on {ip}:{port}: {error.strerror}") from None


def _sqlite_url(db: str) -> str:
    """The URL of the SQLite file ``db``, after checking that it can be written (SQLite
    itself says only "unable to open database file", deep in a traceback)."""
    path = os.path.abspath(db)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise StartError(f"--db {db}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise StartError(f"--db {db}: is a folder, not a file")
    writable = os.access(path, os.W_OK) if os.path.exists(path) else os.access(folder, os.W_OK)
    # SQLite also writes a journal next to the file, so the folder must be writable too.
    if not writable or not os.access(folder, os.W_OK):
        raise StartError(f"--db {db}: cannot write {path} (permission denied)")
    return f"sqlite:///{path}"


def _mask_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _server_of(args: argparse.Namespace, url: str) -> TideflowServer:
    if not args.db_wait >= 0:  # also refuses NaN
        raise StartError(f"--db-wait {args.db_wait}: must be a number of seconds, 0 or more")
    if args.command == "start-dev":
        return TideflowServer(
            url,
            host=args.ip,
            port=args.port,
            config=ServerConfig(
                sqlite_synchronous=args.sqlite_synchronous,
                store_start_timeout_s=args.db_wait,
                **_site_config(args),
            ),
            tls=tls_from_args(args),
            auth=auth_from_args(args),
            ui_port=None if args.no_ui else _or_default(args.ui_port, DEFAULT_UI_PORT),
            ui_required=args.ui_port is not None,
            metrics_port=args.metrics_port,
            tracer_provider=True if args.otel else None,
        )
    # A node's default id is the address it is reached at: unique in the cluster, and
    # the same across its restarts, so a restarted node takes its shards back at once.
    # Port 0 ("any free port") gets its id once the port is bound.
    advertise = args.advertise
    if advertise is None and args.port != 0:
        # A wildcard address reaches nobody: advertise the machine's name instead.
        wildcard = _bare(args.ip) in ("0.0.0.0", "::")
        advertise = f"{socket.gethostname() if wildcard else args.ip}:{args.port}"
    return TideflowServer(
        url,
        host=args.ip,
        port=args.port,
        config=ServerConfig(
            shard_count=args.shards,
            lease_s=args.lease_seconds,
            local_poll_s=args.local_poll_seconds,
            sqlite_synchronous=args.sqlite_synchronous,
            store_start_timeout_s=args.db_wait,
            **_site_config(args),
        ),
        node_id=args.node_id or advertise or f"{socket.gethostname()}:{os.getpid()}",
        advertise=advertise,
        tls=tls_from_args(args),
        auth=auth_from_args(args),
        ui_port=args.ui_port,
        metrics_port=args.metrics_port,
        tracer_provider=True if args.otel else None,
    )


def _print_stacks_on_crash() -> None:
    """A crash inside a C extension (the gRPC core, a database driver) would end the
    process with nothing but a signal number: print every thread's Python stack to
    stderr instead. Not where stderr is no file (the CLI run in-process by a test)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        faulthandler.enable(all_threads=True)


async def _serve(args: argparse.Namespace, url: str) -> None:
    server = _server_of(args, url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if not await _start_unless_stopped(server, stop):
            return  # SIGINT or SIGTERM while waiting for the database
    except Exception as error:
        # Start-up fails on the listen address (checked above, but another process may
        # have taken the port since) or on the database; the traceback is for --log-level
        # DEBUG, the user gets one line.
        log.debug("start failed", exc_info=True)
        if isinstance(error, ClusterConfigError):
            raise StartError(str(error)) from None
        if isinstance(error, OSError) and "could not listen" in str(error):
            raise StartError(f"cannot listen on {args.ip}:{args.port}: {error}") from None
        if args.db_url:
            where = f"--db-url {_mask_password(args.db_url)}: cannot open the database"
        else:
            where = f"--db {args.db}: cannot open the SQLite database"
        raise StartError(f"{where}: {_one_line(error)}") from None
    # What start-up built (modules, the schema, the gRPC stubs) lives as long as the
    # process: moved out of the collector's generations, the older generations' passes
    # walk only what serving allocates.
    gc.freeze()
    # Tests and scripts wait for this exact line on stdout to know the port.
    print(f"tideflow server listening on {server.address}", flush=True)
    if server.ui_port is not None:
        print(f"tideflow web UI on http://{server.host}:{server.ui_port}/", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()


async def _start_unless_stopped(server: TideflowServer, stop: asyncio.Event) -> bool:
    """``server.start()``, given up (False) if a signal arrives first: the start may
    be waiting for the database, and Ctrl-C must not wait with it."""
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Neither task outlives this call, whatever ends it.
        stopping.cancel()
        if not starting.done():
            starting.cancel()
        await asyncio.wait({starting, stopping})
    if starting.cancelled():
        await server.stop()
        return False
    starting.result()  # raises what the start raised
    return True


def _standalone(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="tideflow", description="tideflow server")
    add_parser(parser.add_subparsers(dest="group", required=True))
    args = parser.parse_args(argv)
    configure_logging(args.log_level, getattr(args, "log_format", "text"))
    return main(args)


if __name__ == "__main__":
    raise SystemExit(_standalone(sys.argv[1:]))
