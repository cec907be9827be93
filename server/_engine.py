"""The history engine: every change to a run is a transition computed here and
committed as one store transaction.

A transition runs under the run's lock on this node, on a copy of the cached mutable
state; the store's optimistic version check catches writers on other nodes, and a
lost race reloads the run and recomputes the transition. After a commit the engine
hands new tasks to matching and new timers to the timer queue; both are recovered
from the store on restart, so nothing depends on memory a crash loses.

``HistoryEngine`` owns the cache of runs, the update/retry loop (``update``) and the
public entry points. What a transition does lives in one module per role:
server/_run_start.py (a run's first transition), _workflow_tasks.py, _commands.py
(a completed task's commands), _activities.py (activity attempts), _timeouts.py (timers
firing) and _cross_run.py (transfers to and from other runs); _task_responses.py shapes
what a poll hands a worker.

TLA+ actions implemented here (tla/EngineCore.tla): the commit of ``StartRun`` and
``StartRunEagerly`` (the decision to start: _start_policies.py), ``RecordWorkflowTaskStarted``,
``CompleteWorkflowTask``, ``FailWorkflowTask``, ``RecordActivityStarted``,
``CompleteActivity``, ``FailActivity``, ``RecordHeartbeat``, ``ActivityCanceledValid`` +
``ActivityCanceled``, ``SignalIsNew`` + ``Signal``, ``RequestCancelValid`` +
``RequestCancel``, ``Terminate``, ``UnstickValid`` + ``Unstick``, and ``FireTimer`` (its
transition is server/_timeouts.py). tla/History.tla: ``CommitTaking`` (``update`` and
server/_engine_commits.py, the commit machinery).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from tideflow.api.v1 import command_pb2, common_pb2, history_pb2, service_pb2, state_pb2
from tideflow.api.v1.common_pb2 import (
    Failure,
    TaskQueueKind,
)
from tideflow.api.v1.common_pb2 import WorkflowExecutionStatus as WS
from tideflow.api.v1.history_pb2 import EventType, WorkflowTaskCompletedMetadata
from tideflow.api.v1.replication_pb2 import ForwardedRequest
from tideflow.history import (
    ConditionFailedError,
    CurrentExecutionConflictError,
    CurrentRecord,
    CurrentWrite,
    HistoryStore,
    RunKey,
    StoreError,
    TaskRow,
    TimerRow,
    shard_of,
)

from . import (
    _activities,
    _cross_run,
    _run_start,
    _start_policies,
    _task_responses,
    _timeouts,
    _workflow_tasks,
)
from ._config import Clock, ServerConfig
from ._dispatcher import Dispatcher as Dispatcher  # where tests and the server import it
from ._engine_commits import MAX_CACHED_EVENTS, CommitMachinery
from ._errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    WorkflowNotFoundError,
)
from ._history_pages import HistoryPager
from ._home import NotHomeError, check_home
from ._mutation import Mutation, run_key_of
from ._placement import WorkerSite
from ._replication_trace import ReplicationTracer
from ._run_cache import CachedRun, RunCache
from ._run_gateway import RunGateway
from ._shards import ShardController
from ._task_responses import decode_token as decode_token  # the frontend's import
from ._task_tokens import TaskTokenSigner
from ._timer_fires import fire_page
from ._trace import Tracer

ET = EventType
_RUNNING = WS.WORKFLOW_EXECUTION_STATUS_RUNNING
T = TypeVar("T")
_MAX_CONFLICT_RETRIES = 20
# Signal request ids remembered per run for de-duplication of retried signals.
_MAX_REMEMBERED_SIGNAL_IDS = 10_000


class HistoryEngine(CommitMachinery):
    def __init__(
        self,
        store: HistoryStore,
        dispatcher: Dispatcher,
        clock: Clock,
        config: ServerConfig,
        *,
        shards: ShardController | None = None,
    ) -> None:
        self._store = store
        # The node's shard ownership: runs of shards it does not hold are refused
        # (UNAVAILABLE naming the owner). None: every run is served (tests, tools).
        self._shards = shards
        self.address = shards.address if shards else ""  # named to workers as runs' owner
        # Where transfers act on other runs: here, or on the node that owns the other
        # run's shard (the server wires its router in, server/_run_gateway.py).
        self.gateway = RunGateway(self)
        # A site's inbox (server/_sites.py ``redirect``): where the gateway sends a
        # signal, cancel or terminate of a transfer aimed at a run homed elsewhere.
        self.redirect_to_home: (
            Callable[[ForwardedRequest, RunKey, NotHomeError], Awaitable[bool]] | None
        ) = None
        self._dispatcher = dispatcher
        self._clock = clock
        self._config = config
        self._cache = RunCache(config.state_cache_size)
        self._tracer = Tracer.from_environment()
        # Trace mode of a site (server/_replication_trace.py), set by server/_sites.py.
        self.replication_tracer = ReplicationTracer(None, "")
        # Cuts task histories to a first page; the frontend pages GetHistory with it
        # too, so its continuation tokens are sealed and opened under the same keys.
        signer = TaskTokenSigner(store.token_keys, refresh_s=config.token_key_refresh_s)
        self.pager = HistoryPager(
            self.read_events, self.state_of, config.history_page_bytes, signer
        )

    # ------------------------------------------------------------- machinery

    async def _load(self, key: RunKey) -> CachedRun:
        if self._shards is not None:
            self._shards.check(key.namespace, key.workflow_id)
        run = self._cache.get(key)
        if run is not None:
            self._cache.move_to_end(key)
            return run
        lease = self._lease_of(key)
        record = await self._store.get_execution(key)
        if record is None:
            raise WorkflowNotFoundError(
                f"workflow run not found: workflow_id={key.workflow_id!r} run_id={key.run_id!r}",
                workflow_id=key.workflow_id,
                run_id=key.run_id,
            )
        run = self._cache.get(key)  # another coroutine may have loaded it meanwhile
        if run is None:
            run = CachedRun(
                state=state_pb2.MutableState.FromString(record.state), db_version=record.db_version
            )
            self._cache_if_held(key, run, lease)
        return run

    def memory_held(self) -> dict[str, int]:
        # (The shard memo is process-wide: history's ``shard_of``, SHARD_MEMO_SIZE.)
        memo = shard_of.cache_info().currsize
        return {"engine_cached_runs": len(self._cache), "run_shard_memo": memo}

    def evict_shard(self, shard: int) -> None:
        """The node lost ``shard``: forget its cached runs (their state may be stale
        from now on) and wake whoever waits on them (they find the shard gone)."""
        for key in [k for k in self._cache if self._store.shard_of(k) == shard]:
            run = self._cache.pop(key)
            run.changed.set()

    async def update(self, key: RunKey, action: str, fn: Callable[[Mutation], T]) -> T:
        """Run ``fn`` on a fresh copy of the run's state and commit what it built.

        ``action`` names the transition in trace mode (the TLA+ action). A commit that
        lost a race to another writer is recomputed on the reloaded run.

        A refusal (NOT_FOUND, FAILED_PRECONDITION) computed on a cached state is
        computed again on a state read from the store before it is answered: a node
        that lost the shard without knowing yet (paused past its lease) may hold a
        state another node has moved on from, and a routing race must never surface
        as such an error. (A write on that stale state is refused by the fence.)"""
        rechecked = False
        for _ in range(_MAX_CONFLICT_RETRIES):
            run = await self._load(key)
            async with run.lock:
                if self._cache.get(key) is not run:
                    continue  # evicted or reloaded while we waited
                ms = state_pb2.MutableState()
                ms.CopyFrom(run.state)
                m = Mutation(ms, self._clock.now_micros())
                try:
                    check_home(key, ms, self._config.cluster_name)
                    result = fn(m)
                except (NotFoundError, FailedPreconditionError):
                    if rechecked:
                        raise
                    rechecked = True
                    self._forget(key, run)
                    continue
                if not m.dirty or await self._commit(key, run, m, action):
                    return result
        raise UnavailableError(f"run {key} is changing too fast; try again")

    async def _judged_fresh(
        self, key: RunKey, action: str, fn: Callable[[Mutation], T]
    ) -> T | None:
        """``update(key, action, fn)`` for a dispatched task or a due timer, whose row is
        deleted when the result is falsy (stale). Such a verdict is reached again on a
        state read from the store before it stands: the cached state may lag a commit
        in doubt (its caller cancelled while the write was in flight, and a read cached
        the state from before it), and deleting a live row loses its task or timer for
        good. None: the run is gone."""
        try:
            result = await self.update(key, action, fn)
            if result:
                return result
            run = self._cache.get(key)
            if run is not None:
                self._forget(key, run)
            return await self.update(key, action, fn)
        except (NotFoundError, NotHomeError):  # gone, or handed to another site: stale
            return None

    async def _first_page(
        self,
        key: RunKey,
        first: int,
        last: int,
        unstored: list[history_pb2.HistoryEvent],
        *,
        buffered_from: int = 0,
    ) -> tuple[list[history_pb2.HistoryEvent], bytes]:
        """The first page of a task's history: stored events first..last, then
        ``unstored`` (``HistoryPager.first_task_page``); and the token for the rest.
        A short history is read whole once and kept in memory; a longer one is read
        from the store only as far as the page goes (a sticky task of a long history
        reads a few rows, a full task one page)."""
        run = await self._load(key)
        if run.events is None and run.state.next_event_id - 1 <= MAX_CACHED_EVENTS:
            loaded = await self._store.read_events(key)
            if self._cache.get(key) is run and len(loaded) == run.state.next_event_id - 1:
                run.events = loaded
            stored: tuple[int, int] | list[history_pb2.HistoryEvent] = loaded[first - 1 : last]
        elif run.events is not None:
            stored = run.events[first - 1 : last]
        else:
            stored = (first, last)
        return await self.pager.first_task_page(key, stored, unstored, buffered_from=buffered_from)

    async def state_of(self, key: RunKey) -> state_pb2.MutableState:  # cached, or read
        return (await self._load(key)).state

    async def wait_for_change(self, key: RunKey, next_event_id: int, timeout: float) -> None:
        """Return once the run has an event >= next_event_id, is closed, or timeout."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    run = await self._load(key)
                    ms = run.state
                    if ms.next_event_id > next_event_id or ms.status != _RUNNING:
                        return
                    run.watchers += 1
                    try:
                        await run.changed.wait()
                    finally:
                        run.watchers -= 1
                        self._cache.trim()
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
        run_id, started, _ = await self._start(req, parent, parent_initiated_event_id)
        return run_id, started

    async def start_workflow_eagerly(
        self, req: service_pb2.StartWorkflowRequest
    ) -> tuple[str, bool, service_pb2.PollWorkflowTaskResponse | None]:
        """``start_workflow`` for a client whose worker takes the first workflow task
        (``request_eager_execution``): a new run's first task is started in the start's
        own commit and returned; None when it was dispatched instead."""
        run_id, started, wft = await self._start(req, None, 0)
        if wft is None:
            return run_id, started, None
        key = RunKey(namespace=req.namespace, workflow_id=req.workflow_id, run_id=run_id)
        return run_id, started, await self._workflow_task(key, wft)

    async def _start(
        self,
        req: service_pb2.StartWorkflowRequest,
        parent: state_pb2.MutableState | None,
        parent_initiated_event_id: int,
    ) -> tuple[str, bool, state_pb2.WorkflowTaskInfo | None]:
        if self._shards is not None:
            self._shards.check(req.namespace, req.workflow_id)
        request_id = req.request_id or str(uuid.uuid4())
        # A plain start tries the new run first, without reading the id's current run:
        # a new id (the usual case) costs no read; a taken one fails the insert and
        # is decided from the current run as ever. Signal-with-start usually meets a
        # running run, so it reads first.
        optimistic = not req.signal_name
        for _ in range(_MAX_CONFLICT_RETRIES):
            current = None
            if not optimistic:
                current = await self._store.get_current(req.namespace, req.workflow_id)
            optimistic = False
            if current is not None:
                existing = await _start_policies.existing_run(self, req, current, request_id)
                if existing is _start_policies.AGAIN:
                    continue
                if existing is not None:
                    return existing, False, None
            started = await self._commit_start(
                req, current, request_id, parent, parent_initiated_event_id
            )
            if started is not None:
                return started[0], True, started[1]
        raise UnavailableError(f"workflow id {req.workflow_id!r} is contended; try again")

    async def _commit_start(
        self,
        req: service_pb2.StartWorkflowRequest,
        current: CurrentRecord | None,
        request_id: str,
        parent: state_pb2.MutableState | None,
        parent_initiated_event_id: int,
    ) -> tuple[str, state_pb2.WorkflowTaskInfo | None] | None:
        """Commit a new run as the workflow id's current one; its run id and its first
        workflow task if started eagerly, or None if another start or close changed the
        current run meanwhile, or the commit is in doubt (the caller decides again in
        both cases)."""
        run_id = str(uuid.uuid4())
        m = _run_start.new_run(
            req,
            run_id,
            request_id,
            self._clock.now_micros(),
            self._config,
            parent=parent,
            parent_initiated_event_id=parent_initiated_event_id,
        )
        if current is None:
            m.current = CurrentWrite.INSERT
        else:
            m.current = CurrentWrite.REPLACE
            m.replaces_run_id = current.run_id
        wft = None
        if req.request_eager_execution and parent is None and not req.signal_name:
            m.trace.update(eager_wft=True)
            wft = _workflow_tasks.start_eagerly(m, False, req.task_queue.name, req.identity)
        self._tracer.write_ahead("StartRun", m)
        rseq = self.replication_tracer.home_step("StartRun", m)
        lease = self._lease_of(run_key_of(m.ms))
        write = self._store.submit(m.to_transition(0, start_request_id=request_id))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            # The caller went away: a start no store writer has taken is withdrawn;
            # one that lands later hands its first task over then (as in _commit).
            if not self._store.withdraw(write):
                write.add_done_callback(lambda done: self._dispatch_if_committed(done, m))
            raise
        except CurrentExecutionConflictError:
            self._tracer.never_started(m)
            return None
        except ConditionFailedError:
            # The run id is new, so no other writer can have written its rows: the
            # store retried a commit whose answer was lost and met the rows of its
            # own first attempt. Deciding again finds this request's run as the
            # current one. (Trace mode: the line written ahead stays unconfirmed, as
            # for any commit in doubt.) Its first task is handed over as in _commit.
            self._dispatch_rows(m)
            return None
        self._tracer.outcome(m, committed=True)
        self.replication_tracer.outcome(rseq, "ok")
        run = CachedRun(state=m.ms, db_version=1, events=list(m.events))
        self._cache_if_held(run_key_of(m.ms), run, lease)
        self._after_commit(run, m, "StartRun")
        return run_id, wft

    # -------------------------------------------------------- workflow tasks

    async def record_workflow_task_started(
        self, task: TaskRow, identity: str
    ) -> service_pb2.PollWorkflowTaskResponse | None:
        """Mark a dispatched workflow task started; None if the task is stale."""
        wft = await self._judged_fresh(
            task.key,
            "RecordWorkflowTaskStarted",
            lambda m: _workflow_tasks.record_started(m, task, identity),
        )
        if wft is None:
            await self._store.delete_task(task.task_key, run=task.key)
            return None
        sticky = wft.task_queue.kind == TaskQueueKind.TASK_QUEUE_KIND_STICKY
        return await self._workflow_task(task.key, wft, only_new_events=sticky)

    async def _workflow_task(
        self, key: RunKey, wft: state_pb2.WorkflowTaskInfo, *, only_new_events: bool = False
    ) -> service_pb2.PollWorkflowTaskResponse:
        """What a worker needs to run a started workflow task: the first page of its
        history and the token for the rest."""
        ms = await self.state_of(key)
        first, last = _task_responses.history_range_of(wft, ms, only_new_events=only_new_events)
        unstored = _task_responses.unstored_events(ms, wft)
        events, token = await self._first_page(key, first, last, unstored)
        return _task_responses.workflow_task(ms, wft, events, token, self.address)

    async def query_task(
        self, key: RunKey, query_id: str, query: service_pb2.WorkflowQuery
    ) -> service_pb2.PollWorkflowTaskResponse:
        """A query task: the first page of the run's whole history (its buffered
        events included), for the worker to replay and answer. The state, and so where
        the buffered events start, is the one snapshot the page is built from."""
        ms = await self.state_of(key)
        events, token = await self._first_page(
            key,
            1,
            ms.next_event_id - 1,
            _task_responses.buffered_events(ms),
            buffered_from=ms.next_event_id,
        )
        return _task_responses.query_task(ms, query_id, query, events, token)

    async def complete_workflow_task(
        self,
        token: state_pb2.TaskToken,
        commands: list[command_pb2.Command],
        identity: str,
        sticky: service_pb2.StickyExecutionAttributes | None = None,
        *,
        force_new: bool = False,
        return_new: bool = False,
        sdk_metadata: WorkflowTaskCompletedMetadata | None = None,
    ) -> service_pb2.RespondWorkflowTaskCompletedResponse:
        """Apply a workflow task's commands; returns the activities started eagerly
        for the completing worker and, with ``return_new``, the next workflow task
        started for it in the same transaction (``force_new`` schedules one even if
        nothing new happened: the heartbeat of a worker running local activities)."""
        key = _key(token)
        eager: list[int] = []

        def fn(m: Mutation) -> tuple[str | None, state_pb2.WorkflowTaskInfo | None]:
            error = _workflow_tasks.complete(
                m, token, commands, identity, sticky, eager, self._config, force_new, sdk_metadata
            )
            m.trace["return_new"] = return_new
            if error is not None or not return_new:
                return error, None
            return None, _workflow_tasks.start_eagerly(m, False, m.ms.task_queue.name, identity)

        error, wft = await self.update(key, "CompleteWorkflowTask", fn)
        if error is not None:
            raise InvalidArgumentError(f"workflow task failed: {error}")
        ms = await self.state_of(key)
        response = service_pb2.RespondWorkflowTaskCompletedResponse(
            activity_tasks=[
                await self._activity_task(key, sid) for sid in eager if sid in ms.pending_activities
            ]
        )
        if wft is not None:
            # The worker that completed the task holds the run: the new events suffice.
            response.workflow_task.CopyFrom(
                await self._workflow_task(key, wft, only_new_events=True)
            )
        return response

    async def fail_workflow_task(
        self, token: state_pb2.TaskToken, cause: int, failure: Failure, identity: str
    ) -> None:
        def fn(m: Mutation) -> None:
            _workflow_tasks.check_token(m, token)
            m.trace.update(token=token, cause=cause)
            _workflow_tasks.fail(m, cause, failure, identity, self._config)

        await self.update(_key(token), "FailWorkflowTask", fn)

    # ------------------------------------------------------------ activities

    async def record_activity_started(
        self, task: TaskRow, w: WorkerSite
    ) -> service_pb2.PollActivityTaskResponse | None:
        started = await self._judged_fresh(
            task.key,
            "RecordActivityStarted",
            lambda m: _activities.record_started(m, task, w.identity, w.site, w.tier),
        )
        if not started:
            await self._store.delete_task(task.task_key, run=task.key)
            return None
        return await self._activity_task(task.key, task.ref_id)

    async def _activity_task(
        self, key: RunKey, scheduled_event_id: int
    ) -> service_pb2.PollActivityTaskResponse:
        """What a worker needs to run the started attempt of an activity."""
        run = await self._load(key)
        ms = run.state
        attrs = run.scheduled_activities.get(scheduled_event_id)
        if attrs is None:
            events = await self._store.read_events(
                key, first_event_id=scheduled_event_id, max_events=1
            )
            attrs = events[0].activity_task_scheduled_event_attributes
            run.scheduled_activities[scheduled_event_id] = attrs
        pending = ms.pending_activities[scheduled_event_id]
        return _task_responses.activity_task(ms, pending, attrs, self.address)

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
            info = _activities.check_token(m, token)
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
            _activities.finish(m, info)
            return _workflow_tasks.start_eagerly(
                m, had_workflow_task, eager_workflow_task_queue, identity
            )

        wft = await self.update(_key(token), "CompleteActivity", fn)
        if wft is None:
            return None
        ms = await self.state_of(_key(token))
        partial = bool(sticky_task_queue) and ms.sticky_task_queue == sticky_task_queue
        return await self._workflow_task(_key(token), wft, only_new_events=partial)

    async def fail_activity(
        self,
        token: state_pb2.TaskToken,
        failure: Failure,
        identity: str,
        details: common_pb2.Payloads | None,
    ) -> None:
        def fn(m: Mutation) -> None:
            info = _activities.check_token(m, token)
            m.trace["token"] = token
            if details is not None:
                info.heartbeat_details.CopyFrom(details)
            _activities.attempt_failed(m, info, failure, timeout_type=None)

        await self.update(_key(token), "FailActivity", fn)

    async def record_heartbeat(
        self, token: state_pb2.TaskToken, details: common_pb2.Payloads | None
    ) -> bool:
        """Record a heartbeat; returns whether cancellation was requested."""

        def fn(m: Mutation) -> bool:
            info = _activities.check_token(m, token)
            m.trace["token"] = token
            info.last_heartbeat_time.FromMicroseconds(m.now)
            if details is not None:
                info.heartbeat_details.CopyFrom(details)
            m.dirty = True
            return info.cancel_requested

        return await self.update(_key(token), "RecordHeartbeat", fn)

    async def activity_canceled(
        self, token: state_pb2.TaskToken, details: common_pb2.Payloads | None, identity: str
    ) -> None:
        """The worker stopped an activity whose cancellation was requested."""

        def fn(m: Mutation) -> None:
            info = _activities.check_token(m, token)
            m.trace["token"] = token
            if not info.cancel_requested:
                raise FailedPreconditionError(
                    f"activity {info.activity_id!r} was not asked to cancel; report its "
                    "outcome with RespondActivityTaskCompleted or RespondActivityTaskFailed"
                )
            m.append_activity_outcome(
                info, ET.EVENT_TYPE_ACTIVITY_TASK_CANCELED, details=details, identity=identity
            )
            _activities.finish(m, info)

        await self.update(_key(token), "ActivityCanceled", fn)

    # ---------------------------------------------------------------- timers

    async def fire_timer(self, timer: TimerRow) -> None:
        """A durable timer is due. Stale timers (their task moved on) are dropped."""
        handled = await self._judged_fresh(
            timer.key,
            f"FireTimer:{timer.kind.name}",
            lambda m: _timeouts.fire(m, timer, self._config),
        )
        if not handled:
            await self._store.delete_timer(timer.timer_key, run=timer.key)

    async def fire_timers(self, timers: Sequence[TimerRow]) -> list[BaseException | None]:
        """A page of due timers fired together (server/_timer_fires.py): per timer, None
        (fired, or dropped as stale) or the error its fire ended with."""
        return await fire_page(self, timers)

    async def unstick(self, key: RunKey, sticky_queue: str) -> None:
        """The worker of ``sticky_queue`` left: the run's tasks go to the normal queue."""

        def fn(m: Mutation) -> None:
            if m.ms.sticky_task_queue == sticky_queue:
                m.unstick()

        with contextlib.suppress(NotFoundError):
            await self.update(key, "Unstick", fn)

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

        await self.update(key, "Signal", fn)

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

        await self.update(key, "RequestCancel", fn)

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

        await self.update(key, "Terminate", fn)

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

    # --------------------------------------------------- cross-run (transfer)

    async def event(self, key: RunKey, event_id: int) -> history_pb2.HistoryEvent:
        """One event of a run's history, from memory when it is cached."""
        run = await self._load(key)
        if run.events is not None and event_id <= len(run.events):
            return run.events[event_id - 1]
        events = await self._store.read_events(key, first_event_id=event_id, max_events=1)
        if not events or events[0].event_id != event_id:
            raise NotFoundError(f"event {event_id} of run {key} not found")
        return events[0]

    async def process_transfer(self, task: TaskRow) -> None:
        """Carry out one outbox row (server/_cross_run.py); the row is deleted when its
        effect is recorded."""
        await _cross_run.process_transfer(self, self._store, task)


def _key(token: state_pb2.TaskToken) -> RunKey:
    return RunKey(namespace=token.namespace, workflow_id=token.workflow_id, run_id=token.run_id)
