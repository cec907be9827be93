"""Test environments: a server of your own per test, time that skips ahead, and
activities run without a worker (names follow Temporal's ``temporalio.testing``).

```python
from datetime import timedelta
from tideflow.worker_sdk import Worker
from tideflow.worker_sdk.testing import WorkflowEnvironment

async def test_reminder() -> None:
    async with await WorkflowEnvironment.start_time_skipping() as env:
        async with Worker(env.client, task_queue="q", workflows=[Reminder]):
            # Reminder sleeps 30 days: the test takes milliseconds.
            assert await env.client.execute_workflow(
                Reminder.run, "pay rent", id="r1", task_queue="q") == "sent"
```

``start_local()`` runs a tideflow server in this process on a fresh SQLite file in a
temporary folder, on a free port; ``shutdown()`` (or leaving ``async with``) stops it
and deletes the folder. ``start_time_skipping()`` is the same server with a clock that
jumps to the next timer whenever nothing else is running: no workflow or activity task
waiting for a worker or being worked on, no timer due that has not fired (the rules are
in ``tideflow.server._time_skipping``). Time also passes normally; it never goes back.

Why in this process and not a subprocess: the environment must move the server's clock
(``sleep``, automatic skipping) and read its store; in one process that is a method
call, with no control RPC to add to the public API, no second interpreter to start
(about a second each) and no port to hand over. The server is imported when an
environment starts, never when this module is imported, so a worker that imports the
SDK still loads neither the server nor SQLAlchemy (tests/test_layering.py).

``ActivityEnvironment`` runs an activity function directly, with ``activity.info()``,
heartbeats recorded (and passed to ``on_heartbeat``) and cancellation delivered the way
a worker delivers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from . import activity as activity_mod
from .client import Client
from .converter import DataConverter, default_converter

if TYPE_CHECKING:
    from tideflow.server import ServerConfig, SkippingClock, TideflowServer, TimeSkipper

T = TypeVar("T")

__all__ = ["ActivityEnvironment", "WorkflowEnvironment"]


class WorkflowEnvironment:
    """A server and a client connected to it. Use ``start_local``,
    ``start_time_skipping`` or ``from_client``; ``env.client`` is what workers and the
    test use."""

    def __init__(
        self,
        client: Client,
        *,
        server: TideflowServer | None = None,
        skipper: TimeSkipper | None = None,
        folder: tempfile.TemporaryDirectory[str] | None = None,
        clock: SkippingClock | None = None,
    ) -> None:
        self._client = client
        self._clock = clock
        self._server = server
        self._skipper = skipper
        self._folder = folder
        self._skipping: asyncio.Task[None] | None = None
        if skipper is not None:
            self._skipping = asyncio.create_task(skipper.run(), name="tideflow-time-skipper")

    @property
    def client(self) -> Client:
        return self._client

    @property
    def supports_time_skipping(self) -> bool:
        return self._skipper is not None

    @property
    def server(self) -> TideflowServer | None:
        """The in-process server (None for ``from_client``): its ``address``, its store."""
        return self._server

    @staticmethod
    def from_client(client: Client) -> WorkflowEnvironment:
        """An environment over a server that runs elsewhere (real time)."""
        return WorkflowEnvironment(client)

    @staticmethod
    async def start_local(
        *,
        namespace: str = "default",
        data_converter: DataConverter = default_converter,
        config: ServerConfig | None = None,
    ) -> WorkflowEnvironment:
        """A server in this process on a temporary SQLite file and a free port."""
        return await WorkflowEnvironment._start(namespace, data_converter, config, skipping=False)

    @staticmethod
    async def start_time_skipping(
        *,
        namespace: str = "default",
        data_converter: DataConverter = default_converter,
        config: ServerConfig | None = None,
    ) -> WorkflowEnvironment:
        """Like ``start_local``, with time that skips to the next timer whenever
        nothing else is running (see the module's docstring)."""
        return await WorkflowEnvironment._start(namespace, data_converter, config, skipping=True)

    @staticmethod
    async def _start(
        namespace: str,
        data_converter: DataConverter,
        config: ServerConfig | None,
        *,
        skipping: bool,
    ) -> WorkflowEnvironment:
        # Imported here on purpose (tests/test_layering.py SERVER_IMPORTED_ON_PURPOSE):
        # only a test that starts an environment pays for loading the server.
        from tideflow.server import SkippingClock, TideflowServer, TimeSkipper

        folder = tempfile.TemporaryDirectory(prefix="tideflow-test-env-")
        url = f"sqlite:///{Path(folder.name) / 'tideflow.db'}"
        clock = SkippingClock() if skipping else None
        server = TideflowServer(url, port=0, config=config, clock=clock)
        try:
            await server.start()
            client = await Client.connect(
                server.address, namespace=namespace, data_converter=data_converter
            )
        except BaseException:
            await server.stop()
            folder.cleanup()
            raise
        skipper = None
        if clock is not None:
            skipper = TimeSkipper(server.store, clock, server.clock_jumped)
        return WorkflowEnvironment(
            client, server=server, skipper=skipper, folder=folder, clock=clock
        )

    async def sleep(self, duration: timedelta | float) -> None:
        """Let ``duration`` pass: with time skipping, at once (timers due meanwhile
        fire in order, and what they cause settles, before it returns); otherwise a
        plain ``asyncio.sleep``."""
        seconds = duration.total_seconds() if isinstance(duration, timedelta) else duration
        if self._skipper is None:
            await asyncio.sleep(seconds)
        else:
            await self._skipper.sleep(seconds)

    async def get_current_time(self) -> datetime:
        """The server's time (with time skipping, ahead of the wall clock)."""
        if self._clock is None:
            return datetime.now(UTC)
        return datetime.fromtimestamp(self._clock.now_micros() / 1_000_000, UTC)

    @contextlib.contextmanager
    def auto_time_skipping_disabled(self) -> Iterator[None]:
        """Within this block time skips only through ``sleep``."""
        if self._skipper is None:
            yield
            return
        with self._skipper.auto_disabled():
            yield

    async def shutdown(self) -> None:
        """Close the client, stop the server and delete its files (safe twice)."""
        if self._skipping is not None:
            self._skipping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._skipping
            self._skipping = None
        await self._client.close()
        if self._server is not None:
            await self._server.stop()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    async def __aenter__(self) -> WorkflowEnvironment:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()


class ActivityEnvironment:
    """Runs activity functions outside a worker, for unit tests::

        env = ActivityEnvironment()
        env.on_heartbeat = lambda *details: ...
        assert await env.run(compose_greeting, "hi", "ann") == "hi, ann!"
        assert env.heartbeats == [("started",)]

    ``info`` is what ``activity.info()`` returns (a plausible default; replace it with
    ``dataclasses.replace``). ``cancel()`` delivers a cancellation as the worker does
    when the server asks for one: ``activity.is_cancelled()`` becomes true and an
    async activity's task is cancelled (``asyncio.CancelledError`` inside it). A sync
    activity runs in a thread, as it would on a worker, so ``cancel()`` can reach it
    while it runs."""

    def __init__(self) -> None:
        self.info = default_info()
        self.heartbeats: list[tuple[Any, ...]] = []
        self.on_heartbeat: Callable[..., None] | None = None
        self._running: list[tuple[activity_mod._Context, asyncio.Task[Any] | None]] = []

    def cancel(self) -> None:
        """Cancel the activities running in this environment."""
        for context, task in list(self._running):
            context.cancelled.set()
            if task is not None:
                task.cancel()

    def _heartbeat(self, details: tuple[Any, ...]) -> None:
        self.heartbeats.append(details)
        if self.on_heartbeat is not None:
            self.on_heartbeat(*details)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` (an ``@activity.defn`` function or any callable) with ``args``
        in an activity context; returns its result or raises what it raised."""
        context = activity_mod._Context(info=self.info, heartbeat=self._heartbeat)
        if inspect.iscoroutinefunction(fn):
            task = asyncio.create_task(self._run_async(context, fn, args))
            entry: tuple[activity_mod._Context, asyncio.Task[Any] | None] = (context, task)
            self._running.append(entry)
            try:
                return await task
            finally:
                self._running.remove(entry)
        entry = (context, None)
        self._running.append(entry)
        try:
            return await asyncio.to_thread(self._run_sync, context, fn, args)
        finally:
            self._running.remove(entry)

    @staticmethod
    async def _run_async(
        context: activity_mod._Context, fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> Any:
        token = activity_mod._current.set(context)
        try:
            return await fn(*args)
        finally:
            activity_mod._current.reset(token)

    @staticmethod
    def _run_sync(
        context: activity_mod._Context, fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> Any:
        token = activity_mod._current.set(context)
        try:
            return fn(*args)
        finally:
            activity_mod._current.reset(token)


def default_info() -> activity_mod.Info:
    """The ``activity.info()`` an ``ActivityEnvironment`` starts with."""
    now = datetime.now(UTC)
    return activity_mod.Info(
        activity_id="test-activity",
        activity_type="unknown",
        attempt=1,
        task_queue="test",
        workflow_id="test-workflow",
        workflow_run_id="test-run",
        workflow_type="test",
        workflow_namespace="default",
        scheduled_time=now,
        current_attempt_scheduled_time=now,
        started_time=now,
        start_to_close_timeout=timedelta(minutes=1),
        schedule_to_close_timeout=None,
        heartbeat_timeout=None,
        heartbeat_details=[],
        task_token=b"test-task-token",
    )
