"""Transfers: what one run's transition does to other runs, and the outcome recorded.

A transition that starts a child, closes a child, signals or cancels another run, or
closes a parent with children writes an outbox row (``TaskKind.TRANSFER``); the
transfer processor (server/_transfer.py) hands each committed row to
``process_transfer``. Each action first acts on the other run through the engine's
public entry points (start, signal, cancel, terminate) on whichever node holds the
other run's shard (``engine.gateway``, server/_run_gateway.py), with a request id
derived from the source run and event so a replayed row acts once, then records the
outcome on the run that owns the row and deletes the row in that same transaction.

TLA+ actions (tla/EngineCore.tla): ``RecordChildStarted``, ``RecordChildClosed``,
``RecordExternalOutcome`` (the transitions after the other run was acted on) and the
parent-close policy that ``Close`` arms (``TransferRow(ref, slot)``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from tideflow.api.v1 import cluster_pb2, common_pb2, history_pb2, service_pb2, state_pb2
from tideflow.api.v1.common_pb2 import WorkflowExecutionStatus as WS
from tideflow.api.v1.history_pb2 import EventType, ParentClosePolicy
from tideflow.history import HistoryStore, RunKey, TaskRow, TransferAction

from ._errors import (
    FailedPreconditionError,
    NotFoundError,
    UnknownSiteError,
    WorkflowAlreadyStartedError,
)
from ._mutation import Mutation

if TYPE_CHECKING:
    from ._engine import HistoryEngine

log = logging.getLogger("tideflow.server.engine")

ET = EventType

# How a child's close event is reported in its parent's history.
_CHILD_OUTCOME_EVENT = {
    ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED: ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED,
    ET.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED: ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_FAILED,
    ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED: ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_CANCELED,
    ET.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT: ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TIMED_OUT,
    ET.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED: ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TERMINATED,
}
# Fields of a child's initiated event that its start request takes over.
_CHILD_START_FIELDS = (
    "input",
    "workflow_execution_timeout",
    "workflow_run_timeout",
    "workflow_task_timeout",
    "retry_policy",
    "memo",
    "search_attributes",
    "header",
)


async def process_transfer(engine: HistoryEngine, store: HistoryStore, task: TaskRow) -> None:
    """Carry out one outbox row; the row is deleted when its effect is recorded."""
    action = _ACTIONS.get(task.task_queue)
    try:
        if action is None:
            log.error("unknown transfer action %r; dropping %s", task.task_queue, task.task_key)
            await store.delete_task(task.task_key, run=task.key)
        else:
            await action(engine, store, task)
    except NotFoundError:
        # The run it is about is gone (or never was): nothing left to do.
        await store.delete_task(task.task_key, run=task.key)


# ------------------------------------------------------------------- start child


async def _judged_state(
    engine: HistoryEngine, key: RunKey, stale: Callable[[state_pb2.MutableState], bool]
) -> state_pb2.MutableState | None:
    """The run's state, or None if ``stale`` holds on it read from the store too: the
    cached state may lag a commit whose caller went away (a read cached the state from
    before it), and a row deleted on such a verdict is lost (the chaos suite: a
    child never started)."""
    state = await engine.state_of(key)
    if stale(state):
        engine.invalidate(key)  # read it from the store
        state = await engine.state_of(key)
        if stale(state):
            return None
    return state


def _child_start_done(ref_id: int) -> Callable[[state_pb2.MutableState], bool]:
    def done(parent: state_pb2.MutableState) -> bool:
        child = parent.pending_children.get(ref_id)
        running = parent.status == WS.WORKFLOW_EXECUTION_STATUS_RUNNING
        return child is None or bool(child.run_id) or not running

    return done


async def _start_child(engine: HistoryEngine, store: HistoryStore, task: TaskRow) -> None:
    parent = await _judged_state(engine, task.key, _child_start_done(task.ref_id))
    if parent is None:
        if not await _started_elsewhere_before_close(engine, task):
            await store.delete_task(task.task_key, run=task.key)
        return
    initiated = (
        await engine.event(task.key, task.ref_id)
    ).start_child_workflow_execution_initiated_event_attributes
    req = _child_start_request(parent, initiated, task.ref_id)
    failure_cause: str | None
    try:
        # On the node that owns the child's shard (server/_run_gateway.py), or at the
        # site named its home (server/_remote_children.py).
        run_id = await engine.gateway.start_child(
            req, parent, task.ref_id, home=initiated.home_cluster
        )
    except (WorkflowAlreadyStartedError, UnknownSiteError) as exc:
        # Its id in use, or a home no site is named (server/_sites.py unknown_site).
        failure_cause = str(exc)
        run_id = ""
    else:
        failure_cause = None
    await engine.update(
        task.key,
        "RecordChildStarted",
        lambda m: record_child_started(m, task, run_id, failure_cause),
    )


async def _started_elsewhere_before_close(engine: HistoryEngine, task: TaskRow) -> bool:
    """The parent closed before its child's start was recorded. A child homed at
    another site may have been started by a call whose answer never came, or be
    started yet by one still in flight there (C slow past the call's timeout on a
    link that stays up): no answer from C, not even "not started", is definite. So
    the row sends the start itself, closed parent or not, and goes only once it
    hears: the run of its request id (one run however many deliveries) is recorded,
    which applies the parent's close policy to it (``_late_child_started``); an id
    that another run holds leaves nothing of this request running. True once
    recorded (tla/RemoteChild.tla ``SendStart``; "probe_after_close" is the mutant
    that asked, starting nothing). Otherwise the child would run on, orphaned."""
    parent = await engine.state_of(task.key)
    child = parent.pending_children.get(task.ref_id)
    remote = engine.gateway.remote_children
    if child is None or child.run_id or remote is None or not remote.elsewhere(child.home_cluster):
        return False
    initiated = (
        await engine.event(task.key, task.ref_id)
    ).start_child_workflow_execution_initiated_event_attributes
    req = _child_start_request(parent, initiated, task.ref_id)
    try:
        run_id = await engine.gateway.start_child(req, parent, task.ref_id, home=child.home_cluster)
    except (WorkflowAlreadyStartedError, UnknownSiteError):
        run_id = ""
    await engine.update(
        task.key, "RecordChildStarted", lambda m: record_child_started(m, task, run_id, None)
    )
    return True


def _child_start_request(
    parent: state_pb2.MutableState,
    initiated: history_pb2.StartChildWorkflowExecutionInitiatedEventAttributes,
    initiated_event_id: int,
) -> service_pb2.StartWorkflowRequest:
    req = service_pb2.StartWorkflowRequest(
        namespace=parent.namespace,
        workflow_id=initiated.workflow_id,
        identity=f"parent:{parent.workflow_id}",
        # The same request id on every retry: a child is started at most once.
        request_id=f"{parent.run_id}:child:{initiated_event_id}",
    )
    req.workflow_type.CopyFrom(initiated.workflow_type)
    req.task_queue.name = initiated.task_queue.name
    for name in _CHILD_START_FIELDS:
        if initiated.HasField(name):
            getattr(req, name).CopyFrom(getattr(initiated, name))
    return req


def record_child_started(
    m: Mutation, task: TaskRow, run_id: str, failure_cause: str | None
) -> None:
    """The parent's side of a child's start (or of its failure to start)."""
    ms = m.ms
    m.trace["task"] = task
    m.trace["failed"] = failure_cause is not None
    info = ms.pending_children.get(task.ref_id)
    m.done_task_keys.append(task.task_key)
    m.dirty = True
    if info is None or info.run_id:
        return
    if ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING:
        if info.parent_closed and run_id:
            _late_child_started(m, info, task.ref_id, run_id)
        return
    if failure_cause is not None:
        m.append_or_buffer(
            ET.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_FAILED,
            namespace=ms.namespace,
            workflow_id=info.workflow_id,
            workflow_type=info.workflow_type,
            cause=failure_cause,
            initiated_event_id=task.ref_id,
        )
        del ms.pending_children[task.ref_id]
    else:
        info.run_id = run_id
        m.append_or_buffer(
            ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED,
            namespace=ms.namespace,
            initiated_event_id=task.ref_id,
            workflow_execution=common_pb2.WorkflowExecution(
                workflow_id=info.workflow_id, run_id=run_id
            ),
            workflow_type=info.workflow_type,
        )
    m.schedule_workflow_task()


def _late_child_started(
    m: Mutation, info: state_pb2.ChildInfo, initiated_event_id: int, run_id: str
) -> None:
    # The parent closed while its child was being started: the close policy could
    # not see the child then, so apply it now.
    info.run_id = run_id
    # Slot 2: the close's own row for this child (slot 1) may still be outstanding
    # (see Mutation.add_transfer). An ABANDON child is left alone, as close() does
    # (the policy row would terminate it).
    if info.parent_close_policy != ParentClosePolicy.PARENT_CLOSE_POLICY_ABANDON:
        m.add_transfer(TransferAction.PARENT_CLOSE_POLICY, initiated_event_id, slot=2)


# ------------------------------------------------------------------ child closed


async def _report_child_closed(engine: HistoryEngine, store: HistoryStore, task: TaskRow) -> None:
    # The row is the child's (its run's outbox): the parent's commit deletes it.
    child = await engine.state_of(task.key)
    close = await engine.event(task.key, task.ref_id)
    parent_key = RunKey(
        namespace=child.parent_namespace,
        workflow_id=child.parent_workflow_id,
        run_id=child.parent_run_id,
    )
    remote = engine.gateway.remote_children
    if remote is not None and remote.elsewhere(child.parent_home_cluster):
        # The parent is homed at another site: the row goes once its home recorded
        # the close (server/_remote_children.py); a lost answer sends it again.
        request = child_closed_request(parent_key, task, child, close)
        await remote.report_closed(child.parent_home_cluster, request)
        await store.delete_task(task.task_key, run=task.key)
        return
    # On the node that owns the parent's shard (server/_run_gateway.py).
    await engine.gateway.record_child_closed(parent_key, task, child, close)


def child_closed_request(
    parent_key: RunKey,
    task: TaskRow,
    child: state_pb2.MutableState,
    close: history_pb2.HistoryEvent,
) -> cluster_pb2.RecordChildClosedRequest:
    """A child's close (its outbox row ``task``) for its parent's node or site."""
    return cluster_pb2.RecordChildClosedRequest(
        parent_namespace=parent_key.namespace,
        parent=common_pb2.WorkflowExecution(
            workflow_id=parent_key.workflow_id, run_id=parent_key.run_id
        ),
        child_namespace=task.key.namespace,
        child=common_pb2.WorkflowExecution(workflow_id=child.workflow_id, run_id=child.run_id),
        child_first_execution_run_id=child.first_execution_run_id,
        parent_initiated_event_id=child.parent_initiated_event_id,
        transfer_action=task.task_queue,
        ref_id=task.ref_id,
        attempt=task.attempt,
        created_at=task.created_at,
        close_event=close,
    )


def record_child_closed(
    m: Mutation,
    task: TaskRow,
    child: state_pb2.MutableState,
    close: history_pb2.HistoryEvent,
) -> None:
    """The parent's side of its child's close: the child's outcome event."""
    ms = m.ms
    event_type = _CHILD_OUTCOME_EVENT.get(close.event_type)
    m.trace["task"] = task
    m.trace["initiated"] = child.parent_initiated_event_id
    m.trace["child_close"] = (
        "" if event_type is None else EventType.Name(event_type).removeprefix("EVENT_TYPE_")
    )
    m.done_task_keys.append(task.task_key)
    m.dirty = True
    info = ms.pending_children.get(child.parent_initiated_event_id)
    if (
        event_type is None
        or info is None
        or info.parent_closed
        or ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING
    ):
        return
    attrs: dict[str, Any] = {
        "namespace": ms.namespace,
        "workflow_execution": common_pb2.WorkflowExecution(
            workflow_id=child.workflow_id, run_id=child.run_id
        ),
        "workflow_type": info.workflow_type,
        "initiated_event_id": info.initiated_event_id,
    }
    attrs.update(_child_outcome_attributes(close, event_type))
    if not info.run_id:
        # The child finished before its start was recorded: record it first, so
        # the parent always sees started before closed.
        m.append_or_buffer(
            ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED,
            namespace=ms.namespace,
            initiated_event_id=info.initiated_event_id,
            workflow_execution=common_pb2.WorkflowExecution(
                workflow_id=child.workflow_id,
                run_id=child.first_execution_run_id or child.run_id,
            ),
            workflow_type=info.workflow_type,
        )
    m.append_or_buffer(event_type, **attrs)
    del ms.pending_children[info.initiated_event_id]
    m.schedule_workflow_task()


