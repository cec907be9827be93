"""Errors of the Temporal door, shaped as Temporal servers shape them: the gRPC status
code Temporal uses for the condition and, in the ``grpc-status-details-bin`` trailer, the
``temporal.api.errordetails.v1`` message the SDKs map to their exception types
(``WorkflowExecutionAlreadyStartedFailure`` -> ``WorkflowAlreadyStartedError``,
``NamespaceNotFoundFailure``, ``NotFoundFailure`` -> ``RPCError(NOT_FOUND)``, a failed
query -> INVALID_ARGUMENT with ``QueryFailedFailure`` -> ``WorkflowQueryFailedError``).

The frontend answers in tideflow's shape (``errors.proto``); ``temporal_status`` reads
that detail back and reshapes it, so the two doors report one condition alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2
from temporalio.api.errordetails.v1 import message_pb2 as details_pb2
from temporalio.api.failure.v1 import message_pb2 as failure_pb2

from tideflow.api.v1 import errors_pb2

from . import _temporal_wire as wire
from ._errors import STATUS_DETAILS_KEY

Kind = errors_pb2.ErrorKind
_Context = grpc.aio.ServicerContext[Any, Any]


# Temporal RPCs of features tideflow does not have, by the feature's name: answered
# UNIMPLEMENTED with that name (gRPC's own answer for an unserved method names none).
REFUSED_RPCS: dict[str, str] = {
    "UpdateWorkflowExecution": "workflow updates",
    "PollWorkflowExecutionUpdate": "workflow updates",
    "ExecuteMultiOperation": "multi-operations (update-with-start)",
    "PollNexusTaskQueue": "Nexus operations",
    "RespondNexusTaskCompleted": "Nexus operations",
    "RespondNexusTaskFailed": "Nexus operations",
    "StartNexusOperationExecution": "Nexus operations",
    "UpdateWorkerBuildIdCompatibility": "worker versioning (build ids)",
    "GetWorkerBuildIdCompatibility": "worker versioning (build ids)",
    "UpdateWorkerVersioningRules": "worker versioning (build ids)",
    "GetWorkerVersioningRules": "worker versioning (build ids)",
    "GetWorkerTaskReachability": "worker versioning (build ids)",
    "SetWorkerDeploymentCurrentVersion": "worker deployments",
    "DescribeWorkerDeployment": "worker deployments",
    "ResetWorkflowExecution": "workflow reset",
    "UpdateWorkflowExecutionOptions": "workflow execution options (versioning overrides)",
    "PauseWorkflowExecution": "pausing workflows",
    "StartActivityExecution": "standalone activities",
}


class Refused(Exception):
    """A Temporal request the door answers with ``code``: a feature tideflow does not
    have (UNIMPLEMENTED) or a request it cannot hold (INVALID_ARGUMENT)."""

    def __init__(self, code: grpc.StatusCode, message: str, detail: Message | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail


class Aborted(grpc.aio.AbortError):
    """What the frontend's ``context.abort`` raises under the door: the status it meant
    to send, kept so that the door can send it in Temporal's shape instead.
    (An ``AbortError``: the frontend lets those through untouched.)"""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        trailing_metadata: Sequence[tuple[str, str | bytes]],
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailing_metadata = trailing_metadata


class CapturingContext:
    """The caller's context for a frontend handler, except that ``abort`` raises
    ``Aborted`` instead of ending the call."""

    def __init__(self, context: _Context) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> None:
        raise Aborted(code, details, trailing_metadata)


def unsupported(feature: str) -> Refused:
    """The refusal of a Temporal feature tideflow does not have."""
    return Refused(grpc.StatusCode.UNIMPLEMENTED, f"{feature} is not supported by tideflow")


def untranslatable(exc: wire.Untranslatable) -> Refused:
    return Refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{exc.path}: {exc.why} (tideflow's Temporal API does not support it)",
    )


def reshaped(error: Aborted) -> Refused:
    """The frontend's status with its tideflow detail replaced by Temporal's."""
    detail = _tideflow_detail(error.trailing_metadata)
    code = error.code
    temporal: Message | None = None
    if detail is None:
        pass
    elif detail.kind == Kind.ERROR_KIND_WORKFLOW_ALREADY_STARTED:
        temporal = details_pb2.WorkflowExecutionAlreadyStartedFailure(
            run_id=detail.workflow_already_started.run_id
        )
    elif detail.kind == Kind.ERROR_KIND_NAMESPACE_NOT_FOUND:
        temporal = details_pb2.NamespaceNotFoundFailure(
            namespace=detail.namespace_not_found.namespace
        )
    elif detail.kind == Kind.ERROR_KIND_NOT_FOUND:
        temporal = details_pb2.NotFoundFailure()
    elif detail.kind == Kind.ERROR_KIND_QUERY_FAILED:
        # Temporal servers answer a failed query INVALID_ARGUMENT; the SDKs rely on it.
        code = grpc.StatusCode.INVALID_ARGUMENT
        failure = wire.converted(detail.query_failed.failure, failure_pb2.Failure, strict=False)
        temporal = details_pb2.QueryFailedFailure(failure=failure)
    elif detail.kind == Kind.ERROR_KIND_ALREADY_EXISTS:
        if detail.already_exists.resource == errors_pb2.RESOURCE_TYPE_NAMESPACE:
            temporal = details_pb2.NamespaceAlreadyExistsFailure()
    elif detail.kind == Kind.ERROR_KIND_RESOURCE_EXHAUSTED:
        temporal = details_pb2.ResourceExhaustedFailure()
    return Refused(code, error.message, temporal)


def _tideflow_detail(
    metadata: Sequence[tuple[str, str | bytes]],
) -> errors_pb2.ErrorDetail | None:
    for key, value in metadata:
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for packed in status.details:
            detail = errors_pb2.ErrorDetail()
            if packed.Unpack(detail):
                return detail
    return None


async def abort(context: _Context, refusal: Refused) -> None:
    """End the call with ``refusal``'s status and its Temporal detail, if any."""
    status = status_pb2.Status(code=refusal.code.value[0], message=refusal.message)
    if refusal.detail is not None:
        status.details.add().Pack(refusal.detail)
    await context.abort(
        refusal.code,
        refusal.message,
        trailing_metadata=((STATUS_DETAILS_KEY, status.SerializeToString()),),
    )
