"""Eager workflow start (Temporal's ``request_eager_execution``): a client that shares a
process with a worker of the task queue asks for the new run's first workflow task,
and the server starts it in the start's own commit and returns it, so the worker runs
it without a poll and without a RecordWorkflowTaskStarted commit. On SQLite and
PostgreSQL, against a real server whose trace shows how each task started
(scenarios in helpers_eager_start.py):

- taken: the StartRun commit appends WorkflowTaskStarted, arms the task's timeout and
  writes no task row; the run completes with the worker's result;
- declined: a client without a worker of the queue, a worker without a free slot, and
  the server for a start that finds the run already there (raw gRPC): plain starts;
- a process SIGKILLed holding an eagerly started task: the task times out and its
  retry runs on another worker to the run's result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ET, Processes, assert_well_formed, new_id, of_type
from helpers_eager_start import (
    declined_runs,
    eager_run,
    kill_eager_starter,
    polled_first_tasks,
    start_lines,
    started_eagerly,
)

from tideflow.api.v1 import service_pb2
from tideflow.server import TideflowServer
from tideflow.worker_sdk import Client

pytestmark = pytest.mark.usefixtures("trace_dir")


async def test_a_local_worker_takes_the_first_task_from_the_start(
    client: Client, queue: str, trace_dir: Path
) -> None:
    handle = await eager_run(client, queue)
    lines = start_lines(trace_dir, handle.id)
    assert started_eagerly(lines)
    assert lines[0]["args"]["eager_wft"] is True
    timers = [r["kind"] for r in lines[0]["rows"]["new_timers"]]
    assert "WORKFLOW_TASK_TIMEOUT" in timers
    assert polled_first_tasks(lines) == []
    events = list((await handle.fetch_history()).events)
    assert_well_formed(events)
    assert [e.event_type for e in events[:3]] == [
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED,
        ET.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
        ET.EVENT_TYPE_WORKFLOW_TASK_STARTED,
    ]
    assert events[2].workflow_task_started_event_attributes.identity == client.identity
    assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED


async def test_declined_without_a_local_worker_or_a_free_slot(
    client: Client, server: TideflowServer, queue: str, trace_dir: Path
) -> None:
    runs = await declined_runs(client, server.address, queue)
    for handle in (runs.no_local_worker, runs.no_free_slot):
        lines = start_lines(trace_dir, handle.id)
        assert not started_eagerly(lines)
        assert "eager_wft" not in lines[0]["args"]
        assert polled_first_tasks(lines) == [1]
    # The run whose task held the slot was itself started eagerly.
    assert started_eagerly(start_lines(trace_dir, runs.holder.id))


async def test_the_server_declines_for_a_run_already_started(client: Client, queue: str) -> None:
    request = service_pb2.StartWorkflowRequest(
        namespace=client.namespace,
        workflow_id=new_id("eager-again"),
        request_id=new_id("request"),
        request_eager_execution=True,
        identity="raw",
    )
    request.workflow_type.name = "OneStep"
    request.task_queue.name = queue
    first = await client.service.StartWorkflow(request)
    assert first.started and first.eager_workflow_task.task_token
    assert first.eager_workflow_task.workflow_execution.run_id == first.run_id
    assert first.eager_workflow_task.attempt == 1
    # The same request again finds its run: no second task.
    again = await client.service.StartWorkflow(request)
    assert (again.run_id, again.started) == (first.run_id, False)
    assert not again.HasField("eager_workflow_task")
    # Signal-with-start never starts the task eagerly.
    request.workflow_id, request.request_id = new_id("eager-signal"), new_id("request")
    request.signal_name = "hello"
    signalled = await client.service.StartWorkflow(request)
    assert signalled.started and not signalled.HasField("eager_workflow_task")


async def test_a_starter_killed_holding_its_task(
    tmp_path: Path, server: TideflowServer, client: Client, procs: Processes, trace_dir: Path
) -> None:
    run = await kill_eager_starter(tmp_path, server.address, client, procs)
    note = json.loads(run.marker.read_text())
    assert note == {"pid": run.killed.pid, "attempt": 1, "workflow": run.workflow_id}
    lines = start_lines(trace_dir, run.workflow_id)
    assert started_eagerly(lines)
    fired = [line for line in lines if line["action"] == "FireTimer:WORKFLOW_TASK_TIMEOUT"]
    assert [line["args"]["timer"]["attempt"] for line in fired] == [1]
    # The retry went through matching to this test's worker.
    assert polled_first_tasks(lines) == [2]
    handle = client.get_workflow_handle(run.workflow_id)
    events = list((await handle.fetch_history()).events)
    assert_well_formed(events)
    (timed_out,) = of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT)
    assert timed_out.workflow_task_timed_out_event_attributes.scheduled_event_id == 2
    started = of_type(events, ET.EVENT_TYPE_WORKFLOW_TASK_STARTED)
    assert started[0].workflow_task_started_event_attributes.identity == "eager-starter"
    assert started[1].workflow_task_started_event_attributes.identity == client.identity
    assert events[-1].event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
