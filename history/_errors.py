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
    """A transient failure (serialization conflict, lost connection) after all retries.

    Nothing is known to be wrong with the request: the same request, sent again (with
    the same request id, so a write that did commit is not applied twice), may succeed.
    """


class TransactionConflictError(RetryableStoreError):
    """The database aborted the transaction for a concurrent one, after all retries:
    a serialization failure (SQLSTATE 40001, which CockroachDB and a SERIALIZABLE
    PostgreSQL raise in normal operation) or a deadlock (40P01). Nothing was written."""


class StoreUnavailableError(RetryableStoreError):
    """The database cannot be reached: connection refused or lost, the server shutting
    down, restarting or out of connections. Every request fails alike until it is back."""


class InvalidValueError(StoreError):
    """The database refused a value of the request (an integer out of its range, text
    too long for its column, a NUL character PostgreSQL cannot store). The input is at
    fault: the same request can never succeed."""


class ShardOwnershipLostError(StoreError):
    """A write or lease renewal of a shard whose range id moved on: another node
    acquired the shard (or this node never held it). Nothing was written; the node
    must drop the shard at once (tla/ShardLease.tla: the fence)."""

    def __init__(self, shard_id: int, held: int, current: int | None, how: str) -> None:
        where = (
            "" if current is None else f": range id {current} in the store, this node held {held}"
        )
        super().__init__(f"shard {shard_id} is not owned by this node ({how}{where})")
        self.shard_id = shard_id
        self.held = held
        self.current = current


class ClusterConfigError(StoreError):
    """The node's cluster settings conflict with the database's (the shard count
    fixed when it was first initialised)."""
