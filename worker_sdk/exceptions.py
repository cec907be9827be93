"""Exceptions users of the worker SDK see.

``TideflowError`` is the root. ``FailureError`` and its subclasses travel through
history as ``Failure`` messages (with their cause chain), so a workflow can catch an
activity's ``ApplicationError`` as the cause of an ``ActivityError`` and a client sees
a failed workflow as ``WorkflowFailureError`` whose cause is what the workflow raised.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import IntEnum
from typing import Any

from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from tideflow.api.v1 import common_pb2, errors_pb2


class TideflowError(Exception):
    """Base class of every tideflow error."""


class RPCError(TideflowError):
    """A call to the server failed.

    ``status`` is the gRPC status code name; ``kind`` the ``ErrorKind`` of the typed
    detail the server attached (``tideflow/api/v1/errors.proto``), or the generic kind
    of the status code when there was none (an error of the channel, not the server).
    ``rpc_error_from_status`` picks the subclass from ``kind``.
    """

    def __init__(
        self,
        message: str,
        *,
        status: str,
        kind: errors_pb2.ErrorKind = errors_pb2.ERROR_KIND_UNSPECIFIED,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind

    @classmethod
    def _from_detail(cls, message: str, status: str, detail: errors_pb2.ErrorDetail) -> RPCError:
        return cls(message, status=status, kind=detail.kind)


class ConnectError(RPCError):
    """``Client.connect`` could not reach a server within its ``connect_timeout``."""


def _resource_name(resource: errors_pb2.ResourceType) -> str:
    """``RESOURCE_TYPE_WORKFLOW_TASK`` -> ``"workflow_task"`` ("" if unspecified)."""
    if resource == errors_pb2.RESOURCE_TYPE_UNSPECIFIED:
        return ""
    return errors_pb2.ResourceType.Name(resource).removeprefix("RESOURCE_TYPE_").lower()


class NotFoundError(RPCError):
    """Something the request named does not exist: ``resource`` says what
    (``"workflow"``, ``"workflow_task"``, ``"activity_task"``, ``"query"``,
    ``"schedule"``, ``"namespace"``...; ``""`` if the server did not say), with the ids
    the server knows for it."""

    def __init__(
        self,
        message: str,
        *,
        status: str,
        kind: errors_pb2.ErrorKind = errors_pb2.ERROR_KIND_NOT_FOUND,
        resource: str = "",
        workflow_id: str = "",
        run_id: str = "",
        id: str = "",
    ) -> None:
        super().__init__(message, status=status, kind=kind)
        self.resource = resource
        self.workflow_id = workflow_id
        self.run_id = run_id
        self.id = id

    @classmethod
    def _from_detail(cls, message: str, status: str, detail: errors_pb2.ErrorDetail) -> RPCError:
        info = detail.not_found
        return cls(
            message,
            status=status,
            kind=detail.kind,
            resource=_resource_name(info.resource),
            workflow_id=info.workflow_id,
            run_id=info.run_id,
            id=info.id,
        )


class NamespaceNotFoundError(NotFoundError):
    """The client's namespace is not registered on the server."""

    def __init__(self, message: str, *, status: str, namespace: str = "") -> None:
        super().__init__(
            message,
            status=status,
            kind=errors_pb2.ERROR_KIND_NAMESPACE_NOT_FOUND,
            resource="namespace",
            id=namespace,
        )
        self.namespace = namespace

    @classmethod
    def _from_detail(cls, message: str, status: str, detail: errors_pb2.ErrorDetail) -> RPCError:
        return cls(message, status=status, namespace=detail.namespace_not_found.namespace)


class InvalidArgumentError(RPCError):
    """The server refused a request field (missing, malformed or out of bounds)."""


class AlreadyExistsError(RPCError):
    """What the request creates exists already: ``resource`` says what, ``id`` names it."""

    def __init__(
        self,
        message: str,
        *,
        status: str,
        kind: errors_pb2.ErrorKind = errors_pb2.ERROR_KIND_ALREADY_EXISTS,
        resource: str = "",
        id: str = "",
    ) -> None:
        super().__init__(message, status=status, kind=kind)
        self.resource = resource
        self.id = id

    @classmethod
    def _from_detail(cls, message: str, status: str, detail: errors_pb2.ErrorDetail) -> RPCError:
        info = detail.already_exists
        return cls(
            message,
            status=status,
            kind=detail.kind,
            resource=_resource_name(info.resource),
            id=info.id,
        )


