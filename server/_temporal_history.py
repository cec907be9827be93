"""``GetWorkflowExecutionHistoryReverse`` on tideflow's forward history pages: a page
of the newest events first, read forward from the frontend (whose page tokens for a
run's history are event ids) and reversed. The token names the run and the event to
go on from, so every page is of one run even if the workflow id starts another."""

from __future__ import annotations

from typing import Any

import grpc
from temporalio.api.workflowservice.v1 import request_response_pb2 as tw

from tideflow.api.v1 import common_pb2
from tideflow.api.v1 import service_pb2 as tf

from . import _temporal_wire as wire
from ._frontend import WorkflowService
from ._temporal_errors import Refused

# Events per page when the request asks for none, and at most.
_PAGE_SIZE = 1000


async def reverse_page(
    frontend: WorkflowService, request: tw.GetWorkflowExecutionHistoryReverseRequest, context: Any
) -> tw.GetWorkflowExecutionHistoryReverseResponse:
    execution = common_pb2.WorkflowExecution(
        workflow_id=request.execution.workflow_id, run_id=request.execution.run_id
    )
    if request.next_page_token:
        execution.run_id, last = _decode(request.next_page_token)
    else:
        described = await frontend.DescribeWorkflow(
            tf.DescribeWorkflowRequest(namespace=request.namespace, execution=execution), context
        )
        execution.run_id = described.workflow_execution_info.execution.run_id
        last = described.workflow_execution_info.history_length
    size = min(request.maximum_page_size or _PAGE_SIZE, _PAGE_SIZE)
    first = max(1, last - size + 1)
    page = await frontend.GetHistory(
        tf.GetHistoryRequest(
            namespace=request.namespace,
            execution=execution,
            maximum_page_size=last - first + 1,
            next_page_token=str(first).encode() if first > 1 else b"",
        ),
        context,
    )
    response = tw.GetWorkflowExecutionHistoryReverseResponse()
    for event in reversed([e for e in page.history.events if e.event_id <= last]):
        wire.copy(event, response.history.events.add(), strict=False, path="HistoryEvent.")
    if first > 1:
        response.next_page_token = f"{execution.run_id}/{first - 1}".encode()
    return response


def _decode(token: bytes) -> tuple[str, int]:
    try:
        run_id, last = token.decode().rsplit("/", 1)
        return run_id, int(last)
    except ValueError:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "next_page_token is malformed") from None
