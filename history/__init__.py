"""The event model and the durable history store.

This package imports neither ``tideflow.server`` nor ``tideflow.worker_sdk``: both
depend on it, never the other way round (``tests/test_layering.py`` enforces it).
"""

from ._errors import (
    ConditionFailedError,
    CurrentExecutionConflictError,
    RetryableStoreError,
    StoreError,
)
from ._events import (
    ATTRIBUTE_FIELD,
    CLOSE_EVENTS,
    COMMAND_EVENTS,
    attributes_of,
    event_type_name,
    make_event,
)
from ._records import (
    CurrentRecord,
    CurrentWrite,
    ExecutionRecord,
    ExecutionSummary,
    RunKey,
    TaskKind,
    TaskRow,
    TimerKind,
    TimerRow,
    Transition,
)
from ._store import HistoryStore, now_micros

__all__ = [
    "ATTRIBUTE_FIELD",
    "CLOSE_EVENTS",
    "COMMAND_EVENTS",
    "ConditionFailedError",
    "CurrentExecutionConflictError",
    "CurrentRecord",
    "CurrentWrite",
    "ExecutionRecord",
    "ExecutionSummary",
    "HistoryStore",
    "RetryableStoreError",
    "RunKey",
    "StoreError",
    "TaskKind",
    "TaskRow",
    "TimerKind",
    "TimerRow",
    "Transition",
    "attributes_of",
    "event_type_name",
    "make_event",
    "now_micros",
]
