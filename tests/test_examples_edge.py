"""examples/edge/run.py (``make demo-edge``) as a user runs it: a subprocess that
starts a cloud and an edge server process, cuts and restores the link between them
and prints where each DAG task ran. Checks the printed timeline (tasks on the device,
edge and cloud tiers, the signal pending in the cloud's inbox, both sides caught up)
and that no server process outlives the demo, after a normal end and after SIGTERM."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "edge" / "run.py"


def processes_using(directory: Path) -> list[int]:
    """Pids whose command line names ``directory`` (the demo's sites name their
    database files there)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(directory).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue  # the process ended while we looked
    return pids


async def start_demo(workdir: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(DEMO),
        "--workdir",
        str(workdir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def test_demo_timeline(tmp_path: Path) -> None:
    proc = await start_demo(tmp_path)
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    text = out.decode()
    assert proc.returncode == 0, text
    # The table of where each task ran: tier and site as the server recorded them.
    for task, tier, site, worker in (
        ("capture", "device", "edge1", "camera-1"),
        ("detect", "edge", "edge1", "edge-worker"),
        ("report", "cloud", "cloud", "cloud-worker"),
    ):
        row = rf"^\s+{task}\s+{tier}\s+{site}\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+{worker}$"
        assert re.search(row, text, re.MULTILINE), f"no row for {task}:\n{text}"
    assert "signal 'resume' sent through the cloud: pending_delivery=True (home edge1)" in text
    assert "cloud site status: inbox depth 1, edge1 connected False" in text
    assert "DAG completed at edge1 (its home, no handoff): '6 defects in 24 frames'" in text
    assert "CLOUD CAUGHT UP: inbox depth 0, 0 events behind edge1, connected True" in text
    assert "EDGE CAUGHT UP: the cloud's replica is 0 events behind, edge inbox depth 0" in text
    # The timeline is in time order: cut, offline work, restore, cloud work, catch-up.
    timeline = text[text.index("\ntimeline\n") :]
    order = [
        "LINK CUT",
        "task detect ended",
        "pending_delivery=True",
        "LINK RESTORED",
        "task report started on the cloud worker",
        "CLOUD CAUGHT UP",
        "EDGE CAUGHT UP",
    ]
    positions = [timeline.index(step) for step in order]
    assert positions == sorted(positions), timeline
    assert processes_using(tmp_path) == []


async def test_demo_stops_its_sites_on_sigterm(tmp_path: Path) -> None:
    proc = await start_demo(tmp_path)
    assert proc.stdout is not None
    seen: list[str] = []
    while not any("linked to the cloud" in line for line in seen):
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        assert line, "".join(seen)
        seen.append(line.decode())
    assert processes_using(tmp_path), "the sites run while the demo runs"
    proc.send_signal(signal.SIGTERM)
    rest, _ = await asyncio.wait_for(proc.communicate(), 60)
    # Interrupted (130), unless the demo had already finished by the time it came.
    assert proc.returncode == 130 or "EDGE CAUGHT UP" in rest.decode(), rest.decode()
    assert processes_using(tmp_path) == [], "".join(seen) + rest.decode()
