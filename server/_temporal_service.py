"""The Temporal door: ``temporal.api.workflowservice.v1.WorkflowService`` on the same port as
tideflow's own service, so the official Temporal SDKs and the ``temporal`` CLI run
against tideflow unchanged (README, "Using the Temporal SDKs").

It keeps no state of its own. A Temporal request is translated field by field into
tideflow's request (server/_temporal_wire.py) and handed to the frontend's handler of
the same RPC, in-process: authentication, bounds, namespace checks, routing to the
run's shard owner, audit lines and the engine call are the frontend's, so a run has one
history whichever door wrote it. The answer is translated back, and an error is
reshaped into Temporal's status details (server/_temporal_errors.py).

What tideflow cannot represent (workflow updates, Nexus, worker versioning, start
delays, ...) is refused with UNIMPLEMENTED or INVALID_ARGUMENT naming it, never dropped:
the SDK replays what it sent. RPCs not served here are UNIMPLEMENTED (gRPC's own
answer for an unregistered method).

The generated modules come from the ``temporalio`` wheel (extra ``tideflow[temporal]``);
this module is imported only when it is installed (``serve_temporal_api``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message
from temporalio.api.enums.v1 import command_type_pb2, task_queue_pb2
from temporalio.api.enums.v1 import namespace_pb2 as namespace_enums
from temporalio.api.enums.v1 import workflow_pb2 as workflow_enums
from temporalio.api.errordetails.v1 import message_pb2 as details_pb2
from temporalio.api.namespace.v1 import message_pb2 as namespace_pb2
from temporalio.api.workflowservice.v1 import request_response_pb2 as tw
from temporalio.api.workflowservice.v1 import service_pb2 as temporal_service_pb2

import tideflow
from tideflow.api.v1 import common_pb2
from tideflow.api.v1 import service_pb2 as tf
from tideflow.history import HistoryStore, StoreError

from . import _temporal_wire as wire
from ._errors import ServiceError
from ._frontend import WorkflowService
from ._registration import add_to_server
from ._task_tokens import TaskTokenSigner
from ._temporal_by_id import BY_ID, attempt_token, by_token, response_class
from ._temporal_errors import (
    REFUSED_RPCS,
    Aborted,
    CapturingContext,
    Refused,
    abort,
    reshaped,
    unsupported,
    untranslatable,
)
from ._temporal_history import reverse_page

log = logging.getLogger("tideflow.server.temporal")

_Context = grpc.aio.ServicerContext[Any, Any]
SERVICE = temporal_service_pb2.DESCRIPTOR.services_by_name["WorkflowService"]
# Retention reported for namespaces registered without one (Temporal requires a value).
_DEFAULT_RETENTION_S = 3 * 24 * 3600


@dataclass(frozen=True)
class _Route:
    """A Temporal RPC served by the frontend handler ``rpc`` of tideflow's service."""

    rpc: str
    request: type[Message]
    response: type[Message]