class WorkflowAlreadyStartedError(AlreadyExistsError):
    """A start was refused: run ``run_id`` holds ``workflow_id`` (it is running, or the
    id reuse policy forbids reusing the id of a closed run)."""

    def __init__(
        self, message: str, *, status: str, workflow_id: str = "", run_id: str = ""
    ) -> None:
        super().__init__(
            message,
            status=status,
            kind=errors_pb2.ERROR_KIND_WORKFLOW_ALREADY_STARTED,
            resource="workflow",
            id=workflow_id,
        )
        self.workflow_id = workflow_id
        self.run_id = run_id

    @classmethod
    def _from_detail(cls, message: str, status: str, detail: errors_pb2.ErrorDetail) -> RPCError:
        info = detail.workflow_already_started
        return cls(message, status=status, workflow_id=info.workflow_id, run_id=info.run_id)


class WorkflowQueryFailedError(RPCError):
    """The query handler raised, or the workflow has no such query. ``query_type``
    names the query; ``cause`` (``__cause__``) is what the handler raised, as the
    worker reported it (converted by the client's data converter)."""

    def __init__(
        self,
        message: str,
        *,
        status: str,
        query_type: str = "",
        failure: common_pb2.Failure | None = None,
    ) -> None:
        super().__init__(message, status=status, kind=errors_pb2.ERROR_KIND_QUERY_FAILED)
        self.query_type = query_type
        self.failure = failure

    @property
    def cause(self) -> BaseException | None:
        return self.__cause__

    @classmethod
    def _from_detail(cls, message: str, status: str, detail: errors_pb2.ErrorDetail) -> RPCError:
        info = detail.query_failed
        return cls(
            message,
            status=status,
            query_type=info.query_type,
            failure=info.failure if info.HasField("failure") else None,
        )


# The one mapping from the server's error kind to the exception a caller sees. Kinds
# without a class of their own (failed precondition, unavailable, deadline exceeded,
# resource exhausted, internal) are plain ``RPCError`` whose ``kind`` says which.
_ERROR_CLASSES: dict[int, type[RPCError]] = {
    errors_pb2.ERROR_KIND_INVALID_ARGUMENT: InvalidArgumentError,
    errors_pb2.ERROR_KIND_NOT_FOUND: NotFoundError,
    errors_pb2.ERROR_KIND_NAMESPACE_NOT_FOUND: NamespaceNotFoundError,
    errors_pb2.ERROR_KIND_ALREADY_EXISTS: AlreadyExistsError,
    errors_pb2.ERROR_KIND_WORKFLOW_ALREADY_STARTED: WorkflowAlreadyStartedError,
    errors_pb2.ERROR_KIND_QUERY_FAILED: WorkflowQueryFailedError,
}

# A status without a detail (raised by the channel: a deadline, an unreachable server,
# a message over the size limit) is mapped by its code alone, to the generic kind.
_KIND_OF_STATUS: dict[str, errors_pb2.ErrorKind] = {
    "INVALID_ARGUMENT": errors_pb2.ERROR_KIND_INVALID_ARGUMENT,
    "NOT_FOUND": errors_pb2.ERROR_KIND_NOT_FOUND,
    "ALREADY_EXISTS": errors_pb2.ERROR_KIND_ALREADY_EXISTS,
    "FAILED_PRECONDITION": errors_pb2.ERROR_KIND_FAILED_PRECONDITION,
    "UNAVAILABLE": errors_pb2.ERROR_KIND_UNAVAILABLE,
    "DEADLINE_EXCEEDED": errors_pb2.ERROR_KIND_DEADLINE_EXCEEDED,
    "RESOURCE_EXHAUSTED": errors_pb2.ERROR_KIND_RESOURCE_EXHAUSTED,
    "INTERNAL": errors_pb2.ERROR_KIND_INTERNAL,
}


# The trailer gRPC defines for rich error details: a serialized ``google.rpc.Status``.
STATUS_DETAILS_KEY = "grpc-status-details-bin"


def error_detail(
    trailing_metadata: Iterable[tuple[str, str | bytes]],
) -> errors_pb2.ErrorDetail | None:
    """The typed ``ErrorDetail`` a tideflow server attached to a failed call, if any: it
    travels in the standard ``grpc-status-details-bin`` trailer as a ``google.rpc.Status``
    whose ``details`` hold it packed in an ``Any``."""
    for key, value in trailing_metadata:
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return None  # not from a tideflow server: the status code alone decides
        for packed in status.details:
            detail = errors_pb2.ErrorDetail()
            if packed.Unpack(detail):
                return detail
    return None


def rpc_error_from_status(
    message: str, *, status: str, detail: errors_pb2.ErrorDetail | None
) -> RPCError:
    """The exception for a failed call: chosen by the detail's kind, never by the text."""
    if detail is None:
        detail = errors_pb2.ErrorDetail(
            kind=_KIND_OF_STATUS.get(status, errors_pb2.ERROR_KIND_UNSPECIFIED)
        )
    cls = _ERROR_CLASSES.get(detail.kind, RPCError)
    return cls._from_detail(message, status, detail)


