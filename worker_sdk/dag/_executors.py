"""Executors: activities that run DAG tasks, and what they report."""

from __future__ import annotations

import inspect
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .. import activity as activity_mod
from ._model import ENVELOPE_KEY

# -------------------------------------------------------------- executors


def _identity() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


@dataclass(frozen=True, slots=True)
class ExecutorInfo:
    """Which DAG task and attempt an executor is running (see :func:`executor_info`)."""

    task_id: str
    attempt: int
    compensation: bool
    dag_instance_id: str


def executor_info() -> ExecutorInfo:
    """Inside an executor called by a DAG: the task id and the DAG-level attempt (the
    interpreter makes one activity call per attempt, so ``activity.info().attempt``
    is always 1)."""
    info = activity_mod.info()
    task_id, _, rest = info.activity_id.partition("#")
    compensation = rest.startswith("compensation#")
    number = rest.rsplit("#", 1)[-1]
    return ExecutorInfo(
        task_id=task_id,
        attempt=int(number) if number.isdigit() else info.attempt,
        compensation=compensation,
        dag_instance_id=info.workflow_id,
    )


def executor(
    name: str | None = None, *, executed_at: str | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a function ``fn(parameters: dict) -> result`` (async or sync) as a DAG
    executor: an activity named ``name`` (default: the function's name) whose result
    also tells the interpreter when the attempt started and ended, on which worker,
    and where (``executed_at``: cloud / edge / device; default the environment
    variable ``TIDEFLOW_EXECUTED_AT``, else ``cloud``). Register the returned function
    on a ``Worker`` like any activity. Plain activities work as executors too; they
    just report no start time or location."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        activity_name = name or fn.__name__
        location = executed_at or os.environ.get("TIDEFLOW_EXECUTED_AT") or "cloud"

        def envelope(result: Any, started: datetime) -> dict[str, Any]:
            return {
                ENVELOPE_KEY: 1,
                "result": result,
                "started_at": started.isoformat(),
                "ended_at": datetime.now(UTC).isoformat(),
                "executed_at": location,
                "worker": _identity(),
            }

        wrapper: Callable[..., Any]
        if inspect.iscoroutinefunction(fn):

            async def async_wrapper(parameters: dict[str, Any]) -> dict[str, Any]:
                started = datetime.now(UTC)
                return envelope(await fn(parameters), started)

            wrapper = async_wrapper
        else:
            # Sync executors stay sync: the worker runs them in its thread pool.
            def sync_wrapper(parameters: dict[str, Any]) -> dict[str, Any]:
                started = datetime.now(UTC)
                return envelope(fn(parameters), started)

            wrapper = sync_wrapper
        for attribute in ("__module__", "__name__", "__qualname__", "__doc__"):
            setattr(wrapper, attribute, getattr(fn, attribute, None))
        setattr(wrapper, "__tideflow_dag_executor__", fn)  # noqa: B010
        return activity_mod.defn(name=activity_name)(wrapper)

    return decorate


def unwrap_result(raw: Any) -> tuple[Any, dict[str, Any]]:
    """An executor's result and the envelope's metadata (empty for plain activities)."""
    if isinstance(raw, dict) and raw.get(ENVELOPE_KEY) == 1:
        meta = {k: v for k, v in raw.items() if k not in (ENVELOPE_KEY, "result")}
        return raw.get("result"), meta
    return raw, {}
