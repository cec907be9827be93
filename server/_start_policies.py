"""What a start does about a workflow id that already has a current run.

The id reuse policy (a closed run) and the id conflict policy (a running one) decide
between answering with that run, starting a new run, or refusing; signal-with-start on
a running run only signals it. The engine (server/_engine.py) commits the new run.

TLA+ (tla/EngineCore.tla): the decision to start of ``StartRun``.
"""

from __future__ import annotations

import contextlib
import enum
from typing import TYPE_CHECKING

from tideflow.api.v1 import service_pb2
from tideflow.api.v1.common_pb2 import WorkflowExecutionStatus as WS
from tideflow.api.v1.common_pb2 import WorkflowIdConflictPolicy, WorkflowIdReusePolicy
from tideflow.history import CurrentRecord, RunKey

from . import _run_start
from ._errors import FailedPreconditionError, WorkflowAlreadyStartedError

if TYPE_CHECKING:
    from ._engine import HistoryEngine


class _Decide(enum.Enum):
    """A start's verdict on the workflow id's current run besides "answer with it" or
    "start a new run": it changed meanwhile (closed, or replaced), so look again."""

    AGAIN = enum.auto()


AGAIN = _Decide.AGAIN


async def existing_run(
    engine: HistoryEngine,
    req: service_pb2.StartWorkflowRequest,
    current: CurrentRecord,
    request_id: str,
) -> str | _Decide | None:
    """What a start does about the workflow id's current run: the run id to answer
    with, AGAIN if that run changed meanwhile, or None to start a new run. Raises
    WorkflowAlreadyStartedError when the policies refuse a new run."""
    if current.start_request_id == request_id:
        return current.run_id
    if current.status == WS.WORKFLOW_EXECUTION_STATUS_RUNNING:
        return await _on_running(engine, req, current, request_id)
    problem = _run_start.reuse_refused(req.workflow_id_reuse_policy, current.status)
    if problem:
        raise WorkflowAlreadyStartedError(
            f"workflow id {req.workflow_id!r} was used by run {current.run_id} and {problem}",
            run_id=current.run_id,
            workflow_id=req.workflow_id,
        )
    return None


async def _on_running(
    engine: HistoryEngine,
    req: service_pb2.StartWorkflowRequest,
    current: CurrentRecord,
    request_id: str,
) -> str | _Decide:
    running = RunKey(namespace=req.namespace, workflow_id=req.workflow_id, run_id=current.run_id)
    if req.signal_name:
        # Signal-with-start on a running id: just the signal.
        try:
            await engine.signal(
                running,
                req.signal_name,
                req.signal_input if req.HasField("signal_input") else None,
                req.identity,
                request_id,
                None,
            )
        except FailedPreconditionError:
            return AGAIN  # it closed meanwhile: start a new run
        return current.run_id
    conflict = req.workflow_id_conflict_policy
    if conflict == WorkflowIdConflictPolicy.WORKFLOW_ID_CONFLICT_POLICY_USE_EXISTING:
        return current.run_id
    if (
        conflict == WorkflowIdConflictPolicy.WORKFLOW_ID_CONFLICT_POLICY_TERMINATE_EXISTING
        or req.workflow_id_reuse_policy
        == WorkflowIdReusePolicy.WORKFLOW_ID_REUSE_POLICY_TERMINATE_IF_RUNNING
    ):
        with contextlib.suppress(FailedPreconditionError):
            await engine.terminate(running, "replaced by a new start", None, req.identity)
        return AGAIN  # decide again on the now closed run
    raise WorkflowAlreadyStartedError(
        f"workflow id {req.workflow_id!r} is already running as run {current.run_id}",
        run_id=current.run_id,
        workflow_id=req.workflow_id,
    )
