"""Errors of the service layer. The frontend is the one place that turns them into
gRPC statuses; engine code raises them by condition, never a raw status."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error with the gRPC status code the frontend reports for it."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgumentError(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class NamespaceNotFoundError(NotFoundError):
    pass


class WorkflowAlreadyStartedError(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS

    def __init__(self, message: str, *, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class AlreadyExistsError(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class UnavailableError(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class QueryFailedError(ServiceError):
    """The workflow's query handler raised (or there is no such query)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
