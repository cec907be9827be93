"""The client: start workflows, wait for their results, inspect and terminate them.

``Client`` is also the connection workers poll through. gRPC errors are translated
here, at one boundary, into the exceptions of ``tideflow.worker_sdk.exceptions``;
calls that are safe to repeat (all of them carry request ids or task tokens) are
retried while the server is unreachable, so a server restart is invisible to users.
"""

from __future__ import annotations

import asyncio
import random
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Concatenate, Required, TypedDict, Unpack, cast, overload

import grpc
from google.protobuf.message import Message
from typing_extensions import TypeVar

from tideflow.api.search_attributes import (
    SearchAttributeValue,
    decode_search_attributes,
    encode_search_attributes,
)
from tideflow.api.v1 import common_pb2, replication_pb2_grpc, service_pb2, service_pb2_grpc

from . import exceptions as exc
from ._completions import CompletionBatcher
from ._credentials import CredentialInterceptor, credential_metadata
from ._eager_start import EagerStarts
from ._failover import FailoverService, split_targets
from ._tls import TLSConfig
from ._types import (
    MethodAsyncNoParam,
    MethodAsyncSingleParam,
    MultiParamSpec,
    ParamType,
    ReturnType,
    SelfType,
)
from ._workflow_handle import WorkflowExecutionDescription as WorkflowExecutionDescription
from ._workflow_handle import WorkflowExecutionStatus as WorkflowExecutionStatus
from ._workflow_handle import WorkflowHandle as WorkflowHandle
from ._workflow_handle import WorkflowHistory as WorkflowHistory
from .cluster import ClusterDescription, cluster_description
from .common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from .converter import DataConverter, default_converter
from .interceptor import ClientCallHandler, ClientCallInput, ClientInterceptor
from .schedules import (
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleHandle,
    ScheduleInfo,
    ScheduleListDescription,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
)
from .workflow import definition_of, handler_name

Req = TypeVar("Req")
Resp = TypeVar("Resp")
# A handle's result type; a bare ``WorkflowHandle`` annotation means ``WorkflowHandle[Any]``.
T = TypeVar("T")

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
# Status codes of a connection that never reached a server.
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE.name, grpc.StatusCode.DEADLINE_EXCEEDED.name}
# How long calls keep retrying while the server is unreachable (a restart): workers and
# clients that once connected ride out a server restart of up to this long.
_RECONNECT_BUDGET_S = 120.0
# How long ``Client.connect`` waits for a first answer: an address where no server
# listens is a mistake to report at once, not an outage to wait out.
DEFAULT_CONNECT_TIMEOUT = timedelta(seconds=5)


def default_identity() -> str:
    import os

    return f"{os.getpid()}@{socket.gethostname()}"


async def translate_rpc_error(
    error: grpc.aio.AioRpcError, converter: DataConverter = default_converter
) -> exc.RPCError:
    """The SDK exception for a failed call (``exceptions.rpc_error_from_status``);
    ``converter`` decodes a failed query's reported failure (its payload codec) and
    turns it into the error's cause."""
    code = error.code()
    translated = exc.rpc_error_from_status(
        error.details() or code.name,
        status=code.name,
        detail=exc.error_detail(error.trailing_metadata() or ()),
    )
    if isinstance(translated, exc.WorkflowQueryFailedError) and translated.failure is not None:
        # The failure arrives in the status details, encoded like any payload received.
        await converter.decode_messages([translated.failure])
        translated.__cause__ = converter.from_failure(translated.failure)
    return translated


