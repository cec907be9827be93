"""The event loop a workflow run's code runs on, without the run.

``DeterministicLoop`` is an asyncio loop that advances only when its owner runs it
(``_run_until_blocked``) and whose clock is history time (``_time_us``, set by the
owner from event timestamps): no wall clock, no real I/O, no threads. It leaves one
decision to its subclass, the workflow instance (``_workflow_instance.py``): what a
``call_later`` is (``_timer``) -- there, a durable timer, so ``asyncio.sleep`` and
``asyncio.timeout`` in workflow code become timers in history.

Only the loop methods that tasks, futures, sleeps and timeouts use are provided; the
I/O half of the loop API is deliberately absent (workflow code does no I/O), hence
the ``abstract`` type-ignores where instances are created. Overridden scheduling
methods keep asyncio's runtime signatures.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextvars
import logging
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("tideflow.worker")


class DeterministicLoop(asyncio.AbstractEventLoop):
    """A loop whose ready queue runs only in ``_run_until_blocked`` and whose time is
    ``_time_us`` (microseconds of history time)."""

    def __init__(self, workflow_id: str) -> None:
        self._workflow_id = workflow_id
        self._ready: collections.deque[asyncio.Handle] = collections.deque()
        self._time_us = 0
        self._tasks: list[asyncio.Task[Any]] = []

    @abc.abstractmethod
    def _timer(
        self,
        delay: float,
        callback: Callable[..., Any],
        args: Sequence[Any],
        context: contextvars.Context | None,
    ) -> asyncio.TimerHandle:
        """What ``call_later(delay, callback, *args)`` schedules."""

    def time(self) -> float:
        return self._time_us / 1_000_000

    def call_soon(  # type: ignore[override]
        self, callback: Callable[..., Any], *args: Any, context: contextvars.Context | None = None
    ) -> asyncio.Handle:
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_later(  # type: ignore[override]
        self,
        delay: float,
        callback: Callable[..., Any],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        return self._timer(delay, callback, args, context)

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., Any],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        return self.call_later(when - self.time(), callback, *args, context=context)

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(
        self, coro: Any, *, name: str | None = None, context: Any = None
    ) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.Task(coro, loop=self, name=name, context=context)
        self._tasks.append(task)
        return task

    def get_debug(self) -> bool:
        return False

    def is_running(self) -> bool:
        return True

    def is_closed(self) -> bool:
        return False

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        log.error(
            "workflow %s: %s",
            self._workflow_id,
            context.get("message"),
            exc_info=context.get("exception"),
        )

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.call_exception_handler(context)

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        pass

    def run_in_executor(  # type: ignore[override]
        self, executor: Any, func: Any, *args: Any
    ) -> Any:
        raise RuntimeError("workflow code cannot use threads or executors; use an activity")

    def _run_until_blocked(self) -> None:
        previous = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(self)
        try:
            while self._ready:
                handle = self._ready.popleft()
                if not handle.cancelled():
                    handle._run()
        finally:
            asyncio.events._set_running_loop(previous)
