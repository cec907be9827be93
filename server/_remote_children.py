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
from collections.abc import Callable
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
    WorkflowAlreadyStartedError,
)
from ._run_gateway import child_close_task, child_of, parent_of
from ._site_link import Handler, LinkDown, SiteLink, message_of

if TYPE_CHECKING:
    from ._engine import HistoryEngine

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
    ) -> None:
        self._engine = engine
        self.site = site
        self._link_to = link_to
        self.handlers: dict[str, Handler] = {
            "start_child": self._serve_start,
            "child_closed": self._serve_closed,
        }

    def elsewhere(self, home: str) -> bool:
        """Whether ``home`` names a site other than this one (empty: this one)."""
        return bool(home) and home != self.site

    async def _call(self, home: str, method: str, request: Message) -> rp.ForwardedResponse:
        link = self._link_to(home)
        if link is None:
            raise LinkPendingError(f"no link to site {home!r} now: {method} waits for it")
        try:
            return await link.call(method, request, rp.ForwardedResponse)
        except LinkDown as error:
            raise LinkPendingError(f"{method} at site {home!r}: {error}") from None

    async def start(self, home: str, request: cluster_pb2.StartChildWorkflowRequest) -> str:
        """Start the child at ``home``; its run id (the run of this request id if it
        was started before; with ``only_if_started``, that run or "").
        WorkflowAlreadyStartedError if its id is taken there; LinkPendingError while
        the link is down (the transfer row waits)."""
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
        if request.only_if_started:
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
