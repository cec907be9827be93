"""``tideflow site ...``: look at a site of a cloud/edge deployment.

    tideflow site status [--address HOST:PORT] [-o table|json] [--api-key KEY]
        [--tls] [--tls-ca CA] [--tls-cert CERT --tls-key KEY] [--tls-server-name NAME]

``status`` asks the server at ``--address`` (``SiteService.DescribeSite``) for its site
name and upstream (and, while an edge cannot link, why: the TLS handshake, the
network or the upstream's auth refused it), each peer site (role, whether the link is
up, when it last connected and synced, the replicas of its runs that are behind here and by how many
events, events pulled and requests forwarded since this server started), the depth of
its inbox (signals, cancels and terminates waiting for their run's home) and the
replication alarms (batches that did not continue a replica, never applied).
Exit codes: 0 success, 2 an error talking to the server (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from google.protobuf import json_format

from tideflow.api.v1 import replication_pb2
from tideflow.worker_sdk import exceptions as exc
from tideflow.worker_sdk.client import Client

from ._workflow import add_credential_arguments, tls_of

DEFAULT_ADDRESS = "127.0.0.1:7233"
CONNECT_TIMEOUT_S = 5.0


def add_parser(groups: Any) -> None:
    """Register the ``site`` command group on the ``tideflow`` parser's subparsers."""
    parser = groups.add_parser("site", help="look at a site (cloud or edge)")
    parser.set_defaults(log_level="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser(
        "status", help="peers, link state, replication lag per peer, inbox depth"
    )
    status.add_argument(
        "--address",
        default=os.environ.get("TIDEFLOW_ADDRESS", DEFAULT_ADDRESS),
        help="the site's HOST:PORT (default: $TIDEFLOW_ADDRESS or 127.0.0.1:7233)",
    )
    status.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="output format"
    )
    # A cloud behind TLS, mTLS or auth is asked the way `tideflow workflow` asks it.
    add_credential_arguments(status, None)


def main(args: argparse.Namespace) -> int:
    """Run a parsed ``tideflow site ...`` command; returns the exit code."""
    try:
        status = asyncio.run(_status(args))
    except (exc.RPCError, OSError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"tideflow site {args.command}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if args.output == "json":
        print(json.dumps(json_format.MessageToDict(status), indent=2))
    else:
        print(render_table(status))
    return 0


async def _status(args: argparse.Namespace) -> replication_pb2.DescribeSiteResponse:
    client = await Client.connect(
        args.address,
        tls=tls_of(args),
        api_key=args.api_key or os.environ.get("TIDEFLOW_API_KEY") or None,
        connect_timeout=CONNECT_TIMEOUT_S,
    )
    try:
        response: replication_pb2.DescribeSiteResponse = await client.call(
            client.sites.DescribeSite, replication_pb2.DescribeSiteRequest(), retry=False
        )
        return response
    finally:
        await client.close()


def render_table(status: replication_pb2.DescribeSiteResponse) -> str:
    lines = [
        f"site: {status.site}" + (f" (upstream {status.upstream})" if status.upstream else ""),
        *([f"upstream link down: {status.upstream_error}"] if status.upstream_error else []),
        *(
            [
                f"  {status.upstream_failures} failed dials in a row; next in up to "
                f"{status.upstream_backoff_s:.1f} s"
            ]
            if status.upstream_failures
            else []
        ),
        f"inbox: {status.inbox_depth} pending",
        f"replication alarms: {status.replication_alarms}",
    ]
    lines.extend(f"  {alarm}" for alarm in status.recent_alarms)
    if not status.peers:
        lines.append("peers: none yet")
        return "\n".join(lines)
    header = ("PEER", "ROLE", "LINK", "RUNS BEHIND", "EVENTS BEHIND", "LAST SYNC", "PULLED", "FWD")
    rows = [header]
    for peer in status.peers:
        synced = (
            peer.last_sync.ToDatetime().isoformat(timespec="seconds")
            if peer.HasField("last_sync")
            else "-"
        )
        rows.append(
            (
                peer.site,
                peer.role,
                ("up" + (f" via {peer.address}" if peer.address else ""))
                if peer.connected
                else "down",
                str(peer.runs_behind),
                str(peer.events_behind),
                synced,
                str(peer.events_pulled),
                str(peer.requests_forwarded),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines.append("")
    lines.extend(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
    return "\n".join(lines)
