"""One tideflow server node: store, engine, matching, timer queue and the gRPC frontend,
owned by one object with a clear start and stop."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Protocol, TypeVar

import grpc

from tideflow.api.v1 import matching_pb2, replication_pb2_grpc
from tideflow.history import (
    HistoryStore,
    RunKey,
    StoreError,
    StoreUnavailableError,
    TaskKind,
    TaskRow,
    TimerRow,
)

from ._auth import AuthConfig, gate_for
from ._cluster_service import CLUSTER_SERVICE, ClusterService
from ._config import Clock, ServerConfig, SystemClock, grpc_server_options
from ._engine import Dispatcher, HistoryEngine
from ._errors import UnavailableError
from ._failures import log_retry
from ._frontend import WorkflowService
from ._health import Health, MetricsEndpoint
from ._http_api import HttpFrontend
from ._matching import Matching
from ._matching_routes import MatchingRoutes, TaskForwarder
from ._matching_service import MatchingServicer
from ._metadata_link import MetadataExchange
from ._metadata_sync import MetadataSync
from ._metrics import RpcMetricsInterceptor, ServerMetrics
from ._peers import NodeCredential, PeerChannels
from ._placement import PlacementPolicy
from ._polls import TaskQueueService
from ._registration import add_to_server
from ._remote_children import RemoteChildren
from ._remote_tasks import RemoteTasks
from ._resync import resync_after_outages
from ._routing import Router
from ._run_gateway import RunGateway
from ._schedules import Scheduler
from ._shards import ShardController
from ._site_metadata import SiteMetadata
from ._sites import Sites, SiteService
from ._task_tokens import TaskTokenSigner
from ._timers import FirePage, TimerQueue
from ._tls import ServerTLSConfig
from ._trace import LeaseTracer
from ._tracing import tracing_interceptor
from ._transfer import TransferProcessor

log = logging.getLogger("tideflow.server")

# Pause before a background step that failed on the store is tried again.
_RETRY_DELAY_S = 1.0
# Pause between attempts to reach the database while the server starts.
_START_RETRY_DELAY_S = 1.0
T = TypeVar("T")


class HoldsMemory(Protocol):
    def memory_held(self) -> dict[str, int]: ...


class _Dispatch(Dispatcher):
    """Where a commit's new rows go: transfers to the transfer processor, timers to
    the timer queue, tasks to their task queue's node: matching here when this node
    serves the queue (sync match, no RPC), else the forwarder (``AddTasks``). A task for
    a sticky queue whose worker left is moved to the run's normal queue by ``run``."""

    def __init__(
        self,
        matching: Matching,
        timers: TimerQueue,
        transfers: TransferProcessor,
        routes: MatchingRoutes,
    ) -> None:
        self._matching = matching
        self._timers = timers
        self._transfers = transfers
        self._routes = routes
        self.forwarder = TaskForwarder(routes, self.accept)
        self._to_unstick: asyncio.Queue[TaskRow] = asyncio.Queue()
        # Told of every committed run (the site's hints to its peers: server/_sites.py).
        self.on_commit: Callable[[RunKey], None] = lambda key: None

    def memory_held(self) -> dict[str, int]:
        return {
            "forwarder_rows": self.forwarder.pending,
            "sticky_moves_queued": self._to_unstick.qsize(),
        }

    def add_tasks(self, tasks: list[TaskRow]) -> None:
        transfers = [t for t in tasks if t.kind == TaskKind.TRANSFER]
        if transfers:
            self._transfers.add(transfers)
        self.route([t for t in tasks if t.kind != TaskKind.TRANSFER])

    def route(self, tasks: list[TaskRow]) -> None:
        """Hand task rows to their queues' nodes: this one, or another (forwarded),
        unless a poll parked here for the other node's queue takes the row (local
        dispatch: this node owns the run, so it starts the task itself)."""
        here = []
        elsewhere = []
        for task in tasks:
            if self._routes.serves(task.key.namespace, task.task_queue, task.kind):
                here.append(task)
            elif not (self._routes.owns_run(task.key) and self._matching.offer_local(task)):
                # (A run this node lost goes to the forwarder, which drops it: the
                # run's new owner hands the row over from the store.)
                elsewhere.append(task)
        self.accept(here)
        if elsewhere:
            self.forwarder.send(elsewhere)

    def accept(self, tasks: list[TaskRow]) -> None:
        """Rows of queues this node serves (committed here, or handed over by the run's
        owner): into matching, unless their sticky queue was retired."""
        for task in tasks:
            if self._matching.is_retired(task.key.namespace, task.task_queue):
                # Its sticky worker is gone: move it to the normal queue now.
                self._to_unstick.put_nowait(task)
            else:
                self._matching.add(task)

    def add_timers(self, timers: list[TimerRow]) -> None:
        self._timers.add(timers)

    def drop_timers(self, timer_keys: Sequence[str]) -> None:
        self._timers.drop(timer_keys)

    def committed(self, key: RunKey) -> None:
        self.on_commit(key)

    async def run(self, unstick: Callable[[RunKey, str], Awaitable[None]]) -> None:
        """Move tasks of retired sticky queues through ``unstick`` until cancelled,
        each in a task of this call's task group."""
        async with asyncio.TaskGroup() as moves:
            while True:
                task = await self._to_unstick.get()
                moves.create_task(self._move(unstick, task))

    async def _move(self, unstick: Callable[[RunKey, str], Awaitable[None]], task: TaskRow) -> None:
        # Retried through a store outage or while the run's owner cannot be reached:
        # the row stays in the store, but nothing else would dispatch it before a
        # restart.
        while True:
            try:
                await unstick(task.key, task.task_queue)
            except (StoreError, UnavailableError) as exc:
                log_retry(log, f"moving {task.task_key} off its retired sticky queue", exc)
                await asyncio.sleep(_RETRY_DELAY_S)
            except Exception:
                # The task's sticky schedule-to-start timeout moves it later.
                log.exception("moving %s off its retired sticky queue failed", task.task_key)
                return
            else:
                return


