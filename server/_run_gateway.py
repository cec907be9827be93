"""What a run's transfers do to other runs, wherever those runs' shards are held.

A transfer row (server/_cross_run.py) acts on another run: it starts a child, records
a child's close on its parent, signals, cancels or terminates another run; a schedule
(server/_schedules.py ``ScheduledRuns``) starts, cancels and terminates its runs. That
run's shard may be held by another node of the cluster, so both act through this
gateway: each method runs the engine's entry point here while this node holds
the target's shard, and otherwise calls the owner (``Router.call``: the owner found
in the shard rows, retried through routing races within the router's budget):

- start (a schedule's run), signal, cancel and terminate: the public WorkflowService
  RPCs, with the node credential (server/_peers.py) and the forwarded mark (the owner
  serves them, never forwards them again), and the caller's own request ids, so a
  replayed row or schedule action acts once on whichever node it lands;
- starting a child with its parent link, and recording a child's close on its
  parent: the internal ClusterService (cluster.proto, server/_cluster_service.py),
  which only nodes may call.

The owner's refusals come back as the engine's own errors (FAILED_PRECONDITION: the
run closed; NOT_FOUND; ALREADY_EXISTS: a child id in use), so the transfer code reads
the same outcome whichever node acted.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message

from tideflow.api.v1 import (
    cluster_pb2,
    common_pb2,
    history_pb2,
    replication_pb2,
    service_pb2,
    state_pb2,
)
from tideflow.api.v1.replication_pb2 import ForwardedRequest
from tideflow.history import RunKey, TaskKind, TaskRow

from ._cross_run import child_closed_request, record_child_closed
from ._errors import (
    FailedPreconditionError,
    NotFoundError,
    NotHomeError,
    WorkflowAlreadyStartedError,
)
from ._peers import FORWARDED_HEADER, NodeCredential, Peer
from ._routing import RemoteStatusError, Router

if TYPE_CHECKING:
    from ._engine import HistoryEngine
    from ._remote_children import RemoteChildren

_CLUSTER_SERVICE = cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"].full_name
_WORKFLOW_SERVICE = service_pb2.DESCRIPTOR.services_by_name["WorkflowService"].full_name
# Deadline of one call to the owner (the router retries within its own budget).
_CALL_TIMEOUT_S = 30.0


class RunGateway:
    """Acts on a run here or on the owner of its shard (module docstring)."""

    def __init__(
        self,
        engine: HistoryEngine,
        router: Router | None = None,
        credential: NodeCredential | None = None,
    ) -> None:
        """Without ``router`` every run is acted on here (a node holding every shard,
        tests of the engine alone)."""
        self._engine = engine
        self._router = router
        self._credential = credential
        # A site's end of children homed at another site (server/_remote_children.py),
        # wired by the server once its sites exist; None: every child is homed here.
        self.remote_children: RemoteChildren | None = None

    async def start_child(
        self,
        req: service_pb2.StartWorkflowRequest,
        parent: state_pb2.MutableState,
        initiated_event_id: int,
        home: str = "",
    ) -> str:
        """Start a child run of ``parent`` (homed at site ``home``, default this one);
        its run id (an earlier attempt's, on a retry). WorkflowAlreadyStartedError if
        its id is taken."""

        async def local() -> cluster_pb2.StartChildWorkflowResponse:
            run_id, _ = await self._engine.start_workflow(
                req, parent=parent, parent_initiated_event_id=initiated_event_id
            )
            return cluster_pb2.StartChildWorkflowResponse(run_id=run_id)

        call = cluster_pb2.StartChildWorkflowRequest(
            start=req,
            parent_namespace=parent.namespace,
            parent=common_pb2.WorkflowExecution(
                workflow_id=parent.workflow_id, run_id=parent.run_id
            ),
            parent_initiated_event_id=initiated_event_id,
            parent_home_cluster=parent.home_cluster,
        )
        remote = self.remote_children
        if remote is not None and remote.elsewhere(home):
            return await remote.start(home, call)
        response = await self._route(
            req.namespace,
            req.workflow_id,
            local,
            f"/{_CLUSTER_SERVICE}/StartChildWorkflow",
            call,
            cluster_pb2.StartChildWorkflowResponse,
        )
        return str(response.run_id)

    async def record_child_closed(
        self,
        parent_key: RunKey,
        task: TaskRow,
        child: state_pb2.MutableState,
        close: history_pb2.HistoryEvent,
    ) -> None:
        """Record the close of ``child`` (its outbox row ``task``) on its parent."""

        async def local() -> None:
            await self._engine.update(
                parent_key,
                "RecordChildClosed",
                lambda m: record_child_closed(m, task, child, close),
            )

        call = child_closed_request(parent_key, task, child, close)
        await self._route(
            parent_key.namespace,
            parent_key.workflow_id,
            local,
            f"/{_CLUSTER_SERVICE}/RecordChildClosed",
            call,
            cluster_pb2.RecordChildClosedResponse,
        )

    async def signal(
        self,
        key: RunKey,
        name: str,
        payloads: common_pb2.Payloads | None,
        identity: str,
        request_id: str,
        header: common_pb2.Header | None,
        home: str = "",
    ) -> None:
        request = service_pb2.SignalWorkflowRequest(
            namespace=key.namespace,
            workflow_execution=_execution(key),
            signal_name=name,
            identity=identity,
            request_id=request_id,
        )
        if payloads is not None:
            request.input.CopyFrom(payloads)
        if header is not None:
            request.header.CopyFrom(header)
        await self._route(
            key.namespace,
            key.workflow_id,
            self._at_home(
                key,
                replication_pb2.ForwardedRequest(signal=request),
                lambda: self._engine.signal(key, name, payloads, identity, request_id, header),
                home,
            ),
            f"/{_WORKFLOW_SERVICE}/SignalWorkflow",
            request,
            service_pb2.SignalWorkflowResponse,
        )

    async def start_workflow(self, request: service_pb2.StartWorkflowRequest) -> str:
        """Start a run (a schedule's: ``request`` carries its request id, so a repeat
        finds the run it started); its run id."""

        async def local() -> str:
            run_id, _ = await self._engine.start_workflow(request)
            return run_id

        response: service_pb2.StartWorkflowResponse | str = await self._route(
            request.namespace,
            request.workflow_id,
            local,
            f"/{_WORKFLOW_SERVICE}/StartWorkflow",
            request,
            service_pb2.StartWorkflowResponse,
        )
        return response if isinstance(response, str) else response.run_id

    async def request_cancel(
        self, key: RunKey, identity: str, request_id: str, reason: str, home: str = ""
    ) -> None:
        request = service_pb2.RequestCancelWorkflowRequest(
            namespace=key.namespace,
            workflow_execution=_execution(key),
            identity=identity,
            request_id=request_id,
            reason=reason,
        )
        await self._route(
            key.namespace,
            key.workflow_id,
            self._at_home(
                key,
                replication_pb2.ForwardedRequest(cancel=request),
                lambda: self._engine.request_cancel(key, identity, request_id, reason),
                home,
            ),
            f"/{_WORKFLOW_SERVICE}/RequestCancelWorkflow",
            request,
            service_pb2.RequestCancelWorkflowResponse,
        )

    async def terminate(
        self, key: RunKey, reason: str, identity: str, request_id: str, home: str = ""
    ) -> None:
        request = service_pb2.TerminateWorkflowRequest(
            namespace=key.namespace,
            workflow_execution=_execution(key),
            reason=reason,
            identity=identity,
            request_id=request_id,
        )
        await self._route(
            key.namespace,
            key.workflow_id,
            self._at_home(
                key,
                replication_pb2.ForwardedRequest(terminate=request),
                lambda: self._engine.terminate(key, reason, None, identity, request_id),
                home,
            ),
            f"/{_WORKFLOW_SERVICE}/TerminateWorkflow",
            request,
            service_pb2.TerminateWorkflowResponse,
        )

    def _at_home(
        self,
        key: RunKey,
        forwarded: ForwardedRequest,
        act: Callable[[], Awaitable[Any]],
        home: str = "",
    ) -> Callable[[], Awaitable[None]]:
        """``act`` on this node, or, for a run homed at another site (a replica here),
        ``forwarded`` into this site's inbox: delivered to the home and applied there
        exactly once by its request id, as a client's request to a replica is.
        ``home``: the run is known to be homed at that site (a child homed elsewhere),
        straight into the inbox, even before this site holds its replica."""

        async def here() -> None:
            redirect = self._engine.redirect_to_home
            remote = self.remote_children
            if redirect is not None and remote is not None and remote.elsewhere(home):
                await redirect(forwarded, key, NotHomeError(home, key))
                return
            try:
                await act()
            except NotHomeError as error:
                if redirect is None:
                    raise
                await redirect(forwarded, key, error)

        return here

    async def _route(
        self,
        namespace: str,
        workflow_id: str,
        local: Callable[[], Awaitable[Any]],
        path: str,
        request: Message,
        response_type: type[Message],
    ) -> Any:
        """``local()`` here while this node holds the shard of ``workflow_id``, else
        ``request`` on the owner at ``path`` (its response)."""
        router = self._router
        if router is None:
            return await local()

        async def remote(owner: Peer) -> Any:
            assert self._credential is not None, "a routed gateway needs the node credential"
            metadata = (*await self._credential.metadata(), (FORWARDED_HEADER, router.node_id))
            try:
                return await router.invoke(
                    owner,
                    path,
                    request,
                    response_type,
                    timeout=_CALL_TIMEOUT_S,
                    metadata=metadata,
                )
            except RemoteStatusError as exc:
                raise _local_error(exc) from None

        return await router.call(namespace, workflow_id, local, remote, None)


def _execution(key: RunKey) -> common_pb2.WorkflowExecution:
    return common_pb2.WorkflowExecution(workflow_id=key.workflow_id, run_id=key.run_id)


def _local_error(error: RemoteStatusError) -> Exception:
    """The engine's error for the owner's refusal, as the transfer code expects it."""
    detail = error.detail()
    if error.code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPreconditionError(error.message)
    if error.code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(error.message)
    if detail.HasField("workflow_already_started"):
        started = detail.workflow_already_started
        return WorkflowAlreadyStartedError(
            error.message, workflow_id=started.workflow_id, run_id=started.run_id
        )
    return error


def child_close_task(request: cluster_pb2.RecordChildClosedRequest) -> TaskRow:
    """The child's outbox row a RecordChildClosed call names (deleted by the parent's
    commit, as when both runs are on one node)."""
    return TaskRow(
        key=RunKey(
            namespace=request.child_namespace,
            workflow_id=request.child.workflow_id,
            run_id=request.child.run_id,
        ),
        task_queue=request.transfer_action,
        kind=TaskKind.TRANSFER,
        ref_id=request.ref_id,
        attempt=request.attempt,
        created_at=request.created_at,
    )


def child_of(request: cluster_pb2.RecordChildClosedRequest) -> state_pb2.MutableState:
    """What recording a child's close reads of the child's state."""
    return state_pb2.MutableState(
        namespace=request.child_namespace,
        workflow_id=request.child.workflow_id,
        run_id=request.child.run_id,
        first_execution_run_id=request.child_first_execution_run_id,
        parent_initiated_event_id=request.parent_initiated_event_id,
    )


def parent_of(request: cluster_pb2.StartChildWorkflowRequest) -> state_pb2.MutableState:
    """What starting a child reads of its parent's state."""
    return state_pb2.MutableState(
        namespace=request.parent_namespace,
        workflow_id=request.parent.workflow_id,
        run_id=request.parent.run_id,
        home_cluster=request.parent_home_cluster,
    )
