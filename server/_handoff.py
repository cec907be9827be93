"""Handoff: moving a run's home from one site to another (tla/Replication.tla).

The old home writes ``WORKFLOW_EXECUTION_HANDOFF(from, to, new_version)`` as its last
event (``Handoff``): the same transition names the new home in the run's state and
bumps its ownership epoch, so from that commit on the old home's own replica refuses
it every write (``HistoryEngine.check_home``). The new home learns it by replication,
hence only once its replica holds every event up to the HANDOFF; it then takes the
run over (``take_over``): it creates the task and timer rows the run needs here (its
workflow task, its timers) under the new epoch. Until then nobody writes the run, so
no link flap or crash can fork it: each side only ever writes while its own replica
names it home, and at most one replica can (the HANDOFF is the old home's last).

Activities in flight go with the run, as in Temporal's failover between clusters:
the new home owns them from its take-over. One waiting for a worker is dispatched at
the new home (the old home withdraws its copy from its matching, and drops its row as
stale if a poller gets it first); one started at the old home keeps running there,
and its timeouts (start-to-close, heartbeat, schedule-to-close) and any retry backoff
are re-armed at the new home at the same instants. The worker's answer reaches the
old home, which no longer writes the run and forwards it to the new home
(server/_remote_tasks.py); if that cannot be done (link down, the new home not home
yet) the worker is told UNAVAILABLE and retries, and a worker that went away is
covered by the timeouts: the new home retries the activity per its retry policy.

A handoff is still refused while a workflow task is running or a child or a request
to another run is in flight (their outcomes would arrive at the old home, and the
old home does not forward those): FAILED_PRECONDITION, to be retried.
"""

from __future__ import annotations

from tideflow.api.v1 import state_pb2
from tideflow.api.v1.common_pb2 import TaskQueueKind
from tideflow.api.v1.common_pb2 import WorkflowExecutionStatus as WS
from tideflow.api.v1.history_pb2 import EventType
from tideflow.history import RunKey, TaskKind, TimerKind

from ._engine import HistoryEngine
from ._errors import FailedPreconditionError, InvalidArgumentError
from ._mutation import Mutation
from ._placement import encode

ET = EventType


def _check_quiet(ms: state_pb2.MutableState, key: RunKey) -> None:
    if ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING:
        raise FailedPreconditionError(f"run {key} is closed: nothing to hand off")
    busy = []
    if ms.HasField("workflow_task") and ms.workflow_task.started_event_id:
        busy.append("a workflow task is running")
    if any(not c.parent_closed for c in ms.pending_children.values()):
        busy.append("child workflows are pending")
    if ms.pending_external:
        busy.append("requests to other runs are pending")
    if busy:
        raise FailedPreconditionError(
            f"run {key} cannot be handed off now ({'; '.join(busy)}): try again when it waits"
        )


async def handoff(
    engine: HistoryEngine, key: RunKey, site: str, to_cluster: str
) -> tuple[int, list[tuple[str, str]]]:
    """Write the HANDOFF event at the home ``site``: the new epoch, and the activity
    tasks that were waiting here (for the caller to withdraw from this site's matching:
    they are the new home's to dispatch)."""
    if not to_cluster:
        raise InvalidArgumentError("to_cluster: the site to hand the run to is required")
    waiting: list[tuple[str, str]] = []  # (task queue, task key)

    def fn(m: Mutation) -> int:
        ms = m.ms
        waiting.clear()
        if to_cluster == site:
            return int(ms.version)  # already home here
        _check_quiet(ms, key)
        new_version = max(ms.version, 1) + 1
        m.append(
            ET.EVENT_TYPE_WORKFLOW_EXECUTION_HANDOFF,
            from_cluster=site,
            to_cluster=to_cluster,
            new_version=new_version,
        )
        m.trace["to"] = to_cluster
        ms.home_cluster = to_cluster
        ms.version = new_version
        # The sticky worker is a worker of this site: the new home starts afresh.
        ms.sticky_task_queue = ""
        ms.ClearField("sticky_schedule_to_start_timeout")
        waiting.extend(
            (info.task_queue.name, info.task_key)
            for info in ms.pending_activities.values()
            if info.task_key
        )
        return new_version

    version: int = await engine.update(key, "Handoff", fn)
    return version, waiting


async def take_over(engine: HistoryEngine, key: RunKey) -> None:
    """This site's replica names it home under an epoch it has not activated: create
    the run's task and timer rows here (the old home's rows are stale there, dropped
    when they come up)."""

    def fn(m: Mutation) -> None:
        ms = m.ms
        if ms.activated_version >= ms.version:
            return
        ms.activated_version = ms.version
        m.dirty = True
        if ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING:
            return
        if ms.HasField("workflow_task"):
            wft = ms.workflow_task
            del wft.timer_keys[:]  # the old home's retry or sticky timers
            wft.task_queue.CopyFrom(ms.task_queue)
            wft.task_queue.kind = TaskQueueKind.TASK_QUEUE_KIND_NORMAL
            m.add_task(
                TaskKind.WORKFLOW,
                ms.task_queue.name,
                0 if wft.transient else wft.scheduled_event_id,
                wft.attempt,
            )
        for info in ms.pending_timers.values():
            info.timer_key = m.add_timer(
                TimerKind.USER_TIMER, info.started_event_id, 0, info.expiry_time.ToMicroseconds()
            )
        for timer_key in ms.timer_keys:
            _re_arm(m, timer_key)
        _take_over_activities(m)

    await engine.update(key, "TakeOver", fn)


def _re_arm(m: Mutation, timer_key: str) -> None:
    """The timer row of ``timer_key`` (made of its fields: the same key here)."""
    kind, ref_id, attempt, fire_at = timer_key.rsplit("|", 4)[1:]
    m.add_timer(TimerKind(int(kind)), int(ref_id), int(attempt), int(fire_at))


def _take_over_activities(m: Mutation) -> None:
    """The run's activities are this site's now: their timeouts and backoffs armed at
    the same instants, a waiting attempt dispatched here (a started one runs on where
    it started: its answer is forwarded here by the old home)."""
    for act in m.ms.pending_activities.values():
        for timer_key in act.timer_keys:
            _re_arm(m, timer_key)
        if act.task_key:
            m.add_task(
                TaskKind.ACTIVITY,
                act.task_queue.name,
                act.scheduled_event_id,
                act.attempt,
                placement=encode(act.placement),
            )
