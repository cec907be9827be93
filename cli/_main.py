"""Composes the command groups into the ``tideflow`` parser and dispatches to them."""

from __future__ import annotations

import argparse
import importlib.metadata
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Protocol

from tideflow.server import _cli as server_cli
from tideflow.server._log_format import configure_logging
from tideflow.worker_sdk.dag import cli as dag_cli

from . import _cluster as cluster_cli
from . import _schedule as schedule_cli
from . import _workflow as workflow_cli


class CommandGroup(Protocol):
    """What a command group module provides (see the package docstring)."""

    def add_parser(self, groups: Any) -> None: ...

    def main(self, args: argparse.Namespace) -> int: ...


#: Group name -> module, in the order ``tideflow --help`` lists them.
GROUPS: Mapping[str, CommandGroup] = MappingProxyType(
    {
        "server": server_cli,
        "dag": dag_cli,
        "cluster": cluster_cli,
        "workflow": workflow_cli,
        "schedule": schedule_cli,
    }
)


def _version() -> str:
    try:
        return importlib.metadata.version("tideflow")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tideflow", description="tideflow durable execution engine"
    )
    parser.add_argument("--version", action="version", version=f"tideflow {_version()}")
    sub = parser.add_subparsers(dest="group", required=True)
    for name, group in GROUPS.items():
        group.add_parser(sub)
        sub.choices[name].set_defaults(group_main=group.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``tideflow`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_level", "WARNING"), getattr(args, "log_format", "text"))
    run: Callable[[argparse.Namespace], int] = args.group_main
    return run(args)