# Temporal RPC -> the tideflow RPC that does the same thing.
_ROUTES: dict[str, _Route] = {
    "StartWorkflowExecution": _Route(
        "StartWorkflow", tf.StartWorkflowRequest, tw.StartWorkflowExecutionResponse
    ),
    # tideflow's start request carries the signal of a signal-with-start.
    "SignalWithStartWorkflowExecution": _Route(
        "StartWorkflow", tf.StartWorkflowRequest, tw.SignalWithStartWorkflowExecutionResponse
    ),
    "GetWorkflowExecutionHistory": _Route(
        "GetHistory", tf.GetHistoryRequest, tw.GetWorkflowExecutionHistoryResponse
    ),
    "DescribeWorkflowExecution": _Route(
        "DescribeWorkflow", tf.DescribeWorkflowRequest, tw.DescribeWorkflowExecutionResponse
    ),
    "TerminateWorkflowExecution": _Route(
        "TerminateWorkflow", tf.TerminateWorkflowRequest, tw.TerminateWorkflowExecutionResponse
    ),
    "SignalWorkflowExecution": _Route(
        "SignalWorkflow", tf.SignalWorkflowRequest, tw.SignalWorkflowExecutionResponse
    ),
    "RequestCancelWorkflowExecution": _Route(
        "RequestCancelWorkflow",
        tf.RequestCancelWorkflowRequest,
        tw.RequestCancelWorkflowExecutionResponse,
    ),
    "QueryWorkflow": _Route("QueryWorkflow", tf.QueryWorkflowRequest, tw.QueryWorkflowResponse),
    "RespondQueryTaskCompleted": _Route(
        "RespondQueryTaskCompleted",
        tf.RespondQueryTaskCompletedRequest,
        tw.RespondQueryTaskCompletedResponse,
    ),
    "PollWorkflowTaskQueue": _Route(
        "PollWorkflowTask", tf.PollWorkflowTaskRequest, tw.PollWorkflowTaskQueueResponse
    ),
    "RespondWorkflowTaskCompleted": _Route(
        "RespondWorkflowTaskCompleted",
        tf.RespondWorkflowTaskCompletedRequest,
        tw.RespondWorkflowTaskCompletedResponse,
    ),
    "RespondWorkflowTaskFailed": _Route(
        "RespondWorkflowTaskFailed",
        tf.RespondWorkflowTaskFailedRequest,
        tw.RespondWorkflowTaskFailedResponse,
    ),
    "PollActivityTaskQueue": _Route(
        "PollActivityTask", tf.PollActivityTaskRequest, tw.PollActivityTaskQueueResponse
    ),
    "RespondActivityTaskCompleted": _Route(
        "RespondActivityTaskCompleted",
        tf.RespondActivityTaskCompletedRequest,
        tw.RespondActivityTaskCompletedResponse,
    ),
    "RespondActivityTaskFailed": _Route(
        "RespondActivityTaskFailed",
        tf.RespondActivityTaskFailedRequest,
        tw.RespondActivityTaskFailedResponse,
    ),
    "RespondActivityTaskCanceled": _Route(
        "RespondActivityTaskCanceled",
        tf.RespondActivityTaskCanceledRequest,
        tw.RespondActivityTaskCanceledResponse,
    ),
    "RecordActivityTaskHeartbeat": _Route(
        "RecordActivityHeartbeat",
        tf.RecordActivityHeartbeatRequest,
        tw.RecordActivityTaskHeartbeatResponse,
    ),
    "ListWorkflowExecutions": _Route(
        "ListWorkflowExecutions",
        tf.ListWorkflowExecutionsRequest,
        tw.ListWorkflowExecutionsResponse,
    ),
    # A scan is a list without an order guarantee: tideflow's order is a fine one.
    "ScanWorkflowExecutions": _Route(
        "ListWorkflowExecutions",
        tf.ListWorkflowExecutionsRequest,
        tw.ScanWorkflowExecutionsResponse,
    ),
    "CountWorkflowExecutions": _Route(
        "CountWorkflowExecutions",
        tf.CountWorkflowExecutionsRequest,
        tw.CountWorkflowExecutionsResponse,
    ),
    "ShutdownWorker": _Route("ShutdownWorker", tf.ShutdownWorkerRequest, tw.ShutdownWorkerResponse),
}

# Commands of features tideflow does not have, by the feature's name.
_REFUSED_COMMANDS = {
    command_type_pb2.COMMAND_TYPE_PROTOCOL_MESSAGE: "workflow updates (protocol messages)",
    command_type_pb2.COMMAND_TYPE_MODIFY_WORKFLOW_PROPERTIES: "upserting a workflow's memo",
    command_type_pb2.COMMAND_TYPE_SCHEDULE_NEXUS_OPERATION: "Nexus operations",
    command_type_pb2.COMMAND_TYPE_REQUEST_CANCEL_NEXUS_OPERATION: "Nexus operations",
}

_CHILD_REUSE_POLICIES = (
    workflow_enums.WORKFLOW_ID_REUSE_POLICY_UNSPECIFIED,
    workflow_enums.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE,
)