def _child_outcome_attributes(
    close: history_pb2.HistoryEvent, event_type: EventType
) -> dict[str, Any]:
    """What the parent's event repeats from the child's close event."""
    attrs: dict[str, Any] = {}
    if event_type == ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED:
        done = close.workflow_execution_completed_event_attributes
        if done.HasField("result"):
            attrs["result"] = done.result
    elif event_type == ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_FAILED:
        attrs["failure"] = close.workflow_execution_failed_event_attributes.failure
        attrs["retry_state"] = close.workflow_execution_failed_event_attributes.retry_state
    elif event_type == ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_CANCELED:
        canceled = close.workflow_execution_canceled_event_attributes
        if canceled.HasField("details"):
            attrs["details"] = canceled.details
    elif event_type == ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TIMED_OUT:
        attrs["retry_state"] = close.workflow_execution_timed_out_event_attributes.retry_state
    return attrs


# ------------------------------------------------------------- parent-close policy


async def _apply_parent_close_policy(
    engine: HistoryEngine, store: HistoryStore, task: TaskRow
) -> None:
    def unstarted(state: state_pb2.MutableState) -> bool:
        child = state.pending_children.get(task.ref_id)
        return child is None or not child.run_id

    parent = await _judged_state(engine, task.key, unstarted)
    child = parent.pending_children.get(task.ref_id) if parent is not None else None
    if parent is not None and child is not None:
        key = RunKey(namespace=child.namespace, workflow_id=child.workflow_id, run_id=child.run_id)
        try:
            if child.parent_close_policy == ParentClosePolicy.PARENT_CLOSE_POLICY_REQUEST_CANCEL:
                await engine.gateway.request_cancel(
                    key,
                    f"parent:{parent.workflow_id}",
                    f"{parent.run_id}:close:{task.ref_id}",
                    "parent closed",
                    home=child.home_cluster,
                )
            else:  # TERMINATE, also the default
                await engine.gateway.terminate(
                    key,
                    "parent closed",
                    f"parent:{parent.workflow_id}",
                    # A replayed row (or a retry on another node) terminates once.
                    f"{parent.run_id}:close:{task.ref_id}",
                    home=child.home_cluster,
                )
        except FailedPreconditionError:
            pass  # the child closed already
    await store.delete_task(task.task_key, run=task.key)


