"""A worker process dies (SIGKILL) in the middle of a local activity.

The local activity runs inside the worker's workflow task, so nothing about it is in
history until its marker: the server only sees the workflow task time out (a 2 s task
timeout), retries it, and another worker process replays the run and runs the local
activity again. The workflow completes once, with one LocalActivity marker, written by
the second worker. Real server (conftest's in-test server on SQLite and PostgreSQL), real
worker processes (tests/procs/worker_proc.py, flavour ``local``).
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import ET, Processes, assert_well_formed, eventually, new_id, of_type

from tideflow.server import TideflowServer
from tideflow.worker_sdk import Client
from tideflow.worker_sdk.converter import default_converter

pytestmark = pytest.mark.slow

COMPLETION_TIMEOUT_S = 60.0


def _executions(marker: Path) -> dict[int, dict[str, object]]:
    """What each execution of the local activity wrote, by process id."""
    out = {}
    for path in marker.parent.glob(f"{marker.name}.*"):
        suffix = path.name.rsplit(".", 1)[1]
        if suffix.isdigit():
            out[int(suffix)] = json.loads(path.read_text())
    return out


async def test_worker_sigkill_mid_local_activity_reruns_it_on_another_worker(
    tmp_path: Path, server: TideflowServer, client: Client, procs: Processes
) -> None:
    queue = new_id("local-crash")
    worker1 = await procs.start_worker("worker-1", server.address, queue, "local")
    marker = tmp_path / "local-marker"
    handle = await client.start_workflow(
        "LocalCrashy",
        {"marker": str(marker), "value": "job-9"},
        id=new_id("local-crashy"),
        task_queue=queue,
        task_timeout=timedelta(seconds=2),
    )
    await eventually(lambda: worker1.pid in _executions(marker), "the local activity to start")
    await procs.sigkill(worker1)
    worker2 = await procs.start_worker("worker-2", server.address, queue, "local")

    async with asyncio.timeout(COMPLETION_TIMEOUT_S):
        result = await handle.result()
    assert result == f"job-9:local-in-{worker2.pid}"
    executions = _executions(marker)
    assert executions == {
        worker1.pid: {"pid": worker1.pid, "attempt": 1, "local": True},
        worker2.pid: {"pid": worker2.pid, "attempt": 1, "local": True},
    }

    events = list((await handle.fetch_history()).events)
    assert_well_formed(events)
    assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
    assert not of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)
    # worker-1's task ended by the server's timeout, not by a report.
    assert of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT)
    (marker_event,) = of_type(events, ET.EVENT_TYPE_MARKER_RECORDED)
    attrs = marker_event.marker_recorded_event_attributes
    assert attrs.marker_name == "LocalActivity"
    assert default_converter.from_payloads(attrs.details["result"]) == [worker2.pid]
    data = default_converter.from_payloads(attrs.details["data"])[0]
    assert (data["activity_type"], data["attempt"]) == ("local_stall_once", 1)
    # The marker came with the completion of worker-2's task, the run's last.
    completions = of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
    assert completions[-1].workflow_task_completed_event_attributes.identity == "worker-2"
    assert attrs.workflow_task_completed_event_id == completions[-1].event_id
