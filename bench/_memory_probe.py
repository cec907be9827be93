"""Bench only: where a process's resident memory is, by allocator (bench/_traced_server.py
writes it with each snapshot, as ``DIR/memory-<n>.json``; bench/memory.py ``--trace`` and
``--probe`` print the quarters side by side).

The parts: the kernel's view (/proc/self/status: anonymous and file-backed RSS; the
anonymous mappings and the file mappings by path from /proc/self/smaps), glibc malloc's
(``mallinfo2``: bytes in use and bytes free but kept, over every arena), SQLite's own
allocations (``sqlite3_memory_used``, its page caches included; they are malloc'd, so
inside malloc's in-use figure) and Python's small-object allocator (pymalloc's arenas,
mmapped: outside malloc's figures)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c"))
_libc.mallinfo2.restype = _MallInfo2
# The library Python's sqlite3 module is linked with: dlopen returns the same one.
_sqlite = ctypes.CDLL("libsqlite3.so.0")
_sqlite.sqlite3_memory_used.restype = ctypes.c_int64
_SQLITE_STATUS_PAGECACHE_OVERFLOW = 2


def _mib(n: int) -> float:
    return round(n / 2**20, 2)


def _status_kib() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"):
            fields[key] = int(rest.split()[0])
    return fields


def _smaps() -> dict[str, float]:
    """RSS (MiB) by mapping: [heap] (malloc's main arena), other anonymous mappings,
    files by name."""
    held: Counter[str] = Counter()
    name = ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            name = head[5] if len(head) > 5 else ""
        elif head[0] == "Rss:":
            rss = int(head[1])
            if name.startswith("/"):
                label = "file " + Path(name).name
            elif name:
                label = name
            else:
                # (Adjacent anonymous mappings merge: pymalloc's arenas, malloc's
                # thread arenas, stacks and large blocks are not told apart here.)
                label = "anon mmapped"
            held[label] += rss
    return {k: round(v / 1024, 1) for k, v in held.most_common() if v >= 256}


@contextlib.contextmanager
def _stderr_to(path: str) -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(fd)
        os.close(saved)


def _pymalloc() -> dict[str, float]:
    """pymalloc's totals, from sys._debugmallocstats (written to fd 2 by C code)."""
    with tempfile.NamedTemporaryFile() as out:
        with _stderr_to(out.name):
            sys._debugmallocstats()
        text = Path(out.name).read_text()
    found: dict[str, float] = {}
    for key, pattern in (
        ("arenas", r"# arenas allocated current\s*=\s*([\d,]+)"),
        ("in_blocks_mib", r"# bytes in allocated blocks\s*=\s*([\d,]+)"),
        ("free_blocks_mib", r"# bytes in available blocks\s*=\s*([\d,]+)"),
        ("arena_bytes_mib", r"Total\s*=\s*([\d,]+)"),
    ):
        match = re.search(pattern, text)
        if match:
            value = int(match.group(1).replace(",", ""))
            found[key] = _mib(value) if key.endswith("_mib") else value
    return found


def probe(trim: bool = False) -> dict[str, object]:
    status = _status_kib()
    info = _libc.mallinfo2()
    current, high = ctypes.c_int64(), ctypes.c_int64()
    _sqlite.sqlite3_status64(
        _SQLITE_STATUS_PAGECACHE_OVERFLOW, ctypes.byref(current), ctypes.byref(high), 0
    )
    found: dict[str, object] = {
        "rss_mib": round(status["VmRSS"] / 1024, 1),
        "rss_anon_mib": round(status["RssAnon"] / 1024, 1),
        "rss_file_mib": round(status["RssFile"] / 1024, 1),
        "rss_shmem_mib": round(status["RssShmem"] / 1024, 1),
        "threads": status["Threads"],
        "malloc_in_use_mib": _mib(info.uordblks + info.hblkhd),
        "malloc_free_kept_mib": _mib(info.fordblks),
        "malloc_heap_mib": _mib(info.arena),
        "malloc_mmapped_mib": _mib(info.hblkhd),
        "sqlite_memory_used_mib": _mib(_sqlite.sqlite3_memory_used()),
        "sqlite_page_cache_mib": _mib(current.value),
        "pymalloc": _pymalloc(),
        "smaps_rss_mib": _smaps(),
    }
    if trim:
        _libc.malloc_trim(0)
        found["rss_after_malloc_trim_mib"] = round(_status_kib()["VmRSS"] / 1024, 1)
    return found
