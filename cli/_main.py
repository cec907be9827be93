"""Composes the command groups into the ``tideflow`` parser and dispatches to them."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol, cast


class CommandGroup(Protocol):
    """What a command group module provides (see the package docstring)."""

    def add_parser(self, groups: Any) -> None: ...

    def main(self, args: argparse.Namespace) -> int: ...


#: Group name -> the module that implements it, in the order ``tideflow --help`` lists
#: them. A module is imported only when its group runs (or for the full help): the
#: server group loads SQLAlchemy and the DAG group the whole DAG layer, most of a second
#: of start-up that ``tideflow workflow list`` should not pay.
GROUPS: Mapping[str, str] = MappingProxyType(
    {
        "server": "tideflow.server._cli",
        "dag": "tideflow.worker_sdk.dag.cli",
        "cluster": "tideflow.cli._cluster",
        "workflow": "tideflow.cli._workflow",
        "site": "tideflow.cli._site",
        "schedule": "tideflow.cli._schedule",
    }
)


def load_group(name: str) -> CommandGroup:
    """The module of group ``name`` (imported now if it was not yet)."""
    return cast(CommandGroup, importlib.import_module(GROUPS[name]))


def _version() -> str:
    try:
        return importlib.metadata.version("tideflow")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``tideflow`` parser. Given the command line, it holds only the group the
    line names (when it names one), so only that group's module is imported."""
    parser = argparse.ArgumentParser(
        prog="tideflow", description="tideflow durable execution engine"
    )
    parser.add_argument("--version", action="version", version=f"tideflow {_version()}")
    sub = parser.add_subparsers(dest="group", required=True)
    line = list(argv or ())
    named = next((arg for arg in line if not arg.startswith("-")), None)
    wanted: list[str]
    if named is not None and named in GROUPS:
        wanted = [named]
    else:  # the full help, or a mistake whose message lists every group
        wanted = [] if "--version" in line and named is None else list(GROUPS)
    for name in wanted:
        group = load_group(name)
        group.add_parser(sub)
        sub.choices[name].set_defaults(group_main=group.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``tideflow`` console script; returns the exit code."""
    line = sys.argv[1:] if argv is None else argv
    args = build_parser(line).parse_args(line)
    level = str(getattr(args, "log_level", "WARNING"))
    if getattr(args, "log_format", "text") == "json":
        # Only the server's commands have --log-format, so the server is loaded already.
        from tideflow.server._log_format import configure_logging

        configure_logging(level, "json")
    else:
        logging.basicConfig(
            level=getattr(logging, level.upper(), logging.INFO),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    run: Callable[[argparse.Namespace], int] = args.group_main
    return run(args)
