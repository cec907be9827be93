"""Temporal's activity calls that name the activity by workflow id, run id and activity id
(``RespondActivityTaskCompletedById``, ``RecordActivityTaskHeartbeatById``, ... used by
async activity completion) on tideflow, whose calls name an attempt by task token: the
token of the activity's current attempt is made from the run's pending activities and
sealed as the poll would have, then the token-based call is made."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from temporalio.api.errordetails.v1 import message_pb2 as details_pb2
from temporalio.api.workflowservice.v1 import request_response_pb2 as tw

from tideflow.api.v1 import service_pb2 as tf
from tideflow.api.v1 import state_pb2

from ._task_tokens import TaskTokenSigner
from ._temporal_errors import Refused

# By-id RPC -> the token-based RPC it becomes.
BY_ID: dict[str, str] = {
    "RecordActivityTaskHeartbeatById": "RecordActivityTaskHeartbeat",
    "RespondActivityTaskCompletedById": "RespondActivityTaskCompleted",
    "RespondActivityTaskFailedById": "RespondActivityTaskFailed",
    "RespondActivityTaskCanceledById": "RespondActivityTaskCanceled",
}
_ID_FIELDS = frozenset({"workflow_id", "run_id", "activity_id"})


async def attempt_token(
    described: tf.DescribeWorkflowResponse, request: Any, tokens: TaskTokenSigner
) -> bytes:
    """The sealed task token of the started attempt of ``request.activity_id``; NOT_FOUND
    (as Temporal answers) when the run has no such pending activity."""
    execution = described.workflow_execution_info.execution
    for pending in described.pending_activities:
        if pending.activity_id == request.activity_id:
            token = state_pb2.TaskToken(
                namespace=request.namespace,
                workflow_id=execution.workflow_id,
                run_id=execution.run_id,
                scheduled_event_id=pending.scheduled_event_id,
                attempt=pending.attempt,
                is_activity=True,
            )
            return await tokens.seal(token.SerializeToString())
    raise Refused(
        grpc.StatusCode.NOT_FOUND,
        f"activity {request.activity_id!r} of workflow {execution.workflow_id!r} is not pending",
        details_pb2.NotFoundFailure(),
    )


def by_token(request: Message, base: str, token: bytes) -> Message:
    """``request`` as the token-based ``base`` request: the same fields but the ids."""
    converted = _request_class(base)()
    for field, value in request.ListFields():
        if field.name in _ID_FIELDS:
            continue
        target = getattr(converted, field.name)
        if field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(converted, field.name, value)
    converted.task_token = token  # type: ignore[attr-defined]
    return converted


def _request_class(rpc: str) -> type[Message]:
    return GetMessageClass(tw.DESCRIPTOR.message_types_by_name[f"{rpc}Request"])


def response_class(rpc: str) -> type[Message]:
    return GetMessageClass(tw.DESCRIPTOR.message_types_by_name[f"{rpc}Response"])
