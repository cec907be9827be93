"""``tideflow server rotate-token-key`` and ``retire-token-key``: the task token keys
of a database (``tideflow.history.TokenKeyStore``), administered without a server.

Rotation adds a key; every node signs with it once it reloads its keys (within
``ServerConfig.token_key_refresh_s``, 60 s by default), and tokens signed by the older
keys keep verifying, so tasks in flight complete. Retire an old key once no task
started before the rotation can still be running (the longest activity or workflow
task timeout): tokens it signed are refused from then on.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Coroutine
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from tideflow.history import StoreError, TokenKeyStore
from tideflow.history._dialects import open_runner

COMMANDS = ("rotate-token-key", "retire-token-key")


def add_parsers(server_sub: Any) -> None:
    """Register the commands on the ``tideflow server`` subparsers."""
    rotate = server_sub.add_parser(
        "rotate-token-key", help="add a new task token signing key (old keys keep verifying)"
    )
    rotate.add_argument("--db-url", required=True, help="the server's database URL")
    rotate.add_argument("--log-level", default="WARNING")
    retire = server_sub.add_parser(
        "retire-token-key", help="delete an old task token key: tokens it signed are refused"
    )
    retire.add_argument("--db-url", required=True, help="the server's database URL")
    retire.add_argument("--key-id", type=int, required=True, help="the key to retire")
    retire.add_argument("--log-level", default="WARNING")


def main(args: argparse.Namespace) -> str:
    """Run a token key command; returns the line to print (ValueError: a usage error or
    a database that cannot be used, said in one line)."""
    return run_on_database(_run(args))


def run_on_database(command: Coroutine[Any, Any, str]) -> str:
    """Run an admin command's coroutine; a database error becomes a one-line ValueError
    (shared by the API key commands, server/_api_key_cli.py)."""
    try:
        return asyncio.run(command)
    except (SQLAlchemyError, StoreError) as error:
        first = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise ValueError(f"--db-url: cannot use the database: {first}") from None


async def _run(args: argparse.Namespace) -> str:
    runner = open_runner(args.db_url)
    try:
        keys = TokenKeyStore(runner)
        if args.command == "rotate-token-key":
            await keys.keys()  # a database without keys gets its first one, then the new
            key = await keys.rotate()
            live = [k.key_id for k in await keys.keys()]
            return f"task token key {key.key_id} signs from now on; live keys: {live}"
        if not await keys.retire(args.key_id):
            raise ValueError(f"--key-id {args.key_id}: no such task token key")
        live = [k.key_id for k in await keys.keys()]
        return f"task token key {args.key_id} retired; live keys: {live}"
    finally:
        await runner.close()
