"""The history engine: every change to a run is a transition computed here and
committed as one store transaction.

A transition runs under the run's lock on this node, on a copy of the cached mutable
state; the store's optimistic version check catches writers on other nodes, and a
lost race reloads the run and recomputes the transition. After a commit the engine
hands new tasks to matching and new timers to the timer queue; both are recovered
from the store on restart, so nothing depends on memory a crash loses.

TLA+ actions implemented here (tla/History.tla, tla/WorkflowDag.tla): StartRun,
RecordTaskStarted, CompleteWorkflowTask (commands -> events), FailWorkflowTask,
CompleteActivity, FailActivity (retry or record), FireTimer, TimeoutTask, Terminate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf.duration_pb2 import Duration

from tideflow.api.v1 import command_pb2, common_pb2, history_pb2, service_pb2, state_pb2
from tideflow.api.v1.command_pb2 import CommandType
from tideflow.api.v1.common_pb2 import (
    Failure,
    RetryState,
    TaskQueueKind,
    TimeoutType,
    WorkflowIdConflictPolicy,
    WorkflowIdReusePolicy,
)
from tideflow.api.v1.common_pb2 import WorkflowExecutionStatus as WS
from tideflow.api.v1.history_pb2 import EventType, ParentClosePolicy, WorkflowTaskFailedCause
from tideflow.history import (
    ConditionFailedError,
    CurrentExecutionConflictError,
    CurrentWrite,
    HistoryStore,
    RunKey,
    StoreError,
    TaskKind,
    TaskRow,
    TimerKind,
    TimerRow,
    TransferAction,
    make_event,
    search_attributes_problem,
    timer_key_kind,
)

from . import _retry
from ._config import Clock, ServerConfig
from ._errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    WorkflowAlreadyStartedError,
    WorkflowNotFoundError,
)
from ._mutation import Mutation, run_key_of
from ._trace import Tracer

log = logging.getLogger("tideflow.server.engine")

ET = EventType
T = TypeVar("T")
_MAX_CONFLICT_RETRIES = 20
# Signal request ids remembered per run for de-duplication of retried signals.
_MAX_REMEMBERED_SIGNAL_IDS = 10_000
# Longest history kept in memory per cached run.
_MAX_CACHED_EVENTS = 2_000
# Activities one workflow task may start eagerly (the rest go through matching).
_MAX_EAGER_ACTIVITIES = 3
_US = 1_000_000


class Dispatcher:
    """What the engine needs from matching and the timer queue after a commit."""

    def add_tasks(self, tasks: list[TaskRow]) -> None:
        raise NotImplementedError

    def add_timers(self, timers: list[TimerRow]) -> None:
        raise NotImplementedError


@dataclass(slots=True, eq=False)
class _Run:
    state: state_pb2.MutableState
    db_version: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    scheduled_activities: dict[int, history_pb2.ActivityTaskScheduledEventAttributes] = field(
        default_factory=dict
    )
    # The run's history while it is short enough to keep (None: read from the store).
    events: list[history_pb2.HistoryEvent] | None = None


class BadCommandError(Exception):
    """A command the engine refuses; the workflow task fails with this message."""

    def __init__(
        self,
        message: str,
        cause: int = WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_BAD_COMMAND_ATTRIBUTES,
    ) -> None:
        super().__init__(message)
        self.cause = cause


def _dur_us(d: Duration) -> int:
    return d.ToMicroseconds()


def _token(
    ms: state_pb2.MutableState, scheduled: int, started: int, attempt: int, *, activity: bool
) -> bytes:
    return state_pb2.TaskToken(
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
        token = state_pb2.TaskToken.FromString(raw)
    except Exception as exc:
        raise InvalidArgumentError(f"{kind} task token is malformed") from exc
    if not token.workflow_id or not token.run_id or token.is_activity != activity:
        raise InvalidArgumentError(f"{kind} task token is malformed")
    return token


class HistoryEngine:
    def __init__(
        self, store: HistoryStore, dispatcher: Dispatcher, clock: Clock, config: ServerConfig
    ) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._clock = clock
        self._config = config
        self._cache: OrderedDict[RunKey, _Run] = OrderedDict()
        self._tracer = Tracer.from_environment()

    # ------------------------------------------------------------- machinery

    async def _load(self, key: RunKey) -> _Run:
        run = self._cache.get(key)
        if run is not None:
            self._cache.move_to_end(key)
            return run
        record = await self._store.get_execution(key)
        if record is None:
            raise WorkflowNotFoundError(
                f"workflow run not found: workflow_id={key.workflow_id!r} run_id={key.run_id!r}",
                workflow_id=key.workflow_id,
                run_id=key.run_id,
            )
        run = self._cache.get(key)  # another coroutine may have loaded it meanwhile
        if run is None:
            run = _Run(
                state=state_pb2.MutableState.FromString(record.state), db_version=record.db_version
            )
            self._cache[key] = run
            self._evict_overflow()
        return run

    def _evict_overflow(self) -> None:
        while len(self._cache) > self._config.state_cache_size:
            key, run = next(iter(self._cache.items()))
            if run.lock.locked():
                self._cache.move_to_end(key)
                return
            del self._cache[key]

    def _forget(self, key: RunKey, run: _Run) -> None:
        if self._cache.get(key) is run:
            del self._cache[key]
        run.changed.set()

    async def _update(self, key: RunKey, action: str, fn: Callable[[Mutation], T]) -> T:
        """Run ``fn`` on a fresh copy of the run's state and commit what it built."""
        for _ in range(_MAX_CONFLICT_RETRIES):
            run = await self._load(key)
            async with run.lock:
                if self._cache.get(key) is not run:
                    continue  # evicted or reloaded while we waited
                ms = state_pb2.MutableState()
                ms.CopyFrom(run.state)
                m = Mutation(ms, self._clock.now_micros())
                result = fn(m)
                if not m.dirty:
                    return result
                together = [
                    x.to_transition(0, start_request_id=x.ms.start_request_id) for x in m.side_runs
                ]
                # Trace mode logs ahead of the commit, then its outcome: a crash between
                # the two leaves a transition marked "may have happened", never one
                # missing from the log.
                self._tracer.write_ahead(action, m)
                try:
                    await self._store.apply(m.to_transition(run.db_version), *together)
                except (ConditionFailedError, CurrentExecutionConflictError):
                    log.debug("run %s changed under us; reloading", key)
                    self._tracer.outcome(m, committed=False)
                    self._forget(key, run)
                    continue
                except BaseException:
                    # The outcome of the commit is unknown: never trust the cache again.
                    # (Trace mode: the line written ahead stays unconfirmed, which says
                    # exactly that.)
                    self._forget(key, run)
                    # It may well have committed (a caller cancelled mid-commit, e.g. a
                    # poller or worker that went away, does not stop the store's writer).
                    # Its task and timer rows would then reach matching and the timer
                    # queue only after a restart or a refill, so hand them over anyway:
                    # both are validated against the run's state when started or fired,
                    # and ones that did not commit are dropped as stale there.
                    if m.new_tasks:
                        self._dispatcher.add_tasks(m.new_tasks)
                    if m.new_timers:
                        self._dispatcher.add_timers(m.new_timers)
                    raise
                self._tracer.outcome(m, committed=True)
                for side in m.side_runs:
                    side_run = _Run(state=side.ms, db_version=1, events=list(side.events))
                    self._cache[side.key] = side_run
                    self._after_commit(side_run, side, "StartRun")
                run.state = m.ms
                run.db_version += 1
                run.scheduled_activities.update(m.scheduled_activities)
                if run.events is not None:
                    run.events.extend(m.events)
                    if len(run.events) > _MAX_CACHED_EVENTS:
                        run.events = None
                self._after_commit(run, m, action)
                return result
        raise UnavailableError(f"run {key} is changing too fast; try again")

    def _after_commit(self, run: _Run, m: Mutation, action: str) -> None:
        old = run.changed
        run.changed = asyncio.Event()
        old.set()
        if m.new_tasks:
            self._dispatcher.add_tasks(m.new_tasks)
        if m.new_timers:
            self._dispatcher.add_timers(m.new_timers)

    async def _history_range(
        self, key: RunKey, first_event_id: int, last_event_id: int
    ) -> list[history_pb2.HistoryEvent]:
        """Events first..last, from memory when the run's history is cached, else only
        that range from the store (a sticky task of a long history reads a few rows)."""
        run = await self._load(key)
        if run.events is None and run.state.next_event_id - 1 <= _MAX_CACHED_EVENTS:
            loaded = await self._store.read_events(key)
            if self._cache.get(key) is run and len(loaded) == run.state.next_event_id - 1:
                run.events = loaded
            return loaded[first_event_id - 1 : last_event_id]
        if run.events is not None:
            return run.events[first_event_id - 1 : last_event_id]
        return await self._store.read_events(
            key,
            first_event_id=first_event_id,
            max_events=max(0, last_event_id - first_event_id + 1),
        )

    async def state_of(self, key: RunKey) -> state_pb2.MutableState:
        return (await self._load(key)).state

    async def wait_for_change(self, key: RunKey, next_event_id: int, timeout: float) -> None:
        """Return once the run has an event >= next_event_id, is closed, or timeout."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    run = await self._load(key)
                    ms = run.state
                    if (
                        ms.next_event_id > next_event_id
                        or ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING
                    ):
                        return
                    await run.changed.wait()
        except TimeoutError:
            return

    # ---------------------------------------------------------------- start

    async def start_workflow(
        self,
        req: service_pb2.StartWorkflowRequest,
        *,
        parent: state_pb2.MutableState | None = None,
        parent_initiated_event_id: int = 0,
    ) -> tuple[str, bool]:
        """Start a run; returns (run_id, started). A retried request finds its run."""
        request_id = req.request_id or str(uuid.uuid4())
        for _ in range(_MAX_CONFLICT_RETRIES):
            current = await self._store.get_current(req.namespace, req.workflow_id)
            if current is not None:
                if current.start_request_id == request_id:
                    return current.run_id, False
                if current.status == WS.WORKFLOW_EXECUTION_STATUS_RUNNING and req.signal_name:
                    # Signal-with-start on a running id: just the signal.
                    key = RunKey(
                        namespace=req.namespace, workflow_id=req.workflow_id, run_id=current.run_id
                    )
                    try:
                        await self.signal(
                            key,
                            req.signal_name,
                            req.signal_input if req.HasField("signal_input") else None,
                            req.identity,
                            request_id,
                            None,
                        )
                    except FailedPreconditionError:
                        continue  # it closed meanwhile: start a new run
                    return current.run_id, False
                if current.status == WS.WORKFLOW_EXECUTION_STATUS_RUNNING:
                    conflict = req.workflow_id_conflict_policy
                    if (
                        conflict
                        == WorkflowIdConflictPolicy.WORKFLOW_ID_CONFLICT_POLICY_USE_EXISTING
                    ):
                        return current.run_id, False
                    if (
                        conflict
                        == WorkflowIdConflictPolicy.WORKFLOW_ID_CONFLICT_POLICY_TERMINATE_EXISTING
                        or req.workflow_id_reuse_policy
                        == WorkflowIdReusePolicy.WORKFLOW_ID_REUSE_POLICY_TERMINATE_IF_RUNNING
                    ):
                        running = RunKey(
                            namespace=req.namespace,
                            workflow_id=req.workflow_id,
                            run_id=current.run_id,
                        )
                        with contextlib.suppress(FailedPreconditionError):
                            await self.terminate(
                                running, "replaced by a new start", None, req.identity
                            )
                        continue  # decide again on the now closed run
                    raise WorkflowAlreadyStartedError(
                        f"workflow id {req.workflow_id!r} is already running "
                        f"as run {current.run_id}",
                        run_id=current.run_id,
                        workflow_id=req.workflow_id,
                    )
                problem = _reuse_refused(req.workflow_id_reuse_policy, current.status)
                if problem:
                    raise WorkflowAlreadyStartedError(
                        f"workflow id {req.workflow_id!r} was used by run {current.run_id} "
                        f"and {problem}",
                        run_id=current.run_id,
                        workflow_id=req.workflow_id,
                    )
            run_id = str(uuid.uuid4())
            m = self._new_run(
                req,
                run_id,
                request_id,
                self._clock.now_micros(),
                parent=parent,
                parent_initiated_event_id=parent_initiated_event_id,
            )
            ms = m.ms
            if current is None:
                m.current = CurrentWrite.INSERT
            else:
                m.current = CurrentWrite.REPLACE
                m.replaces_run_id = current.run_id
            self._tracer.write_ahead("StartRun", m)
            try:
                await self._store.apply(m.to_transition(0, start_request_id=request_id))
            except CurrentExecutionConflictError:
                self._tracer.outcome(m, committed=False)
                continue  # someone else started or replaced meanwhile: decide again
            self._tracer.outcome(m, committed=True)
            key = run_key_of(ms)
            run = _Run(state=m.ms, db_version=1, events=list(m.events))
            self._cache[key] = run
            self._evict_overflow()
            self._after_commit(run, m, "StartRun")
            return run_id, True
        raise UnavailableError(f"workflow id {req.workflow_id!r} is contended; try again")

    def _new_run(
        self,
        req: service_pb2.StartWorkflowRequest,
        run_id: str,
        request_id: str,
        now: int,
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
        ms = self._initial_state(req, run_id, now)
        # The workflow execution timeout bounds the whole chain of runs (Temporal's
        # semantics): a successor keeps its predecessor's expiration time rather than
        # starting the clock again, so continuing as new cannot escape the timeout.
        execution_timeout_us = _dur_us(req.workflow_execution_timeout)
        if not execution_expiration_us and execution_timeout_us:
            execution_expiration_us = now + execution_timeout_us
        expiration = None
        if execution_expiration_us:
            ms.execution_expiration_time.FromMicroseconds(execution_expiration_us)
            expiration = ms.execution_expiration_time
        ms.first_execution_run_id = first_execution_run_id or run_id
        ms.start_request_id = request_id
        m = Mutation(ms, now)
        parent_execution = None
        if parent is not None:
            ms.parent_namespace = parent.namespace
            ms.parent_workflow_id = parent.workflow_id
            ms.parent_run_id = parent.run_id
            ms.parent_initiated_event_id = parent_initiated_event_id
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
            original_execution_run_id=run_id,
            first_execution_run_id=ms.first_execution_run_id,
            continued_execution_run_id=continued_execution_run_id,
            retry_policy=req.retry_policy if req.HasField("retry_policy") else None,
            memo=req.memo if req.HasField("memo") else None,
            search_attributes=req.search_attributes if req.HasField("search_attributes") else None,
            header=req.header if req.HasField("header") else None,
            parent_workflow_namespace=parent.namespace if parent is not None else "",
            parent_workflow_execution=parent_execution,
            parent_initiated_event_id=parent_initiated_event_id,
            workflow_execution_expiration_time=expiration,
            random_seed=uuid.UUID(run_id).int & 0x7FFF_FFFF_FFFF_FFFF,
            request_id=request_id,
        )
        # The run closes TIMED_OUT at its run timeout or the chain's expiration,
        # whichever comes first.
        run_timeout_us = _dur_us(req.workflow_run_timeout)
        deadlines = [now + run_timeout_us] if run_timeout_us else []
        if execution_expiration_us:
            deadlines.append(execution_expiration_us)
        if deadlines:
            ms.timer_keys.append(m.add_timer(TimerKind.WORKFLOW_RUN_TIMEOUT, 0, 1, min(deadlines)))
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

    def _initial_state(
        self, req: service_pb2.StartWorkflowRequest, run_id: str, now: int
    ) -> state_pb2.MutableState:
        ms = state_pb2.MutableState(
            namespace=req.namespace,
            workflow_id=req.workflow_id,
            run_id=run_id,
            status=WS.WORKFLOW_EXECUTION_STATUS_RUNNING,
            next_event_id=1,
            start_request_id=req.request_id,
        )
        ms.workflow_type.CopyFrom(req.workflow_type)
        ms.task_queue.name = req.task_queue.name
        ms.task_queue.kind = common_pb2.TASK_QUEUE_KIND_NORMAL
        ms.start_time.FromMicroseconds(now)
        wft_timeout = _dur_us(req.workflow_task_timeout) or int(
            self._config.default_workflow_task_timeout_s * _US
        )
        ms.workflow_task_timeout.FromMicroseconds(
            min(wft_timeout, int(self._config.max_workflow_task_timeout_s * _US))
        )
        if req.HasField("workflow_run_timeout"):
            ms.workflow_run_timeout.CopyFrom(req.workflow_run_timeout)
        if req.HasField("workflow_execution_timeout"):
            ms.workflow_execution_timeout.CopyFrom(req.workflow_execution_timeout)
        return ms

    # -------------------------------------------------------- workflow tasks

    def _start_workflow_task(self, m: Mutation, identity: str) -> state_pb2.WorkflowTaskInfo:
        """Hand the scheduled workflow task to a worker; returns a copy of its info."""
        ms = m.ms
        wft = ms.workflow_task
        request_id = str(uuid.uuid4())
        if wft.transient:
            # Ids a completion will give the scheduled/started events; nothing can be
            # appended before then because new events are buffered meanwhile.
            wft.scheduled_event_id = ms.next_event_id
            wft.started_event_id = ms.next_event_id + 1
            m.dirty = True
        else:
            event = m.append(
                ET.EVENT_TYPE_WORKFLOW_TASK_STARTED,
                scheduled_event_id=wft.scheduled_event_id,
                identity=identity,
                request_id=request_id,
            )
            wft.started_event_id = event.event_id
        wft.started_time.FromMicroseconds(m.now)
        wft.identity = identity
        wft.request_id = request_id
        wft.timer_keys.append(
            m.add_timer(
                TimerKind.WORKFLOW_TASK_TIMEOUT,
                wft.scheduled_event_id,
                wft.attempt,
                m.now + _dur_us(ms.workflow_task_timeout),
            )
        )
        info = state_pb2.WorkflowTaskInfo()
        info.CopyFrom(wft)
        return info

    async def record_workflow_task_started(
        self, task: TaskRow, identity: str
    ) -> service_pb2.PollWorkflowTaskResponse | None:
        """Mark a dispatched workflow task started; None if the task is stale."""

        def fn(m: Mutation) -> state_pb2.WorkflowTaskInfo | None:
            ms = m.ms
            wft = ms.workflow_task
            if (
                ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING
                or not ms.HasField("workflow_task")
                or wft.started_event_id != 0
                or wft.attempt != task.attempt
                or (0 if wft.transient else wft.scheduled_event_id) != task.ref_id
            ):
                return None
            m.trace["task"] = task
            m.done_task_keys.append(task.task_key)
            return self._start_workflow_task(m, identity)

        try:
            wft = await self._update(task.key, "RecordWorkflowTaskStarted", fn)
        except NotFoundError:
            wft = None
        if wft is None:
            await self._store.delete_task(task.task_key)
            return None
        sticky = wft.task_queue.kind == TaskQueueKind.TASK_QUEUE_KIND_STICKY
        return await self._workflow_task(task.key, wft, only_new_events=sticky)

    async def _workflow_task(
        self, key: RunKey, wft: state_pb2.WorkflowTaskInfo, *, only_new_events: bool = False
    ) -> service_pb2.PollWorkflowTaskResponse:
        """What a worker needs to run a started workflow task: the history up to it
        (for the sticky worker, only what came after the task it completed last)."""
        ms = await self.state_of(key)
        # Up to the started event: anything later belongs to the next task.
        last = wft.scheduled_event_id - 1 if wft.transient else wft.started_event_id
        first = ms.last_workflow_task_started_event_id + 1 if only_new_events else 1
        events = await self._history_range(key, first, last)
        if wft.transient:
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
                    },
                ),
            ):
                event = make_event(event_type, wft.started_time.ToMicroseconds(), **attrs)
                event.event_id = event_id
                events.append(event)
        response = service_pb2.PollWorkflowTaskResponse(
            task_token=_token(
                ms, wft.scheduled_event_id, wft.started_event_id, wft.attempt, activity=False
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

    async def query_task(
        self, key: RunKey, query_id: str, query: service_pb2.WorkflowQuery
    ) -> service_pb2.PollWorkflowTaskResponse:
        """A query task: the run's whole history, for the worker to replay and answer."""
        ms = await self.state_of(key)
        response = service_pb2.PollWorkflowTaskResponse(
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
        response.history.events.extend(await self._history_range(key, 1, ms.next_event_id - 1))
        # Events buffered while a workflow task runs (signals, activity results...) were
        # accepted already: a query must see them too (read-your-writes). Their ids are
        # provisional (the task's completion is recorded before them); the worker only
        # applies them to answer the query, it matches nothing against them.
        for offset, buffered in enumerate(ms.buffered_events):
            event = response.history.events.add()
            event.CopyFrom(buffered)
            event.event_id = ms.next_event_id + offset
        response.query.CopyFrom(query)
        return response

    def _check_workflow_task(self, m: Mutation, token: state_pb2.TaskToken) -> None:
        ms = m.ms
        wft = ms.workflow_task
        if (
            ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING
            or not ms.HasField("workflow_task")
            or wft.started_event_id == 0
            or wft.scheduled_event_id != token.scheduled_event_id
            or wft.started_event_id != token.started_event_id
            or wft.attempt != token.attempt
        ):
            raise NotFoundError(
                "workflow task not found: it already completed, timed out, or the run closed "
                f"(workflow_id={token.workflow_id!r}, "
                f"scheduled_event_id={token.scheduled_event_id}, "
                f"attempt={token.attempt})"
            )

    def _materialize_transient(self, m: Mutation) -> None:
        """A transient attempt that completes gets its scheduled/started events now."""
        ms = m.ms
        wft = ms.workflow_task
        if not wft.transient:
            return
        scheduled = m.append(
            ET.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
            task_queue=wft.task_queue,
            start_to_close_timeout=ms.workflow_task_timeout,
            attempt=wft.attempt,
        )
        started = m.append(
            ET.EVENT_TYPE_WORKFLOW_TASK_STARTED,
            scheduled_event_id=scheduled.event_id,
            identity=wft.identity,
            request_id=wft.request_id,
        )
        assert scheduled.event_id == wft.scheduled_event_id
        assert started.event_id == wft.started_event_id

    async def complete_workflow_task(
        self,
        token: state_pb2.TaskToken,
        commands: list[command_pb2.Command],
        identity: str,
        sticky: service_pb2.StickyExecutionAttributes | None = None,
    ) -> list[service_pb2.PollActivityTaskResponse]:
        """Apply a workflow task's commands; returns the activities started eagerly
        for the completing worker."""
        key = RunKey(namespace=token.namespace, workflow_id=token.workflow_id, run_id=token.run_id)
        eager: list[int] = []

        def fn(m: Mutation) -> str | None:
            eager.clear()  # a conflict retry recomputes the transition from scratch
            self._check_workflow_task(m, token)
            m.trace.update(
                token=token,
                commands=commands,
                sticky=sticky is not None and bool(sticky.worker_task_queue.name),
                eager_identity=bool(identity),
            )
            try:
                self._validate_commands(m.ms, commands)
            except BadCommandError as exc:
                m.trace["rejected"] = exc
                self._fail_workflow_task(
                    m,
                    exc.cause,
                    Failure(message=str(exc), source="server"),
                    identity,
                )
                return str(exc)
            ms = m.ms
            wft = ms.workflow_task
            self._materialize_transient(m)
            completed = m.append(
                ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
                scheduled_event_id=wft.scheduled_event_id,
                started_event_id=wft.started_event_id,
                identity=identity,
            )
            ms.last_workflow_task_completed_event_id = completed.event_id
            ms.last_workflow_task_started_event_id = wft.started_event_id
            if sticky is not None and sticky.worker_task_queue.name:
                ms.sticky_task_queue = sticky.worker_task_queue.name
                ms.sticky_schedule_to_start_timeout.CopyFrom(sticky.schedule_to_start_timeout)
            elif ms.sticky_task_queue:
                m.unstick()
            m.clear_workflow_task()
            for command in commands:
                if ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING:
                    break  # commands after the one that closed the run are ignored
                self._apply_command(m, command, completed.event_id, identity, eager)
            if ms.status == WS.WORKFLOW_EXECUTION_STATUS_RUNNING and m.flush_buffered():
                m.schedule_workflow_task()
            return None

        error = await self._update(key, "CompleteWorkflowTask", fn)
        if error is not None:
            raise InvalidArgumentError(f"workflow task failed: {error}")
        ms = await self.state_of(key)
        return [
            await self._activity_task(key, sid) for sid in eager if sid in ms.pending_activities
        ]

    def _validate_commands(
        self, ms: state_pb2.MutableState, commands: list[command_pb2.Command]
    ) -> None:
        activity_ids = {info.activity_id for info in ms.pending_activities.values()}
        timer_ids = set(ms.pending_timers)
        # Timers that fired while this task ran: the workflow has not seen the fire
        # yet and may still cancel them (the buffered TIMER_FIRED is then dropped).
        fired_unseen = {
            e.timer_fired_event_attributes.timer_id
            for e in ms.buffered_events
            if e.event_type == ET.EVENT_TYPE_TIMER_FIRED
        }
        has_signal = any(
            e.event_type == ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED for e in ms.buffered_events
        )
        for index, command in enumerate(commands):
            which = command.WhichOneof("attributes")
            ctype = command.command_type
            where = f"command {index} ({CommandType.Name(ctype)})"
            if which is None:
                raise BadCommandError(f"{where} has no attributes")
            if ctype == CommandType.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK:
                a = command.schedule_activity_task_command_attributes
                if not a.activity_id:
                    raise BadCommandError(f"{where}: activity_id is empty")
                if a.activity_id in activity_ids:
                    raise BadCommandError(
                        f"{where}: activity_id {a.activity_id!r} is already pending"
                    )
                activity_ids.add(a.activity_id)
                if not a.activity_type.name:
                    raise BadCommandError(f"{where}: activity_type is empty")
                if (
                    _dur_us(a.start_to_close_timeout) <= 0
                    and _dur_us(a.schedule_to_close_timeout) <= 0
                ):
                    raise BadCommandError(
                        f"{where}: start_to_close_timeout or schedule_to_close_timeout must be set"
                    )
                for name in (
                    "schedule_to_close_timeout",
                    "schedule_to_start_timeout",
                    "start_to_close_timeout",
                    "heartbeat_timeout",
                ):
                    if _dur_us(getattr(a, name)) < 0:
                        raise BadCommandError(f"{where}: {name} must not be negative")
                problem = _retry.validate(a.retry_policy)
                if problem:
                    raise BadCommandError(f"{where}: {problem}")
            elif ctype == CommandType.COMMAND_TYPE_START_TIMER:
                a2 = command.start_timer_command_attributes
                if not a2.timer_id:
                    raise BadCommandError(f"{where}: timer_id is empty")
                if a2.timer_id in timer_ids:
                    raise BadCommandError(f"{where}: timer_id {a2.timer_id!r} is already pending")
                timer_ids.add(a2.timer_id)
                if _dur_us(a2.start_to_fire_timeout) <= 0:
                    raise BadCommandError(f"{where}: start_to_fire_timeout must be positive")
            elif ctype == CommandType.COMMAND_TYPE_CANCEL_TIMER:
                timer_id = command.cancel_timer_command_attributes.timer_id
                if timer_id in timer_ids:
                    timer_ids.discard(timer_id)
                elif timer_id in fired_unseen:
                    fired_unseen.discard(timer_id)
                else:
                    raise BadCommandError(f"{where}: no pending timer {timer_id!r}")
            elif ctype == CommandType.COMMAND_TYPE_REQUEST_CANCEL_ACTIVITY_TASK:
                sid = command.request_cancel_activity_task_command_attributes.scheduled_event_id
                if sid not in ms.pending_activities:
                    raise BadCommandError(f"{where}: no pending activity scheduled by event {sid}")
            elif ctype in (
                CommandType.COMMAND_TYPE_COMPLETE_WORKFLOW_EXECUTION,
                CommandType.COMMAND_TYPE_FAIL_WORKFLOW_EXECUTION,
                CommandType.COMMAND_TYPE_CANCEL_WORKFLOW_EXECUTION,
                CommandType.COMMAND_TYPE_CONTINUE_AS_NEW_WORKFLOW_EXECUTION,
            ):
                if has_signal:
                    raise BadCommandError(
                        f"{where}: unhandled signal arrived during the workflow task; "
                        "the workflow must see it before closing",
                        WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_UNHANDLED_COMMAND,
                    )
            elif ctype == CommandType.COMMAND_TYPE_RECORD_MARKER:
                if not command.record_marker_command_attributes.marker_name:
                    raise BadCommandError(f"{where}: marker_name is empty")
            elif ctype == CommandType.COMMAND_TYPE_START_CHILD_WORKFLOW_EXECUTION:
                c = command.start_child_workflow_execution_command_attributes
                if not c.workflow_id:
                    raise BadCommandError(f"{where}: workflow_id is empty")
                if not c.workflow_type.name:
                    raise BadCommandError(f"{where}: workflow_type is empty")
                if c.namespace and c.namespace != ms.namespace:
                    raise BadCommandError(f"{where}: children must be in the parent's namespace")
            elif ctype == CommandType.COMMAND_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION:
                e = command.signal_external_workflow_execution_command_attributes
                if not e.execution.workflow_id or not e.signal_name:
                    raise BadCommandError(
                        f"{where}: execution.workflow_id and signal_name are required"
                    )
            elif ctype == CommandType.COMMAND_TYPE_REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION:
                cancel = command.request_cancel_external_workflow_execution_command_attributes
                if not cancel.workflow_id:
                    raise BadCommandError(f"{where}: workflow_id is empty")
            elif ctype == CommandType.COMMAND_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
                problem = search_attributes_problem(
                    command.upsert_workflow_search_attributes_command_attributes.search_attributes,
                    allow_removal=True,
                )
                if problem:
                    raise BadCommandError(f"{where}: {problem}")
            else:
                raise BadCommandError(f"{where} is not supported by this server yet")

    def _apply_command(
        self,
        m: Mutation,
        command: command_pb2.Command,
        completed_id: int,
        identity: str,
        eager: list[int],
    ) -> None:
        ms = m.ms
        ctype = command.command_type
        if ctype == CommandType.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK:
            self._schedule_activity(
                m, command.schedule_activity_task_command_attributes, completed_id, identity, eager
            )
        elif ctype == CommandType.COMMAND_TYPE_START_TIMER:
            a = command.start_timer_command_attributes
            event = m.append(
                ET.EVENT_TYPE_TIMER_STARTED,
                timer_id=a.timer_id,
                start_to_fire_timeout=a.start_to_fire_timeout,
                workflow_task_completed_event_id=completed_id,
            )
            fire_at = m.now + _dur_us(a.start_to_fire_timeout)
            info = ms.pending_timers[a.timer_id]
            info.timer_id = a.timer_id
            info.started_event_id = event.event_id
            info.expiry_time.FromMicroseconds(fire_at)
            info.timer_key = m.add_timer(TimerKind.USER_TIMER, event.event_id, 0, fire_at)
        elif ctype == CommandType.COMMAND_TYPE_CANCEL_TIMER:
            timer_id = command.cancel_timer_command_attributes.timer_id
            if timer_id in ms.pending_timers:
                info = ms.pending_timers[timer_id]
                started_event_id = info.started_event_id
                m.drop_timers([info.timer_key])
                del ms.pending_timers[timer_id]
            else:
                # It fired while this task ran. As in Temporal, the cancel wins: the
                # workflow never saw the fire, so history records the cancel and the
                # buffered TIMER_FIRED is dropped (its row is already gone).
                started_event_id = m.drop_buffered_timer_fired(timer_id)
            m.append(
                ET.EVENT_TYPE_TIMER_CANCELED,
                timer_id=timer_id,
                started_event_id=started_event_id,
                workflow_task_completed_event_id=completed_id,
            )
        elif ctype == CommandType.COMMAND_TYPE_REQUEST_CANCEL_ACTIVITY_TASK:
            sid = command.request_cancel_activity_task_command_attributes.scheduled_event_id
            act = ms.pending_activities[sid]
            requested = m.append(
                ET.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED,
                scheduled_event_id=sid,
                workflow_task_completed_event_id=completed_id,
            )
            if act.started_time.ToMicroseconds() == 0:
                # Not running anywhere: cancel at once.
                m.append(
                    ET.EVENT_TYPE_ACTIVITY_TASK_CANCELED,
                    scheduled_event_id=sid,
                    latest_cancel_requested_event_id=requested.event_id,
                )
                m.drop_timers(act.timer_keys)
                if act.task_key:
                    m.done_task_keys.append(act.task_key)
                del ms.pending_activities[sid]
                m.schedule_workflow_task()
            else:
                act.cancel_requested = True  # the worker learns it from its next heartbeat
        elif ctype == CommandType.COMMAND_TYPE_COMPLETE_WORKFLOW_EXECUTION:
            a3 = command.complete_workflow_execution_command_attributes
            m.close(
                WS.WORKFLOW_EXECUTION_STATUS_COMPLETED,
                ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
                result=a3.result if a3.HasField("result") else None,
                workflow_task_completed_event_id=completed_id,
            )
        elif ctype == CommandType.COMMAND_TYPE_FAIL_WORKFLOW_EXECUTION:
            m.close(
                WS.WORKFLOW_EXECUTION_STATUS_FAILED,
                ET.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
                failure=command.fail_workflow_execution_command_attributes.failure,
                retry_state=RetryState.RETRY_STATE_RETRY_POLICY_NOT_SET,
                workflow_task_completed_event_id=completed_id,
            )
        elif ctype == CommandType.COMMAND_TYPE_START_CHILD_WORKFLOW_EXECUTION:
            c = command.start_child_workflow_execution_command_attributes
            event = m.append(ET.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED)
            attrs = event.start_child_workflow_execution_initiated_event_attributes
            for field, value in c.ListFields():
                if field.name in attrs.DESCRIPTOR.fields_by_name:
                    if field.message_type is not None:
                        getattr(attrs, field.name).CopyFrom(value)
                    else:
                        setattr(attrs, field.name, value)
            attrs.namespace = ms.namespace
            attrs.task_queue.name = c.task_queue.name or ms.task_queue.name
            attrs.workflow_task_completed_event_id = completed_id
            child = ms.pending_children[event.event_id]
            child.initiated_event_id = event.event_id
            child.namespace = ms.namespace
            child.workflow_id = c.workflow_id
            child.workflow_type.CopyFrom(c.workflow_type)
            child.parent_close_policy = c.parent_close_policy
            m.add_transfer(TransferAction.START_CHILD, event.event_id)
        elif ctype == CommandType.COMMAND_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION:
            e = command.signal_external_workflow_execution_command_attributes
            event = m.append(
                ET.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED,
                workflow_task_completed_event_id=completed_id,
                namespace=ms.namespace,
                workflow_execution=e.execution,
                signal_name=e.signal_name,
                input=e.input if e.HasField("input") else None,
                control=e.control,
                child_workflow_only=e.child_workflow_only,
                header=e.header if e.HasField("header") else None,
            )
            ms.pending_external[event.event_id].CopyFrom(
                state_pb2.ExternalRequest(
                    initiated_event_id=event.event_id,
                    namespace=ms.namespace,
                    workflow_id=e.execution.workflow_id,
                    run_id=e.execution.run_id,
                )
            )
            m.add_transfer(TransferAction.SIGNAL_EXTERNAL, event.event_id)
        elif ctype == CommandType.COMMAND_TYPE_REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION:
            r = command.request_cancel_external_workflow_execution_command_attributes
            target = common_pb2.WorkflowExecution(workflow_id=r.workflow_id, run_id=r.run_id)
            event = m.append(
                ET.EVENT_TYPE_REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED,
                workflow_task_completed_event_id=completed_id,
                namespace=ms.namespace,
                workflow_execution=target,
                control=r.control,
                child_workflow_only=r.child_workflow_only,
                reason=r.reason,
            )
            ms.pending_external[event.event_id].CopyFrom(
                state_pb2.ExternalRequest(
                    initiated_event_id=event.event_id,
                    namespace=ms.namespace,
                    workflow_id=r.workflow_id,
                    run_id=r.run_id,
                    cancel=True,
                )
            )
            m.add_transfer(TransferAction.CANCEL_EXTERNAL, event.event_id)
        elif ctype == CommandType.COMMAND_TYPE_CONTINUE_AS_NEW_WORKFLOW_EXECUTION:
            self._continue_as_new(
                m, command.continue_as_new_workflow_execution_command_attributes, completed_id
            )
        elif ctype == CommandType.COMMAND_TYPE_CANCEL_WORKFLOW_EXECUTION:
            a5 = command.cancel_workflow_execution_command_attributes
            m.close(
                WS.WORKFLOW_EXECUTION_STATUS_CANCELED,
                ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
                details=a5.details if a5.HasField("details") else None,
                workflow_task_completed_event_id=completed_id,
            )
        elif ctype == CommandType.COMMAND_TYPE_RECORD_MARKER:
            a4 = command.record_marker_command_attributes
            event = m.append(
                ET.EVENT_TYPE_MARKER_RECORDED,
                marker_name=a4.marker_name,
                workflow_task_completed_event_id=completed_id,
                header=a4.header if a4.HasField("header") else None,
                failure=a4.failure if a4.HasField("failure") else None,
            )
            for name, payloads in a4.details.items():
                event.marker_recorded_event_attributes.details[name].CopyFrom(payloads)
        elif ctype == CommandType.COMMAND_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
            # The store indexes the attributes from this event, in this transaction
            # (history/_visibility_store.py).
            upsert = command.upsert_workflow_search_attributes_command_attributes
            m.append(
                ET.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES,
                workflow_task_completed_event_id=completed_id,
                search_attributes=upsert.search_attributes,
            )

    def _continue_as_new(
        self,
        m: Mutation,
        a: command_pb2.ContinueAsNewWorkflowExecutionCommandAttributes,
        completed_id: int,
    ) -> None:
        """Close this run and start its successor (same workflow id, empty history) in
        the same transaction, so there is never a moment with neither or both open."""
        ms = m.ms
        req = service_pb2.StartWorkflowRequest(
            namespace=ms.namespace, workflow_id=ms.workflow_id, identity="continue-as-new"
        )
        req.workflow_type.name = a.workflow_type.name or ms.workflow_type.name
        req.task_queue.name = a.task_queue.name or ms.task_queue.name
        if a.HasField("input"):
            req.input.CopyFrom(a.input)
        if _dur_us(a.workflow_run_timeout):
            req.workflow_run_timeout.CopyFrom(a.workflow_run_timeout)
        elif ms.HasField("workflow_run_timeout"):
            req.workflow_run_timeout.CopyFrom(ms.workflow_run_timeout)
        req.workflow_task_timeout.CopyFrom(
            a.workflow_task_timeout
            if _dur_us(a.workflow_task_timeout)
            else ms.workflow_task_timeout
        )
        # The execution timeout (and its deadline, passed to _new_run) carry over.
        if ms.HasField("workflow_execution_timeout"):
            req.workflow_execution_timeout.CopyFrom(ms.workflow_execution_timeout)
        for name in ("header", "memo", "search_attributes", "retry_policy"):
            if a.HasField(name):
                getattr(req, name).CopyFrom(getattr(a, name))
        new_run_id = str(uuid.uuid4())
        parent = None
        if ms.parent_workflow_id:
            # The chain stays the parent's child: the parent hears from the last run.
            parent = state_pb2.MutableState(
                namespace=ms.parent_namespace,
                workflow_id=ms.parent_workflow_id,
                run_id=ms.parent_run_id,
            )
        successor = self._new_run(
            req,
            new_run_id,
            f"{ms.run_id}:continue-as-new",
            m.now,
            first_execution_run_id=ms.first_execution_run_id or ms.run_id,
            continued_execution_run_id=ms.run_id,
            parent=parent,
            parent_initiated_event_id=ms.parent_initiated_event_id,
            execution_expiration_us=ms.execution_expiration_time.ToMicroseconds(),
        )
        successor.current = CurrentWrite.REPLACE
        successor.replaces_run_id = ms.run_id
        m.close(
            WS.WORKFLOW_EXECUTION_STATUS_CONTINUED_AS_NEW,
            ET.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
            new_execution_run_id=new_run_id,
            workflow_type=req.workflow_type,
            task_queue=req.task_queue,
            input=req.input if req.HasField("input") else None,
            workflow_run_timeout=req.workflow_run_timeout
            if req.HasField("workflow_run_timeout")
            else None,
            workflow_task_timeout=req.workflow_task_timeout,
            workflow_task_completed_event_id=completed_id,
        )
        ms.new_execution_run_id = new_run_id
        m.side_runs.append(successor)

    def _schedule_activity(
        self,
        m: Mutation,
        a: command_pb2.ScheduleActivityTaskCommandAttributes,
        completed_id: int,
        eager_identity: str,
        eager: list[int],
    ) -> None:
        ms = m.ms
        attrs = history_pb2.ActivityTaskScheduledEventAttributes()
        attrs.activity_id = a.activity_id
        attrs.activity_type.CopyFrom(a.activity_type)
        attrs.task_queue.name = a.task_queue.name or ms.task_queue.name
        attrs.task_queue.kind = common_pb2.TASK_QUEUE_KIND_NORMAL
        if a.HasField("header"):
            attrs.header.CopyFrom(a.header)
        if a.HasField("input"):
            attrs.input.CopyFrom(a.input)
        # Timeout defaults follow Temporal: start-to-close inherits schedule-to-close and
        # vice versa; schedule-to-start defaults to "until schedule-to-close".
        s2c = _dur_us(a.schedule_to_close_timeout)
        st2c = _dur_us(a.start_to_close_timeout) or s2c
        s2s = _dur_us(a.schedule_to_start_timeout)
        if s2c:
            attrs.schedule_to_close_timeout.FromMicroseconds(s2c)
            if s2s == 0 or s2s > s2c:
                s2s = s2c
            st2c = min(st2c, s2c)
        attrs.start_to_close_timeout.FromMicroseconds(st2c)
        if s2s:
            attrs.schedule_to_start_timeout.FromMicroseconds(s2s)
        if _dur_us(a.heartbeat_timeout):
            attrs.heartbeat_timeout.FromMicroseconds(min(_dur_us(a.heartbeat_timeout), st2c))
        attrs.retry_policy.CopyFrom(_retry.with_defaults(a.retry_policy))
        attrs.retry_policy.non_retryable_error_types[:] = a.retry_policy.non_retryable_error_types
        attrs.workflow_task_completed_event_id = completed_id
        attrs.placement = a.placement
        event = m.append(ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)
        event.activity_task_scheduled_event_attributes.CopyFrom(attrs)
        sid = event.event_id
        m.scheduled_activities[sid] = attrs
        info = ms.pending_activities[sid]
        info.scheduled_event_id = sid
        info.activity_id = a.activity_id
        info.activity_type.CopyFrom(a.activity_type)
        info.task_queue.CopyFrom(attrs.task_queue)
        info.attempt = 1
        info.first_scheduled_time.FromMicroseconds(m.now)
        info.scheduled_time.FromMicroseconds(m.now)
        info.schedule_to_close_timeout.CopyFrom(attrs.schedule_to_close_timeout)
        info.schedule_to_start_timeout.CopyFrom(attrs.schedule_to_start_timeout)
        info.start_to_close_timeout.CopyFrom(attrs.start_to_close_timeout)
        info.heartbeat_timeout.CopyFrom(attrs.heartbeat_timeout)
        info.retry_policy.CopyFrom(attrs.retry_policy)
        if s2c:
            info.timer_keys.append(
                m.add_timer(TimerKind.ACTIVITY_SCHEDULE_TO_CLOSE, sid, 0, m.now + s2c)
            )
        if eager_identity and a.request_eager_execution and len(eager) < _MAX_EAGER_ACTIVITIES:
            # The completing worker runs it: no dispatch row, no poll, no extra commit.
            self._start_activity_attempt(m, info, eager_identity)
            eager.append(sid)
        else:
            self._dispatch_activity_attempt(m, info)

    def _dispatch_activity_attempt(self, m: Mutation, info: state_pb2.ActivityInfo) -> None:
        info.backing_off = False
        info.scheduled_time.FromMicroseconds(m.now)
        info.task_key = m.add_task(
            TaskKind.ACTIVITY, info.task_queue.name, info.scheduled_event_id, info.attempt
        )
        s2s = _dur_us(info.schedule_to_start_timeout)
        if s2s and s2s != _dur_us(info.schedule_to_close_timeout):
            info.timer_keys.append(
                m.add_timer(
                    TimerKind.ACTIVITY_SCHEDULE_TO_START,
                    info.scheduled_event_id,
                    info.attempt,
                    m.now + s2s,
                )
            )

    def _fail_workflow_task(
        self, m: Mutation, cause: int, failure: Failure, identity: str, *, timed_out: bool = False
    ) -> None:
        ms = m.ms
        wft = ms.workflow_task
        attempt = wft.attempt
        # A failed or lost task may mean the sticky worker is gone: use the normal queue.
        m.unstick()
        if not wft.transient:
            if timed_out:
                m.append(
                    ET.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT,
                    scheduled_event_id=wft.scheduled_event_id,
                    started_event_id=wft.started_event_id,
                    timeout_type=TimeoutType.TIMEOUT_TYPE_START_TO_CLOSE,
                )
            else:
                m.append(
                    ET.EVENT_TYPE_WORKFLOW_TASK_FAILED,
                    scheduled_event_id=wft.scheduled_event_id,
                    started_event_id=wft.started_event_id,
                    cause=cause,
                    failure=failure,
                    identity=identity,
                )
        m.clear_workflow_task()
        reset_sticky = (
            cause == WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_RESET_STICKY_TASK_QUEUE
        )
        if m.flush_buffered() or reset_sticky:
            # New events, or a sticky worker that lost the run: a fresh, recorded
            # attempt (full history through the normal queue), not a retry.
            m.schedule_workflow_task()
            return
        next_attempt = attempt + 1
        delay = 0
        if next_attempt > 2:
            delay = int(
                min(
                    self._config.workflow_task_retry_initial_s * 2 ** (next_attempt - 3),
                    self._config.workflow_task_retry_max_s,
                )
                * _US
            )
        m.schedule_workflow_task(attempt=next_attempt, delay_until=m.now + delay if delay else 0)

    async def fail_workflow_task(
        self, token: state_pb2.TaskToken, cause: int, failure: Failure, identity: str
    ) -> None:
        key = RunKey(namespace=token.namespace, workflow_id=token.workflow_id, run_id=token.run_id)

        def fn(m: Mutation) -> None:
            self._check_workflow_task(m, token)
            m.trace.update(token=token, cause=cause)
            self._fail_workflow_task(m, cause, failure, identity)

        await self._update(key, "FailWorkflowTask", fn)

    # ------------------------------------------------------------ activities

    def _start_activity_attempt(
        self, m: Mutation, info: state_pb2.ActivityInfo, identity: str
    ) -> None:
        """The current attempt is handed to a worker: arm its start-to-close and
        heartbeat timeouts. (No event: ActivityTaskStarted is written with the outcome.)"""
        info.task_key = ""
        info.started_time.FromMicroseconds(m.now)
        info.started_identity = identity
        info.request_id = str(uuid.uuid4())
        info.ClearField("last_heartbeat_time")
        schedule_to_start = [
            k for k in info.timer_keys if timer_key_kind(k) == TimerKind.ACTIVITY_SCHEDULE_TO_START
        ]
        m.drop_timers(schedule_to_start)
        info.timer_keys[:] = [k for k in info.timer_keys if k not in schedule_to_start]
        info.timer_keys.append(
            m.add_timer(
                TimerKind.ACTIVITY_START_TO_CLOSE,
                info.scheduled_event_id,
                info.attempt,
                m.now + _dur_us(info.start_to_close_timeout),
            )
        )
        hb = _dur_us(info.heartbeat_timeout)
        if hb:
            info.timer_keys.append(
                m.add_timer(
                    TimerKind.ACTIVITY_HEARTBEAT, info.scheduled_event_id, info.attempt, m.now + hb
                )
            )
        m.dirty = True

    async def record_activity_started(
        self, task: TaskRow, identity: str
    ) -> service_pb2.PollActivityTaskResponse | None:
        def fn(m: Mutation) -> bool:
            ms = m.ms
            info = ms.pending_activities.get(task.ref_id)
            if (
                ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING
                or info is None
                or info.attempt != task.attempt
                or info.started_time.ToMicroseconds() != 0
                or info.backing_off
            ):
                return False
            m.trace["task"] = task
            m.done_task_keys.append(task.task_key)
            self._start_activity_attempt(m, info, identity)
            return True

        try:
            started = await self._update(task.key, "RecordActivityStarted", fn)
        except NotFoundError:
            started = False
        if not started:
            await self._store.delete_task(task.task_key)
            return None
        return await self._activity_task(task.key, task.ref_id)

    async def _activity_task(
        self, key: RunKey, scheduled_event_id: int
    ) -> service_pb2.PollActivityTaskResponse:
        """What a worker needs to run the started attempt of an activity."""
        run = await self._load(key)
        ms = run.state
        info = ms.pending_activities[scheduled_event_id]
        attrs = run.scheduled_activities.get(scheduled_event_id)
        if attrs is None:
            events = await self._store.read_events(
                key, first_event_id=scheduled_event_id, max_events=1
            )
            attrs = events[0].activity_task_scheduled_event_attributes
            run.scheduled_activities[scheduled_event_id] = attrs
        resp = service_pb2.PollActivityTaskResponse(
            task_token=_token(ms, info.scheduled_event_id, 0, info.attempt, activity=True),
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

    def _check_activity(self, m: Mutation, token: state_pb2.TaskToken) -> state_pb2.ActivityInfo:
        ms = m.ms
        info = ms.pending_activities.get(token.scheduled_event_id)
        if (
            ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING
            or info is None
            or info.attempt != token.attempt
            or info.started_time.ToMicroseconds() == 0
        ):
            raise NotFoundError(
                "activity task not found: it already completed, timed out, was retried, or the "
                f"run closed (workflow_id={token.workflow_id!r}, "
                f"scheduled_event_id={token.scheduled_event_id}, attempt={token.attempt})"
            )
        return info

    def _finish_activity(self, m: Mutation, info: state_pb2.ActivityInfo) -> None:
        m.drop_timers(info.timer_keys)
        if info.task_key:
            m.done_task_keys.append(info.task_key)
        del m.ms.pending_activities[info.scheduled_event_id]
        m.schedule_workflow_task()

    async def complete_activity(
        self,
        token: state_pb2.TaskToken,
        result: common_pb2.Payloads | None,
        identity: str,
        eager_workflow_task_queue: str = "",
        sticky_task_queue: str = "",
    ) -> service_pb2.PollWorkflowTaskResponse | None:
        """Record an activity's result. If the completing worker offers to run the
        workflow task this schedules (same task queue), it is started in the same
        transaction and returned: no dispatch row, no poll, no extra commit."""

        def fn(m: Mutation) -> state_pb2.WorkflowTaskInfo | None:
            info = self._check_activity(m, token)
            m.trace.update(
                token=token,
                eager_wft=bool(eager_workflow_task_queue)
                and eager_workflow_task_queue == m.ms.task_queue.name,
            )
            m.append_activity_outcome(
                info,
                ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
                result=result,
                identity=identity,
            )
            had_workflow_task = m.ms.HasField("workflow_task")
            self._finish_activity(m, info)
            return self._start_eagerly(m, had_workflow_task, eager_workflow_task_queue, identity)

        wft = await self._update(_key(token), "CompleteActivity", fn)
        if wft is None:
            return None
        ms = await self.state_of(_key(token))
        partial = bool(sticky_task_queue) and ms.sticky_task_queue == sticky_task_queue
        return await self._workflow_task(_key(token), wft, only_new_events=partial)

    def _start_eagerly(
        self, m: Mutation, had_workflow_task: bool, queue: str, identity: str
    ) -> state_pb2.WorkflowTaskInfo | None:
        ms = m.ms
        if (
            not queue
            or had_workflow_task
            or not ms.HasField("workflow_task")
            or ms.workflow_task.transient
            or ms.task_queue.name != queue
        ):
            return None
        row = m.workflow_task_row_key()
        m.new_tasks = [t for t in m.new_tasks if t.task_key != row]
        return self._start_workflow_task(m, identity)

    async def fail_activity(
        self,
        token: state_pb2.TaskToken,
        failure: Failure,
        identity: str,
        details: common_pb2.Payloads | None,
    ) -> None:
        def fn(m: Mutation) -> None:
            info = self._check_activity(m, token)
            m.trace["token"] = token
            if details is not None:
                info.heartbeat_details.CopyFrom(details)
            self._attempt_failed(m, info, failure, timeout_type=None)

        await self._update(_key(token), "FailActivity", fn)

    def _attempt_failed(
        self,
        m: Mutation,
        info: state_pb2.ActivityInfo,
        failure: Failure,
        *,
        timeout_type: int | None,
    ) -> None:
        """An attempt failed or timed out: retry after a backoff, or record the outcome."""
        s2c = _dur_us(info.schedule_to_close_timeout)
        deadline = info.first_scheduled_time.ToMicroseconds() + s2c if s2c else 0
        if timeout_type in (
            TimeoutType.TIMEOUT_TYPE_SCHEDULE_TO_CLOSE,
            TimeoutType.TIMEOUT_TYPE_SCHEDULE_TO_START,
        ):
            decision = _retry.RetryDecision(-1, RetryState.RETRY_STATE_TIMEOUT)
        else:
            decision = _retry.next_retry(
                info.retry_policy,
                attempt=info.attempt,
                failure=None if timeout_type is not None else failure,
                now_us=m.now,
                deadline_us=deadline,
            )
        m.trace["retry"] = decision.delay_us >= 0
        if decision.delay_us >= 0:
            # Retries are the server's job and write no history: only state changes.
            keep = [
                k
                for k in info.timer_keys
                if timer_key_kind(k) == TimerKind.ACTIVITY_SCHEDULE_TO_CLOSE
            ]
            m.drop_timers([k for k in info.timer_keys if k not in keep])
            info.timer_keys[:] = keep
            info.last_failure.CopyFrom(failure)
            info.attempt += 1
            info.ClearField("started_time")
            info.started_identity = ""
            info.backing_off = True
            info.timer_keys.append(
                m.add_timer(
                    TimerKind.ACTIVITY_RETRY,
                    info.scheduled_event_id,
                    info.attempt,
                    m.now + decision.delay_us,
                )
            )
            return
        if timeout_type is not None:
            m.append_activity_outcome(
                info,
                ET.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT,
                failure=failure,
                retry_state=decision.state,
            )
        else:
            m.append_activity_outcome(
                info,
                ET.EVENT_TYPE_ACTIVITY_TASK_FAILED,
                failure=failure,
                identity=info.started_identity,
                retry_state=decision.state,
            )
        self._finish_activity(m, info)

    async def record_heartbeat(
        self, token: state_pb2.TaskToken, details: common_pb2.Payloads | None
    ) -> bool:
        """Record a heartbeat; returns whether cancellation was requested."""

        def fn(m: Mutation) -> bool:
            info = self._check_activity(m, token)
            m.trace["token"] = token
            info.last_heartbeat_time.FromMicroseconds(m.now)
            if details is not None:
                info.heartbeat_details.CopyFrom(details)
            m.dirty = True
            return info.cancel_requested

        return await self._update(_key(token), "RecordHeartbeat", fn)

    # ---------------------------------------------------------------- timers

    async def fire_timer(self, timer: TimerRow) -> None:
        """A durable timer is due. Stale timers (their task moved on) are dropped."""

        def fn(m: Mutation) -> bool:
            ms = m.ms
            if ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING:
                return False
            m.trace["timer"] = timer
            handled = self._on_timer(m, timer)
            if handled:
                m.done_timer_keys.append(timer.timer_key)
                _forget_key(ms, timer.timer_key)
            return handled

        try:
            handled = await self._update(timer.key, f"FireTimer:{timer.kind.name}", fn)
        except NotFoundError:
            handled = False
        if not handled:
            await self._store.delete_timer(timer.timer_key)

    def _on_timer(self, m: Mutation, timer: TimerRow) -> bool:
        ms = m.ms
        kind = timer.kind
        if kind == TimerKind.USER_TIMER:
            for timer_id, timer_info in ms.pending_timers.items():
                if timer_info.started_event_id == timer.ref_id:
                    m.append_or_buffer(
                        ET.EVENT_TYPE_TIMER_FIRED,
                        timer_id=timer_id,
                        started_event_id=timer_info.started_event_id,
                    )
                    del ms.pending_timers[timer_id]
                    m.schedule_workflow_task()
                    return True
            return False
        if kind == TimerKind.WORKFLOW_RUN_TIMEOUT:
            m.close(
                WS.WORKFLOW_EXECUTION_STATUS_TIMED_OUT,
                ET.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
                retry_state=RetryState.RETRY_STATE_TIMEOUT,
            )
            return True
        if kind in (
            TimerKind.WORKFLOW_TASK_TIMEOUT,
            TimerKind.WORKFLOW_TASK_RETRY,
            TimerKind.STICKY_SCHEDULE_TO_START,
        ):
            if not ms.HasField("workflow_task") or ms.workflow_task.attempt != timer.attempt:
                return False
            wft = ms.workflow_task
            if not _forget_key(wft, timer.timer_key):
                return False  # fired before (a refill raced the delete)
            if kind == TimerKind.STICKY_SCHEDULE_TO_START:
                if (
                    wft.started_event_id != 0
                    or wft.task_queue.kind != TaskQueueKind.TASK_QUEUE_KIND_STICKY
                ):
                    return False
                m.unstick()  # the sticky worker did not pick it up in time
                return True
            if kind == TimerKind.WORKFLOW_TASK_RETRY:
                if wft.started_event_id != 0:
                    return False
                m.add_task(
                    TaskKind.WORKFLOW,
                    wft.task_queue.name,
                    0 if wft.transient else wft.scheduled_event_id,
                    wft.attempt,
                )
                return True
            if wft.started_event_id == 0 or wft.scheduled_event_id != timer.ref_id:
                return False
            self._fail_workflow_task(
                m,
                0,
                Failure(message="workflow task timed out", source="server"),
                "",
                timed_out=True,
            )
            return True
        info = ms.pending_activities.get(timer.ref_id)
        if info is None:
            return False
        if not _forget_key(info, timer.timer_key):
            return False  # fired before (a refill raced the delete)
        if kind == TimerKind.ACTIVITY_RETRY:
            if not info.backing_off or info.attempt != timer.attempt:
                return False
            self._dispatch_activity_attempt(m, info)
            return True
        if kind == TimerKind.ACTIVITY_SCHEDULE_TO_CLOSE:
            timeout = TimeoutType.TIMEOUT_TYPE_SCHEDULE_TO_CLOSE
        elif info.attempt != timer.attempt:
            return False
        elif kind == TimerKind.ACTIVITY_SCHEDULE_TO_START:
            if info.started_time.ToMicroseconds() != 0 or info.backing_off:
                return False
            timeout = TimeoutType.TIMEOUT_TYPE_SCHEDULE_TO_START
        elif kind == TimerKind.ACTIVITY_START_TO_CLOSE:
            if info.started_time.ToMicroseconds() == 0:
                return False
            timeout = TimeoutType.TIMEOUT_TYPE_START_TO_CLOSE
        elif kind == TimerKind.ACTIVITY_HEARTBEAT:
            if info.started_time.ToMicroseconds() == 0:
                return False
            last = info.last_heartbeat_time.ToMicroseconds() or info.started_time.ToMicroseconds()
            due = last + _dur_us(info.heartbeat_timeout)
            if due > m.now:
                # Heartbeats arrived meanwhile: re-arm at the new deadline.
                m.trace["rearm"] = True
                info.timer_keys.append(
                    m.add_timer(
                        TimerKind.ACTIVITY_HEARTBEAT, info.scheduled_event_id, info.attempt, due
                    )
                )
                return True
            timeout = TimeoutType.TIMEOUT_TYPE_HEARTBEAT
        else:
            return False
        failure = Failure(
            message=f"activity {TimeoutType.Name(timeout).removeprefix('TIMEOUT_TYPE_')} timeout",
            source="server",
        )
        failure.timeout_failure_info.timeout_type = timeout
        if info.HasField("heartbeat_details"):
            failure.timeout_failure_info.last_heartbeat_details.CopyFrom(info.heartbeat_details)
        if info.HasField("last_failure") and timeout == TimeoutType.TIMEOUT_TYPE_SCHEDULE_TO_CLOSE:
            failure.cause.CopyFrom(info.last_failure)
        self._attempt_failed(m, info, failure, timeout_type=timeout)
        return True

    async def unstick(self, key: RunKey, sticky_queue: str) -> None:
        """The worker of ``sticky_queue`` left: the run's tasks go to the normal queue."""

        def fn(m: Mutation) -> None:
            if m.ms.sticky_task_queue == sticky_queue:
                m.unstick()

        with contextlib.suppress(NotFoundError):
            await self._update(key, "Unstick", fn)

    # -------------------------------------------------- signals, cancellation

    async def signal(
        self,
        key: RunKey,
        name: str,
        payloads: common_pb2.Payloads | None,
        identity: str,
        request_id: str,
        header: common_pb2.Header | None,
    ) -> None:
        """Deliver a signal: an event in history (buffered while a workflow task runs)
        and a workflow task. A retried request (same request id) is applied once."""

        def fn(m: Mutation) -> None:
            ms = m.ms
            if ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING:
                raise FailedPreconditionError(
                    f"workflow run {key.run_id} of {key.workflow_id!r} is already closed"
                )
            if request_id and request_id in ms.signal_request_ids:
                return  # a retry of a signal already delivered
            m.trace["request_id"] = request_id
            m.append_or_buffer(
                ET.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
                signal_name=name,
                input=payloads,
                identity=identity,
                header=header,
                request_id=request_id,
            )
            if request_id:
                ms.signal_request_ids.append(request_id)
                if len(ms.signal_request_ids) > _MAX_REMEMBERED_SIGNAL_IDS:
                    del ms.signal_request_ids[0]
            m.schedule_workflow_task()

        await self._update(key, "Signal", fn)

    async def request_cancel(
        self, key: RunKey, identity: str, request_id: str, reason: str
    ) -> None:
        """Ask the workflow to cancel itself: its code sees CancelledError and decides."""

        def fn(m: Mutation) -> None:
            ms = m.ms
            if ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING:
                raise FailedPreconditionError(
                    f"workflow run {key.run_id} of {key.workflow_id!r} is already closed"
                )
            if ms.cancel_requested:
                return  # requested before: cancellation is idempotent
            ms.cancel_requested = True
            m.append_or_buffer(
                ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED,
                cause=reason,
                identity=identity,
                request_id=request_id,
            )
            m.schedule_workflow_task()

        await self._update(key, "RequestCancel", fn)

    async def activity_canceled(
        self, token: state_pb2.TaskToken, details: common_pb2.Payloads | None, identity: str
    ) -> None:
        """The worker stopped an activity whose cancellation was requested."""

        def fn(m: Mutation) -> None:
            info = self._check_activity(m, token)
            m.trace["token"] = token
            if not info.cancel_requested:
                raise FailedPreconditionError(
                    f"activity {info.activity_id!r} was not asked to cancel; report its "
                    "outcome with RespondActivityTaskCompleted or RespondActivityTaskFailed"
                )
            m.append_activity_outcome(
                info, ET.EVENT_TYPE_ACTIVITY_TASK_CANCELED, details=details, identity=identity
            )
            self._finish_activity(m, info)

        await self._update(_key(token), "ActivityCanceled", fn)

    # --------------------------------------------------- cross-run (transfer)

    async def _event(self, key: RunKey, event_id: int) -> history_pb2.HistoryEvent:
        run = await self._load(key)
        if run.events is not None and event_id <= len(run.events):
            return run.events[event_id - 1]
        events = await self._store.read_events(key, first_event_id=event_id, max_events=1)
        if not events or events[0].event_id != event_id:
            raise NotFoundError(f"event {event_id} of run {key} not found")
        return events[0]

    async def process_transfer(self, task: TaskRow) -> None:
        """Carry out one outbox row; the row is deleted when its effect is recorded."""
        try:
            action = task.task_queue
            if action == TransferAction.START_CHILD:
                await self._start_child(task)
            elif action == TransferAction.CHILD_CLOSED:
                await self._report_child_closed(task)
            elif action == TransferAction.PARENT_CLOSE_POLICY:
                await self._apply_parent_close_policy(task)
            elif action in (TransferAction.SIGNAL_EXTERNAL, TransferAction.CANCEL_EXTERNAL):
                await self._external_request(task)
            else:
                log.error("unknown transfer action %r; dropping %s", action, task.task_key)
                await self._store.delete_task(task.task_key)
        except NotFoundError:
            # The run it is about is gone (or never was): nothing left to do.
            await self._store.delete_task(task.task_key)

    async def _start_child(self, task: TaskRow) -> None:
        parent = await self.state_of(task.key)
        child = parent.pending_children.get(task.ref_id)
        if child is None or child.run_id or parent.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING:
            await self._store.delete_task(task.task_key)
            return
        initiated = (
            await self._event(task.key, task.ref_id)
        ).start_child_workflow_execution_initiated_event_attributes
        req = service_pb2.StartWorkflowRequest(
            namespace=parent.namespace,
            workflow_id=initiated.workflow_id,
            identity=f"parent:{parent.workflow_id}",
            # The same request id on every retry: a child is started at most once.
            request_id=f"{parent.run_id}:child:{task.ref_id}",
        )
        req.workflow_type.CopyFrom(initiated.workflow_type)
        req.task_queue.name = initiated.task_queue.name
        for name in (
            "input",
            "workflow_execution_timeout",
            "workflow_run_timeout",
            "workflow_task_timeout",
            "retry_policy",
            "memo",
            "search_attributes",
            "header",
        ):
            if initiated.HasField(name):
                getattr(req, name).CopyFrom(getattr(initiated, name))
        try:
            run_id, _ = await self.start_workflow(
                req, parent=parent, parent_initiated_event_id=task.ref_id
            )
        except WorkflowAlreadyStartedError as exc:
            failure_cause: str | None = str(exc)
            run_id = ""
        else:
            failure_cause = None

        def fn(m: Mutation) -> None:
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
                    # The parent closed while its child was being started: the close
                    # policy could not see the child then, so apply it now.
                    info.run_id = run_id
                    # Slot 2: the close's own row for this child (slot 1) may still
                    # be outstanding (see Mutation.add_transfer). An ABANDON child is
                    # left alone, as close() does (the policy row would terminate it).
                    abandon = ParentClosePolicy.PARENT_CLOSE_POLICY_ABANDON
                    if info.parent_close_policy != abandon:
                        m.add_transfer(TransferAction.PARENT_CLOSE_POLICY, task.ref_id, slot=2)
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

        await self._update(task.key, "RecordChildStarted", fn)

    async def _report_child_closed(self, task: TaskRow) -> None:
        child = await self.state_of(task.key)
        close = await self._event(task.key, task.ref_id)
        parent_key = RunKey(
            namespace=child.parent_namespace,
            workflow_id=child.parent_workflow_id,
            run_id=child.parent_run_id,
        )
        event_type = _CHILD_OUTCOME_EVENT.get(close.event_type)
        execution = common_pb2.WorkflowExecution(workflow_id=child.workflow_id, run_id=child.run_id)

        def fn(m: Mutation) -> None:
            ms = m.ms
            # The row is the child's (its run's outbox): the parent's commit deletes it.
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
                "workflow_execution": execution,
                "workflow_type": info.workflow_type,
                "initiated_event_id": info.initiated_event_id,
            }
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
                attrs["retry_state"] = (
                    close.workflow_execution_timed_out_event_attributes.retry_state
                )
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

        await self._update(parent_key, "RecordChildClosed", fn)

    async def _apply_parent_close_policy(self, task: TaskRow) -> None:
        parent = await self.state_of(task.key)
        child = parent.pending_children.get(task.ref_id)
        if child is not None and child.run_id:
            key = RunKey(
                namespace=child.namespace, workflow_id=child.workflow_id, run_id=child.run_id
            )
            try:
                if (
                    child.parent_close_policy
                    == ParentClosePolicy.PARENT_CLOSE_POLICY_REQUEST_CANCEL
                ):
                    await self.request_cancel(
                        key,
                        f"parent:{parent.workflow_id}",
                        f"{parent.run_id}:close:{task.ref_id}",
                        "parent closed",
                    )
                else:  # TERMINATE, also the default
                    await self.terminate(key, "parent closed", None, f"parent:{parent.workflow_id}")
            except FailedPreconditionError:
                pass  # the child closed already
        await self._store.delete_task(task.task_key)

    async def _external_request(self, task: TaskRow) -> None:
        source = await self.state_of(task.key)
        request = source.pending_external.get(task.ref_id)
        if request is None:
            await self._store.delete_task(task.task_key)
            return
        initiated = await self._event(task.key, task.ref_id)
        failure_cause = None
        try:
            target = await self.resolve_run_id(
                request.namespace, request.workflow_id, request.run_id
            )
            request_id = f"{source.run_id}:external:{task.ref_id}"
            if request.cancel:
                await self.request_cancel(target, f"workflow:{source.workflow_id}", request_id, "")
            else:
                a = initiated.signal_external_workflow_execution_initiated_event_attributes
                await self.signal(
                    target,
                    a.signal_name,
                    a.input if a.HasField("input") else None,
                    f"workflow:{source.workflow_id}",
                    request_id,
                    a.header if a.HasField("header") else None,
                )
        except (NotFoundError, FailedPreconditionError) as exc:
            failure_cause = str(exc)
        execution = common_pb2.WorkflowExecution(
            workflow_id=request.workflow_id, run_id=request.run_id
        )

        def fn(m: Mutation) -> None:
            ms = m.ms
            m.trace["task"] = task
            m.trace["failed"] = failure_cause is not None
            m.trace["cancel"] = request.cancel
            m.done_task_keys.append(task.task_key)
            m.dirty = True
            if (
                task.ref_id not in ms.pending_external
                or ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING
            ):
                return
            del ms.pending_external[task.ref_id]
            common = {
                "namespace": ms.namespace,
                "workflow_execution": execution,
                "initiated_event_id": task.ref_id,
            }
            if request.cancel:
                if failure_cause is None:
                    m.append_or_buffer(
                        ET.EVENT_TYPE_EXTERNAL_WORKFLOW_EXECUTION_CANCEL_REQUESTED, **common
                    )
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

        await self._update(task.key, "RecordExternalOutcome", fn)

    # ------------------------------------------------------------- terminate

    async def terminate(
        self,
        key: RunKey,
        reason: str,
        details: common_pb2.Payloads | None,
        identity: str,
        request_id: str = "",
    ) -> None:
        def fn(m: Mutation) -> None:
            if request_id and m.ms.terminate_request_id == request_id:
                return  # a retry of the terminate that closed the run
            if m.ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING:
                raise FailedPreconditionError(
                    f"workflow run {key.run_id} of {key.workflow_id!r} is already closed"
                )
            m.ms.terminate_request_id = request_id
            m.close(
                WS.WORKFLOW_EXECUTION_STATUS_TERMINATED,
                ET.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
                reason=reason,
                details=details,
                identity=identity,
            )

        await self._update(key, "Terminate", fn)

    async def resolve_run_id(self, namespace: str, workflow_id: str, run_id: str) -> RunKey:
        if run_id:
            return RunKey(namespace=namespace, workflow_id=workflow_id, run_id=run_id)
        current = await self._store.get_current(namespace, workflow_id)
        if current is None:
            raise WorkflowNotFoundError(
                f"workflow not found: workflow_id={workflow_id!r}", workflow_id=workflow_id
            )
        return RunKey(namespace=namespace, workflow_id=workflow_id, run_id=current.run_id)

    async def read_events(
        self, key: RunKey, first_event_id: int, max_events: int | None
    ) -> list[Any]:
        try:
            return await self._store.read_events(
                key, first_event_id=first_event_id, max_events=max_events
            )
        except StoreError as exc:
            raise UnavailableError(f"history store: {exc}") from exc


def _reuse_refused(policy: int, closed_status: int) -> str | None:
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


# How a child's close event is reported in its parent's history.
_CHILD_OUTCOME_EVENT = {
    ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED: ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED,
    ET.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED: ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_FAILED,
    ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED: ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_CANCELED,
    ET.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT: ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TIMED_OUT,
    ET.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED: ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TERMINATED,
}


def _key(token: state_pb2.TaskToken) -> RunKey:
    return RunKey(namespace=token.namespace, workflow_id=token.workflow_id, run_id=token.run_id)


def _forget_key(holder: Any, timer_key: str) -> bool:
    """Remove a fired timer's key from the list that tracks it (its row is deleted in
    this transition); False if the key was not tracked, i.e. the timer is stale."""
    keys = holder.timer_keys
    if timer_key in keys:
        keys.remove(timer_key)
        return True
    return False
