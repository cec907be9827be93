"""One tideflow server node: store, engine, matching, timer queue and the gRPC frontend,
owned by one object with a clear start and stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType

import grpc

from tideflow.api.v1 import service_pb2_grpc
from tideflow.history import HistoryStore, StoreError, TaskKind, TaskRow, TimerRow

from ._config import Clock, ServerConfig, SystemClock
from ._engine import Dispatcher, HistoryEngine
from ._errors import UnavailableError
from ._frontend import WorkflowService
from ._matching import Matching
from ._resync import resync_after_outages
from ._schedules import Scheduler
from ._timers import TimerQueue
from ._transfer import TransferProcessor

log = logging.getLogger("tideflow.server")

# Requests up to this size reach the frontend, which then answers oversized payloads
# with a clear INVALID_ARGUMENT naming the limit instead of a transport error.
_GRPC_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Pause before a background step that failed on the store is tried again.
_RETRY_DELAY_S = 1.0


class _Dispatch(Dispatcher):
    def __init__(self, matching: Matching) -> None:
        self._matching = matching
        self.timers: TimerQueue | None = None
        self.transfers: TransferProcessor | None = None
        self.engine: HistoryEngine | None = None
        self._moving: set[asyncio.Task[None]] = set()

    def add_tasks(self, tasks: list[TaskRow]) -> None:
        transfers = [t for t in tasks if t.kind == TaskKind.TRANSFER]
        if transfers and self.transfers is not None:
            self.transfers.add(transfers)
        for task in tasks:
            if task.kind == TaskKind.TRANSFER:
                continue
            if self.engine is not None and self._matching.is_retired(
                task.key.namespace, task.task_queue
            ):
                # Its sticky worker is gone: move it to the normal queue now.
                job = asyncio.create_task(_unstick(self.engine, task))
                self._moving.add(job)
                job.add_done_callback(self._moving.discard)
            else:
                self._matching.add(task)

    def add_timers(self, timers: list[TimerRow]) -> None:
        if self.timers is not None:
            self.timers.add(timers)


async def _unstick(engine: HistoryEngine, task: TaskRow) -> None:
    """Move a task off a retired sticky queue, retrying through a store outage: its
    row stays in the store, but nothing else would dispatch it before a restart."""
    while True:
        try:
            await engine.unstick(task.key, task.task_queue)
        except (StoreError, UnavailableError) as exc:
            log.warning("moving task %s off its sticky queue failed (%s); retrying", task, exc)
            await asyncio.sleep(_RETRY_DELAY_S)
        else:
            return


class TideflowServer:
    """A complete single-node server.

    ``async with TideflowServer(db_url) as server:`` starts it; ``server.port`` is the
    bound port (pass ``port=0`` for an ephemeral one). ``stop()`` is safe twice.
    """

    def __init__(
        self,
        db_url: str,
        *,
        host: str = "127.0.0.1",
        port: int = 7233,
        config: ServerConfig | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.db_url = db_url
        self.host = host
        self.port = port
        self.config = config or ServerConfig()
        self._clock = clock or SystemClock()
        self._store: HistoryStore | None = None
        self._grpc: grpc.aio.Server | None = None
        self._timer_task: asyncio.Task[None] | None = None
        self._scheduler_task: asyncio.Task[None] | None = None
        self._transfer_task: asyncio.Task[None] | None = None
        self._resync_task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def store(self) -> HistoryStore:
        assert self._store is not None, "server not started"
        return self._store

    async def start(self) -> int:
        """Open the store, recover in-flight work, listen; returns the bound port."""
        store = await HistoryStore.open(
            self.db_url, sqlite_synchronous=self.config.sqlite_synchronous
        )
        self._store = store
        matching = Matching()
        dispatch = _Dispatch(matching)
        engine = HistoryEngine(store, dispatch, self._clock, self.config)
        timers = TimerQueue(
            store, engine.fire_timer, self._clock, window_s=self.config.timer_window_s
        )
        dispatch.timers = timers
        dispatch.engine = engine
        transfers = TransferProcessor(store, engine.process_transfer)
        dispatch.transfers = transfers
        recovered = await matching.recover(store)
        recovered += await transfers.recover()
        # Schedules (server/_schedules.py): the frontend serves their RPCs, a task fires them.
        scheduler = Scheduler(store, engine, self._clock)
        service = WorkflowService(store, engine, matching, self.config)
        service.scheduler = scheduler
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", _GRPC_MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", _GRPC_MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ]
        )
        service_pb2_grpc.add_WorkflowServiceServicer_to_server(  # type: ignore[no-untyped-call]
            service, server
        )
        bound = server.add_insecure_port(f"{self.host}:{self.port}")
        if bound == 0:
            await store.close()
            raise OSError(f"could not listen on {self.host}:{self.port}")
        self.port = bound
        await server.start()
        self._grpc = server
        self._timer_task = asyncio.create_task(timers.run(), name="tideflow-timer-queue")
        self._scheduler_task = asyncio.create_task(scheduler.run(), name="tideflow-scheduler")
        self._transfer_task = asyncio.create_task(transfers.run(), name="tideflow-transfers")
        self._resync_task = asyncio.create_task(
            resync_after_outages(store, matching, transfers), name="tideflow-resync"
        )
        log.info(
            "tideflow server listening on %s (store: %s, %d tasks recovered)",
            self.address,
            store.dialect.name,
            recovered,
        )
        return bound

    async def stop(self, grace: float = 2.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._scheduler_task is not None:
            self._scheduler_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler_task
        for task in (self._timer_task, self._transfer_task, self._resync_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
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