# --------------------------------------------------- signal / cancel another run


async def _external_request(engine: HistoryEngine, store: HistoryStore, task: TaskRow) -> None:
    source = await _judged_state(
        engine, task.key, lambda state: task.ref_id not in state.pending_external
    )
    if source is None:
        await store.delete_task(task.task_key, run=task.key)
        return
    request = source.pending_external[task.ref_id]
    initiated = await engine.event(task.key, task.ref_id)
    failure_cause = None
    try:
        await _deliver_external(engine, source, request, initiated, task.ref_id)
    except (NotFoundError, FailedPreconditionError) as exc:
        failure_cause = str(exc)
    await engine.update(
        task.key,
        "RecordExternalOutcome",
        lambda m: record_external_outcome(m, task, request, failure_cause),
    )


async def _deliver_external(
    engine: HistoryEngine,
    source: state_pb2.MutableState,
    request: state_pb2.ExternalRequest,
    initiated: history_pb2.HistoryEvent,
    initiated_event_id: int,
) -> None:
    """Signal or cancel the other run, once however often the row is replayed."""
    child = _started_child(source, request.workflow_id, request.run_id)
    if child is not None and child.home_cluster:
        # A child homed at another site: its run is known even before this site
        # holds its replica, and the request goes to its home's inbox.
        target = RunKey(
            namespace=child.namespace, workflow_id=child.workflow_id, run_id=child.run_id
        )
    else:
        target = await engine.resolve_run_id(request.namespace, request.workflow_id, request.run_id)
    request_id = f"{source.run_id}:external:{initiated_event_id}"
    if request.cancel:
        await engine.gateway.request_cancel(
            target,
            f"workflow:{source.workflow_id}",
            request_id,
            "",
            home=child.home_cluster if child is not None else "",
        )
        return
    a = initiated.signal_external_workflow_execution_initiated_event_attributes
    await engine.gateway.signal(
        target,
        a.signal_name,
        a.input if a.HasField("input") else None,
        f"workflow:{source.workflow_id}",
        request_id,
        a.header if a.HasField("header") else None,
        home=child.home_cluster if child is not None else "",
    )


