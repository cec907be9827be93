"""``tideflow server create-api-key``, ``list-api-keys`` and ``revoke-api-key``: the API
keys of ``--auth api-key`` (``tideflow.history.ApiKeyStore``), administered on the
database without a server.

``create-api-key --name NAME --grant NAMESPACE:ROLE [--grant ...]`` prints the key
once: only its hash is stored. A revoked key is refused from the next call on (servers
look keys up on every call).
"""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from tideflow.history._api_keys import ApiKeyRecord, ApiKeyStore
from tideflow.history._dialects import open_runner

from ._auth import parse_grant
from ._token_cli import run_on_database

COMMANDS = ("create-api-key", "list-api-keys", "revoke-api-key")


def add_parsers(server_sub: Any) -> None:
    """Register the commands on the ``tideflow server`` subparsers."""
    create = server_sub.add_parser(
        "create-api-key", help="create an API key for --auth api-key (printed once)"
    )
    create.add_argument("--db-url", required=True, help="the server's database URL")
    create.add_argument("--name", required=True, help="the identity the key authenticates")
    create.add_argument(
        "--grant",
        action="append",
        required=True,
        metavar="NAMESPACE:ROLE",
        help="a role (reader, writer, worker, admin) on a namespace ('*': every one); repeat",
    )
    create.add_argument("--log-level", default="WARNING")
    listing = server_sub.add_parser("list-api-keys", help="list the API keys (never the secrets)")
    listing.add_argument("--db-url", required=True, help="the server's database URL")
    listing.add_argument("--log-level", default="WARNING")
    revoke = server_sub.add_parser("revoke-api-key", help="revoke an API key")
    revoke.add_argument("--db-url", required=True, help="the server's database URL")
    revoke.add_argument("--key-id", required=True, help="the key id (list-api-keys shows it)")
    revoke.add_argument("--log-level", default="WARNING")


def main(args: argparse.Namespace) -> str:
    """Run an API key command; returns the text to print (ValueError: a usage error or
    a database that cannot be used, said in one line)."""
    if args.command == "create-api-key":
        if not args.name.strip():
            raise ValueError("--name must not be empty")
        for grant in args.grant:
            parse_grant(grant)
    return run_on_database(_run(args))


async def _run(args: argparse.Namespace) -> str:
    runner = open_runner(args.db_url)
    try:
        keys = ApiKeyStore(runner)
        if args.command == "create-api-key":
            record, key = await keys.create(args.name, list(args.grant))
            return (
                f"{key}\n"
                f"# API key {record.key_id} of {record.name!r} "
                f"({', '.join(record.grants)}): store it now, it is not shown again"
            )
        if args.command == "list-api-keys":
            return "\n".join(_line(record) for record in await keys.list()) or "no API keys"
        if not await keys.revoke(args.key_id):
            raise ValueError(f"--key-id {args.key_id}: no such live API key")
        return f"API key {args.key_id} revoked"
    finally:
        await runner.close()


def _line(record: ApiKeyRecord) -> str:
    state = "live" if record.revoked_at is None else f"revoked {_time(record.revoked_at)}"
    return (
        f"{record.key_id}  {record.name}  {','.join(record.grants)}  "
        f"created {_time(record.created_at)}  {state}"
    )


def _time(micros: int) -> str:
    return datetime.datetime.fromtimestamp(micros / 1e6, datetime.UTC).isoformat(timespec="seconds")
