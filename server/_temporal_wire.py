"""Translation between Temporal's wire messages (the generated ``temporalio.api.*``
modules of the pinned ``temporalio`` wheel) and tideflow's own (``tideflow.api.v1``).

Both APIs name their messages, fields and enum values alike almost everywhere, but the
field numbers and many enum numbers differ, so bytes cannot pass through. ``copy``
walks the source message's descriptor and sets the destination field of the same name:
messages recursively, enums by value *name* (with alias tables where the two enums
name a value differently), maps and repeated fields item by item. Nothing goes through
JSON.

The direction decides what happens to a field the other side has no place for:

- into tideflow (a request, a command, a failure a worker reports) it is refused with
  ``Untranslatable`` naming the field, unless ``IGNORED`` says the field carries no
  meaning for the run (worker versioning stamps, UI summaries, ...): a field dropped
  here could change what the SDK later replays;
- into Temporal (history, poll responses, describe/list) a tideflow-only field is left
  out (``placement``, ``executed_at``, the tideflow SDK's ``random_seed``): Temporal
  SDKs do not replay them. An *event type* Temporal has no name for is refused instead,
  because leaving an event out would tear a hole in the history the SDK replays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

# Fields of Temporal requests that tideflow does not store and that change nothing a
# worker replays or a caller reads back; each is accepted and dropped. Keyed by the
# Temporal message's name (not full name: they are unique across the packages used).
IGNORED: Mapping[str, frozenset[str]] = {
    "*": frozenset(
        {
            # Worker versioning and deployments (refused where they would route work:
            # see _temporal_service), priorities (dispatch order only), links between
            # runs (UI), user metadata (UI summaries), identities of poller groups.
            "worker_version_capabilities",
            "worker_version_stamp",
            "worker_version",
            "deployment",
            "deployment_options",
            "versioning_behavior",
            "use_workflow_build_id",
            "inherit_build_id",
            "priority",
            "links",
            "user_metadata",
            "binary_checksum",
            "poller_group_id",
            "worker_instance_key",
            "worker_control_task_queue",
            "resource_id",
            "worker_heartbeat",
            "task_queue_types",
            "metering_metadata",
            "capabilities",
            "event_group_markers",
        }
    ),
    # The task token names the namespace of a token-bearing call; the frontend checks it.
    "RespondWorkflowTaskCompletedRequest": frozenset({"namespace"}),
    "RespondWorkflowTaskFailedRequest": frozenset({"namespace", "messages"}),
    "RespondActivityTaskCompletedRequest": frozenset({"namespace"}),
    # Why the worker failed the attempt (unhandled error, payload size): not history.
    "RespondActivityTaskFailedRequest": frozenset({"namespace", "cause"}),
    "RespondActivityTaskCanceledRequest": frozenset({"namespace"}),
    "RecordActivityTaskHeartbeatRequest": frozenset({"namespace"}),
    "ShutdownWorkerRequest": frozenset({"reason", "task_queue"}),
    # tideflow does not archive: there is nothing to skip.
    "GetWorkflowExecutionHistoryRequest": frozenset({"skip_archival"}),
    # The SDK always says that its continue-as-new is the workflow's own decision.
    "ContinueAsNewWorkflowExecutionCommandAttributes": frozenset({"initiator"}),
    # Eager start is not advertised (GetSystemInfo); a request for it gets a plain start.
    "StartWorkflowExecutionRequest": frozenset({"request_eager_execution"}),
    # Eager activities: the frontend answers the flag (same name), nothing else.
    "ScheduleActivityTaskCommandAttributes": frozenset(),
}

# Enum values the two APIs name differently, by the *source* value's name.
_ENUM_ALIASES: Mapping[str, str] = {
    # tideflow -> Temporal
    "WORKFLOW_TASK_FAILED_CAUSE_PAYLOAD_TOO_LARGE": "WORKFLOW_TASK_FAILED_CAUSE_PAYLOADS_TOO_LARGE",
    "WORKFLOW_TASK_FAILED_CAUSE_BAD_COMMAND_ATTRIBUTES": "WORKFLOW_TASK_FAILED_CAUSE_UNSPECIFIED",
    "WORKFLOW_TASK_FAILED_CAUSE_UNKNOWN_WORKFLOW_TYPE": (
        "WORKFLOW_TASK_FAILED_CAUSE_WORKFLOW_WORKER_UNHANDLED_FAILURE"
    ),
    # Temporal -> tideflow
    "WORKFLOW_TASK_FAILED_CAUSE_PAYLOADS_TOO_LARGE": "WORKFLOW_TASK_FAILED_CAUSE_PAYLOAD_TOO_LARGE",
}
# A workflow task failure of a cause tideflow has no name for is still a failure: it
# must be recorded, not refused (the worker would retry the same report for ever).
_FALLBACK_ENUM: Mapping[str, str] = {
    "tideflow.api.v1.WorkflowTaskFailedCause": (
        "WORKFLOW_TASK_FAILED_CAUSE_WORKFLOW_WORKER_UNHANDLED_FAILURE"
    ),
}
# The causes of the three ``*_FAILED`` cross-run events are free text in tideflow (the
# engine's message); each of those events has one cause tideflow produces.
_CAUSE_OF_TEXT: Mapping[str, str] = {
    "temporal.api.enums.v1.StartChildWorkflowExecutionFailedCause": (
        "START_CHILD_WORKFLOW_EXECUTION_FAILED_CAUSE_WORKFLOW_ALREADY_EXISTS"
    ),
    "temporal.api.enums.v1.SignalExternalWorkflowExecutionFailedCause": (
        "SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_FAILED_CAUSE_EXTERNAL_WORKFLOW_EXECUTION_NOT_FOUND"
    ),
    "temporal.api.enums.v1.CancelExternalWorkflowExecutionFailedCause": (
        "CANCEL_EXTERNAL_WORKFLOW_EXECUTION_FAILED_CAUSE_EXTERNAL_WORKFLOW_EXECUTION_NOT_FOUND"
    ),
}


# Source enums whose unknown values are refused even into Temporal: an event or command
# left out would change what the SDK replays.
_NEVER_DROPPED = frozenset({"tideflow.api.v1.EventType", "tideflow.api.v1.CommandType"})


class Untranslatable(Exception):
    """A field or value of one API that the other cannot hold; ``path`` names it."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


