"""How background loops report a failed step they will retry.

A store outage fails every step alike, so it is one warning line per failure, not a
traceback (a restart of the database would otherwise flood the log); anything else is
a bug worth its traceback.
"""

from __future__ import annotations

import logging

from tideflow.history import StoreError

from ._errors import UnavailableError


def log_retry(log: logging.Logger, what: str, exc: BaseException) -> None:
    """Log that ``what`` failed with ``exc`` and will be tried again. UNAVAILABLE
    (a run of a shard another node owns, say) is expected to pass, like an outage."""
    if isinstance(exc, (StoreError, UnavailableError)):
        log.warning("%s failed (%s); retrying", what, exc)
    else:
        log.error("%s failed; retrying", what, exc_info=exc)
