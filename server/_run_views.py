"""What a run's mutable state shows a client: the DescribeWorkflow response."""

from __future__ import annotations

from collections.abc import Callable

from tideflow.api.v1 import service_pb2, state_pb2

from ._placement import encode

# Why an activity task waits: (namespace, task queue, placement) -> reason or "".
WaitingReason = Callable[[str, str, bytes], str]


def describe_response(
    ms: state_pb2.MutableState, detail_budget: int, waiting_reason: WaitingReason | None = None
) -> service_pb2.DescribeWorkflowResponse:
    """The run's info and pending work. Each activity's details and failure are
    bounded, their number is not: past ``detail_budget`` bytes the remaining entries
    come without them (still all listed), so the response fits the message limit.
    ``waiting_reason`` (matching's) says why a scheduled attempt waits for a worker."""
    response = service_pb2.DescribeWorkflowResponse()
    info = response.workflow_execution_info
    info.execution.workflow_id = ms.workflow_id
    info.execution.run_id = ms.run_id
    info.type.CopyFrom(ms.workflow_type)
    info.start_time.CopyFrom(ms.start_time)
    if ms.HasField("close_time"):
        info.close_time.CopyFrom(ms.close_time)
    info.status = ms.status
    info.history_length = ms.next_event_id - 1
    info.task_queue = ms.task_queue.name
    for act in sorted(ms.pending_activities.values(), key=lambda a: a.scheduled_event_id):
        pending = response.pending_activities.add(
            activity_id=act.activity_id,
            attempt=act.attempt,
            last_worker_identity=act.started_identity,
            scheduled_event_id=act.scheduled_event_id,
        )
        pending.activity_type.CopyFrom(act.activity_type)
        pending.scheduled_time.CopyFrom(act.scheduled_time)
        pending.placement.CopyFrom(act.placement)
        pending.last_worker_site = act.started_site
        pending.last_worker_tier = act.started_tier
        if act.HasField("started_time"):
            pending.last_started_time.CopyFrom(act.started_time)
        elif act.task_key and waiting_reason is not None:
            placement = encode(act.placement)
            pending.waiting_reason = waiting_reason(ms.namespace, act.task_queue.name, placement)
        if act.HasField("last_heartbeat_time"):
            pending.last_heartbeat_time.CopyFrom(act.last_heartbeat_time)
        details = act.heartbeat_details.ByteSize() + act.last_failure.ByteSize()
        if details > detail_budget:
            continue
        detail_budget -= details
        if act.HasField("heartbeat_details"):
            pending.heartbeat_details.CopyFrom(act.heartbeat_details)
        if act.HasField("last_failure"):
            pending.last_failure.CopyFrom(act.last_failure)
    if ms.HasField("workflow_task"):
        response.pending_workflow_task_attempt = ms.workflow_task.attempt
    return response