class _ShardHooks:
    """What acquiring or losing a shard does to the node's memory.

    Acquiring shard s: the task queues of s are served here from now on, so their rows
    (of runs of any shard) are read into the backlogs; the rows of the runs of s are
    handed to their queues' nodes (the previous owner may have died before it did);
    the transfers and timers of s are read. Losing s: its cached runs, timers and the
    backlogs of its queues are dropped (the new owner reads them), and polls parked on
    those queues are answered so that they reach the new owner. The scheduler wakes to fire the
    schedules of s; it keeps nothing of a shard between passes: its next pass no longer
    loads a lost shard's schedules, and the fence refuses what a pass under way would
    still write for them."""

    def __init__(
        self,
        store: HistoryStore,
        matching: Matching,
        dispatch: _Dispatch,
        transfers: TransferProcessor,
        timers: TimerQueue,
    ) -> None:
        self._store = store
        self._matching = matching
        self._dispatch = dispatch
        self._transfers = transfers
        self._timers = timers
        self.engine: HistoryEngine | None = None
        self.scheduler: Scheduler | None = None
        self.recovered = 0  # task rows read back, for the start-up log line

    async def acquired(self, shard: int) -> None:
        if self.engine is not None:
            # Nothing cached of the shard from an earlier tenure may be served: another
            # node wrote its runs meanwhile.
            self.engine.evict_shard(shard)
        self.recovered += await self.recover_tasks([shard])
        # Rows waiting for this shard's queues' owner go to this node now.
        self._dispatch.forwarder.nudge()
        self.recovered += await self._transfers.recover([shard])
        await self._timers.recover_shard(shard)
        if self.scheduler is not None:
            self.scheduler.wake()

    async def recover_tasks(self, shards: list[int] | None) -> int:
        """Read the task rows of the queues of ``shards`` into the backlogs, and hand the
        rows of the runs of ``shards`` to their queues' nodes (None: every shard, a
        store without fencing); returns the rows read."""
        count = await self._matching.recover(self._store, shards)
        after = ""
        while True:
            rows = await self._store.list_tasks(after_key=after, limit=5000, shards=shards)
            if not rows:
                return count
            self._dispatch.route([r for r in rows if r.kind != TaskKind.TRANSFER])
            after = rows[-1].task_key

    def lost(self, shard: int) -> None:
        if self.engine is not None:
            self.engine.evict_shard(shard)
        self._matching.drop_unowned()
        self._timers.drop_unowned()


