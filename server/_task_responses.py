"""What a poll hands a worker: a started task, its token and the history it needs.

The engine reads the run's state and history (from its cache or the store); these
functions only shape the responses, so what a worker sees is defined in one place.

TLA+ (tla/EngineCore.tla): ``WftToken`` (the token of the started workflow task,
which ``WftTokenValid`` checks when the worker reports), and the activity token that
``ActivityTokenValid`` checks.
"""

from __future__ import annotations

from tideflow.api.v1 import history_pb2, service_pb2, state_pb2
from tideflow.api.v1.history_pb2 import EventType
from tideflow.history import make_event

from ._errors import InvalidArgumentError

ET = EventType


def token(
    ms: state_pb2.MutableState,
    scheduled: int,
    started: int,
    attempt: int,
    *,
    activity: bool,
    scheduled_time_us: int = 0,
) -> bytes:
    return state_pb2.TaskToken(
        scheduled_time_us=scheduled_time_us,
        namespace=ms.namespace,
        workflow_id=ms.workflow_id,
        run_id=ms.run_id,
        scheduled_event_id=scheduled,
        started_event_id=started,
        attempt=attempt,
        is_activity=activity,
    ).SerializeToString()


def decode_token(raw: bytes, *, activity: bool) -> state_pb2.TaskToken:
    kind = "activity" if activity else "workflow"
    if not raw:
        raise InvalidArgumentError(f"{kind} task token is empty")
    try:
        decoded = state_pb2.TaskToken.FromString(raw)
    except Exception as exc:
        raise InvalidArgumentError(f"{kind} task token is malformed") from exc
    if not decoded.workflow_id or not decoded.run_id or decoded.is_activity != activity:
        raise InvalidArgumentError(f"{kind} task token is malformed")
    return decoded


def history_range_of(
    wft: state_pb2.WorkflowTaskInfo, ms: state_pb2.MutableState, *, only_new_events: bool
) -> tuple[int, int]:
    """The stored events (first, last) a started workflow task's worker gets: up to
    the started event, anything later belongs to the next task (for the sticky
    worker, only what came after the task it completed last)."""
    last = wft.scheduled_event_id - 1 if wft.transient else wft.started_event_id
    first = ms.last_workflow_task_started_event_id + 1 if only_new_events else 1
    return first, last


def workflow_task(
    ms: state_pb2.MutableState,
    wft: state_pb2.WorkflowTaskInfo,
    events: list[history_pb2.HistoryEvent],
    next_page_token: bytes,
    run_owner: str = "",
) -> service_pb2.PollWorkflowTaskResponse:
    """A started workflow task with the first page of its history: ``events`` (see
    ``history_range_of``, then ``unstored_events``) and the token for the rest.
    ``run_owner``: the advertised address of the node that owns the run (this one),
    where the worker sends the task's completion (docs/cluster.md)."""
    response = service_pb2.PollWorkflowTaskResponse(
        run_owner=run_owner,
        next_page_token=next_page_token,
        task_token=token(
            ms,
            wft.scheduled_event_id,
            wft.started_event_id,
            wft.attempt,
            activity=False,
            scheduled_time_us=wft.scheduled_time.ToMicroseconds(),
        ),
        previous_started_event_id=ms.last_workflow_task_started_event_id,
        started_event_id=wft.started_event_id,
        attempt=wft.attempt,
    )
    response.workflow_execution.workflow_id = ms.workflow_id
    response.workflow_execution.run_id = ms.run_id
    response.workflow_type.CopyFrom(ms.workflow_type)
    response.history.events.extend(events)
    response.scheduled_time.CopyFrom(wft.scheduled_time)
    response.started_time.CopyFrom(wft.started_time)
    return response