class WorkflowStartOptions(TypedDict, total=False):
    """The options of a workflow start, shared by ``Client.start_workflow`` and
    ``Client.execute_workflow`` (keyword arguments; ``id`` and ``task_queue`` are
    required).

    Attributes:
        id: The workflow id.
        task_queue: The task queue whose workers run the workflow.
        execution_timeout: Bound of the whole execution, continue-as-new included.
        run_timeout: Bound of one run.
        task_timeout: Bound of one workflow task.
        request_id: Makes a retried start idempotent (one is made up per call).
        result_type: Type the result is decoded to (the run method's return type by
            default).
        start_signal: A signal method or name: signal-with-start. A running run with
            this id gets the signal; otherwise a new run starts with it.
        start_signal_args: The signal's arguments.
        memo: Data returned by ``list_workflows``, any value the converter encodes.
        search_attributes: Indexed values (str, int, float, bool, datetime, list[str]) for
            ``list_workflows`` / ``count_workflows`` queries.
        id_reuse_policy: Whether the id of a closed run may be reused
            (``ALLOW_DUPLICATE`` by default).
        id_conflict_policy: What happens when a run with the id is running (``FAIL``
            by default: ``WorkflowAlreadyStartedError``).
        home: The site (``--cluster-name``) that is the run's home, its only writer
            (default: the site the client is connected to, which forwards the start
            to the named site over its link).
        request_eager_start: Eager workflow start (Temporal's name): when a ``Worker``
            built on this same client runs on the task queue, runs the workflow type
            and has a free workflow task slot, the server starts the run's first
            workflow task in the start's commit and hands it to that worker (no poll,
            one commit fewer). Otherwise, or if the server declines, a plain start.
    """

    id: Required[str]
    task_queue: Required[str]
    execution_timeout: timedelta | None
    run_timeout: timedelta | None
    task_timeout: timedelta | None
    request_id: str | None
    result_type: Any
    start_signal: Any
    start_signal_args: Sequence[Any]
    memo: Mapping[str, Any] | None
    search_attributes: Mapping[str, SearchAttributeValue] | None
    id_reuse_policy: WorkflowIDReusePolicy
    id_conflict_policy: WorkflowIDConflictPolicy
    home: str | None
    request_eager_start: bool


_START_OPTION_NAMES = (
    WorkflowStartOptions.__required_keys__ | WorkflowStartOptions.__optional_keys__
)


_MAX_RECONNECT_BACKOFF_MS = 2_000


def _open_channel(
    target: str, tls: TLSConfig | bool, credentials: tuple[tuple[str, str], ...]
) -> grpc.aio.Channel:
    """A channel to ``target``: plaintext, or TLS per ``tls``; ``credentials`` (gRPC
    metadata) ride on every call."""
    interceptors = [CredentialInterceptor(credentials)] if credentials else None
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.keepalive_time_ms", 30_000),
        # gRPC's reconnect backoff grows to 120 s by default: a client whose server was
        # down a while (restarts under load, each taking seconds) would go on failing
        # calls fast for up to two minutes after the server is back.
        ("grpc.max_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS),
    ]
    if tls is False:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    config = TLSConfig() if tls is True else tls
    return grpc.aio.secure_channel(
        target,
        config.credentials(),
        options=options + config.channel_options(),
        interceptors=interceptors,
    )


