"""Trace validation of crash recovery and of a DAG: TLC decides whether real runs are
behaviours of tla/EngineCore.tla (how: helpers_tla.py).

- crash recovery: the server process is SIGKILLed while an activity runs and a new
  one on the same database takes over (the trace file survives: it is appended per
  transition, ahead of the commit);
- a DAG a -> {b, c} -> d through the DAG API, checked for TaskDependencyCorrectness.

Real traces corrupted on purpose must be rejected (TLC exit 0, the line and reason
printed).
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import WAIT_S, ServerProcess
from helpers_tla import (
    Corrupted,
    Gates,
    assert_accepted,
    assert_rejected,
    first_index,
    read_lines,
    real_accepted_all_corrupted_rejected,
    trace_of,
    validate,
    write_lines,
)

from tideflow.api.v1.common_pb2 import WorkflowExecutionStatus as WS
from tideflow.worker_sdk import (
    Client,
    Worker,
    activity,
    dag,
    workflow,
)
from tideflow.worker_sdk.dag import DagWorkflow, Task

# Trace mode on before any server of the test starts (conftest: trace_dir).
pytestmark = [pytest.mark.tla, pytest.mark.usefixtures("trace_dir")]


@activity.defn
async def held_across_crash(n: int) -> int:
    Gates.running.set()
    await Gates.release.wait()
    return n * 10


@activity.defn
async def after_crash(n: int) -> str:
    return f"done-{n}"


@workflow.defn
class SpansCrash:
    @workflow.run
    async def run(self, n: int) -> str:
        held: int = await workflow.execute_activity(
            held_across_crash, n, start_to_close_timeout=timedelta(seconds=60)
        )
        await workflow.sleep(timedelta(milliseconds=100))
        result: str = await workflow.execute_activity(
            after_crash, held + 1, start_to_close_timeout=timedelta(seconds=10)
        )
        return result


async def test_server_crash_mid_run(
    jar: Path, trace_dir: Path, server_process: ServerProcess, tmp_path: Path
) -> None:
    Gates.reset()
    client = await Client.connect(server_process.address)
    worker = Worker(
        client,
        task_queue="tla-crash",
        workflows=[SpansCrash],
        activities=[held_across_crash, after_crash],
    )
    try:
        worker.start()
        handle = await client.start_workflow(
            SpansCrash.run, 4, id="crash-1", task_queue="tla-crash"
        )
        # The run is quiescent now (its activity is running, nothing else is due), so
        # no commit is in flight when the process dies.
        await asyncio.wait_for(Gates.running.wait(), WAIT_S)
        trace = trace_of(trace_dir, "crash-1")
        before = len(read_lines(trace))
        await server_process.kill()
        await server_process.start()
        # The attempt started by the first server completes against the second.
        Gates.release.set()
        async with asyncio.timeout(WAIT_S):
            assert await handle.result() == "done-41"
        await worker.shutdown()
    finally:
        Gates.release.set()
        await client.close()
        await worker.shutdown()
    lines = read_lines(trace)
    assert [ln["action"] for ln in lines[:before]][-1] == "CompleteWorkflowTask"
    assert lines[before]["action"] == "CompleteActivity", lines[before]
    assert lines[-1]["state"]["status"] == WS.WORKFLOW_EXECUTION_STATUS_COMPLETED

    # A transition lost in the crash (the line of the second server's first commit
    # missing) must be noticed.
    lost = write_lines(tmp_path / "lost-line.ndjson", lines[:before] + lines[before + 1 :])
    verdicts = validate(jar, tmp_path, [(trace, None), (lost, None)])
    assert_accepted(verdicts[0], trace)
    assert_rejected(verdicts[1], before + 1)


@dag.executor("tla-step")
async def tla_step(params: dict[str, Any]) -> dict[str, Any]:
    return {"task": params["name"]}


def _diamond() -> dag.Workflow:
    wf = dag.new_workflow("tla-diamond", "1.0.0")
    a = Task("a", executor="tla-step", parameters={"name": "a"})
    b = Task("b", executor="tla-step", parameters={"name": "b"}, depends_on=[a])
    c = Task("c", executor="tla-step", parameters={"name": "c"}, depends_on=[a])
    d = Task("d", executor="tla-step", parameters={"name": "d"}, depends_on=[b, c])
    for task in (a, b, c, d):
        wf.add_task(task)
    return wf


def _swap_ids(lines: list[dict[str, Any]], one: str, other: str) -> list[dict[str, Any]]:
    """The trace with two activity ids exchanged everywhere (commands, events, state)."""
    text = json.dumps(lines)
    text = text.replace(f'"{one}"', '"<swap>"').replace(f'"{other}"', f'"{one}"')
    swapped: list[dict[str, Any]] = json.loads(text.replace('"<swap>"', f'"{other}"'))
    return swapped


async def test_dag_with_parallel_branches(
    jar: Path, trace_dir: Path, client: Client, tmp_path: Path
) -> None:
    wf = _diamond()
    async with Worker(client, task_queue="tla-dag", workflows=[DagWorkflow], activities=[tla_step]):
        handle = await client.start_dag(wf, {}, id="dag-1", task_queue="tla-dag")
        output = await handle.result()
    assert output == {"d": {"task": "d"}}
    deps = {task.id: set(task.dependencies) for task in wf.tasks}
    assert deps == {"a": set(), "b": {"a"}, "c": {"a"}, "d": {"b", "c"}}
    trace = trace_of(trace_dir, "dag-1")
    lines = read_lines(trace)
    scheduled = [
        sorted(c["id"] for c in ln["args"]["commands"] if c["type"] == "SCHEDULE_ACTIVITY_TASK")
        for ln in lines
        if ln["action"] == "CompleteWorkflowTask"
    ]
    # The branches ran in parallel: b and c were scheduled by one workflow task.
    assert [ids for ids in scheduled if ids] == [["a#1"], ["b#1", "c#1"], ["d#1"]]

    # Corruptions: d scheduled where c was (right after a completed: its dependencies
    # b and c had not), and an activity completion delivered twice.
    violated = _swap_ids(lines, "c#1", "d#1")
    at = first_index(
        violated,
        lambda ln: any(e.get("activity_id") == "d#1" for e in ln["events"]),
    )
    twice = first_index(lines, lambda ln: ln["action"] == "CompleteActivity")
    duplicated = [*lines[: twice + 1], lines[twice], *lines[twice + 1 :]]
    real_accepted_all_corrupted_rejected(
        jar,
        tmp_path,
        trace,
        [
            Corrupted(
                "dependency-violated",
                violated,
                at + 1,
                ("TaskDependencyCorrectness violated", '"d#1"'),
            ),
            Corrupted(
                "duplicated-completion",
                duplicated,
                twice + 2,
                ("guard for this action does not hold",),
            ),
        ],
        deps,
    )
