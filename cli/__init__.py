"""The ``tideflow`` command: one entry point over the command groups of each layer.

Each group lives with the code it drives (``tideflow.server._cli`` for ``tideflow
server ...``, ``tideflow.worker_sdk.dag.cli`` for ``tideflow dag ...``); this package
only composes them, so the server never imports the SDK. A group is a module with
``add_parser(subparsers)``, which registers its parser under its name, and
``main(args) -> int``, which runs a parsed command. Adding a group is one entry in
``GROUPS``.
"""

from __future__ import annotations

from ._main import GROUPS, CommandGroup, build_parser, main

__all__ = ["GROUPS", "CommandGroup", "build_parser", "main"]
