"""The top allocation growths between two snapshots bench/_traced_server.py wrote:
``python bench/tracediff.py DIR A B`` (also printed by ``bench/memory.py --trace``)."""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path


def snapshot_diff(folder: Path, first: int, last: int, top: int = 25) -> str:
    old = tracemalloc.Snapshot.load(str(folder / f"snapshot-{first}.pickle"))
    new = tracemalloc.Snapshot.load(str(folder / f"snapshot-{last}.pickle"))
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    old, new = old.filter_traces(ignore), new.filter_traces(ignore)
    total = [sum(t.size for t in s.traces) / 2**20 for s in (old, new)]
    lines = [f"-- traced by Python's allocator: {total[0]:.1f} MiB -> {total[1]:.1f} MiB"]
    lines.append(f"-- tracemalloc growth by line, snapshot {first} -> {last}")
    lines += [str(stat) for stat in new.compare_to(old, "lineno")[:top]]
    lines.append(f"-- the same by traceback (top 8), snapshot {first} -> {last}")
    for stat in new.compare_to(old, "traceback")[:8]:
        lines.append(f"{stat.size_diff / 1024:.1f} KiB, {stat.count_diff:+d} blocks")
        lines += [f"    {frame}" for frame in stat.traceback.format()[-12:]]
    before = json.loads((folder / f"objects-{first}.json").read_text())
    after = json.loads((folder / f"objects-{last}.json").read_text())
    growth = sorted(((after[k] - before.get(k, 0), k) for k in after), reverse=True)[:20]
    lines.append(f"-- live objects by type, growth {first} -> {last}")
    lines += [f"{count:+d} {name}" for count, name in growth]
    return "\n".join(lines)


def memory_quarters(folder: Path, last: int) -> str:
    """The allocators' figures (bench/_memory_probe.py) after each quarter, a column
    each, and the RSS after ``malloc_trim(0)`` at the end."""
    samples = [json.loads((folder / f"memory-{n}.json").read_text()) for n in range(last + 1)]
    trimmed = folder / "memory-trim.json"
    if trimmed.exists():
        samples.append(json.loads(trimmed.read_text()))
    rows: dict[str, list[str]] = {}
    for i, sample in enumerate(samples):
        flat = dict(sample)
        for group in ("pymalloc", "smaps_rss_mib"):
            part = flat.pop(group, {})
            flat.update({f"{group}: {k}": v for k, v in part.items()})
        for key, value in flat.items():
            rows.setdefault(key, [""] * len(samples))[i] = str(value)
    lines = [
        "-- resident memory by allocator (MiB) per quarter"
        + (", then trimmed" if trimmed.exists() else "")
    ]
    lines += [f"{key:60s} " + " ".join(f"{v:>8s}" for v in values) for key, values in rows.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(snapshot_diff(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
