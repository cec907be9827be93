"""The ClusterService (cluster.proto): what a node asks of the owner of another run's
shard on its own behalf, served on the same port as the WorkflowService.

Every method first proves its caller is a node of this cluster (``require_node``:
the node credential of server/_peers.py), whatever the auth mode, since a client that
could record a child's close or start a run with a parent link could forge any run's
history. The owner serves the call only while it holds the target's shard; otherwise
it answers UNAVAILABLE and the calling node finds the new owner
(server/_run_gateway.py). Errors become statuses with their typed detail, as at the
frontend (a child id in use is ALREADY_EXISTS naming the run that holds it).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from tideflow.api.v1 import cluster_pb2, cluster_pb2_grpc
from tideflow.history import RunKey, StoreError

from ._cross_run import record_child_closed
from ._engine import HistoryEngine
from ._errors import ServiceError, UnavailableError, abort_with_detail
from ._peers import NodeCredential, require_node
from ._run_gateway import child_close_task, child_of, parent_of
from ._site_nodes import SiteNodes

log = logging.getLogger("tideflow.server.cluster")

_Context = grpc.aio.ServicerContext[Any, Any]
CLUSTER_SERVICE = cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"]
Req = TypeVar("Req")
Resp = TypeVar("Resp")


def _internal(
    method: Callable[[Any, Req, _Context], Awaitable[Resp]],
) -> Callable[[Any, Req, _Context], Awaitable[Resp]]:
    """Refuse callers that are not nodes, then translate errors into statuses."""

    @functools.wraps(method)
    async def wrapper(self: ClusterService, request: Req, context: _Context) -> Resp:
        try:
            await require_node(self.credential, context.invocation_metadata())
            return await method(self, request, context)
        except ServiceError as exc:
            await abort_with_detail(context, exc)
        except StoreError as exc:
            # The fence's refusal included: the caller looks for the new owner.
            await abort_with_detail(context, UnavailableError(f"history store: {exc}"))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("%s failed", method.__name__)
            await abort_with_detail(context, ServiceError(f"internal error in {method.__name__}"))
        raise AssertionError("unreachable")  # abort() always raises

    return wrapper


class ClusterService(cluster_pb2_grpc.ClusterServiceServicer):
    def __init__(self, engine: HistoryEngine, credential: NodeCredential) -> None:
        self._engine = engine
        self.credential = credential
        # The site's calls between its nodes (server/_site_nodes.py), once it exists.
        self.site_nodes: SiteNodes | None = None

    @_internal
    async def StartChildWorkflow(
        self, request: cluster_pb2.StartChildWorkflowRequest, context: _Context
    ) -> cluster_pb2.StartChildWorkflowResponse:
        run_id, _ = await self._engine.start_workflow(
            request.start,
            parent=parent_of(request),
            parent_initiated_event_id=request.parent_initiated_event_id,
        )
        return cluster_pb2.StartChildWorkflowResponse(run_id=run_id)

    @_internal
    async def RecordChildClosed(
        self, request: cluster_pb2.RecordChildClosedRequest, context: _Context
    ) -> cluster_pb2.RecordChildClosedResponse:
        parent = RunKey(
            namespace=request.parent_namespace,
            workflow_id=request.parent.workflow_id,
            run_id=request.parent.run_id,
        )
        task, child, close = child_close_task(request), child_of(request), request.close_event
        await self._engine.update(
            parent, "RecordChildClosed", lambda m: record_child_closed(m, task, child, close)
        )
        return cluster_pb2.RecordChildClosedResponse()

    @_internal
    async def SiteCall(
        self, request: cluster_pb2.SiteCallRequest, context: _Context
    ) -> cluster_pb2.SiteCallResponse:
        if self.site_nodes is None:
            raise UnavailableError("this node is not serving its site yet")
        return await self.site_nodes.serve(request)