class Client:
    """A connection to a tideflow server in one namespace."""

    def __init__(
        self,
        channel: grpc.aio.Channel | Sequence[tuple[str, grpc.aio.Channel]],
        *,
        namespace: str,
        data_converter: DataConverter,
        identity: str,
        interceptors: Sequence[ClientInterceptor] = (),
    ) -> None:
        """``channel``: one channel, or (address, channel) pairs of several nodes of a
        cluster, failed over between (worker_sdk/_failover.py); ``interceptors``: see
        ``tideflow.worker_sdk.interceptor`` (the first is outermost)."""
        self.service: Any
        if isinstance(channel, grpc.aio.Channel):
            self._channels = [channel]
            self.service = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        else:
            self._channels = [c for _, c in channel]
            self.service = FailoverService([a for a, _ in channel], self._channels)
        self._channel = self._channels[0]
        # The SiteService (replication.proto): handoffs and site status.
        self.sites: Any = replication_pb2_grpc.SiteServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self.namespace = namespace
        self.data_converter = data_converter
        self.identity = identity
        self.interceptors = tuple(interceptors)
        handler: ClientCallHandler = self._send
        for interceptor in reversed(self.interceptors):
            handler = interceptor.intercept_call(handler)
        self._intercepted: ClientCallHandler | None = handler if self.interceptors else None
        # The workers built on this client that take eagerly started workflow tasks.
        self.eager_starts = EagerStarts()
        # The workers' task completions, batched while one is in flight (_completions).
        self.completions = CompletionBatcher(self)

    def service_for(self, run_owner: str) -> Any:
        """The service a task's completion or heartbeat goes through: the node that
        owns the task's run (its ``run_owner``) when that is one of this client's
        addresses, else ``service`` (worker_sdk/_failover.py)."""
        service = self.service
        return service.to(run_owner) if isinstance(service, FailoverService) else service

    def node_of(self, run_owner: str) -> int | None:
        """Which of this client's addresses ``run_owner`` is (None: not one of them,
        or the client has one address)."""
        service = self.service
        return service.owner_index(run_owner) if isinstance(service, FailoverService) else None

    @staticmethod
    async def connect(
        target: str,
        *,
        namespace: str = "default",
        data_converter: DataConverter = default_converter,
        identity: str | None = None,
        connect_timeout: timedelta | float = DEFAULT_CONNECT_TIMEOUT,
        tls: TLSConfig | bool = False,
        api_key: str | None = None,
        rpc_metadata: Mapping[str, str] | None = None,
        interceptors: Sequence[ClientInterceptor] = (),
    ) -> Client:
        """Connect to ``host:port`` (or to one of several nodes of a cluster,
        ``"h1:p1,h2:p2,h3:p3"``) and check the server answers.

        With several addresses the client uses one node at a time and moves to the
        next when a call fails UNAVAILABLE there (the node is down or unreachable),
        retrying that call on it with the same request id; workers polling through
        the client move with it. ``connect`` succeeds once any of them answers.

        Raises ``ConnectError`` if no server answers within ``connect_timeout`` (a
        timedelta or seconds; 5 s by default). Once connected, calls retry while the
        server is unreachable for up to two minutes, so a server restart does not
        disturb the client or the workers that poll through it.

        ``tls``: a ``TLSConfig`` (the CA to trust, a client certificate for mTLS, the
        name to check the server's certificate against), or True for TLS with the
        system's root CAs; False (the default) connects in plaintext. A TLS handshake
        that fails (no or wrong client certificate, an untrusted server) is a
        ``ConnectError``.

        ``api_key``: an API key (``tideflow server create-api-key``) or a JWT for a
        server with ``--auth`` on, sent as ``authorization: Bearer <api_key>`` on every
        call, the workers' included; ``rpc_metadata``: more gRPC metadata for every
        call. Use TLS with either, or the credentials cross the network in plain text.
        A server that refuses them answers the first call (here) with
        ``RPCError(status="UNAUTHENTICATED")``.
        """
        seconds = (
            connect_timeout.total_seconds()
            if isinstance(connect_timeout, timedelta)
            else float(connect_timeout)
        )
        if seconds <= 0:
            raise ValueError(f"connect_timeout must be positive, not {connect_timeout!r}")
        credentials = credential_metadata(api_key, rpc_metadata)
        addresses = split_targets(target)
        channels = [(a, _open_channel(a, tls, credentials)) for a in addresses]
        client = Client(
            channels[0][1] if len(channels) == 1 else channels,
            namespace=namespace,
            data_converter=data_converter,
            identity=identity or default_identity(),
            interceptors=interceptors,
        )
        try:
            # Retrying within the timeout covers a server that is still starting;
            # asyncio.timeout bounds an attempt begun just before the end.
            async with asyncio.timeout(seconds):
                await client.call(
                    client.service.GetSystemInfo,
                    service_pb2.GetSystemInfoRequest(),
                    timeout=seconds,
                    retry_for=seconds,
                )
        except (exc.RPCError, TimeoutError) as error:
            await client.close()
            if isinstance(error, exc.RPCError) and error.status not in _UNREACHABLE:
                raise  # a server answered, with an error
            why = error.message if isinstance(error, exc.RPCError) else "no answer"
            raise exc.ConnectError(
                f"cannot reach a tideflow server at {target} within {seconds:g} s: {why}",
                status=grpc.StatusCode.UNAVAILABLE.name,
            ) from None
        except BaseException:
            await client.close()
            raise
        return client

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def call(
        self,
        method: Callable[..., Awaitable[Resp]],
        request: Any,
        *,
        timeout: float = 30.0,
        retry: bool = True,
        retry_for: float = _RECONNECT_BUDGET_S,
    ) -> Resp:
        """One RPC with status translation; retries while the server is unreachable,
        for up to ``retry_for`` seconds (two minutes: a server restart). The client's
        interceptors see it first (``ClientInterceptor.intercept_call``)."""
        if self._intercepted is not None:
            rpc = type(request).__name__.removesuffix("Request")
            call = ClientCallInput(
                rpc=rpc, request=request, metadata={}, timeout=timeout, target=method
            )
            call.retry_for = retry_for if retry else 0.0
            return cast(Resp, await self._intercepted(call))
        return await self._call(method, request, timeout, retry, retry_for, None)

    async def _send(self, call: ClientCallInput) -> Any:
        """The innermost handler of the interceptors' chain: the RPC itself."""
        metadata = tuple(call.metadata.items()) or None
        retry = call.retry_for > 0
        return await self._call(
            call.target, call.request, call.timeout, retry, call.retry_for, metadata
        )

    async def _call(
        self,
        method: Callable[..., Awaitable[Resp]],
        request: Any,
        timeout: float,
        retry: bool,
        retry_for: float,
        metadata: tuple[tuple[str, str], ...] | None,
    ) -> Resp:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + retry_for
        delay = 0.05
        codec = self.data_converter.codec
        if codec is not None:
            # The payload codec's wire boundary: every payload sent is encoded here, once
            # (retries resend the same bytes), on a copy so the caller's message keeps
            # its decoded values.
            encoded = type(request)()
            encoded.CopyFrom(request)
            await self.data_converter.encode_messages([encoded])
            request = encoded
        while True:
            try:
                response = await (
                    method(request, timeout=timeout)
                    if metadata is None
                    else method(request, timeout=timeout, metadata=metadata)
                )
                if codec is not None:
                    # ...and every payload received is decoded before anything reads it.
                    await self.data_converter.decode_messages([cast(Message, response)])
                return response
            except grpc.aio.AioRpcError as error:
                if retry and error.code() in _RETRYABLE and loop.time() < give_up:
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 2.0)
                    continue
                translated = await translate_rpc_error(error, self.data_converter)
                # Hide the grpc error (its text is in ours), keep a failed query's cause.
                raise translated from translated.__cause__

    # ------------------------------------------------------------- workflows

    @overload
    async def start_workflow(
        self,
        workflow: MethodAsyncNoParam[SelfType, ReturnType],
        **options: Unpack[WorkflowStartOptions],
    ) -> WorkflowHandle[ReturnType]: ...

    @overload
    async def start_workflow(
        self,
        workflow: MethodAsyncSingleParam[SelfType, ParamType, ReturnType],
        arg: ParamType,
        **options: Unpack[WorkflowStartOptions],
    ) -> WorkflowHandle[ReturnType]: ...

    @overload
    async def start_workflow(
        self,
        workflow: Callable[Concatenate[SelfType, MultiParamSpec], Awaitable[ReturnType]],
        *,
        args: Sequence[Any],
        **options: Unpack[WorkflowStartOptions],
    ) -> WorkflowHandle[ReturnType]: ...

    @overload
    async def start_workflow(
        self,
        workflow: str | type,
        arg: Any = None,
        *,
        args: Sequence[Any] = (),
        **options: Unpack[WorkflowStartOptions],
    ) -> WorkflowHandle[Any]: ...

    async def start_workflow(
        self,
        workflow: Any,
        arg: Any = None,
        *,
        args: Sequence[Any] = (),
        **options: Unpack[WorkflowStartOptions],
    ) -> WorkflowHandle[Any]:
        """Start a workflow run; ``workflow`` is its run method (``MyWorkflow.run``,
        which lets type checkers check the argument and infer the handle's result
        type), its class, or its type name.

        Pass one argument positionally or several with ``args=[...]``; the options
        (``id`` and ``task_queue`` are required) are those of ``WorkflowStartOptions``.
        Raises ``WorkflowAlreadyStartedError`` (with the ``run_id`` holding the id) if
        the start is refused. Retrying with the same ``request_id`` returns the run
        the first call started.
        """
        request, result_type = self._start_request(workflow, arg, args, options)
        if options.get("request_eager_start"):
            response = await self.eager_starts.start(
                request, lambda r: self.call(self.service.StartWorkflow, r)
            )
        else:
            response = await self.call(self.service.StartWorkflow, request)
        return WorkflowHandle(
            self, request.workflow_id, run_id=response.run_id, result_type=result_type
        )

    @overload
    async def execute_workflow(
        self,
        workflow: MethodAsyncNoParam[SelfType, ReturnType],
        **options: Unpack[WorkflowStartOptions],
    ) -> ReturnType: ...

    @overload
    async def execute_workflow(
        self,
        workflow: MethodAsyncSingleParam[SelfType, ParamType, ReturnType],
        arg: ParamType,
        **options: Unpack[WorkflowStartOptions],
    ) -> ReturnType: ...

    @overload
    async def execute_workflow(
        self,
        workflow: Callable[Concatenate[SelfType, MultiParamSpec], Awaitable[ReturnType]],
        *,
        args: Sequence[Any],
        **options: Unpack[WorkflowStartOptions],
    ) -> ReturnType: ...

    @overload
    async def execute_workflow(
        self,
        workflow: str | type,
        arg: Any = None,
        *,
        args: Sequence[Any] = (),
        **options: Unpack[WorkflowStartOptions],
    ) -> Any: ...

    async def execute_workflow(
        self,
        workflow: Any,
        arg: Any = None,
        *,
        args: Sequence[Any] = (),
        **options: Unpack[WorkflowStartOptions],
    ) -> Any:
        """Start a workflow (as ``start_workflow``, same options) and wait for its
        result; raises ``WorkflowFailureError`` if the run did not complete."""
        handle = await self.start_workflow(workflow, arg, args=args, **options)
        return await handle.result()

    def _start_request(
        self,
        workflow: Any,
        arg: Any,
        args: Sequence[Any],
        options: WorkflowStartOptions,
    ) -> tuple[service_pb2.StartWorkflowRequest, Any]:
        """The StartWorkflow request for these options, and the result type to decode
        the run's result with."""
        unknown = sorted(options.keys() - _START_OPTION_NAMES)
        if unknown:
            raise TypeError(f"unknown workflow start options: {', '.join(unknown)}")
        # Only absence is a TypeError: an empty id is the server's to refuse
        # (INVALID_ARGUMENT), like any other bad value.
        missing = [name for name in ("id", "task_queue") if name not in options]
        if missing:
            raise TypeError(f"starting a workflow needs {' and '.join(missing)}")
        result_type = options.get("result_type")
        if isinstance(workflow, str):
            type_name = workflow
        else:
            definition = definition_of(workflow)
            type_name = definition.name
            if result_type is None:
                result_type = definition.return_type
        all_args = list(args) if args else ([] if arg is None else [arg])
        request = service_pb2.StartWorkflowRequest(
            namespace=self.namespace,
            workflow_id=options["id"],
            identity=self.identity,
            request_id=options.get("request_id") or str(uuid.uuid4()),
        )
        request.workflow_type.name = type_name
        request.task_queue.name = options["task_queue"]
        request.input.CopyFrom(self.data_converter.to_payloads(all_args))
        for field, option in (
            ("workflow_execution_timeout", "execution_timeout"),
            ("workflow_run_timeout", "run_timeout"),
            ("workflow_task_timeout", "task_timeout"),
        ):
            value = options.get(option)
            if value is not None:
                getattr(request, field).FromTimedelta(value)
        request.workflow_id_reuse_policy = int(  # type: ignore[assignment]
            options.get("id_reuse_policy", WorkflowIDReusePolicy.ALLOW_DUPLICATE)
        )
        request.workflow_id_conflict_policy = int(  # type: ignore[assignment]
            options.get("id_conflict_policy", WorkflowIDConflictPolicy.FAIL)
        )
        start_signal = options.get("start_signal")
        if start_signal is not None:
            request.signal_name = handler_name(start_signal, "__tideflow_signal__")
            request.signal_input.CopyFrom(
                self.data_converter.to_payloads(list(options.get("start_signal_args", ())))
            )
        # Visibility: ``memo`` values are any data the converter encodes, returned by
        # list_workflows; ``search_attributes`` (str/int/float/bool/datetime) are
        # indexed for list_workflows / count_workflows queries.
        memo = options.get("memo")
        if memo:
            request.memo.CopyFrom(_encode_memo(self.data_converter, memo))
        search_attributes = options.get("search_attributes")
        if search_attributes:
            request.search_attributes.CopyFrom(encode_search_attributes(search_attributes))
        request.home_cluster = options.get("home") or ""
        return request, result_type

    @overload
    def get_workflow_handle(
        self, workflow_id: str, *, run_id: str | None = None, result_type: None = None
    ) -> WorkflowHandle[Any]: ...

    @overload
    def get_workflow_handle(
        self, workflow_id: str, *, run_id: str | None = None, result_type: type[T]
    ) -> WorkflowHandle[T]: ...

    def get_workflow_handle(
        self, workflow_id: str, *, run_id: str | None = None, result_type: Any = None
    ) -> WorkflowHandle[Any]:
        """A handle to an existing workflow (its newest run unless run_id is given);
        ``result_type`` types and decodes its result."""
        return WorkflowHandle(self, workflow_id, run_id=run_id, result_type=result_type)

    def get_workflow_handle_for(
        self,
        workflow: Callable[Concatenate[SelfType, MultiParamSpec], Awaitable[ReturnType]],
        workflow_id: str,
        *,
        run_id: str | None = None,
    ) -> WorkflowHandle[ReturnType]:
        """A handle to an existing run of ``workflow`` (its run method), typed and
        decoded by that method's return type."""
        return WorkflowHandle(
            self, workflow_id, run_id=run_id, result_type=definition_of(workflow).return_type
        )

    # ---------------------------------------------------------- visibility

    async def list_workflows(
        self, query: str = "", *, page_size: int = 1000
    ) -> AsyncIterator[WorkflowExecution]:
        """Runs matching ``query``, fetched page by page (``page_size`` runs a call)::

            async for wf in client.list_workflows("WorkflowType = 'Billing' AND "
                                                  "ExecutionStatus = 'Running'"):
                print(wf.id, wf.status, wf.search_attributes)

        The query language (fields, operators, ORDER BY) is described in the README
        and ``tideflow.server._visibility``; an invalid query raises
        ``InvalidArgumentError`` naming the offending token.
        """
        token = b""
        while True:
            request = service_pb2.ListWorkflowExecutionsRequest(
                namespace=self.namespace, page_size=page_size, next_page_token=token, query=query
            )
            response = await self.call(self.service.ListWorkflowExecutions, request)
            for info in response.executions:
                yield WorkflowExecution.from_info(info, self.data_converter)
            token = response.next_page_token
            if not token:
                return

    async def count_workflows(self, query: str = "") -> int:
        """How many runs match ``query`` (no ORDER BY)."""
        request = service_pb2.CountWorkflowExecutionsRequest(namespace=self.namespace, query=query)
        response = await self.call(self.service.CountWorkflowExecutions, request)
        return int(response.count)

    # ----------------------------------------------------------- schedules

    async def create_schedule(
        self,
        id: str,
        schedule: Schedule | None = None,
        *,
        action: ScheduleActionStartWorkflow | None = None,
        spec: ScheduleSpec | None = None,
        policy: SchedulePolicy | None = None,
        state: ScheduleState | None = None,
        request_id: str | None = None,
    ) -> ScheduleHandle:
        """Create a schedule (see ``tideflow.worker_sdk.schedules``): pass a
        ``Schedule`` or its parts. Raises ``ScheduleAlreadyRunningError`` if the id is
        taken (unless this is a retry with the same ``request_id``)."""
        if schedule is None:
            if action is None or spec is None:
                raise TypeError("create_schedule needs a Schedule, or action= and spec=")
            schedule = Schedule(
                action=action,
                spec=spec,
                policy=policy or SchedulePolicy(),
                state=state or ScheduleState(),
            )
        request = service_pb2.CreateScheduleRequest(
            namespace=self.namespace,
            schedule_id=id,
            identity=self.identity,
            request_id=request_id or str(uuid.uuid4()),
        )
        request.schedule.CopyFrom(schedule.to_proto(self.data_converter))
        try:
            await self.call(self.service.CreateSchedule, request)
        except exc.AlreadyExistsError as error:
            raise ScheduleAlreadyRunningError(error.message, status=error.status) from None
        return ScheduleHandle(self, id)

    def get_schedule_handle(self, id: str) -> ScheduleHandle:
        """A handle to an existing schedule."""
        return ScheduleHandle(self, id)

    async def list_schedules(
        self, *, page_size: int = 1000
    ) -> AsyncIterator[ScheduleListDescription]:
        """Every schedule of the namespace, in id order."""
        token = b""
        while True:
            request = service_pb2.ListSchedulesRequest(
                namespace=self.namespace, maximum_page_size=page_size, next_page_token=token
            )
            response = await self.call(self.service.ListSchedules, request)
            for entry in response.schedules:
                yield ScheduleListDescription(
                    id=entry.schedule_id,
                    schedule=Schedule.from_proto(entry.schedule, self.data_converter),
                    info=ScheduleInfo.from_proto(entry.info),
                )
            token = response.next_page_token
            if not token:
                return

    # --------------------------------------------------------------- cluster

    async def describe_cluster(self) -> ClusterDescription:
        """The cluster's server nodes and every shard's lease, as the store has them
        (a server with auth on needs the admin role on every namespace, ``*:admin``)."""
        request = service_pb2.DescribeClusterRequest()
        return cluster_description(await self.call(self.service.DescribeCluster, request))

    # ------------------------------------------------------------------ DAGs

    async def start_dag(self, definition: Any, input: Any = None, **options: Any) -> Any:
        """Alias of ``dag.start_dag(client, definition, input, ...)``, which is typed
        and documents the options; returns a ``dag.DagHandle``. The DAG layer sits on
        top of the client, so it is imported only when called."""
        from .dag import start_dag

        return await start_dag(self, definition, input, **options)

    def get_dag_handle(self, id: str, *, run_id: str | None = None) -> Any:
        """Alias of ``dag.DagHandle(client, id)``: a handle to an existing DAG run."""
        from .dag import DagHandle

        return DagHandle(self, id, run_id=run_id)