def _check_start(request: Any) -> None:
    if request.HasField("versioning_override"):
        raise unsupported("worker versioning (versioning_override)")
    if request.HasField("workflow_start_delay"):
        raise unsupported("a delayed start (workflow_start_delay)")


def _check_task_completed(request: tw.RespondWorkflowTaskCompletedRequest) -> None:
    for command in request.commands:
        feature = _REFUSED_COMMANDS.get(command.command_type)
        if feature is not None:
            raise unsupported(feature)
        if command.HasField("start_child_workflow_execution_command_attributes"):
            child = command.start_child_workflow_execution_command_attributes
            # tideflow starts a child as ALLOW_DUPLICATE does (the SDK's default).
            if child.workflow_id_reuse_policy not in _CHILD_REUSE_POLICIES:
                raise unsupported("a child workflow's workflow_id_reuse_policy")
            child.ClearField("workflow_id_reuse_policy")
    if request.messages:
        raise unsupported("workflow updates (protocol messages)")
    # sdk_metadata (the SDK's behaviour flags, name and version) is translated and kept
    # in the WorkflowTaskCompleted event, where a replay reads the flags back.
    # A next workflow task handed back in the answer would lack the run's queue, which
    # the core requires on every task; declined, it is dispatched like any other.
    request.return_new_workflow_task = False


_CHECKS: dict[str, Callable[[Any], None]] = {
    "StartWorkflowExecution": _check_start,
    "SignalWithStartWorkflowExecution": _check_start,
    "RespondWorkflowTaskCompleted": _check_task_completed,
}


def _complete_workflow_task(request: Any, response: Any) -> None:
    # Temporal names the run's own (normal) queue with each task; the core refuses a
    # task without it. A sticky poll names it as its normal_name.
    if response.task_token:
        queue = request.task_queue
        response.workflow_execution_task_queue.name = queue.normal_name or queue.name
        response.workflow_execution_task_queue.kind = task_queue_pb2.TASK_QUEUE_KIND_NORMAL


def _complete_description(request: Any, response: Any) -> None:
    # tideflow keeps the start time of an attempt only while it runs (a retry clears it).
    for pending in response.pending_activities:
        pending.state = (
            workflow_enums.PENDING_ACTIVITY_STATE_STARTED
            if pending.HasField("last_started_time")
            else workflow_enums.PENDING_ACTIVITY_STATE_SCHEDULED
        )


_COMPLETIONS: dict[str, Callable[[Any, Any], None]] = {
    "PollWorkflowTaskQueue": _complete_workflow_task,
    "DescribeWorkflowExecution": _complete_description,
}


# RPCs that may name a chain of runs by its first run (``first_execution_run_id``).
_CHAIN_RPCS = frozenset({"RequestCancelWorkflowExecution", "TerminateWorkflowExecution"})


