"""Commands out of bounds fail the workflow task, visibly (issue 10 follow-up).

The frontend's bounds refused a completion whose commands were out of bounds with
INVALID_ARGUMENT and nothing in history: the task timed out and was retried, and the
user never saw why. Now, as in Temporal, such a completion records WorkflowTaskFailed
with a cause saying what was wrong (PAYLOAD_TOO_LARGE, BAD_COMMAND_ATTRIBUTES), the
worker still gets INVALID_ARGUMENT (it drops its cached run), and the task is retried at
once. A request whose fault is not a command (identity, sticky attributes) keeps plain
INVALID_ARGUMENT and fails nothing. Driven over raw gRPC, on every store under test.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from google.protobuf.duration_pb2 import Duration
from raw_workflow import RawWorkflows, complete_workflow

from tideflow.api.v1 import command_pb2, common_pb2, history_pb2, service_pb2
from tideflow.api.v1.history_pb2 import EventType, WorkflowTaskFailedCause
from tideflow.server import ServerConfig, TideflowServer
from tideflow.worker_sdk import Client
from tideflow.worker_sdk.exceptions import InvalidArgumentError

Cause = WorkflowTaskFailedCause
# A run's history up to its first workflow task, started.
_FIRST_TASK_STARTED = [
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
]
_MAX_PAYLOAD = 64 * 1024


@asynccontextmanager
async def raw_workflows(store_url: str) -> AsyncIterator[RawWorkflows]:
    config = ServerConfig(max_payload_bytes=_MAX_PAYLOAD)
    async with TideflowServer(store_url, port=0, config=config) as server:
        client = await Client.connect(server.address)
        try:
            yield RawWorkflows(client, f"tq-{uuid.uuid4()}")
        finally:
            await client.close()


async def _history(raw: RawWorkflows, workflow_id: str) -> list[history_pb2.HistoryEvent]:
    return list((await raw.client.get_workflow_handle(workflow_id).fetch_history()).events)


async def _refused(raw: RawWorkflows, token: bytes, *commands: command_pb2.Command) -> str:
    with pytest.raises(InvalidArgumentError) as info:
        await asyncio.wait_for(raw.complete(token, *commands), 30)
    return str(info.value)


def _oversized_result() -> command_pb2.Command:
    payload = common_pb2.Payload(data=b"x" * (_MAX_PAYLOAD + 1))
    return command_pb2.Command(
        command_type=command_pb2.COMMAND_TYPE_COMPLETE_WORKFLOW_EXECUTION,
        complete_workflow_execution_command_attributes=(
            command_pb2.CompleteWorkflowExecutionCommandAttributes(
                result=common_pb2.Payloads(payloads=[payload])
            )
        ),
    )


def _mismatched() -> command_pb2.Command:
    command = complete_workflow()
    command.command_type = command_pb2.COMMAND_TYPE_START_TIMER
    return command


def _century_timer() -> command_pb2.Command:
    return command_pb2.Command(
        command_type=command_pb2.COMMAND_TYPE_START_TIMER,
        start_timer_command_attributes=command_pb2.StartTimerCommandAttributes(
            timer_id="t", start_to_fire_timeout=Duration(seconds=200 * 365 * 86_400)
        ),
    )


@pytest.mark.parametrize(
    ("commands", "cause", "words"),
    [
        ([_oversized_result()], Cause.WORKFLOW_TASK_FAILED_CAUSE_PAYLOAD_TOO_LARGE, "bytes"),
        (
            [command_pb2.Command(command_type=999)],  # type: ignore[arg-type]
            Cause.WORKFLOW_TASK_FAILED_CAUSE_BAD_COMMAND_ATTRIBUTES,
            "command_type",
        ),
        ([_mismatched()], Cause.WORKFLOW_TASK_FAILED_CAUSE_BAD_COMMAND_ATTRIBUTES, "carries"),
        (
            [complete_workflow(), _century_timer()],
            Cause.WORKFLOW_TASK_FAILED_CAUSE_BAD_COMMAND_ATTRIBUTES,
            "commands[1].start_timer_command_attributes.start_to_fire_timeout",
        ),
    ],
    ids=["oversized-payload", "unknown-type", "wrong-attributes", "huge-duration"],
)
async def test_a_bad_command_fails_the_task_in_history(
    store_url: str, commands: list[command_pb2.Command], cause: int, words: str
) -> None:
    async with raw_workflows(store_url) as raw:
        workflow_id = f"w-{uuid.uuid4()}"
        await raw.start(workflow_id)
        task = await raw.poll()
        message = await _refused(raw, task.task_token, *commands)
        assert words in message and "workflow task failed" in message

        events = await _history(raw, workflow_id)
        assert [e.event_type for e in events] == [
            *_FIRST_TASK_STARTED,
            EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED,
        ]
        failed = events[-1].workflow_task_failed_event_attributes
        assert failed.cause == cause
        assert words in failed.failure.message
        assert failed.failure.source == "server"
        assert failed.identity == "raw"

        # The next attempt comes at once (no timeout to wait out) and can complete.
        retry = await asyncio.wait_for(raw.poll(), 30)
        assert retry.attempt == 2
        assert retry.history.events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED
        await raw.complete(retry.task_token, complete_workflow())
        events = await _history(raw, workflow_id)
        assert events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED


async def test_a_bad_request_around_good_commands_fails_nothing(store_url: str) -> None:
    """Faults of the request itself stay INVALID_ARGUMENT and leave the task started."""
    async with raw_workflows(store_url) as raw:
        workflow_id = f"w-{uuid.uuid4()}"
        await raw.start(workflow_id)
        task = await raw.poll()
        stub = raw.client.service
        long_identity = service_pb2.RespondWorkflowTaskCompletedRequest(
            task_token=task.task_token, commands=[complete_workflow()], identity="i" * 1001
        )
        with pytest.raises(InvalidArgumentError, match="identity"):
            await raw.client.call(stub.RespondWorkflowTaskCompleted, long_identity)
        sticky = service_pb2.RespondWorkflowTaskCompletedRequest(
            task_token=task.task_token, commands=[_mismatched()], identity="raw"
        )
        sticky.sticky_attributes.worker_task_queue.name = "sticky\x00"
        # The request's own fault is reported even though a command is bad as well.
        with pytest.raises(InvalidArgumentError, match="sticky_attributes"):
            await raw.client.call(stub.RespondWorkflowTaskCompleted, sticky)

        events = await _history(raw, workflow_id)
        assert [e.event_type for e in events] == _FIRST_TASK_STARTED
        await raw.complete(task.task_token, complete_workflow())  # the same task completes
        events = await _history(raw, workflow_id)
        assert [e.event_type for e in events] == [
            *_FIRST_TASK_STARTED,
            EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
        ]
