"""Retry policy semantics (Temporal's): defaults, validation and the next delay."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tideflow.api.v1.common_pb2 import Failure, RetryPolicy, RetryState

DEFAULT_INITIAL_INTERVAL_S = 1.0
DEFAULT_BACKOFF_COEFFICIENT = 2.0
DEFAULT_MAXIMUM_INTERVAL_FACTOR = 100
# Attempt numbers are int32 fields of the run's state and events.
MAX_ATTEMPT = 2**31 - 1


def with_defaults(policy: RetryPolicy) -> RetryPolicy:
    """Fill unset fields: 1 s initial, coefficient 2, cap 100 x initial, unlimited."""
    out = RetryPolicy()
    out.CopyFrom(policy)
    if out.initial_interval.ToMicroseconds() <= 0:
        out.initial_interval.FromMicroseconds(int(DEFAULT_INITIAL_INTERVAL_S * 1_000_000))
    if out.backoff_coefficient == 0:
        out.backoff_coefficient = DEFAULT_BACKOFF_COEFFICIENT
    if out.maximum_interval.ToMicroseconds() <= 0:
        out.maximum_interval.FromMicroseconds(
            out.initial_interval.ToMicroseconds() * DEFAULT_MAXIMUM_INTERVAL_FACTOR
        )
    return out


def validate(policy: RetryPolicy) -> str | None:
    """A message naming what is wrong with the policy, or None."""
    if policy.initial_interval.ToMicroseconds() < 0:
        return "retry_policy.initial_interval must not be negative"
    if policy.backoff_coefficient != 0 and policy.backoff_coefficient < 1:
        return "retry_policy.backoff_coefficient must be at least 1"
    if policy.maximum_attempts < 0:
        return "retry_policy.maximum_attempts must not be negative"
    max_us = policy.maximum_interval.ToMicroseconds()
    if max_us < 0:
        return "retry_policy.maximum_interval must not be negative"
    if max_us and max_us < policy.initial_interval.ToMicroseconds():
        return "retry_policy.maximum_interval must not be less than initial_interval"
    return None


@dataclass(frozen=True, slots=True)
class RetryDecision:
    delay_us: int  # -1: do not retry
    state: int


def next_retry(
    policy: RetryPolicy,
    *,
    attempt: int,
    failure: Failure | None,
    now_us: int,
    deadline_us: int,
) -> RetryDecision:
    """Whether attempt ``attempt`` (1-based, just failed) is retried, and after how long.

    ``deadline_us`` is the schedule-to-close deadline (0: none): a retry that could not
    start before it is not made.
    """
    p = with_defaults(policy)
    info = (
        failure.application_failure_info
        if failure is not None and failure.HasField("application_failure_info")
        else None
    )
    if info is not None and (info.non_retryable or info.type in p.non_retryable_error_types):
        return RetryDecision(-1, RetryState.RETRY_STATE_NON_RETRYABLE_FAILURE)
    if (p.maximum_attempts and attempt >= p.maximum_attempts) or attempt >= MAX_ATTEMPT:
        # "Unlimited" ends where the attempt counter (int32, as in Temporal) does: one
        # more would not fit the activity's state, and its transition would fail for
        # ever (about 25 days of retries every millisecond).
        return RetryDecision(-1, RetryState.RETRY_STATE_MAXIMUM_ATTEMPTS_REACHED)
    try:
        delay = p.initial_interval.ToMicroseconds() * (p.backoff_coefficient ** (attempt - 1))
    except OverflowError:
        # 2.0 ** 1024 and beyond overflow a float (unlimited attempts get there, a large
        # coefficient much sooner); the delay is capped at maximum_interval anyway.
        delay = math.inf
    if info is not None and info.HasField("next_retry_delay"):
        # The failure names its own wait (Temporal's next_retry_delay); a zero or
        # negative one becomes maximum_interval there, and here.
        delay = info.next_retry_delay.ToMicroseconds()
        if delay <= 0:
            delay = math.inf
    delay_us = int(min(delay, p.maximum_interval.ToMicroseconds()))
    if deadline_us and now_us + delay_us >= deadline_us:
        return RetryDecision(-1, RetryState.RETRY_STATE_TIMEOUT)
    return RetryDecision(delay_us, RetryState.RETRY_STATE_IN_PROGRESS)
