"""Bench only: ``python bench/_traced_server.py DIR CACHE_SIZE tideflow-args...`` runs the
``tideflow`` command with tracemalloc on and ``state_cache_size`` set to CACHE_SIZE;
each SIGUSR1 writes ``DIR/snapshot-<n>.pickle`` (tracemalloc) and ``DIR/objects-<n>.json``
(live objects by type), so bench/memory.py ``--trace DIR`` can diff two moments, and
``DIR/memory-<n>.json`` (resident memory by allocator: bench/_memory_probe.py). With
``TIDEFLOW_TRACE_FRAMES=0`` tracemalloc stays off (``--probe``: only the allocators'
figures, at the server's own speed). SIGUSR2 writes ``DIR/memory-trim.json``: the same
figures, then the RSS after glibc's ``malloc_trim(0)`` (memory freed but not returned)."""

from __future__ import annotations

import collections
import functools
import gc
import itertools
import json
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

from _memory_probe import probe

from tideflow.server import _cli
from tideflow.server._config import ServerConfig


def _dump(folder: Path, counter: itertools.count[int], _sig: int, _frame: FrameType | None) -> None:
    n = next(counter)
    gc.collect()
    (folder / f"memory-{n}.json").write_text(json.dumps(probe()))
    if tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(str(folder / f"snapshot-{n}.pickle"))
    counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    (folder / f"objects-{n}.json").write_text(json.dumps(dict(counts.most_common(200))))


def _dump_trimmed(folder: Path, _sig: int, _frame: FrameType | None) -> None:
    gc.collect()
    (folder / "memory-trim.json").write_text(json.dumps(probe(trim=True)))


def main() -> int:
    folder, cache_size, argv = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    frames = int(os.environ.get("TIDEFLOW_TRACE_FRAMES", "6"))
    if frames:
        tracemalloc.start(frames)
    signal.signal(signal.SIGUSR1, functools.partial(_dump, folder, itertools.count()))
    signal.signal(signal.SIGUSR2, functools.partial(_dump_trimmed, folder))
    _cli.ServerConfig = functools.partial(ServerConfig, state_cache_size=cache_size)  # type: ignore[attr-defined,assignment]
    from tideflow.cli import main as cli_main

    return int(cli_main(argv) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
