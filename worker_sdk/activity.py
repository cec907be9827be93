"""Defining activities and what an activity can ask about itself while it runs.

An activity is an ordinary function, async or sync (sync ones run in the worker's
thread pool), decorated with ``@activity.defn``. It may run more than once (retries,
a worker crash), so it should be idempotent.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar, overload

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivityDefinition:
    name: str
    fn: Callable[..., Any]
    is_async: bool
    arg_types: list[Any]
    return_type: Any


@overload
def defn(fn: F) -> F: ...


@overload
def defn(*, name: str | None = None) -> Callable[[F], F]: ...


def defn(fn: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
    """Mark a function as an activity; its type name defaults to the function name."""

    def decorate(f: F) -> F:
        hints = _type_hints(f)
        params = [p for p in inspect.signature(f).parameters.values()]
        definition = ActivityDefinition(
            name=name or f.__name__,
            fn=f,
            is_async=inspect.iscoroutinefunction(f),
            arg_types=[hints.get(p.name) for p in params],
            return_type=hints.get("return"),
        )
        f.__tideflow_activity_definition__ = definition  # type: ignore[attr-defined]
        return f

    return decorate(fn) if fn is not None else decorate


def _type_hints(f: Callable[..., Any]) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(f)
    except Exception:
        return {}


def definition_of(fn: Any) -> ActivityDefinition:
    definition = getattr(fn, "__tideflow_activity_definition__", None)
    if definition is None:
        raise TypeError(f"{fn!r} is not an activity: decorate it with @activity.defn")
    assert isinstance(definition, ActivityDefinition)
    return definition


@dataclass(frozen=True, slots=True, kw_only=True)
class Info:
    """What an activity knows about the current attempt."""

    activity_id: str
    activity_type: str
    attempt: int
    task_queue: str
    workflow_id: str
    workflow_run_id: str
    workflow_type: str
    workflow_namespace: str
    scheduled_time: datetime
    current_attempt_scheduled_time: datetime
    started_time: datetime
    start_to_close_timeout: timedelta | None
    schedule_to_close_timeout: timedelta | None
    heartbeat_timeout: timedelta | None
    heartbeat_details: list[Any]
    task_token: bytes
    # A local activity (workflow.execute_local_activity): it runs inside its workflow
    # task, has no task token, and its heartbeats go nowhere.
    is_local: bool = False


class _CancelFlag:
    """Whether the attempt was cancelled: set on the event loop, read from any thread
    (a sync activity's). Nothing waits on it, so a flag does what a
    ``threading.Event`` (a lock and a condition built per attempt) did."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


@dataclass(slots=True, kw_only=True)
class _Context:
    """The running attempt. Its ``Info`` is given (``info``) or built when first asked
    for (``make_info``): the activity worker's way, as most activities never ask and
    building it converts the task's timestamps."""

    heartbeat: Callable[[tuple[Any, ...]], None]
    info: Info | None = None
    make_info: Callable[[], Info] | None = None
    cancelled: _CancelFlag = field(default_factory=_CancelFlag)

    def attempt_info(self) -> Info:
        if self.info is None:
            if self.make_info is None:
                raise RuntimeError("activity context without info")
            self.info = self.make_info()
        return self.info


_current: contextvars.ContextVar[_Context] = contextvars.ContextVar("tideflow_activity")


def _context() -> _Context:
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError(
            "not in an activity: this works only inside @activity.defn code"
        ) from None


def info() -> Info:
    """Information about the running activity attempt."""
    return _context().attempt_info()


def heartbeat(*details: Any) -> None:
    """Report progress. The worker batches heartbeats to the server; the details of the
    last one are given to the next attempt as ``info().heartbeat_details``."""
    _context().heartbeat(details)


def is_cancelled() -> bool:
    """True once the server asked this attempt to stop (seen through heartbeats)."""
    return _context().cancelled.is_set()


def in_activity() -> bool:
    return _current.get(None) is not None