class TemporalWorkflowService:
    """The Temporal RPCs this door serves; each routed one is an attribute named after
    it (``add_to_server`` registers what exists, the rest is UNIMPLEMENTED)."""

    def __init__(
        self, frontend: WorkflowService, store: HistoryStore, tokens: TaskTokenSigner
    ) -> None:
        self._frontend = frontend
        self._store = store
        self._tokens = tokens  # seals the tokens of activity calls by id

    def __getattr__(self, name: str) -> Callable[[Message, _Context], Awaitable[Message]]:
        route = _ROUTES.get(name)
        if route is not None:
            return functools.partial(self._routed, name, route)
        base = BY_ID.get(name)
        if base is not None:
            return functools.partial(self._by_id, name, base)
        feature = REFUSED_RPCS.get(name)
        if feature is not None:
            return functools.partial(_refuse, name, feature)
        raise AttributeError(name)

    async def _routed(self, name: str, route: _Route, request: Message, context: _Context) -> Any:
        return await _served(name, context, lambda: self._call(name, route, request, context))

    async def _call(self, name: str, route: _Route, request: Message, context: _Context) -> Any:
        """The frontend's answer to ``request``, both ways translated."""
        check = _CHECKS.get(name)
        if check is not None:
            check(request)
        if name in _CHAIN_RPCS:
            await self._pin_chain(request, context)
        tideflow_request = wire.converted(request, route.request, strict=True)
        handler = getattr(self._frontend, route.rpc)
        response = await handler(tideflow_request, _frontend_context(context))
        try:
            answer = wire.converted(response, route.response, strict=False)
        except wire.Untranslatable as exc:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{exc.path}: {exc.why}; a Temporal SDK could not replay it",
            ) from exc
        complete = _COMPLETIONS.get(name)
        if complete is not None:
            complete(request, answer)
        return answer

    async def _by_id(self, name: str, base: str, request: Any, context: _Context) -> Any:
        """An activity call naming the activity by id: the same call with the task token
        of the activity's current attempt."""

        async def work() -> Message:
            described = await self._frontend.DescribeWorkflow(
                tf.DescribeWorkflowRequest(
                    namespace=request.namespace,
                    execution=common_pb2.WorkflowExecution(
                        workflow_id=request.workflow_id, run_id=request.run_id
                    ),
                ),
                _frontend_context(context),
            )
            token = await attempt_token(described, request, self._tokens)
            answer = await self._call(base, _ROUTES[base], by_token(request, base, token), context)
            return wire.converted(answer, response_class(name), strict=False)

        return await _served(name, context, work)

    async def _pin_chain(self, request: Any, context: _Context) -> None:
        """``first_execution_run_id``: act on the workflow id's current run only if it
        belongs to the chain that run started (a newer start of the id is left alone).
        The check names the current run, so the frontend acts on exactly that one."""
        chain = request.first_execution_run_id
        request.ClearField("first_execution_run_id")
        execution = request.workflow_execution
        if not chain or execution.run_id:
            return  # a named run is at least as precise as its chain
        ours = _frontend_context(context)
        described = await self._frontend.DescribeWorkflow(
            tf.DescribeWorkflowRequest(
                namespace=request.namespace,
                execution=common_pb2.WorkflowExecution(workflow_id=execution.workflow_id),
            ),
            ours,
        )
        current = described.workflow_execution_info.execution.run_id
        page = await self._frontend.GetHistory(
            tf.GetHistoryRequest(
                namespace=request.namespace,
                execution=common_pb2.WorkflowExecution(
                    workflow_id=execution.workflow_id, run_id=current
                ),
                maximum_page_size=1,
            ),
            ours,
        )
        started = page.history.events[0].workflow_execution_started_event_attributes
        if started.first_execution_run_id != chain:
            raise Refused(
                grpc.StatusCode.NOT_FOUND,
                f"workflow {execution.workflow_id!r} has no open run of the chain {chain}",
                details_pb2.NotFoundFailure(),
            )
        execution.run_id = current

    async def GetSystemInfo(
        self, request: tw.GetSystemInfoRequest, context: _Context
    ) -> tw.GetSystemInfoResponse:
        # Only what tideflow stores and answers alike. sdk_metadata: the SDK's flags are
        # kept in WorkflowTaskCompleted events. Without it the core could record none,
        # and replays would take the old paths of behaviours the first run took the new
        # way (e.g. commands after a workflow's completion: moved before it when live,
        # cut off on replay). No eager start.
        capabilities = tw.GetSystemInfoResponse.Capabilities(
            signal_and_query_header=True,
            internal_error_differentiation=True,
            activity_failure_include_heartbeat=True,
            sdk_metadata=True,
        )
        return tw.GetSystemInfoResponse(
            server_version=f"tideflow {tideflow.__version__}", capabilities=capabilities
        )

    async def DescribeNamespace(
        self, request: tw.DescribeNamespaceRequest, context: _Context
    ) -> Any:
        async def work() -> Message:
            name = request.namespace or request.id
            if not name:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "namespace is empty")
            for row in await self._store.list_namespaces():
                if row[0] == name:
                    return _namespace_response(*row)
            raise Refused(
                grpc.StatusCode.NOT_FOUND,
                f"namespace not found: {name!r}",
                details_pb2.NamespaceNotFoundFailure(namespace=name),
            )

        return await _served("DescribeNamespace", context, work)

    async def ListNamespaces(self, request: tw.ListNamespacesRequest, context: _Context) -> Any:
        async def work() -> Message:
            # A handful of rows: one page, whatever page size was asked for.
            rows = await self._store.list_namespaces()
            return tw.ListNamespacesResponse(namespaces=[_namespace_response(*row) for row in rows])

        return await _served("ListNamespaces", context, work)

    async def GetWorkflowExecutionHistoryReverse(
        self, request: tw.GetWorkflowExecutionHistoryReverseRequest, context: _Context
    ) -> Any:
        return await _served(
            "GetWorkflowExecutionHistoryReverse",
            context,
            lambda: reverse_page(self._frontend, request, _frontend_context(context)),
        )

    async def ShutdownWorker(self, request: tw.ShutdownWorkerRequest, context: _Context) -> Any:
        if not request.sticky_task_queue:
            # A worker without a sticky cache: nothing of it to retire.
            return tw.ShutdownWorkerResponse()
        return await self._routed("ShutdownWorker", _ROUTES["ShutdownWorker"], request, context)

    async def RegisterNamespace(
        self, request: tw.RegisterNamespaceRequest, context: _Context
    ) -> Any:
        async def work() -> Message:
            # Clusters, archival and ownership are Temporal deployment settings that a
            # single-region tideflow has no use for; they are not stored.
            ours = tf.RegisterNamespaceRequest(
                namespace=request.namespace, description=request.description
            )
            ours.workflow_execution_retention_period.CopyFrom(
                request.workflow_execution_retention_period
            )
            await self._frontend.RegisterNamespace(ours, _frontend_context(context))
            return tw.RegisterNamespaceResponse()

        return await _served("RegisterNamespace", context, work)


