"""Values shared by workflows, activities and the client."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum

from tideflow.api.v1 import common_pb2


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How the server retries a failed activity (Temporal's semantics).

    The delay before attempt n+1 is ``initial_interval * backoff_coefficient**(n-1)``,
    capped at ``maximum_interval`` (default 100 x initial). ``maximum_attempts`` 0
    means unlimited. Errors whose type is in ``non_retryable_error_types`` (or an
    ``ApplicationError(non_retryable=True)``) are not retried.
    """

    initial_interval: timedelta = timedelta(seconds=1)
    backoff_coefficient: float = 2.0
    maximum_interval: timedelta | None = None
    maximum_attempts: int = 0
    non_retryable_error_types: Sequence[str] = ()

    def to_proto(self) -> common_pb2.RetryPolicy:
        proto = common_pb2.RetryPolicy(
            backoff_coefficient=self.backoff_coefficient,
            maximum_attempts=self.maximum_attempts,
            non_retryable_error_types=list(self.non_retryable_error_types),
        )
        proto.initial_interval.FromTimedelta(self.initial_interval)
        if self.maximum_interval is not None:
            proto.maximum_interval.FromTimedelta(self.maximum_interval)
        return proto

    @staticmethod
    def from_proto(proto: common_pb2.RetryPolicy) -> RetryPolicy:
        return RetryPolicy(
            initial_interval=proto.initial_interval.ToTimedelta(),
            backoff_coefficient=proto.backoff_coefficient or 2.0,
            maximum_interval=proto.maximum_interval.ToTimedelta()
            if proto.HasField("maximum_interval")
            else None,
            maximum_attempts=proto.maximum_attempts,
            non_retryable_error_types=tuple(proto.non_retryable_error_types),
        )


class WorkflowIDReusePolicy(IntEnum):
    """Whether a start may reuse the id of a closed run."""

    ALLOW_DUPLICATE = 1
    ALLOW_DUPLICATE_FAILED_ONLY = 2
    REJECT_DUPLICATE = 3
    TERMINATE_IF_RUNNING = 4


class WorkflowIDConflictPolicy(IntEnum):
    """What a start does when a run with the id is still running."""

    FAIL = 1
    USE_EXISTING = 2
    TERMINATE_EXISTING = 3