class TideflowServer:
    """One server node: a whole cluster on its own, or one of several on one database.

    ``async with TideflowServer(db_url) as server:`` starts it; ``server.port`` is the
    bound port (pass ``port=0`` for an ephemeral one). ``stop()`` is safe twice.

    The node serves the runs of the shards it holds a lease on (server/_shards.py);
    alone on its database it holds them all. ``node_id`` names it in the shard rows
    (default ``dev@<hostname>``: a restart on the same machine takes its shards back
    at once); two live nodes must never share one. ``advertise`` is the address other
    nodes and clients reach it at (default: the bound ``host:port``).
    """

    def __init__(
        self,
        db_url: str,
        *,
        host: str = "127.0.0.1",
        port: int = 7233,
        config: ServerConfig | None = None,
        clock: Clock | None = None,
        tls: ServerTLSConfig | None = None,
        node_id: str | None = None,
        advertise: str | None = None,
        auth: AuthConfig | None = None,
        ui_port: int | None = None,
        ui_required: bool = True,
        metrics_port: int | None = None,
        tracer_provider: Any = None,
    ) -> None:
        self.db_url = db_url
        # The HTTP API and web UI (server/_http_api.py) on this port of ``host`` (0: a
        # free one; None: off); the bound port once started. Unless ``ui_required``, a
        # port in use leaves the UI off (a warning) instead of failing the start.
        self.ui_port = ui_port
        self._ui_required = ui_required
        self._http: HttpFrontend | None = None
        # OpenTelemetry spans of the RPCs served (server/_tracing.py): a tracer
        # provider, True for the global one, None: off.
        self.tracer_provider = tracer_provider
        # Authentication and per-namespace authorization (server/_auth.py); None: off.
        self.auth = auth or AuthConfig()
        # TLS (mTLS with a client CA) on the gRPC port; None: plaintext.
        self.tls = tls
        self.node_id = node_id or f"dev@{socket.gethostname()}"
        self._advertise = advertise
        self.host = host
        self.port = port
        self.config = config or ServerConfig()
        self._clock = clock or SystemClock()
        self._store: HistoryStore | None = None
        self._grpc: grpc.aio.Server | None = None
        # Owns the node's background loops (see _run_background).
        self._background: asyncio.Task[None] | None = None
        self._shards: ShardController | None = None
        self._stopped = False
        self._tokens: TaskTokenSigner | None = None
        self.peers = PeerChannels(self.config, self.tls)
        self.node_credential: NodeCredential | None = None
        # Where activity tasks may run (server/_placement.py); the sites work gives it
        # a run's home site (``home_of``) and its links' state (``links``).
        self.placement = PlacementPolicy(self.config.cluster_name, self.config.site_tier)
        self.metadata: SiteMetadata | None = None
        self.metadata_sync: MetadataSync | None = None

        # This server as a site of a cloud/edge deployment (server/_sites.py).
        self.sites: Sites | None = None

        # What keeps structures in memory (memory_held); set once started.
        self._memory_sources: tuple[HoldsMemory, ...] = ()
        # What wakes up when the clock jumps (clock_jumped); set once started.
        self._on_clock_jump: tuple[Callable[[], None], ...] = ()
        # Observability (server/_metrics.py, server/_health.py): this node's own
        # registry; /metrics and /healthz on ``metrics_port`` (None: no HTTP listener;
        # 0: any free port, the bound one in ``metrics_port`` once started).
        self.metrics = ServerMetrics(self._clock.now_micros)
        self.health = Health()
        self.metrics_port = metrics_port
        self._metrics_http: MetricsEndpoint | None = None

        # Whether Temporal's WorkflowService is served too (the temporal extra).
        self.temporal_api = False

    def memory_held(self) -> dict[str, int]:
        """The sizes of the structures this node keeps in memory, by name: none grows
        with the number of idle runs (tests and bench/memory.py check it). Empty
        before the start."""
        sizes: dict[str, int] = {}
        for source in self._memory_sources:
            sizes.update(source.memory_held())
        return sizes

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def shards(self) -> ShardController:
        assert self._shards is not None, "server not started"
        return self._shards

    @property
    def store(self) -> HistoryStore:
        assert self._store is not None, "server not started"
        return self._store

    async def start(self) -> int:
        """Open the store, take this node's shards (recovering their in-flight work),
        listen; returns the bound port.

        A database that cannot be reached is tried again, one log line per attempt,
        until ``config.store_start_timeout_s`` has passed since the start began; then
        the last ``StoreUnavailableError`` is raised."""
        deadline = asyncio.get_running_loop().time() + self.config.store_start_timeout_s
        store = await _until_reachable(
            deadline,
            "opening the store",
            lambda: HistoryStore.open(
                self.db_url,
                sqlite_synchronous=self.config.sqlite_synchronous,
                shards=self.config.shard_count,
            ),
        )
        self._store = store
        try:
            await self._start_on(store, deadline)
        except BaseException:
            # A start that failed leaves nothing open: the caller may try again.
            self._store = None
            if self._http is not None:
                await self._http.stop()
                self._http = None
            if self._grpc is not None:
                await self._grpc.stop(None)
                self._grpc = None
            if self._shards is not None:
                await self._shards.stop()  # others need not wait for the leases to lapse
                self._shards = None
            await store.close()
            raise
        return self.port

    async def _start_on(self, store: HistoryStore, deadline: float) -> None:
        owns = self._owns
        # Who serves which task queue and run (server/_matching_routes.py): matching
        # serves the queues of the shards this node holds.
        routes = MatchingRoutes(store, self.peers, self.node_id)
        matching = Matching(routes.serves, self.placement, self.metrics)
        store.observe_commit = self.metrics.store_committed
        self.metrics.watch(store, matching.backlog_sizes)
        timers = self._timer_queue(store)
        transfers = TransferProcessor(store, owns)
        dispatch = _Dispatch(matching, timers, transfers, routes)
        matching.local_fallback = dispatch.route
        hooks = _ShardHooks(store, matching, dispatch, transfers, timers)
        server = self._listen()
        shards = self._shard_controller(store, hooks)
        self._shards = routes.shards = shards
        engine = HistoryEngine(store, dispatch, self._clock, self.config, shards=shards)
        hooks.engine = engine
        # Recovery of each shard's backlog de-duplicates by row key, so an attempt that
        # failed halfway is simply made again.
        await _until_reachable(deadline, "taking shards and reading their backlog", shards.start)
        # Task token keys are read now: a store that cannot give them fails the start.
        tokens = TaskTokenSigner(store.token_keys, refresh_s=self.config.token_key_refresh_s)
        await tokens.load()
        self._tokens = tokens
        # Links to the other nodes (server/_peers.py): forwarded requests and the calls
        # a node makes on its own behalf, proved by the node credential.
        self.node_credential = routes.credential = NodeCredential(self.node_id, tokens)
        polls = TaskQueueService(engine, matching, self.config, tokens, routes, self.metrics)
        router = self._route_between_nodes(shards, engine, server)
        scheduler = hooks.scheduler = self._scheduler(store, engine)
        sites = self.sites = self._site(store, engine, dispatch, server, router)
        # Every task dispatched here belongs to a run homed here (only the home writes),
        # so placement's default home is right; its link state is the sites'.
        self.placement.links = sites
        remote_tasks = RemoteTasks(engine, matching, self.placement, tokens, sites.link_to)
        sites.use_remote_tasks(remote_tasks, routes)
        polls.remote_start = remote_tasks.start
        self._on_clock_jump = (timers.reread, scheduler.wake)
        self._memory_sources = (engine, matching, timers, transfers, polls, sites, dispatch)
        service = WorkflowService(
            store,
            engine,
            matching,
            self.config,
            scheduler=scheduler,
            tokens=tokens,
            auth=gate_for(self.auth, store.api_keys, self.node_credential),
            polls=polls,
            router=router,
            sites=sites,
            metrics=self.metrics,
        )
        service.metadata = await self._open_metadata(store, scheduler)
        sites.metadata = MetadataExchange(service.metadata)
        remote_tasks.use_metadata(service.metadata)
        add_to_server(service, server)
        self._open_temporal_door(service, store, tokens, server)
        internal = MatchingServicer(routes, self.node_credential, dispatch.accept, engine, polls)
        add_to_server(internal, server, matching_pb2.DESCRIPTOR.services_by_name["MatchingService"])
        await server.start()
        self._grpc = server
        await self._start_http(service)
        await self._report_health()
        loops: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
            "tideflow-timer-queue": functools.partial(
                timers.run, self._timed(engine.fire_timer), self._timed_page(engine.fire_timers)
            ),
            "tideflow-transfers": functools.partial(transfers.run, engine.process_transfer),
            "tideflow-task-forwarder": dispatch.forwarder.run,
            "tideflow-sticky-mover": functools.partial(dispatch.run, polls.unstick),
            "tideflow-scheduler": scheduler.run,
            "tideflow-shards": shards.run,
            "tideflow-sites": sites.run,
            "tideflow-resync": functools.partial(
                resync_after_outages, store, hooks.recover_tasks, transfers, timers
            ),
        }
        self._run_loops(loops)
        self._log_started(store, hooks.recovered)

    def _scheduler(self, store: HistoryStore, engine: HistoryEngine) -> Scheduler:
        """Schedules (server/_schedules.py): the frontend serves their RPCs (of every
        shard), a task fires those of the shards this node holds, and starts their runs
        through the gateway (the runs' shards may be held elsewhere)."""
        return Scheduler(
            store,
            engine,
            self._clock,
            owned=lambda: store.held_shards.keys(),
            runs=engine.gateway,
        )

    def _shard_controller(self, store: HistoryStore, hooks: _ShardHooks) -> ShardController:
        """This node's shard leases (server/_shards.py), traced when trace mode is on."""
        return ShardController(
            store,
            self.node_id,
            self._advertise or self.address,
            lease_s=self.config.lease_s,
            on_acquired=hooks.acquired,
            on_lost=hooks.lost,
            tracer=LeaseTracer.from_environment(self.node_id),
        )

    async def _start_http(self, service: WorkflowService) -> None:
        """The HTTP API and web UI on ``ui_port``, calling ``service`` (if asked for)."""
        if self.ui_port is None:
            return
        self._http = HttpFrontend(
            service,
            self.host,
            self.ui_port,
            healthy=self._healthy,
            max_body_bytes=self.config.grpc_max_message_bytes,
        )
        try:
            self.ui_port = await self._http.start()
        except OSError as error:
            if self._ui_required:
                raise OSError(f"could not listen on {self.host}:{self.ui_port}: {error}") from None
            # start-dev's default port taken (another dev server): run without the UI.
            log.warning("web UI and HTTP API off: port %s: %s", self.ui_port, error)
            self._http = self.ui_port = None

    async def _open_metadata(self, store: HistoryStore, scheduler: Scheduler) -> MetadataSync:
        """The metadata both sites write (server/_metadata_sync.py): the sites' link
        exchanges it through ``metadata`` and ``metadata_sync``."""
        self.metadata = await SiteMetadata.open(
            store, self.config.cluster_name, node_id=self.node_id
        )
        self.metadata_sync = MetadataSync(self.metadata, store, scheduler)
        await self.metadata_sync.publish_site(tier=self.config.site_tier)
        return self.metadata_sync

    def _site(
        self,
        store: HistoryStore,
        engine: HistoryEngine,
        dispatch: _Dispatch,
        server: grpc.aio.Server,
        router: Router,
    ) -> Sites:
        """This server as a site (server/_sites.py): told of every commit, serving the
        SiteService on the same port, one site with the other nodes on its database
        (server/_site_nodes.py)."""
        sites = Sites(store, engine, self.config)
        assert self.node_credential is not None
        nodes = sites.join_nodes(self.shards, router, self.node_credential)
        self._cluster_service.site_nodes = nodes
        dispatch.on_commit = sites.committed
        engine.redirect_to_home = sites.redirect
        # Children homed at the other site (server/_remote_children.py).
        children = RemoteChildren(
            engine, sites.name, sites.link_to, sites.nodes, sites.unknown_site
        )
        sites.handlers.update(children.handlers)
        engine.gateway.remote_children = children
        gate = gate_for(self.auth, store.api_keys, self.node_credential)
        replication_pb2_grpc.add_SiteServiceServicer_to_server(  # type: ignore[no-untyped-call]
            SiteService(sites, gate), server
        )
        return sites

    def clock_jumped(self) -> None:
        """The clock moved ahead at once (the time-skipping test environment,
        server/_time_skipping.py): the timer queue and the scheduler look at what is
        due now instead of sleeping until the real time they planned to wake at."""
        for wake in self._on_clock_jump:
            wake()

    async def _report_health(self) -> None:
        """SERVING on the health service; /metrics and /healthz if asked for."""
        await self.health.set_serving(True)
        if self.metrics_port is not None:
            endpoint = MetricsEndpoint(self.metrics, self.health, self.host, self.metrics_port)
            self._metrics_http = endpoint
            self.metrics_port = await endpoint.start()

    def _timed(
        self, fire: Callable[[TimerRow], Awaitable[None]]
    ) -> Callable[[TimerRow], Awaitable[None]]:
        """``fire`` that reports each timer's lateness first."""

        async def fire_timer(timer: TimerRow) -> None:
            self.metrics.timer_fired(timer.fire_at)
            await fire(timer)

        return fire_timer

    def _timed_page(self, fire_page: FirePage) -> FirePage:
        """``fire_page`` that reports each timer's lateness first."""

        async def fire_timers(timers: list[TimerRow]) -> Sequence[BaseException | None]:
            for timer in timers:
                self.metrics.timer_fired(timer.fire_at)
            return await fire_page(timers)

        return fire_timers

    def _open_temporal_door(
        self,
        service: WorkflowService,
        store: HistoryStore,
        tokens: TaskTokenSigner,
        server: grpc.aio.Server,
    ) -> None:
        """Temporal's WorkflowService on the same port (server/_temporal_service.py),
        when the ``tideflow[temporal]`` extra (the temporalio wheel) is installed."""
        if importlib.util.find_spec("temporalio") is None:
            log.info("Temporal API not served: pip install 'tideflow[temporal]' to serve it")
            return
        from ._temporal_service import serve_temporal_api

        serve_temporal_api(service, store, tokens, server)
        self.temporal_api = True
        log.info(
            "Temporal API (temporal.api.workflowservice.v1.WorkflowService) served on %s",
            self.address,
        )

    def _timer_queue(self, store: HistoryStore) -> TimerQueue:
        """The timers of the shards this node holds (server/_timers.py)."""
        return TimerQueue(
            store,
            self._clock,
            window_s=self.config.timer_window_s,
            max_in_memory=self.config.max_timers_in_memory,
            owns=self._owns,
            owned=lambda: store.held_shards.keys(),
        )

    def _run_loops(self, loops: dict[str, Callable[[], Coroutine[Any, Any, None]]]) -> None:
        """The node's background loops, in one task ``stop()`` cancels."""
        self._background = asyncio.create_task(_run_background(loops), name="tideflow-background")
        self._background.add_done_callback(_report_failure)

    def _log_started(self, store: HistoryStore, recovered: int) -> None:
        log.info(
            "tideflow server listening on %s%s, auth %s (node %s, store: %s, %d of %d shards, "
            "%d tasks recovered)",
            self.address,
            "" if self.tls is None else (" with mTLS" if self.tls.client_ca else " with TLS"),
            self.auth.mode.value,
            self.node_id,
            store.dialect.name,
            len(store.held_shards),
            store.shard_count,
            recovered,
        )

    def _route_between_nodes(
        self, shards: ShardController, engine: HistoryEngine, server: grpc.aio.Server
    ) -> Router:
        """The router of run-keyed calls (server/_routing.py). Transfers act on runs of
        other nodes' shards through their owners (server/_run_gateway.py), which serve
        those calls on the ClusterService (cluster.proto) on the same port."""
        assert self.node_credential is not None
        router = Router(
            shards,
            self.peers,
            # Long enough for a killed owner's lease to lapse and another node to take
            # the shard (a lease, a third of one to the next acquire pass, recovery).
            budget_s=2 * self.config.lease_s + 5.0,
            unbounded_call_s=self.config.long_poll_timeout_s + 10.0,
        )
        engine.gateway = RunGateway(engine, router, self.node_credential)
        self._cluster_service = ClusterService(engine, self.node_credential)
        add_to_server(self._cluster_service, server, CLUSTER_SERVICE)
        return router

    def _listen(self) -> grpc.aio.Server:
        """A gRPC server bound to ``host:port`` (TLS if configured), not started yet;
        ``self.port`` becomes the bound port (port 0 picks a free one)."""
        interceptors: list[grpc.aio.ServerInterceptor] = [RpcMetricsInterceptor(self.metrics)]
        if self.tracer_provider is not None:
            interceptors.append(tracing_interceptor(self.tracer_provider))
        server = grpc.aio.server(
            options=grpc_server_options(self.config), interceptors=interceptors
        )
        if self.tls is None:
            bound = server.add_insecure_port(f"{self.host}:{self.port}")
        else:
            bound = server.add_secure_port(f"{self.host}:{self.port}", self.tls.credentials())
        if bound == 0:
            raise OSError(f"could not listen on {self.host}:{self.port}")
        self.port = bound
        self.health.add_to(server)
        return server

    async def reload_token_keys(self) -> int:
        """Re-read the task token keys now (nodes also do every
        ``ServerConfig.token_key_refresh_s``); returns the id of the key that signs."""
        assert self._tokens is not None, "server not started"
        await self._tokens.load()
        return self._tokens.signing_key_id

    async def stop(self, grace: float = 2.0) -> None:
        """Stop serving, cancel the background loops and wait for them, close the
        store. Safe to call twice; re-raises a failure of a background loop."""
        if self._stopped:
            return
        self._stopped = True
        failure: BaseException | None = None
        try:
            if self._http is not None:
                await self._http.stop()
            await self.health.set_serving(False)
            if self._metrics_http is not None:
                await self._metrics_http.stop()
            if self._grpc is not None:
                await self._grpc.stop(grace)
            background = self._background
            if background is not None:
                background.cancel()
                # Waits without raising the task's CancelledError here; a cancel of
                # stop() itself still propagates.
                await asyncio.wait([background])
                failure = None if background.cancelled() else background.exception()
            if self._shards is not None:
                # Nothing writes any more: hand the shards over at once.
                await self._shards.stop()
            await self.peers.close()
            if failure is not None:
                raise failure
        finally:
            if self._store is not None:
                log.info("store commits: %s", self._store.stats)
                await self._store.close()
            log.info("tideflow server stopped")

    async def wait_closed(self) -> None:
        if self._grpc is not None:
            await self._grpc.wait_for_termination()

    async def __aenter__(self) -> TideflowServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _healthy(self) -> bool:
        """Serving: started, not stopped, and the background loops still run."""
        background = self._background
        return not self._stopped and background is not None and not background.done()

    def _owns(self, key: RunKey) -> bool:
        return self._shards is None or self._shards.owns(key)


