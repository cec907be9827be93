"""Errors of the service layer. The frontend is the one place that turns them into
gRPC statuses; engine code raises them by condition, never a raw status.

Each class names a stable ``ErrorKind`` (``errors.proto``) and keeps the fields of
its condition; ``detail()`` is the typed ``ErrorDetail`` the frontend attaches to the
status, so a client learns, say, the run that holds a workflow id without parsing the
message.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import status_pb2

from tideflow.api.v1 import common_pb2, errors_pb2

Kind = errors_pb2.ErrorKind
Resource = errors_pb2.ResourceType

# The trailer gRPC defines for rich error details (a serialized ``google.rpc.Status``);
# grpcio-status and every Temporal SDK read it under this name.
STATUS_DETAILS_KEY = "grpc-status-details-bin"


# The kind of a subclass that names only its status code.
_KIND_OF_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: Kind.ERROR_KIND_INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND: Kind.ERROR_KIND_NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: Kind.ERROR_KIND_ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION: Kind.ERROR_KIND_FAILED_PRECONDITION,
    grpc.StatusCode.UNAVAILABLE: Kind.ERROR_KIND_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Kind.ERROR_KIND_DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Kind.ERROR_KIND_RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL: Kind.ERROR_KIND_INTERNAL,
}


def status_trailer(error: ServiceError) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata that carries the error's typed detail with its status."""
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    status.details.add().Pack(error.detail())
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


async def abort_with_detail(
    context: grpc.aio.ServicerContext[Any, Any], error: ServiceError
) -> None:
    """End the call with the error's status and its typed detail in the trailer."""
    await context.abort(error.code, error.message, trailing_metadata=status_trailer(error))


class ServiceError(Exception):
    """An error with the gRPC status code the frontend reports for it."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    kind: errors_pb2.ErrorKind = Kind.ERROR_KIND_INTERNAL

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass that sets only ``code`` (say, a limit refused with
        # RESOURCE_EXHAUSTED) gets that code's generic kind, not its parent's.
        if "code" in cls.__dict__ and "kind" not in cls.__dict__:
            cls.kind = _KIND_OF_CODE.get(cls.code, Kind.ERROR_KIND_UNSPECIFIED)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def detail(self) -> errors_pb2.ErrorDetail:
        """The typed detail sent with the status (subclasses add their fields)."""
        return errors_pb2.ErrorDetail(kind=self.kind)


class InvalidArgumentError(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    kind = Kind.ERROR_KIND_INVALID_ARGUMENT


class UnknownSiteError(InvalidArgumentError):
    """A run's home names no site this site knows (server/_sites.py
    ``Sites.unknown_site``): a child's start fails with it, not retried."""


class NotFoundError(ServiceError):
    """``resource`` (and its ids, when known) says what was not found."""

    code = grpc.StatusCode.NOT_FOUND
    kind = Kind.ERROR_KIND_NOT_FOUND

    def __init__(
        self,
        message: str,
        *,
        resource: errors_pb2.ResourceType = Resource.RESOURCE_TYPE_UNSPECIFIED,
        workflow_id: str = "",
        run_id: str = "",
        id: str = "",
    ) -> None:
        super().__init__(message)
        self.resource = resource
        self.workflow_id = workflow_id
        self.run_id = run_id
        self.id = id

    def detail(self) -> errors_pb2.ErrorDetail:
        detail = super().detail()
        detail.not_found.resource = self.resource
        detail.not_found.workflow_id = self.workflow_id
        detail.not_found.run_id = self.run_id
        detail.not_found.id = self.id
        return detail


class WorkflowNotFoundError(NotFoundError):
    """No run ``run_id`` of ``workflow_id`` (or no run at all, if ``run_id`` is empty)."""

    def __init__(self, message: str, *, workflow_id: str, run_id: str = "") -> None:
        super().__init__(
            message,
            resource=Resource.RESOURCE_TYPE_WORKFLOW,
            workflow_id=workflow_id,
            run_id=run_id,
        )


class ScheduleNotFoundError(NotFoundError):
    def __init__(self, message: str, *, schedule_id: str) -> None:
        super().__init__(message, resource=Resource.RESOURCE_TYPE_SCHEDULE, id=schedule_id)


