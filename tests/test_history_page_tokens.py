"""A task's history continuation token (GetHistory's ``next_page_token`` for the rest
of a workflow or query task's history) is sealed under the store's keys, like task
tokens (server/_history_pages.py, server/_task_tokens.py).

Unsealed, a caller allowed to read a run could forge a query continuation and read
the run's buffered events, which no history holds yet (here: a signal that arrived
while a workflow task runs). Now a forged, altered or unsealed token is refused
INVALID_ARGUMENT before anything reads it, a genuine one still pages through the
task's history, and a continuation token is no task token (nor the other way round).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest

from tideflow.api.v1 import command_pb2, common_pb2, service_pb2, service_pb2_grpc
from tideflow.server import ServerConfig, TideflowServer

NS = "default"
QUEUE = "page-tokens"
SECRET = b"buffered-signal-payload"
# Small pages: a task of a few hundred markers spans several.
_PAGE_BYTES = 8 * 1024


def _marker(index: int) -> command_pb2.Command:
    details = common_pb2.Payloads(payloads=[common_pb2.Payload(data=b"%06d" % index * 10)])
    return command_pb2.Command(
        command_type=command_pb2.COMMAND_TYPE_RECORD_MARKER,
        record_marker_command_attributes=command_pb2.RecordMarkerCommandAttributes(
            marker_name="m", details={"d": details}
        ),
    )


async def _refused(call: Awaitable[Any]) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return info.value.details() or ""


def _page_request(workflow_id: str, token: bytes) -> service_pb2.GetHistoryRequest:
    request = service_pb2.GetHistoryRequest(namespace=NS, next_page_token=token)
    request.execution.workflow_id = workflow_id
    return request


async def _poll(stub: service_pb2_grpc.WorkflowServiceStub) -> service_pb2.PollWorkflowTaskResponse:
    response: service_pb2.PollWorkflowTaskResponse = await stub.PollWorkflowTask(
        service_pb2.PollWorkflowTaskRequest(
            namespace=NS, task_queue=common_pb2.TaskQueue(name=QUEUE), identity="t"
        ),
        timeout=30,
    )
    assert response.task_token
    return response


async def _signal(
    stub: service_pb2_grpc.WorkflowServiceStub, workflow_id: str, data: bytes
) -> None:
    request = service_pb2.SignalWorkflowRequest(
        namespace=NS, signal_name="s", request_id=str(uuid.uuid4())
    )
    request.workflow_execution.workflow_id = workflow_id
    request.input.payloads.add(data=data)
    await stub.SignalWorkflow(request, timeout=30)


async def test_continuation_tokens_are_sealed(store_url: str) -> None:
    config = ServerConfig(history_page_bytes=_PAGE_BYTES)
    async with (
        TideflowServer(store_url, port=0, config=config) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        workflow_id = f"pages-{uuid.uuid4()}"
        started = await stub.StartWorkflow(
            service_pb2.StartWorkflowRequest(
                namespace=NS,
                workflow_id=workflow_id,
                workflow_type=common_pb2.WorkflowType(name="Raw"),
                task_queue=common_pb2.TaskQueue(name=QUEUE),
                request_id=str(uuid.uuid4()),
            ),
            timeout=30,
        )
        first = await _poll(stub)
        await stub.RespondWorkflowTaskCompleted(
            service_pb2.RespondWorkflowTaskCompletedRequest(
                task_token=first.task_token, commands=[_marker(i) for i in range(300)]
            ),
            timeout=30,
        )
        await _signal(stub, workflow_id, b"wake up")
        task = await _poll(stub)  # runs now: the next signal is buffered
        await _signal(stub, workflow_id, SECRET)

        # A genuine token pages through the rest of the task's history.
        token = task.next_page_token
        assert token.startswith(b"tfh1:")
        events = list(task.history.events)
        while token:
            page = await stub.GetHistory(_page_request(workflow_id, token), timeout=30)
            events.extend(page.history.events)
            token = page.next_page_token
        assert [e.event_id for e in events] == list(range(1, len(events) + 1))
        assert len(events) > len(task.history.events) > 0

        # Forged: a query continuation asking for the buffered events (the format the
        # server seals), unsealed, and sealed with a MAC that does not match.
        ms_next = events[-1].event_id + 1
        head = {"r": started.run_id, "n": ms_next, "l": ms_next - 1, "b": ms_next}
        body = json.dumps(head).encode() + b"\n"
        genuine = task.next_page_token
        forged = [
            b"tfh1:" + body,
            genuine[: len(b"tfh1:") + 4] + bytes(32) + body,  # the key id, no valid MAC
            genuine[:-1] + bytes([genuine[-1] ^ 1]),  # one bit of a genuine body flipped
        ]
        for bad in forged:
            details = await _refused(stub.GetHistory(_page_request(workflow_id, bad), timeout=30))
            assert details.startswith("next_page_token "), details
            assert SECRET.decode() not in details

        # One kind of token never passes for the other.
        details = await _refused(
            stub.RespondWorkflowTaskCompleted(
                service_pb2.RespondWorkflowTaskCompletedRequest(task_token=genuine), timeout=30
            )
        )
        assert details.startswith("task token is malformed"), details
        details = await _refused(
            stub.GetHistory(_page_request(workflow_id, b"tfh1:" + task.task_token[4:]), timeout=30)
        )
        assert details.startswith("next_page_token "), details
