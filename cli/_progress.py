"""Progress of the CLI's long operations (waiting for a run's result, listing many runs):
one status line on stderr, redrawn in place and erased when the operation ends.

Drawn only when stderr is a terminal, so pipes, logs and ``-o json`` output stay
exactly what they were; stdout is never touched.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from typing import TextIO

from tideflow.worker_sdk import exceptions as exc
from tideflow.worker_sdk.client import Client, WorkflowExecutionDescription

# Erase the line the cursor is on and go back to its start (ECMA-48 "EL", CR).
CLEAR_LINE = "\r\x1b[K"
# Redraw at most this often: a fast loop (a listing) must not flood the terminal.
MIN_REDRAW_S = 0.1
# How often the status of a run being waited for is asked for (DescribeWorkflow).
WATCH_EVERY_S = 1.0


class Progress:
    """A status line on ``stream`` (stderr) when it is a terminal; otherwise nothing."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_terminal(self.stream)
        self.shown = False
        self._drawn_at = 0.0

    def update(self, text: str, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and self.shown and now - self._drawn_at < MIN_REDRAW_S:
            return
        self._drawn_at = now
        width = _width(self.stream)
        if len(text) >= width:
            text = text[: width - 2] + "…"
        self.stream.write(CLEAR_LINE + text)
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write(CLEAR_LINE)
            self.stream.flush()
            self.shown = False


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or fake stream
        return False


def _width(stream: TextIO) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        columns = 0
    return columns if columns > 0 else shutil.get_terminal_size((80, 24)).columns


def run_status(
    workflow_id: str, elapsed_s: float, description: WorkflowExecutionDescription
) -> str:
    """One line about a run being waited for: state, time waited, history length and
    what it waits on (its pending activities, with their attempt)."""
    parts = [
        f"waiting for {workflow_id} ({description.workflow_type}): "
        f"{description.status.name.lower()}, {elapsed_s:.0f}s",
        f"{description.history_length} events",
    ]
    pending = description.raw.pending_activities
    if pending:
        shown = ", ".join(
            f"{a.activity_type.name} (attempt {max(a.attempt, 1)})" for a in pending[:3]
        )
        more = f" and {len(pending) - 3} more" if len(pending) > 3 else ""
        parts.append(f"activities: {shown}{more}")
    return " · ".join(parts)


async def watch_run(client: Client, workflow_id: str, progress: Progress) -> None:
    """Redraw ``progress`` with the newest run of ``workflow_id`` every second until
    cancelled (the caller cancels it once the result is in)."""
    started = time.monotonic()
    handle = client.get_workflow_handle(workflow_id)
    while True:
        try:
            description = await handle.describe()
        except exc.RPCError as error:  # shown, not fatal: the wait itself decides
            text = f"waiting for {workflow_id}: {error}".splitlines()[0]
        else:
            text = run_status(workflow_id, time.monotonic() - started, description)
        progress.update(text, force=True)
        await asyncio.sleep(WATCH_EVERY_S)