class FailureError(TideflowError):
    """An error that is recorded in history as a ``Failure``."""

    def __init__(self, message: str, *, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.message = message
        if cause is not None:
            self.__cause__ = cause

    @property
    def cause(self) -> BaseException | None:
        return self.__cause__


class ApplicationError(FailureError):
    """Raised by user code. ``non_retryable=True`` stops activity retries at once;
    raised from workflow code it fails the workflow (other exceptions only fail the
    workflow task, which is retried, as in Temporal)."""

    def __init__(
        self,
        message: str,
        *details: Any,
        type: str | None = None,
        non_retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.details: Sequence[Any] = details
        self.type = type
        self.non_retryable = non_retryable


class TimeoutType(IntEnum):
    START_TO_CLOSE = 1
    SCHEDULE_TO_START = 2
    SCHEDULE_TO_CLOSE = 3
    HEARTBEAT = 4


class TimeoutError(FailureError):
    def __init__(
        self, message: str, *, type: TimeoutType | None, last_heartbeat_details: Sequence[Any] = ()
    ) -> None:
        super().__init__(message)
        self.type = type
        self.last_heartbeat_details = last_heartbeat_details


class CancelledError(FailureError):
    def __init__(self, message: str = "cancelled", *details: Any) -> None:
        super().__init__(message)
        self.details = details


class TerminatedError(FailureError):
    pass


class ServerError(FailureError):
    def __init__(self, message: str, *, non_retryable: bool = False) -> None:
        super().__init__(message)
        self.non_retryable = non_retryable


class RetryState(IntEnum):
    UNSPECIFIED = 0
    IN_PROGRESS = 1
    NON_RETRYABLE_FAILURE = 2
    TIMEOUT = 3
    MAXIMUM_ATTEMPTS_REACHED = 4
    RETRY_POLICY_NOT_SET = 5
    INTERNAL_SERVER_ERROR = 6
    CANCEL_REQUESTED = 7


class ActivityError(FailureError):
    """An activity failed for good (its retries are over); ``cause`` says why."""

    def __init__(
        self,
        message: str,
        *,
        scheduled_event_id: int,
        started_event_id: int,
        identity: str,
        activity_type: str,
        activity_id: str,
        retry_state: RetryState | None,
    ) -> None:
        super().__init__(message)
        self.scheduled_event_id = scheduled_event_id
        self.started_event_id = started_event_id
        self.identity = identity
        self.activity_type = activity_type
        self.activity_id = activity_id
        self.retry_state = retry_state


class ChildWorkflowError(FailureError):
    """A child workflow failed, was cancelled, terminated or timed out (or could not
    start); ``cause`` says why."""

    def __init__(
        self,
        message: str,
        *,
        namespace: str,
        workflow_id: str,
        run_id: str,
        workflow_type: str,
        initiated_event_id: int,
        started_event_id: int,
        retry_state: RetryState | None,
    ) -> None:
        super().__init__(message)
        self.namespace = namespace
        self.workflow_id = workflow_id
        self.run_id = run_id
        self.workflow_type = workflow_type
        self.initiated_event_id = initiated_event_id
        self.started_event_id = started_event_id
        self.retry_state = retry_state


class WorkflowFailureError(TideflowError):
    """``handle.result()`` of a workflow that failed; ``cause`` is the failure."""

    def __init__(self, *, cause: BaseException) -> None:
        super().__init__(f"workflow execution failed: {cause}")
        self.__cause__ = cause

    @property
    def cause(self) -> BaseException:
        assert self.__cause__ is not None
        return self.__cause__


class NonDeterminismError(TideflowError):
    """Workflow code did not emit the commands its history recorded."""


class WorkflowNotFoundError(TideflowError):
    pass


class ContinueAsNewError(BaseException):
    """Raised by ``workflow.continue_as_new``: ends this run and starts its successor.

    A BaseException so that ``except Exception`` in workflow code cannot swallow it.
    """

    def __init__(
        self,
        args: list[Any],
        *,
        workflow: str | None,
        task_queue: str | None,
        run_timeout: Any,
        task_timeout: Any,
    ) -> None:
        super().__init__("continue as new")
        self.input_args = args
        self.workflow = workflow
        self.task_queue = task_queue
        self.run_timeout = run_timeout
        self.task_timeout = task_timeout


class _EvictionSignal(BaseException):
    """Raised into a workflow's coroutines to tear it down; user code cannot catch it
    with ``except Exception``."""