def _started_child(
    source: state_pb2.MutableState, workflow_id: str, run_id: str
) -> state_pb2.ChildInfo | None:
    """The started child of ``source`` a request to (workflow_id, run_id) aims at."""
    for child in source.pending_children.values():
        if child.run_id and child.workflow_id == workflow_id and run_id in ("", child.run_id):
            return child
    return None


def record_external_outcome(
    m: Mutation, task: TaskRow, request: state_pb2.ExternalRequest, failure_cause: str | None
) -> None:
    """The requesting run's side of a signal or cancel it sent another run."""
    ms = m.ms
    m.trace["task"] = task
    m.trace["failed"] = failure_cause is not None
    m.trace["cancel"] = request.cancel
    m.done_task_keys.append(task.task_key)
    m.dirty = True
    if task.ref_id not in ms.pending_external or ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING:
        return
    del ms.pending_external[task.ref_id]
    common = {
        "namespace": ms.namespace,
        "workflow_execution": common_pb2.WorkflowExecution(
            workflow_id=request.workflow_id, run_id=request.run_id
        ),
        "initiated_event_id": task.ref_id,
    }
    if request.cancel:
        if failure_cause is None:
            m.append_or_buffer(ET.EVENT_TYPE_EXTERNAL_WORKFLOW_EXECUTION_CANCEL_REQUESTED, **common)
        else:
            m.append_or_buffer(
                ET.EVENT_TYPE_REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION_FAILED,
                cause=failure_cause,
                **common,
            )
    elif failure_cause is None:
        m.append_or_buffer(ET.EVENT_TYPE_EXTERNAL_WORKFLOW_EXECUTION_SIGNALED, **common)
    else:
        m.append_or_buffer(
            ET.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_FAILED,
            cause=failure_cause,
            **common,
        )
    m.schedule_workflow_task()


_Action = Callable[["HistoryEngine", HistoryStore, TaskRow], Awaitable[None]]
_ACTIONS: dict[str, _Action] = {
    TransferAction.START_CHILD: _start_child,
    TransferAction.CHILD_CLOSED: _report_child_closed,
    TransferAction.PARENT_CLOSE_POLICY: _apply_parent_close_policy,
    TransferAction.SIGNAL_EXTERNAL: _external_request,
    TransferAction.CANCEL_EXTERNAL: _external_request,
}