def _namespace_response(
    name: str, description: str, retention_s: int
) -> tw.DescribeNamespaceResponse:
    info = namespace_pb2.NamespaceInfo(
        name=name,
        id=name,
        description=description,
        state=namespace_enums.NAMESPACE_STATE_REGISTERED,
    )
    config = namespace_pb2.NamespaceConfig()
    config.workflow_execution_retention_ttl.FromSeconds(retention_s or _DEFAULT_RETENTION_S)
    return tw.DescribeNamespaceResponse(namespace_info=info, config=config)


async def _refuse(name: str, feature: str, request: Message, context: _Context) -> Any:
    """A Temporal RPC of a feature tideflow does not have: UNIMPLEMENTED, naming it."""
    return await _served(name, context, _raise(unsupported(feature)))


def _raise(refusal: Refused) -> Callable[[], Awaitable[Message]]:
    async def work() -> Message:
        raise refusal

    return work


def _frontend_context(context: _Context) -> Any:
    """The caller's context for a frontend handler: its aborts come back here."""
    return CapturingContext(context)


async def _served(name: str, context: _Context, work: Callable[[], Awaitable[Message]]) -> Any:
    """``work()``'s answer, or its failure as a Temporal-shaped status."""
    try:
        return await work()
    except wire.Untranslatable as exc:
        refusal = untranslatable(exc)
    except Aborted as exc:
        refusal = reshaped(exc)
    except Refused as exc:
        refusal = exc
    except ServiceError as exc:
        refusal = Refused(exc.code, exc.message)
    except StoreError as exc:
        refusal = Refused(grpc.StatusCode.UNAVAILABLE, f"history store unavailable: {exc}")
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception:
        # As the frontend does: logged here, no details to the caller.
        log.exception("Temporal API: %s failed", name)
        refusal = Refused(grpc.StatusCode.INTERNAL, f"internal error in {name}")
    await abort(context, refusal)
    raise AssertionError("unreachable")  # abort() always raises


def serve_temporal_api(
    frontend: WorkflowService, store: HistoryStore, tokens: TaskTokenSigner, server: Any
) -> None:
    """Register the Temporal door on ``server`` (a ``grpc.aio.Server``)."""
    add_to_server(TemporalWorkflowService(frontend, store, tokens), server, SERVICE)