class NamespaceNotFoundError(NotFoundError):
    kind = Kind.ERROR_KIND_NAMESPACE_NOT_FOUND

    def __init__(self, message: str, *, namespace: str) -> None:
        super().__init__(message, resource=Resource.RESOURCE_TYPE_NAMESPACE, id=namespace)
        self.namespace = namespace

    def detail(self) -> errors_pb2.ErrorDetail:
        detail = errors_pb2.ErrorDetail(kind=self.kind)
        detail.namespace_not_found.namespace = self.namespace
        return detail


class WorkflowAlreadyStartedError(ServiceError):
    """A start refused because ``run_id`` holds ``workflow_id``."""

    code = grpc.StatusCode.ALREADY_EXISTS
    kind = Kind.ERROR_KIND_WORKFLOW_ALREADY_STARTED

    def __init__(self, message: str, *, workflow_id: str, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.workflow_id = workflow_id

    def detail(self) -> errors_pb2.ErrorDetail:
        detail = super().detail()
        detail.workflow_already_started.workflow_id = self.workflow_id
        detail.workflow_already_started.run_id = self.run_id
        return detail


class AlreadyExistsError(ServiceError):
    """Something other than a workflow run exists already (a namespace, a schedule)."""

    code = grpc.StatusCode.ALREADY_EXISTS
    kind = Kind.ERROR_KIND_ALREADY_EXISTS

    def __init__(
        self,
        message: str,
        *,
        resource: errors_pb2.ResourceType = Resource.RESOURCE_TYPE_UNSPECIFIED,
        id: str = "",
    ) -> None:
        super().__init__(message)
        self.resource = resource
        self.id = id

    def detail(self) -> errors_pb2.ErrorDetail:
        detail = super().detail()
        detail.already_exists.resource = self.resource
        detail.already_exists.id = self.id
        return detail


class ScheduleAlreadyExistsError(AlreadyExistsError):
    def __init__(self, message: str, *, schedule_id: str) -> None:
        super().__init__(message, resource=Resource.RESOURCE_TYPE_SCHEDULE, id=schedule_id)


class FailedPreconditionError(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    kind = Kind.ERROR_KIND_FAILED_PRECONDITION


class NotHomeError(ServiceError):
    """A write of a run this site holds as a read-only replica (its home, its only
    writer, is ``home``: server/_sites.py). The frontend stores a signal, cancel or
    terminate in the site inbox instead; a task or timer row is dropped as stale;
    anything else is answered FAILED_PRECONDITION. (Not a FailedPreconditionError:
    nothing that handles a closed run may take it for one.)"""

    code = grpc.StatusCode.FAILED_PRECONDITION
    kind = Kind.ERROR_KIND_FAILED_PRECONDITION

    def __init__(self, home: str, key: object) -> None:
        super().__init__(f"run {key} is homed at site {home!r}; this site holds a replica")
        self.home = home


class UnavailableError(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    kind = Kind.ERROR_KIND_UNAVAILABLE


class LinkPendingError(UnavailableError):
    """A call to another site that waits for the sites' link (down now, or the peer
    cannot act yet): its transfer row is tried again, quietly (a link may stay down for
    hours; server/_remote_children.py)."""


class DeadlineExceededError(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    kind = Kind.ERROR_KIND_DEADLINE_EXCEEDED


class ResourceExhaustedError(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    kind = Kind.ERROR_KIND_RESOURCE_EXHAUSTED


class QueryFailedError(ServiceError):
    """The workflow's query handler raised (or there is no such query); ``failure`` is
    what the worker reported."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    kind = Kind.ERROR_KIND_QUERY_FAILED

    def __init__(
        self, message: str, *, query_type: str = "", failure: common_pb2.Failure | None = None
    ) -> None:
        super().__init__(message)
        self.query_type = query_type
        self.failure = failure

    def detail(self) -> errors_pb2.ErrorDetail:
        detail = super().detail()
        detail.query_failed.query_type = self.query_type
        if self.failure is not None:
            detail.query_failed.failure.CopyFrom(self.failure)
        return detail