def copy(src: Message, dst: Message, *, strict: bool, path: str = "") -> None:
    """Set every field of ``src`` that is set on the same-named field of ``dst``.

    ``strict`` (into tideflow): a set field with no counterpart raises ``Untranslatable``
    unless ``IGNORED`` lists it; otherwise (into Temporal) it is left out."""
    fields = dst.DESCRIPTOR.fields_by_name
    ignored = IGNORED.get(src.DESCRIPTOR.name, frozenset()) | IGNORED["*"]
    for field, value in src.ListFields():
        where = f"{path}{field.name}"
        target = fields.get(field.name)
        if target is None:
            if strict and field.name not in ignored:
                raise Untranslatable(where, "tideflow cannot store this field")
            continue
        _copy_field(field, target, value, dst, where, strict)


M = TypeVar("M", bound=Message)


def converted(src: Message, dst_class: type[M], *, strict: bool) -> M:
    """A new ``dst_class`` message with ``src`` copied into it (see ``copy``)."""
    dst = dst_class()
    copy(src, dst, strict=strict, path=f"{src.DESCRIPTOR.name}.")
    return dst


def _copy_field(
    field: Any,
    target: Any,
    value: Any,
    dst: Message,
    where: str,
    strict: bool,
) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        _copy_map(field, target, value, dst, where, strict)
    elif field.is_repeated:
        if not target.is_repeated:
            raise Untranslatable(where, "a list where one value is expected")
        items = getattr(dst, target.name)
        for index, item in enumerate(value):
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                copy(item, items.add(), strict=strict, path=f"{where}[{index}].")
            else:
                items.append(_scalar(field, target, item, f"{where}[{index}]", strict))
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        if target.type != FieldDescriptor.TYPE_MESSAGE:
            raise Untranslatable(where, "a message where a value is expected")
        inner = getattr(dst, target.name)
        if field.message_type.full_name == target.message_type.full_name:
            inner.CopyFrom(value)  # google.protobuf well-known types
        else:
            inner.SetInParent()  # an empty message is still present
            copy(value, inner, strict=strict, path=f"{where}.")
    else:
        converted_value = _scalar(field, target, value, where, strict)
        if converted_value is not None:
            setattr(dst, target.name, converted_value)


def _copy_map(
    field: Any,
    target: Any,
    value: Any,
    dst: Message,
    where: str,
    strict: bool,
) -> None:
    entries = getattr(dst, target.name)
    value_field = field.message_type.fields_by_name["value"]
    for key, item in value.items():
        if value_field.type == FieldDescriptor.TYPE_MESSAGE:
            copy(item, entries[key], strict=strict, path=f"{where}[{key!r}].")
        else:
            entries[key] = item


def _scalar(field: Any, target: Any, value: Any, where: str, strict: bool) -> object:
    """``value`` as ``target`` holds it; None: leave the target unset."""
    if field.type == FieldDescriptor.TYPE_ENUM:
        name = field.enum_type.values_by_number[value].name
        if target.type == FieldDescriptor.TYPE_STRING:
            return name
        if target.type == FieldDescriptor.TYPE_ENUM:
            strict = strict or field.enum_type.full_name in _NEVER_DROPPED
            return _enum_value(target.enum_type, name, where, strict)
    elif field.type == FieldDescriptor.TYPE_STRING and target.type == FieldDescriptor.TYPE_ENUM:
        # A tideflow free-text cause into a Temporal cause enum.
        text = str(value)
        if text in target.enum_type.values_by_name:
            return target.enum_type.values_by_name[text].number
        fallback = _CAUSE_OF_TEXT.get(target.enum_type.full_name)
        return 0 if fallback is None else target.enum_type.values_by_name[fallback].number
    elif field.cpp_type == target.cpp_type:
        return value
    if strict:
        raise Untranslatable(where, "the two APIs give this field different types")
    return None


def _enum_value(enum: Any, name: str, where: str, strict: bool) -> int | None:
    values = enum.values_by_name
    for candidate in (name, _ENUM_ALIASES.get(name), _FALLBACK_ENUM.get(enum.full_name)):
        if candidate is not None and candidate in values:
            return int(values[candidate].number)
    if strict:
        raise Untranslatable(where, f"{name} has no counterpart in {enum.full_name}")
    return None
