"""How the server logs failures that come in floods.

A store outage fails every step alike, so a background loop logs one warning line per
failure, not a traceback (a restart of the database would otherwise flood the log);
anything else is a bug worth its traceback. Failures of requests, which arrive as fast
as clients send them, go through ``RateLimitedLog``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from tideflow.history import StoreError

from ._errors import LinkPendingError, UnavailableError


def log_retry(log: logging.Logger, what: str, exc: BaseException) -> None:
    """Log that ``what`` failed with ``exc`` and will be tried again. UNAVAILABLE
    (a run of a shard another node owns, say) is expected to pass, like an outage."""
    if isinstance(exc, LinkPendingError):
        log.debug("%s waits for the sites' link (%s)", what, exc)
    elif isinstance(exc, (StoreError, UnavailableError)):
        log.warning("%s failed (%s); retrying", what, exc)
    else:
        log.error("%s failed; retrying", what, exc_info=exc)


class RateLimitedLog:
    """Warnings to ``log``, at most one line per ``interval_s``, each saying how many
    were left out since the last: one per failed request of an outage (or per
    undecodable body) would flood the log at the rate clients send. The ones left out
    go to DEBUG.

    ``now_s`` is a monotonic clock (a wall clock set back would silence the log)."""

    def __init__(
        self,
        log: logging.Logger,
        interval_s: float,
        *,
        now_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._interval_s = interval_s
        self._now_s = now_s
        self._next_at: float | None = None
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = self._now_s()
        if self._next_at is not None and now < self._next_at:
            self._suppressed += 1
            self._log.debug(message, *args)  # each one still, for who asks for them
            return
        self._next_at = now + self._interval_s
        suppressed, self._suppressed = self._suppressed, 0
        self._log.warning(message + " (%d more left out before this one)", *args, suppressed)