async def _until_reachable(deadline: float, what: str, step: Callable[[], Awaitable[T]]) -> T:
    """``step()``, tried again while the database is unavailable and the loop's clock
    is before ``deadline``; one warning line per failed attempt."""
    loop = asyncio.get_running_loop()
    attempt = 1
    while True:
        try:
            return await step()
        except StoreUnavailableError as exc:
            # Every failed attempt is logged, the last too (a first attempt slower than
            # the whole wait, say on a loaded machine, still leaves its line).
            remaining = deadline - loop.time()
            log_retry(log, f"{what} (attempt {attempt}, {max(remaining, 0):.0f} s left)", exc)
            if remaining <= 0:
                raise StoreUnavailableError(
                    f"{exc} (still unavailable after {attempt} attempt(s))"
                ) from exc
            await asyncio.sleep(min(_START_RETRY_DELAY_S, remaining))
            attempt += 1


async def _run_background(loops: dict[str, Callable[[], Coroutine[Any, Any, None]]]) -> None:
    """The node's background loops (timer queue, transfer processor, sticky mover,
    scheduler), each owning its own tasks, in one task group: they run until
    ``stop()`` cancels this task, and if one fails the others are cancelled too (a node
    that no longer fires timers must not look healthy)."""
    async with asyncio.TaskGroup() as group:
        for name, loop in loops.items():
            group.create_task(loop(), name=name)


def _report_failure(background: asyncio.Task[None]) -> None:
    # Say so when it happens, not only at stop(): the node no longer fires timers.
    failure = None if background.cancelled() else background.exception()
    if failure is not None:
        log.critical(
            "a background loop of the server failed; timers, transfers and schedules are stopped",
            exc_info=failure,
        )
