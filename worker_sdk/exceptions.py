"""Exceptions users of the worker SDK see.

``TideflowError`` is the root. ``FailureError`` and its subclasses travel through
history as ``Failure`` messages (with their cause chain), so a workflow can catch an
activity's ``ApplicationError`` as the cause of an ``ActivityError`` and a client sees
a failed workflow as ``WorkflowFailureError`` whose cause is what the workflow raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Any


class TideflowError(Exception):
    """Base class of every tideflow error."""


class RPCError(TideflowError):
    """A call to the server failed; ``status`` is the gRPC status code name."""

    def __init__(self, message: str, *, status: str) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class NotFoundError(RPCError):
    pass


class InvalidArgumentError(RPCError):
    pass


class WorkflowAlreadyStartedError(RPCError):
    pass


class WorkflowQueryFailedError(RPCError):
    """The query handler raised, or the workflow has no such query."""


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