# ------------------------------------------------------------------ visibility


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowExecution:
    """One run as ``Client.list_workflows`` returns it."""

    id: str
    run_id: str
    workflow_type: str
    task_queue: str
    status: WorkflowExecutionStatus
    start_time: datetime
    close_time: datetime | None
    history_length: int
    memo: dict[str, Any]
    search_attributes: dict[str, SearchAttributeValue]
    raw_info: service_pb2.WorkflowExecutionInfo

    @staticmethod
    def from_info(
        info: service_pb2.WorkflowExecutionInfo, converter: DataConverter
    ) -> WorkflowExecution:
        return WorkflowExecution(
            id=info.execution.workflow_id,
            run_id=info.execution.run_id,
            workflow_type=info.type.name,
            task_queue=info.task_queue,
            status=WorkflowExecutionStatus(info.status),
            start_time=info.start_time.ToDatetime(tzinfo=UTC),
            close_time=info.close_time.ToDatetime(tzinfo=UTC)
            if info.HasField("close_time")
            else None,
            history_length=info.history_length,
            memo={
                key: converter.payload_converter.from_payload(payload)
                for key, payload in info.memo.fields.items()
            },
            search_attributes={
                key: value
                for key, value in sorted(decode_search_attributes(info.search_attributes).items())
                if value is not None
            },
            raw_info=info,
        )


def _encode_memo(converter: DataConverter, memo: Mapping[str, Any]) -> common_pb2.Memo:
    proto = common_pb2.Memo()
    for key, value in memo.items():
        proto.fields[key].CopyFrom(converter.payload_converter.to_payload(value))
    return proto
