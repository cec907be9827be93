"""The first transition of a run: its state, WorkflowExecutionStarted and first task.

Used for a client's start, a child's start, signal-with-start and the successor of a
continue-as-new (built in the same transaction as its predecessor's close). The
engine decides whether a run may start (id reuse and conflict policies) and commits;
this module only builds the ``Mutation``.

TLA+ actions (tla/EngineCore.tla): ``StartRun``, ``StartRunWith(attempt, runTimeout,
signalRid, hasParent)``.
"""

from __future__ import annotations

import uuid

from tideflow.api.v1 import common_pb2, service_pb2, state_pb2
from tideflow.api.v1.common_pb2 import WorkflowExecutionStatus as WS
from tideflow.api.v1.common_pb2 import WorkflowIdReusePolicy
from tideflow.api.v1.history_pb2 import EventType
from tideflow.history import TimerKind

from ._config import ServerConfig
from ._mutation import Mutation

ET = EventType
_US = 1_000_000


def new_run(
    req: service_pb2.StartWorkflowRequest,
    run_id: str,
    request_id: str,
    now: int,
    config: ServerConfig,
    *,
    first_execution_run_id: str = "",
    continued_execution_run_id: str = "",
    parent: state_pb2.MutableState | None = None,
    parent_initiated_event_id: int = 0,
    execution_expiration_us: int = 0,
) -> Mutation:
    """The first transition of a new run: WorkflowExecutionStarted (+ the start
    signal) and its first workflow task. ``execution_expiration_us``: the deadline
    a continue-as-new successor inherits (the execution timeout spans the chain)."""
    ms = initial_state(req, run_id, now, config)
    # The workflow execution timeout bounds the whole chain of runs (Temporal's
    # semantics): a successor keeps its predecessor's expiration time rather than
    # starting the clock again, so continuing as new cannot escape the timeout.
    execution_timeout_us = req.workflow_execution_timeout.ToMicroseconds()
    if not execution_expiration_us and execution_timeout_us:
        execution_expiration_us = now + execution_timeout_us
    if execution_expiration_us:
        ms.execution_expiration_time.FromMicroseconds(execution_expiration_us)
    ms.first_execution_run_id = first_execution_run_id or run_id
    ms.start_request_id = request_id
    m = Mutation(ms, now)
    if parent is not None:
        ms.parent_namespace = parent.namespace
        ms.parent_workflow_id = parent.workflow_id
        ms.parent_run_id = parent.run_id
        ms.parent_initiated_event_id = parent_initiated_event_id
        ms.parent_home_cluster = parent.home_cluster
    _append_started(m, req, request_id, continued_execution_run_id, parent)
    _arm_run_timeout(m, req, execution_expiration_us)
    if req.signal_name:
        m.append(
            ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
            signal_name=req.signal_name,
            input=req.signal_input if req.HasField("signal_input") else None,
            identity=req.identity,
            request_id=request_id,
        )
        ms.signal_request_ids.append(request_id)
    m.schedule_workflow_task()
    return m


def initial_state(
    req: service_pb2.StartWorkflowRequest, run_id: str, now: int, config: ServerConfig
) -> state_pb2.MutableState:
    ms = state_pb2.MutableState(
        namespace=req.namespace,
        workflow_id=req.workflow_id,
        run_id=run_id,
        status=WS.WORKFLOW_EXECUTION_STATUS_RUNNING,
        next_event_id=1,
        start_request_id=req.request_id,
        # Started here, so homed here, with the first ownership epoch
        # (tla/Replication.tla Init); a start naming another home never gets here
        # (server/_sites.py forwards it).
        home_cluster=config.cluster_name,
        version=1,
        activated_version=1,
    )
    ms.workflow_type.CopyFrom(req.workflow_type)
    ms.task_queue.name = req.task_queue.name
    ms.task_queue.kind = common_pb2.TASK_QUEUE_KIND_NORMAL
    ms.start_time.FromMicroseconds(now)
    wft_timeout = req.workflow_task_timeout.ToMicroseconds() or int(
        config.default_workflow_task_timeout_s * _US
    )
    ms.workflow_task_timeout.FromMicroseconds(
        min(wft_timeout, int(config.max_workflow_task_timeout_s * _US))
    )
    if req.HasField("workflow_run_timeout"):
        ms.workflow_run_timeout.CopyFrom(req.workflow_run_timeout)
    if req.HasField("workflow_execution_timeout"):
        ms.workflow_execution_timeout.CopyFrom(req.workflow_execution_timeout)
    return ms


