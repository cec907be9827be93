"""Defining workflows and the API workflow code calls.

Workflow code is replayed from history, so it must be deterministic: use
``workflow.now()``, ``workflow.random()``, ``workflow.uuid4()`` and
``workflow.sleep()`` (``asyncio.sleep`` works too and is durable), never the wall
clock, real I/O or threads. Everything with side effects belongs in activities.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random as _random_module
import typing
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn, TypeVar, overload

from tideflow.api.search_attributes import SearchAttributeValue

from ._workflow_inputs import ActivityCancellationType as ActivityCancellationType
from ._workflow_inputs import ParentClosePolicy as ParentClosePolicy
from ._workflow_inputs import (
    StartActivityInput,
    StartChildWorkflowInput,
    StartLocalActivityInput,
)
from .activity import definition_of as activity_definition_of
from .common import RetryPolicy
from .exceptions import ContinueAsNewError
from .placement import ExecutedAt, Placement, Requirements, check_placement

C = TypeVar("C", bound=type)
F = TypeVar("F", bound=Callable[..., Any])

# What names a workflow for a child or continue-as-new: its class, its run method, or
# its type name.
WorkflowRef = type | Callable[..., Awaitable[Any]] | str
# A signal or query: its decorated method or its name.
HandlerRef = Callable[..., Any] | str


@dataclass(frozen=True, slots=True, kw_only=True)
class HandlerDefinition:
    """A signal or query method of a workflow class."""

    name: str
    fn: Callable[..., Any]
    arg_types: list[Any]
    return_type: Any
    is_async: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowDefinition:
    name: str
    cls: type
    run_fn: Callable[..., Awaitable[Any]]
    arg_types: list[Any]
    return_type: Any
    signals: dict[str, HandlerDefinition]
    queries: dict[str, HandlerDefinition]


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:
        return {}


def _handler(fn: Callable[..., Any], name: str) -> HandlerDefinition:
    hints = _hints(fn)
    params = list(inspect.signature(fn).parameters.values())[1:]
    return HandlerDefinition(
        name=name,
        fn=fn,
        arg_types=[hints.get(p.name) for p in params],
        return_type=hints.get("return"),
        is_async=inspect.iscoroutinefunction(fn),
    )


@overload
def defn(cls: C) -> C: ...


@overload
def defn(*, name: str | None = None) -> Callable[[C], C]: ...


def defn(cls: C | None = None, *, name: str | None = None) -> C | Callable[[C], C]:
    """Mark a class as a workflow; exactly one method must carry ``@workflow.run``."""

    def decorate(c: C) -> C:
        runs = [
            member
            for _, member in inspect.getmembers(c, inspect.isfunction)
            if getattr(member, "__tideflow_workflow_run__", False)
        ]
        if len(runs) != 1:
            raise TypeError(
                f"workflow {c.__name__} needs exactly one @workflow.run method, has {len(runs)}"
            )
        run_fn = runs[0]
        if not inspect.iscoroutinefunction(run_fn):
            raise TypeError(f"{c.__name__}.{run_fn.__name__} must be async")
        hints = _hints(run_fn)
        params = list(inspect.signature(run_fn).parameters.values())[1:]
        signals: dict[str, HandlerDefinition] = {}
        queries: dict[str, HandlerDefinition] = {}
        for _, member in inspect.getmembers(c, inspect.isfunction):
            signal_name = getattr(member, "__tideflow_signal__", None)
            query_name = getattr(member, "__tideflow_query__", None)
            if signal_name is not None:
                if signal_name in signals:
                    raise TypeError(f"workflow {c.__name__} has two signals named {signal_name!r}")
                signals[signal_name] = _handler(member, signal_name)
            if query_name is not None:
                if query_name in queries:
                    raise TypeError(f"workflow {c.__name__} has two queries named {query_name!r}")
                if inspect.iscoroutinefunction(member):
                    raise TypeError(
                        f"query {c.__name__}.{member.__name__} must not be async: queries "
                        "only read state"
                    )
                queries[query_name] = _handler(member, query_name)
        definition = WorkflowDefinition(
            name=name or c.__name__,
            cls=c,
            run_fn=run_fn,
            arg_types=[hints.get(p.name) for p in params],
            return_type=hints.get("return"),
            signals=signals,
            queries=queries,
        )
        c.__tideflow_workflow_definition__ = definition  # type: ignore[attr-defined]
        run_fn.__tideflow_workflow_definition__ = definition  # type: ignore[attr-defined]
        return c

    return decorate(cls) if cls is not None else decorate


def run(fn: F) -> F:
    """Mark the async method that is the workflow's body."""
    fn.__tideflow_workflow_run__ = True  # type: ignore[attr-defined]
    return fn


