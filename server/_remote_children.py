"""Children homed at another site: their start and their close cross the sites' link.

A workflow may start a child whose home is the other site
(``workflow.start_child_workflow(..., home="cloud")``). The parent's home records
START_CHILD_WORKFLOW_EXECUTION_INITIATED as for any child, with the transfer row that
starts it (server/_cross_run.py). That row is the durable "to send" of the start: its
action calls ``start_child`` over the link to the child's home, with the request id
derived from the parent run and the initiated event (``{parent run}:child:{event}``),
so however often the row is replayed, or the call repeated after a lost reply, the
child's home starts one run (a start finds the run of its own request id). The answer,
a run id or the reason it could not start (its id in use), is recorded on the parent
as CHILD_WORKFLOW_EXECUTION_STARTED or START_CHILD_WORKFLOW_EXECUTION_FAILED, which
deletes the row in the same transaction; a second answer finds the child recorded and
changes nothing. While the link is down the call fails at once and the row waits
(``LinkPendingError``: retried, not a slot held), so nothing else waits for it.

A row of a run on any node of a site of several nodes calls over the link whichever
node holds it (``SiteNodes.over_link``, server/_site_nodes.py); the serving site
applies the start and the close on the owner of the child's, or the parent's, shard
(``RunGateway``, routed like any run-keyed call), whichever node holds its link.

A parent that closes before it heard its child's start keeps the row, and the row
sends the start itself: a call that got no answer (lost with the link, or C slower
than the call's 60 s timeout on a link that stays up) may have started the child or
may start it yet, so no answer, not even "not started", is definite. The run it
hears of, started by then or by this call, gets the parent's close policy
(server/_cross_run.py ``_started_elsewhere_before_close``; tla/RemoteChild.tla).

The child's home keeps where its parent lives (``MutableState.parent_home_cluster``).
Its close writes the usual CHILD_CLOSED transfer row in its own outbox; that row's
action sends the close over the link (``child_closed``) and is deleted only once the
parent's home answered, so a close while the link is down, or a SIGKILL of either
side, delivers it when the link is back. The parent's home records the child's
outcome once (a repeat finds the child no longer pending).

Parent-close policies and a cancel of the child from the parent go through the site
inbox (server/_inbox.py) aimed at the child's home, with request ids derived from the
parent run and event, exactly once like a client's request to a replica.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from google.protobuf.message import Message

from tideflow.api.v1 import cluster_pb2, service_pb2
from tideflow.api.v1 import replication_pb2 as rp
from tideflow.history import RunKey

from ._errors import (
    FailedPreconditionError,
    LinkPendingError,
    NotFoundError,
    NotHomeError,
    UnknownSiteError,
    WorkflowAlreadyStartedError,
)
from ._run_gateway import child_close_task, child_of, parent_of
from ._site_link import Handler, LinkDown, SiteLink, message_of

if TYPE_CHECKING:
    from ._engine import HistoryEngine
    from ._site_nodes import SiteNodes

log = logging.getLogger("tideflow.server.sites")

# Outcomes of the two calls (rp.ForwardedResponse.outcome).
APPLIED = "applied"
ALREADY_STARTED = "already_started"
NOT_FOUND = "not_found"
NOT_HOME = "not_home"
NOT_STARTED = "not_started"


class RemoteChildren:
    """This site's end of children homed at, or parents homed at, another site."""

    def __init__(
        self,
        engine: HistoryEngine,
        site: str,
        link_to: Callable[[str], SiteLink | None],
        nodes: SiteNodes,
        unknown_site: Callable[[str], Awaitable[str]],
    ) -> None:
        self._engine = engine
        self.site = site
        self._link_to = link_to
        self._nodes = nodes
        # Why a home is refused ("" if not): server/_sites.py ``Sites.unknown_site``.
        self._unknown_site = unknown_site
        self.handlers: dict[str, Handler] = {
            "start_child": self._serve_start,
            "child_closed": self._serve_closed,
        }

    def elsewhere(self, home: str) -> bool:
        """Whether ``home`` names a site other than this one (empty: this one)."""
        return bool(home) and home != self.site

    async def _call(self, home: str, method: str, request: Message) -> rp.ForwardedResponse:
        """``method`` at ``home`` over the link this node holds, or the one another node
        of this site holds (``SiteNodes.over_link``): the rows of runs on any node's
        shards reach the peer. LinkPendingError while no node holds one, or the call
        failed on the way (the row is tried again)."""
        try:
            reply = await self._nodes.over_link(
                self._link_to(home), home, method, request, rp.ForwardedResponse
            )
        except LinkDown as error:
            raise LinkPendingError(f"{method} at site {home!r}: {error}") from None
        except Exception as error:  # the node holding the link died, or dropped it
            log.info("%s at site %s over another node's link: %s", method, home, error)
            raise LinkPendingError(f"{method} at site {home!r}: {error}") from None
        if reply is None:
            raise LinkPendingError(f"no link to site {home!r} now: {method} waits for it")
        return reply

    async def start(self, home: str, request: cluster_pb2.StartChildWorkflowRequest) -> str:
        """Start the child at ``home``; its run id (the run of this request id if it
        was started before; with ``only_if_started``, which this site no longer
        sends, that run or "").
        WorkflowAlreadyStartedError if its id is taken there; LinkPendingError while
        the link is down (the transfer row waits). UnknownSiteError if this site
        knows of no site ``home`` (the parent records the start as failed)."""
        refusal = await self._unknown_site(home)
        if refusal:
            raise UnknownSiteError(f"home {refusal}")
        request.parent_home_cluster = self.site
        reply = await self._call(home, "start_child", request)
        if reply.outcome == NOT_STARTED:
            return ""
        if reply.outcome == ALREADY_STARTED:
            raise WorkflowAlreadyStartedError(
                reply.detail, workflow_id=request.start.workflow_id, run_id=reply.run_id
            )
        if reply.outcome != APPLIED:
            raise LinkPendingError(f"start_child at site {home!r}: {reply.detail}")
        return str(reply.run_id)

    async def report_closed(self, home: str, request: cluster_pb2.RecordChildClosedRequest) -> None:
        """Record a child's close on its parent at ``home``. NotFoundError if the parent
        is gone there; LinkPendingError while it cannot be recorded yet."""
        reply = await self._call(home, "child_closed", request)
        if reply.outcome == NOT_FOUND:
            raise NotFoundError(reply.detail)
        if reply.outcome != APPLIED:
            raise LinkPendingError(f"child_closed at site {home!r}: {reply.detail}")

    async def _serve_start(self, link: SiteLink, body: bytes) -> rp.ForwardedResponse:
        """The peer's parent starts a child homed here."""
        request = message_of(body, cluster_pb2.StartChildWorkflowRequest)
        request.parent_home_cluster = request.parent_home_cluster or link.peer
        if request.only_if_started:  # a peer of an earlier version asking
            return await self._started_before(request.start)
        try:
            run_id = await self._engine.gateway.start_child(
                request.start, parent_of(request), request.parent_initiated_event_id
            )
        except WorkflowAlreadyStartedError as error:
            return rp.ForwardedResponse(
                outcome=ALREADY_STARTED, detail=str(error), run_id=error.run_id or ""
            )
        return rp.ForwardedResponse(outcome=APPLIED, run_id=run_id, started=True)

    async def _started_before(
        self, start: service_pb2.StartWorkflowRequest
    ) -> rp.ForwardedResponse:
        """The run a delivery of ``start``'s request id started, if any."""
        try:
            key = await self._engine.resolve_run_id(start.namespace, start.workflow_id, "")
            state = await self._engine.state_of(key)
        except NotFoundError:
            return rp.ForwardedResponse(outcome=NOT_STARTED)
        if state.start_request_id != start.request_id:
            return rp.ForwardedResponse(outcome=NOT_STARTED)
        return rp.ForwardedResponse(outcome=APPLIED, run_id=key.run_id)

    async def _serve_closed(self, link: SiteLink, body: bytes) -> rp.ForwardedResponse:
        """A child homed at the peer closed: record it on its parent, homed here."""
        request = message_of(body, cluster_pb2.RecordChildClosedRequest)
        parent = RunKey(
            namespace=request.parent_namespace,
            workflow_id=request.parent.workflow_id,
            run_id=request.parent.run_id,
        )
        try:
            await self._engine.gateway.record_child_closed(
                parent, child_close_task(request), child_of(request), request.close_event
            )
        except NotHomeError as error:
            return rp.ForwardedResponse(outcome=NOT_HOME, detail=error.home)
        except (NotFoundError, FailedPreconditionError) as error:
            return rp.ForwardedResponse(outcome=NOT_FOUND, detail=error.message)
        return rp.ForwardedResponse(outcome=APPLIED)
