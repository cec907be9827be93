"""Errors the store raises. The store is one of the two places that translate
errors (the other is the server's frontend): database exceptions never escape it raw."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by the history store."""


class ConditionFailedError(StoreError):
    """Another writer changed the run since it was read (version or event id clash).

    The caller reloads the run and recomputes its transition on fresh state.
    """


class CurrentExecutionConflictError(StoreError):
    """The workflow id already has an open run (or the run it expected is gone)."""

    def __init__(self, message: str, *, current_run_id: str | None = None) -> None:
        super().__init__(message)
        self.current_run_id = current_run_id


class RetryableStoreError(StoreError):
    """A transient failure (serialization conflict, lost connection) after all retries."""