@overload
def signal(fn: F) -> F: ...


@overload
def signal(*, name: str | None = None) -> Callable[[F], F]: ...


def signal(fn: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
    """Mark a method (async or sync) as a signal handler; the signal name defaults to
    the method name. Signals are delivered in the order history recorded them."""

    def decorate(f: F) -> F:
        f.__tideflow_signal__ = name or f.__name__  # type: ignore[attr-defined]
        return f

    return decorate(fn) if fn is not None else decorate


@overload
def query(fn: F) -> F: ...


@overload
def query(*, name: str | None = None) -> Callable[[F], F]: ...


def query(fn: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
    """Mark a (sync) method as a query handler. Queries are answered from a replay of
    the run and write nothing; they must not change state or call workflow APIs that
    emit commands."""

    def decorate(f: F) -> F:
        f.__tideflow_query__ = name or f.__name__  # type: ignore[attr-defined]
        return f

    return decorate(fn) if fn is not None else decorate


def handler_name(method: HandlerRef, attribute: str) -> str:
    """The signal/query name of a decorated method (or a plain string name)."""
    if isinstance(method, str):
        return method
    name = getattr(method, attribute, None)
    if not isinstance(name, str):
        kind = "signal" if attribute == "__tideflow_signal__" else "query"
        raise TypeError(f"{method!r} is not a workflow {kind}: decorate it with @workflow.{kind}")
    return name


def definition_of(workflow: object) -> WorkflowDefinition:
    """The definition behind a workflow class or its run method."""
    definition = getattr(workflow, "__tideflow_workflow_definition__", None)
    if not isinstance(definition, WorkflowDefinition):
        raise TypeError(f"{workflow!r} is not a workflow: decorate the class with @workflow.defn")
    return definition


class _Defined(typing.Protocol):
    @property
    def name(self) -> str: ...

    @property
    def return_type(self) -> Any: ...


def _name_and_result(
    ref: object, lookup: Callable[[object], _Defined], result_type: Any
) -> tuple[str, Any]:
    if isinstance(ref, str):
        return ref, result_type
    definition = lookup(ref)
    return definition.name, definition.return_type if result_type is None else result_type


def type_and_result(workflow: WorkflowRef, result_type: Any = None) -> tuple[str, Any]:
    """The type name of a workflow, and the type its result decodes to: ``result_type``
    if given, else the run method's annotation (a bare name has none)."""
    return _name_and_result(workflow, definition_of, result_type)


@dataclass(frozen=True, slots=True, kw_only=True)
class Info:
    namespace: str
    workflow_id: str
    run_id: str
    workflow_type: str
    task_queue: str
    attempt: int
    start_time: datetime


class ActivityHandle(typing.Protocol):
    """An activity started with ``start_activity``: await it for the result; once it
    completed, ``executed_at`` says where it ran (server/_placement.py records it)."""

    executed_at: ExecutedAt | None

    def __await__(self) -> typing.Generator[Any, None, Any]: ...

    def cancel(self, msg: Any | None = None) -> bool: ...

    def done(self) -> bool: ...


class ChildWorkflowHandle(typing.Protocol):
    """A started child workflow: await it for its result."""

    id: str
    first_execution_run_id: str

    def __await__(self) -> typing.Generator[Any, None, Any]: ...

    async def signal(
        self, signal: HandlerRef, arg: Any = None, *, args: Sequence[Any] = ()
    ) -> None: ...

    async def cancel(self) -> None: ...


class ExternalWorkflowHandle(typing.Protocol):
    """Another workflow run, addressed from workflow code (signal it, cancel it)."""

    id: str
    run_id: str | None

    async def signal(
        self, signal: HandlerRef, arg: Any = None, *, args: Sequence[Any] = ()
    ) -> None: ...

    async def cancel(self) -> None: ...


class _Runtime(ABC):
    """What the functions of this module need from the run they are called in.

    The SDK's deterministic event loop (``_workflow_instance.WorkflowInstanceImpl``)
    implements this contract, and workflow code runs with that loop as the running
    loop, so ``current()`` finds it there (as the Temporal SDK's ``_Runtime`` does).
    This module therefore imports nothing from the implementation: the dependency
    points one way, from the runtime to the API.
    """

    @staticmethod
    def current() -> _Runtime:
        runtime = _Runtime.maybe_current()
        if runtime is None:
            raise RuntimeError("not in a workflow: this works only inside @workflow.defn code")
        return runtime

    @staticmethod
    def maybe_current() -> _Runtime | None:
        # get_running_loop raises where no loop runs; this getter answers None there.
        loop = asyncio.events._get_running_loop()
        return loop if isinstance(loop, _Runtime) else None

    @abstractmethod
    def workflow_info(self) -> Info: ...

    @abstractmethod
    def workflow_now(self) -> datetime: ...

    @abstractmethod
    def workflow_random(self) -> _random_module.Random: ...

    @abstractmethod
    def workflow_is_replaying(self) -> bool:
        """Whether the code now re-runs what already happened (history being replayed,
        a query's catch-up, teardown), so its side effects such as log lines must not
        repeat."""

    @abstractmethod
    def workflow_is_cancel_requested(self) -> bool:
        """Whether the run got a cancellation request (a CancelledError without one
        is the worker tearing the run's instance down)."""

    @abstractmethod
    def workflow_sleep(self, seconds: float) -> Awaitable[None]: ...

    @abstractmethod
    def workflow_start_activity(self, request: StartActivityInput) -> ActivityHandle: ...

    @abstractmethod
    def workflow_start_local_activity(self, request: StartLocalActivityInput) -> Awaitable[Any]: ...

    @abstractmethod
    def workflow_wait_condition(
        self, fn: Callable[[], bool], timeout: float | None
    ) -> Awaitable[None]: ...

    @abstractmethod
    def workflow_patched(self, patch_id: str, *, deprecated: bool) -> bool: ...

    @abstractmethod
    def workflow_start_child_workflow(
        self, request: StartChildWorkflowInput
    ) -> Awaitable[ChildWorkflowHandle]: ...

    @abstractmethod
    def workflow_external_handle(
        self, workflow_id: str, run_id: str | None
    ) -> ExternalWorkflowHandle: ...

    @abstractmethod
    def workflow_upsert_search_attributes(
        self, values: Mapping[str, SearchAttributeValue | None]
    ) -> None: ...


def info() -> Info:
    """Information about the running workflow."""
    return _Runtime.current().workflow_info()


def is_cancel_requested() -> bool:
    """Whether someone asked this run to cancel (``handle.cancel()``, a parent's
    close policy, an external cancel). Code that catches ``asyncio.CancelledError``
    can tell a real request from the worker evicting the run's cached instance, which
    it must never swallow."""
    return _Runtime.current().workflow_is_cancel_requested()


def now() -> datetime:
    """Deterministic current time: the time of the workflow task being processed."""
    return _Runtime.current().workflow_now()


def random() -> _random_module.Random:
    """A random generator seeded from the run: the same numbers on every replay."""
    return _Runtime.current().workflow_random()


def uuid4() -> uuid.UUID:
    """A deterministic UUID4 drawn from ``workflow.random()``."""
    return uuid.UUID(int=random().getrandbits(128), version=4)


async def sleep(duration: timedelta | float) -> None:
    """Durable timer: the workflow resumes after ``duration`` even across restarts."""
    seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
    await _Runtime.current().workflow_sleep(seconds)


def start_activity(
    activity: Callable[..., Any] | str,
    arg: Any = None,
    *,
    args: Sequence[Any] = (),
    activity_id: str | None = None,
    task_queue: str | None = None,
    schedule_to_close_timeout: timedelta | None = None,
    schedule_to_start_timeout: timedelta | None = None,
    start_to_close_timeout: timedelta | None = None,
    heartbeat_timeout: timedelta | None = None,
    retry_policy: RetryPolicy | None = None,
    result_type: Any = None,
    cancellation_type: ActivityCancellationType = ActivityCancellationType.TRY_CANCEL,
    placement: Placement | None = None,
    requirements: Requirements | Mapping[str, Any] | None = None,
) -> ActivityHandle:
    """Schedule an activity and return a handle to await its result.

    Pass one argument positionally or several with ``args=[...]``. At least one of
    ``start_to_close_timeout`` and ``schedule_to_close_timeout`` is required.
    ``placement`` and ``requirements`` say where it may run (worker_sdk/placement.py).
    """
    runtime = _Runtime.current()
    name, result_type = _name_and_result(activity, activity_definition_of, result_type)
    if start_to_close_timeout is None and schedule_to_close_timeout is None:
        raise ValueError("start_to_close_timeout or schedule_to_close_timeout is required")
    check_placement(placement)
    return runtime.workflow_start_activity(
        StartActivityInput(
            activity_type=name,
            args=list(args) if args else ([] if arg is None else [arg]),
            activity_id=activity_id,
            task_queue=task_queue,
            schedule_to_close_timeout=schedule_to_close_timeout,
            schedule_to_start_timeout=schedule_to_start_timeout,
            start_to_close_timeout=start_to_close_timeout,
            heartbeat_timeout=heartbeat_timeout,
            retry_policy=retry_policy,
            result_type=result_type,
            cancellation_type=cancellation_type,
            placement=placement,
            requirements=Requirements.of(requirements),
        )
    )


_ActivityResult = TypeVar("_ActivityResult")
_ActivityParam = TypeVar("_ActivityParam")


class ActivityOptions(typing.TypedDict, total=False):
    """The keyword options of ``execute_activity`` (as ``start_activity`` takes them),
    named in its typed overloads."""

    activity_id: str | None
    task_queue: str | None
    schedule_to_close_timeout: timedelta | None
    schedule_to_start_timeout: timedelta | None
    start_to_close_timeout: timedelta | None
    heartbeat_timeout: timedelta | None
    retry_policy: RetryPolicy | None
    result_type: Any
    cancellation_type: ActivityCancellationType
    placement: Placement | None
    requirements: Requirements | Mapping[str, Any] | None


# Typed by the activity function (async or sync, by arity, as the Temporal SDK does):
# mypy checks the argument and infers the result; by type name the result is Any.
@overload
async def execute_activity(
    activity: Callable[[], Awaitable[_ActivityResult]],
    **options: typing.Unpack[ActivityOptions],
) -> _ActivityResult: ...


@overload
async def execute_activity(
    activity: Callable[[], _ActivityResult], **options: typing.Unpack[ActivityOptions]
) -> _ActivityResult: ...


@overload
async def execute_activity(
    activity: Callable[[_ActivityParam], Awaitable[_ActivityResult]],
    arg: _ActivityParam,
    **options: typing.Unpack[ActivityOptions],
) -> _ActivityResult: ...


@overload
async def execute_activity(
    activity: Callable[[_ActivityParam], _ActivityResult],
    arg: _ActivityParam,
    **options: typing.Unpack[ActivityOptions],
) -> _ActivityResult: ...


@overload
async def execute_activity(
    activity: Callable[..., Awaitable[_ActivityResult]],
    *,
    args: Sequence[Any],
    **options: typing.Unpack[ActivityOptions],
) -> _ActivityResult: ...


@overload
async def execute_activity(
    activity: Callable[..., _ActivityResult],
    *,
    args: Sequence[Any],
    **options: typing.Unpack[ActivityOptions],
) -> _ActivityResult: ...


@overload
async def execute_activity(
    activity: str,
    arg: Any = None,
    *,
    args: Sequence[Any] = (),
    **options: typing.Unpack[ActivityOptions],
) -> Any: ...


async def execute_activity(
    activity: Callable[..., Any] | str,
    arg: Any = None,
    *,
    args: Sequence[Any] = (),
    **options: typing.Unpack[ActivityOptions],
) -> Any:
    """Run an activity and return its result; raises ``ActivityError`` if it failed
    for good (the cause says why). The options are ``start_activity``'s."""
    return await start_activity(activity, arg, args=args, **options)


class LocalActivityOptions(typing.TypedDict, total=False):
    """The keyword options of ``execute_local_activity``, named in its typed overloads."""

    activity_id: str | None
    schedule_to_close_timeout: timedelta | None
    start_to_close_timeout: timedelta | None
    retry_policy: RetryPolicy | None
    local_retry_threshold: timedelta
    result_type: Any


@overload
async def execute_local_activity(
    activity: Callable[[], Awaitable[_ActivityResult]],
    **options: typing.Unpack[LocalActivityOptions],
) -> _ActivityResult: ...


@overload
async def execute_local_activity(
    activity: Callable[[], _ActivityResult], **options: typing.Unpack[LocalActivityOptions]
) -> _ActivityResult: ...


@overload
async def execute_local_activity(
    activity: Callable[[_ActivityParam], Awaitable[_ActivityResult]],
    arg: _ActivityParam,
    **options: typing.Unpack[LocalActivityOptions],
) -> _ActivityResult: ...


@overload
async def execute_local_activity(
    activity: Callable[[_ActivityParam], _ActivityResult],
    arg: _ActivityParam,
    **options: typing.Unpack[LocalActivityOptions],
) -> _ActivityResult: ...


@overload
async def execute_local_activity(
    activity: Callable[..., Awaitable[_ActivityResult]],
    *,
    args: Sequence[Any],
    **options: typing.Unpack[LocalActivityOptions],
) -> _ActivityResult: ...


@overload
async def execute_local_activity(
    activity: Callable[..., _ActivityResult],
    *,
    args: Sequence[Any],
    **options: typing.Unpack[LocalActivityOptions],
) -> _ActivityResult: ...


@overload
async def execute_local_activity(
    activity: str,
    arg: Any = None,
    *,
    args: Sequence[Any] = (),
    **options: typing.Unpack[LocalActivityOptions],
) -> Any: ...


async def execute_local_activity(
    activity: Callable[..., Any] | str,
    arg: Any = None,
    *,
    args: Sequence[Any] = (),
    activity_id: str | None = None,
    schedule_to_close_timeout: timedelta | None = None,
    start_to_close_timeout: timedelta | None = None,
    retry_policy: RetryPolicy | None = None,
    local_retry_threshold: timedelta = timedelta(minutes=1),
    result_type: Any = None,
) -> Any:
    """Run an activity in this worker, inside the workflow task (Temporal's local
    activity): no activity task, no server round trip. The outcome is recorded as a
    ``LocalActivity`` marker, from which replay takes it without running the function.
    The activity must be registered on this worker. Attempts are retried here per
    ``retry_policy``; a backoff longer than ``local_retry_threshold`` becomes a durable
    timer. Raises ``ActivityError`` once it failed for good. Cancelling the awaiting code
    cancels the activity and stops waiting; only a finished attempt is recorded."""
    runtime = _Runtime.current()
    name, result_type = _name_and_result(activity, activity_definition_of, result_type)
    if start_to_close_timeout is None and schedule_to_close_timeout is None:
        raise ValueError("start_to_close_timeout or schedule_to_close_timeout is required")
    if any(
        t is not None and t <= timedelta(0)
        for t in (start_to_close_timeout, schedule_to_close_timeout)
    ):
        raise ValueError("local activity timeouts must be positive")
    return await runtime.workflow_start_local_activity(
        StartLocalActivityInput(
            activity_type=name,
            args=list(args) if args else ([] if arg is None else [arg]),
            activity_id=activity_id,
            schedule_to_close_timeout=schedule_to_close_timeout,
            start_to_close_timeout=start_to_close_timeout,
            retry_policy=retry_policy,
            local_retry_threshold=local_retry_threshold,
            result_type=result_type,
        )
    )


async def wait_condition(
    fn: Callable[[], bool], *, timeout: timedelta | float | None = None
) -> None:
    """Wait until ``fn()`` is true; it is checked whenever the workflow's state may have
    changed (after each signal, activity result, timer...). With ``timeout``, raises
    ``asyncio.TimeoutError`` once that much workflow time passed (a durable timer)."""
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    await _Runtime.current().workflow_wait_condition(fn, seconds)


def patched(patch_id: str) -> bool:
    """Whether the run takes the new code path of a change named ``patch_id``.

    New runs (and runs whose history reached this point with the patch) return True
    and record a marker; runs replaying history written before the change return
    False, so old histories keep replaying deterministically."""
    return _Runtime.current().workflow_patched(patch_id, deprecated=False)


def deprecate_patch(patch_id: str) -> None:
    """The old code path of ``patch_id`` is gone: runs from before the patch are all
    closed. Keeps recording the marker so histories with it still replay."""
    _Runtime.current().workflow_patched(patch_id, deprecated=True)


def continue_as_new(
    arg: Any = None,
    *,
    args: Sequence[Any] = (),
    workflow: WorkflowRef | None = None,
    task_queue: str | None = None,
    run_timeout: timedelta | None = None,
    task_timeout: timedelta | None = None,
) -> NoReturn:
    """End this run and start a fresh one of the same workflow id with an empty history
    (``workflow`` may name another workflow type). Never returns."""
    _Runtime.current()  # only inside a workflow
    name = None if workflow is None else type_and_result(workflow)[0]
    raise ContinueAsNewError(
        list(args) if args else ([] if arg is None else [arg]),
        workflow=name,
        task_queue=task_queue,
        run_timeout=run_timeout,
        task_timeout=task_timeout,
    )


async def start_child_workflow(
    workflow: WorkflowRef,
    arg: Any = None,
    *,
    args: Sequence[Any] = (),
    id: str,
    task_queue: str | None = None,
    parent_close_policy: ParentClosePolicy = ParentClosePolicy.TERMINATE,
    execution_timeout: timedelta | None = None,
    run_timeout: timedelta | None = None,
    task_timeout: timedelta | None = None,
    result_type: Any = None,
    home: str | None = None,
) -> ChildWorkflowHandle:
    """Start a child workflow (a run of its own, with its own history) and return its
    handle once it started. Raises ``ChildWorkflowError`` if it could not start (its id
    is in use).

    ``home``: the site (``--cluster-name``) that is the child's home, its only writer;
    default the parent's site. A child homed at the other site is started there over
    the sites' link, once (while the link is down the parent just waits for it), and
    its outcome comes back the same way."""
    runtime = _Runtime.current()
    type_name, result_type = type_and_result(workflow, result_type)
    return await runtime.workflow_start_child_workflow(
        StartChildWorkflowInput(
            workflow_type=type_name,
            args=list(args) if args else ([] if arg is None else [arg]),
            workflow_id=id,
            task_queue=task_queue,
            parent_close_policy=parent_close_policy,
            execution_timeout=execution_timeout,
            run_timeout=run_timeout,
            task_timeout=task_timeout,
            result_type=result_type,
            home=home,
        )
    )


async def execute_child_workflow(
    workflow: WorkflowRef,
    arg: Any = None,
    *,
    args: Sequence[Any] = (),
    id: str,
    task_queue: str | None = None,
    parent_close_policy: ParentClosePolicy = ParentClosePolicy.TERMINATE,
    execution_timeout: timedelta | None = None,
    run_timeout: timedelta | None = None,
    task_timeout: timedelta | None = None,
    result_type: Any = None,
    home: str | None = None,
) -> Any:
    """Start a child workflow and wait for its result; raises ``ChildWorkflowError``
    (cause: what the child failed with) if it did not complete. ``home``: as for
    ``start_child_workflow``."""
    handle = await start_child_workflow(
        workflow,
        arg,
        args=args,
        id=id,
        task_queue=task_queue,
        parent_close_policy=parent_close_policy,
        execution_timeout=execution_timeout,
        run_timeout=run_timeout,
        task_timeout=task_timeout,
        result_type=result_type,
        home=home,
    )
    return await handle


def get_external_workflow_handle(
    workflow_id: str, *, run_id: str | None = None
) -> ExternalWorkflowHandle:
    """A handle to signal or cancel another workflow from workflow code."""
    return _Runtime.current().workflow_external_handle(workflow_id, run_id)


def in_workflow() -> bool:
    return _Runtime.maybe_current() is not None


def upsert_search_attributes(
    attributes: Mapping[str, SearchAttributeValue | None],
) -> None:
    """Set (or, with None, remove) search attributes of this run, for
    ``client.list_workflows`` queries. Recorded in history as an
    UpsertWorkflowSearchAttributes event; the server indexes the values in the same
    transaction. Values are str, int, float, bool, datetime (naive means UTC) or list[str]."""
    if not attributes:
        return
    _Runtime.current().workflow_upsert_search_attributes(dict(attributes))


class LoggerAdapter(logging.LoggerAdapter[logging.Logger]):
    """``workflow.logger``: a logger that is quiet while the run replays and tags what
    it writes with the run.

    Workflow code runs again on every replay (a worker that lost its cache, another
    worker taking over, a query), so a plain logger would repeat each line. Inside a
    workflow this adapter drops records while the code re-runs history, and adds the
    run's identity both to the record (``extra``: ``workflow_id``, ``run_id``,
    ``workflow_type`` and a ``tideflow_workflow`` dict with namespace, task queue and
    attempt too) and, readable, to the message. Outside a workflow it logs as is.
    """

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, None)

    def isEnabledFor(self, level: int) -> bool:
        runtime = _Runtime.maybe_current()
        if runtime is not None and runtime.workflow_is_replaying():
            return False
        return super().isEnabledFor(level)

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        runtime = _Runtime.maybe_current()
        if runtime is None:
            return msg, kwargs
        fields = _run_fields(runtime.workflow_info())
        # What the caller passed in ``extra`` wins over the run's fields.
        kwargs["extra"] = {
            "tideflow_workflow": fields,
            "workflow_id": fields["workflow_id"],
            "run_id": fields["run_id"],
            "workflow_type": fields["workflow_type"],
            **(kwargs.get("extra") or {}),
        }
        return msg, kwargs

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):
            return
        msg, options = self.process(msg, kwargs)
        fields = (options.get("extra") or {}).get("tideflow_workflow")
        if isinstance(fields, dict):
            tag = ", ".join(f"{key}={value}" for key, value in fields.items())
            # With arguments the message is %-formatted: a '%' in an id must not count.
            msg = f"{msg} ({tag.replace('%', '%%') if args else tag})"
        # Report the caller's line, not this method's.
        options["stacklevel"] = options.get("stacklevel", 1) + 1
        self.logger.log(level, msg, *args, **options)


def _run_fields(info: Info) -> dict[str, str | int]:
    return {
        "namespace": info.namespace,
        "workflow_id": info.workflow_id,
        "run_id": info.run_id,
        "workflow_type": info.workflow_type,
        "task_queue": info.task_queue,
        "attempt": info.attempt,
    }


logger = LoggerAdapter(logging.getLogger("tideflow.workflow"))