def _append_started(
    m: Mutation,
    req: service_pb2.StartWorkflowRequest,
    request_id: str,
    continued_execution_run_id: str,
    parent: state_pb2.MutableState | None,
) -> None:
    ms = m.ms
    parent_execution = None
    if parent is not None:
        parent_execution = common_pb2.WorkflowExecution(
            workflow_id=parent.workflow_id, run_id=parent.run_id
        )
    m.append(
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED,
        workflow_type=req.workflow_type,
        task_queue=ms.task_queue,
        input=req.input if req.HasField("input") else None,
        workflow_execution_timeout=req.workflow_execution_timeout
        if req.HasField("workflow_execution_timeout")
        else None,
        workflow_run_timeout=req.workflow_run_timeout
        if req.HasField("workflow_run_timeout")
        else None,
        workflow_task_timeout=ms.workflow_task_timeout,
        identity=req.identity,
        attempt=1,
        original_execution_run_id=ms.run_id,
        first_execution_run_id=ms.first_execution_run_id,
        continued_execution_run_id=continued_execution_run_id,
        retry_policy=req.retry_policy if req.HasField("retry_policy") else None,
        memo=req.memo if req.HasField("memo") else None,
        search_attributes=req.search_attributes if req.HasField("search_attributes") else None,
        header=req.header if req.HasField("header") else None,
        parent_workflow_namespace=parent.namespace if parent is not None else "",
        parent_workflow_execution=parent_execution,
        parent_initiated_event_id=ms.parent_initiated_event_id,
        workflow_execution_expiration_time=ms.execution_expiration_time
        if ms.HasField("execution_expiration_time")
        else None,
        random_seed=uuid.UUID(ms.run_id).int & 0x7FFF_FFFF_FFFF_FFFF,
        request_id=request_id,
    )


def _arm_run_timeout(
    m: Mutation, req: service_pb2.StartWorkflowRequest, execution_expiration_us: int
) -> None:
    # The run closes TIMED_OUT at its run timeout or the chain's expiration,
    # whichever comes first.
    run_timeout_us = req.workflow_run_timeout.ToMicroseconds()
    deadlines = [m.now + run_timeout_us] if run_timeout_us else []
    if execution_expiration_us:
        deadlines.append(execution_expiration_us)
    if deadlines:
        m.ms.timer_keys.append(m.add_timer(TimerKind.WORKFLOW_RUN_TIMEOUT, 0, 1, min(deadlines)))


def reuse_refused(policy: int, closed_status: int) -> str | None:
    """Why the id reuse policy refuses a new run after one that closed so, or None."""
    if policy == WorkflowIdReusePolicy.WORKFLOW_ID_REUSE_POLICY_REJECT_DUPLICATE:
        return "the id reuse policy REJECT_DUPLICATE refuses a new run"
    if (
        policy == WorkflowIdReusePolicy.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE_FAILED_ONLY
        and closed_status
        in (WS.WORKFLOW_EXECUTION_STATUS_COMPLETED, WS.WORKFLOW_EXECUTION_STATUS_CONTINUED_AS_NEW)
    ):
        return "completed; the id reuse policy ALLOW_DUPLICATE_FAILED_ONLY refuses a new run"
    return None