def unstored_events(
    ms: state_pb2.MutableState, wft: state_pb2.WorkflowTaskInfo
) -> list[history_pb2.HistoryEvent]:
    """The events that end a workflow task's history without being stored: a
    transient attempt's scheduled/started events (stored only if it completes)."""
    if not wft.transient:
        return []
    out = []
    for event_type, event_id, attrs in (
        (
            ET.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
            wft.scheduled_event_id,
            {
                "task_queue": ms.task_queue,
                "start_to_close_timeout": ms.workflow_task_timeout,
                "attempt": wft.attempt,
            },
        ),
        (
            ET.EVENT_TYPE_WORKFLOW_TASK_STARTED,
            wft.started_event_id,
            {
                "scheduled_event_id": wft.scheduled_event_id,
                "identity": wft.identity,
                "request_id": wft.request_id,
                "history_size_bytes": wft.history_size_bytes,
            },
        ),
    ):
        event = make_event(event_type, wft.started_time.ToMicroseconds(), **attrs)
        event.event_id = event_id
        out.append(event)
    return out


def buffered_events(ms: state_pb2.MutableState) -> list[history_pb2.HistoryEvent]:
    """Events buffered while a workflow task runs (signals, activity results...), with
    provisional ids from the run's next event id. They were accepted already: a query
    must see them too (read-your-writes). Their ids are provisional (the task's
    completion is recorded before them); the worker only applies them to answer the
    query, it matches nothing against them."""
    out = []
    for offset, buffered in enumerate(ms.buffered_events):
        event = history_pb2.HistoryEvent()
        event.CopyFrom(buffered)
        event.event_id = ms.next_event_id + offset
        out.append(event)
    return out


def query_task(
    ms: state_pb2.MutableState,
    query_id: str,
    query: service_pb2.WorkflowQuery,
    events: list[history_pb2.HistoryEvent],
    next_page_token: bytes,
) -> service_pb2.PollWorkflowTaskResponse:
    """A query task: the first page of the run's whole history (stored events, then
    ``buffered_events``), for the worker to replay and answer."""
    response = service_pb2.PollWorkflowTaskResponse(
        next_page_token=next_page_token,
        task_token=state_pb2.TaskToken(
            namespace=ms.namespace,
            workflow_id=ms.workflow_id,
            run_id=ms.run_id,
            query_id=query_id,
        ).SerializeToString(),
        previous_started_event_id=ms.last_workflow_task_started_event_id,
    )
    response.workflow_execution.workflow_id = ms.workflow_id
    response.workflow_execution.run_id = ms.run_id
    response.workflow_type.CopyFrom(ms.workflow_type)
    response.history.events.extend(events)
    response.query.CopyFrom(query)
    return response


def activity_task(
    ms: state_pb2.MutableState,
    info: state_pb2.ActivityInfo,
    attrs: history_pb2.ActivityTaskScheduledEventAttributes,
    run_owner: str = "",
) -> service_pb2.PollActivityTaskResponse:
    """The started attempt of an activity (``attrs``: its scheduled event's;
    ``run_owner`` as for ``workflow_task``)."""
    resp = service_pb2.PollActivityTaskResponse(
        run_owner=run_owner,
        task_token=token(
            ms,
            info.scheduled_event_id,
            0,
            info.attempt,
            activity=True,
            scheduled_time_us=info.scheduled_time.ToMicroseconds(),
        ),
        workflow_namespace=ms.namespace,
        activity_id=info.activity_id,
        attempt=info.attempt,
    )
    resp.workflow_type.CopyFrom(ms.workflow_type)
    resp.workflow_execution.workflow_id = ms.workflow_id
    resp.workflow_execution.run_id = ms.run_id
    resp.activity_type.CopyFrom(info.activity_type)
    if attrs.HasField("header"):
        resp.header.CopyFrom(attrs.header)
    if attrs.HasField("input"):
        resp.input.CopyFrom(attrs.input)
    if info.HasField("heartbeat_details"):
        resp.heartbeat_details.CopyFrom(info.heartbeat_details)
    resp.scheduled_time.CopyFrom(info.first_scheduled_time)
    resp.current_attempt_scheduled_time.CopyFrom(info.scheduled_time)
    resp.started_time.CopyFrom(info.started_time)
    resp.schedule_to_close_timeout.CopyFrom(info.schedule_to_close_timeout)
    resp.start_to_close_timeout.CopyFrom(info.start_to_close_timeout)
    resp.heartbeat_timeout.CopyFrom(info.heartbeat_timeout)
    resp.retry_policy.CopyFrom(info.retry_policy)
    return resp
