"""The event model and the durable history store.

This package imports neither ``tideflow.server`` nor ``tideflow.worker_sdk``: both
depend on it, never the other way round (``tests/test_layering.py`` enforces it).
The event helpers and the search-attribute codec live in ``tideflow.api`` (no SQL
there, so the SDK imports them without SQLAlchemy); they are re-exported here for the
server.
"""

from tideflow.api.events import (
    ATTRIBUTE_FIELD,
    CLOSE_EVENTS,
    COMMAND_EVENTS,
    attributes_of,
    event_type_name,
    make_event,
)
from tideflow.api.search_attributes import (
    SearchAttributeType,
    SearchAttributeValue,
    datetime_of,
    decode_search_attribute,
    decode_search_attributes,
    encode_search_attribute,
    encode_search_attributes,
    format_rfc3339,
    micros_of,
    parse_rfc3339,
)

from ._cluster import MemberRecord, ShardRecord, queue_shard_of, shard_of
from ._errors import (
    ClusterConfigError,
    ConditionFailedError,
    CurrentExecutionConflictError,
    InvalidValueError,
    RetryableStoreError,
    ShardOwnershipLostError,
    StoreError,
    StoreUnavailableError,
    TransactionConflictError,
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
    TransferAction,
    Transition,
    now_micros,
    timer_key_kind,
)
from ._schedule_store import (
    ScheduleActionKind,
    ScheduleActionRecord,
    ScheduleActionState,
    ScheduleRecord,
    ScheduleStore,
    schedule_shard,
    slot_action_key,
    trigger_action_key,
)
from ._site_metadata_store import SiteMetadataRecord
from ._store import HistoryStore
from ._token_keys import TokenKey, TokenKeyStore
from ._visibility_store import (
    BUILTIN_FIELDS,
    COMPARE_OPS,
    Compare,
    FieldKind,
    LogicalOp,
    OrderBy,
    QueryExpr,
    QueryValue,
    VisibilityQuery,
    VisibilityRecord,
    search_attributes_problem,
)
from ._visibility_store import Cursor as VisibilityCursor

__all__ = [
    "ATTRIBUTE_FIELD",
    "BUILTIN_FIELDS",
    "CLOSE_EVENTS",
    "COMMAND_EVENTS",
    "COMPARE_OPS",
    "ClusterConfigError",
    "Compare",
    "ConditionFailedError",
    "CurrentExecutionConflictError",
    "CurrentRecord",
    "CurrentWrite",
    "ExecutionRecord",
    "ExecutionSummary",
    "FieldKind",
    "HistoryStore",
    "InvalidValueError",
    "LogicalOp",
    "MemberRecord",
    "OrderBy",
    "QueryExpr",
    "QueryValue",
    "RetryableStoreError",
    "RunKey",
    "ScheduleActionKind",
    "ScheduleActionRecord",
    "ScheduleActionState",
    "ScheduleRecord",
    "ScheduleStore",
    "SearchAttributeType",
    "SearchAttributeValue",
    "ShardOwnershipLostError",
    "ShardRecord",
    "SiteMetadataRecord",
    "StoreError",
    "StoreUnavailableError",
    "TaskKind",
    "TaskRow",
    "TimerKind",
    "TimerRow",
    "TokenKey",
    "TokenKeyStore",
    "TransactionConflictError",
    "TransferAction",
    "Transition",
    "VisibilityCursor",
    "VisibilityQuery",
    "VisibilityRecord",
    "attributes_of",
    "datetime_of",
    "decode_search_attribute",
    "decode_search_attributes",
    "encode_search_attribute",
    "encode_search_attributes",
    "event_type_name",
    "format_rfc3339",
    "make_event",
    "micros_of",
    "now_micros",
    "parse_rfc3339",
    "queue_shard_of",
    "schedule_shard",
    "search_attributes_problem",
    "shard_of",
    "slot_action_key",
    "timer_key_kind",
    "trigger_action_key",
]
