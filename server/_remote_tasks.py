"""Placement across sites: an activity task of a run homed here, run by a worker of
the site at the other end of a link (tla/Replication.tla: only the home writes).

The home keeps the task where every task is, in its store and its matching backlog,
until it is recorded started. A waiting task with a placement that no worker seen
polling its queue here meets (``Matching.offerable``: a ``placement="cloud"`` task at
an edge, an ``auto`` task needing a label only the cloud's workers have) is *offered*
to every linked peer (method "offer"): the peer holds it in memory as a
``RemoteTaskRow`` in the same queue's backlog and hands it only to its own pollers
that meet it. A peer poller taking it asks the home to record it started (method
"start_remote"): the home takes the task out of its backlog (so no local poller gets
it too; if it is gone, started elsewhere, the peer's poller is told and polls on),
records ActivityTaskStarted with the worker's site and tier, and answers with the
poll response whose token it sealed. The peer hands the worker a token of its own
that carries the home's (``TaskToken.home_site`` / ``home_token``); the worker's
RespondActivityTaskCompleted/Failed/Canceled and heartbeats at the peer are forwarded
to the home (method "activity_response"), which checks and applies the home's token
as for any worker: a completion forwarded twice is applied once (the second finds the
attempt closed: NOT_FOUND). An answer reaching a site that handed the task's run to
another site since (server/_handoff.py) is forwarded the same way to the run's new
home, with the token it opened (``former_home``): sites' tokens are sealed under
each site's own keys, and the link is a trusted, admin-authenticated channel.

Both ends of a link do both roles (an edge offers to its cloud, the cloud to its
edges) over the stream the edge dialled. While the link is down nothing is offered:
the task waits at its home (for ``auto``, a worker of the home that meets it takes
it). The offers are re-sent from scratch on each link (``reset``): the peer drops what
the home offered on an earlier link. What no link or crash may lose is in the home's
store; the peer's copy is only a pointer to it.

A task is offered only to a peer whose advertised workers could meet it: each site
publishes in its record of the shared metadata (server/_metadata_sync.py,
``sites[<site>]``, field ``workers@<node>``) the queues its activity workers polled
in the last five minutes and what each offered (tier, labels, memory, cores); the
home reads the peer's record as the metadata exchange brought it. A peer whose record
advertises no workers at all (a site of an older version, or one whose record has
not arrived yet) is offered every such task, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from tideflow.api.v1 import cluster_pb2, service_pb2, state_pb2
from tideflow.api.v1 import replication_pb2 as rp
from tideflow.history import RunKey, TaskKind, TaskRow

from ._engine import HistoryEngine
from ._errors import (
    _KIND_OF_CODE,
    InvalidArgumentError,
    NotHomeError,
    ServiceError,
    UnavailableError,
)
from ._matching import Matching, RemoteTaskRow
from ._matching_routes import MatchingRoutes
from ._metadata_sync import MetadataSync
from ._peers import Peer
from ._placement import PlacementPolicy, WorkerSite, decode
from ._site_link import Handler, LinkDown, SiteLink, message_of
from ._site_nodes import SiteNodes
from ._task_responses import decode_token
from ._task_tokens import TaskTokenSigner

log = logging.getLogger("tideflow.server.sites")
M = TypeVar("M", bound=Message)

# How often a link's offers are brought up to date without being woken (a worker of
# the home that stopped polling makes its tasks offerable without any new task).
_OFFER_RESCAN_S = 1.0
# A peer that refused offers is offered everything again after this long.
_REFUSED_OFFER_PAUSE_S = 10.0
# Most (queue, capabilities) entries a site record advertises (bounded like any input).
_MAX_ADVERTISED = 256
_WORKERS = "workers"

ActivityAnswer = (
    service_pb2.RespondActivityTaskCompletedRequest
    | service_pb2.RespondActivityTaskFailedRequest
    | service_pb2.RecordActivityHeartbeatRequest
    | service_pb2.RespondActivityTaskCanceledRequest
)

# Where each kind of answer travels in a ForwardedActivityResponse.
_ANSWER_FIELDS: dict[type[ActivityAnswer], str] = {
    service_pb2.RespondActivityTaskCompletedRequest: "completed",
    service_pb2.RespondActivityTaskFailedRequest: "failed",
    service_pb2.RecordActivityHeartbeatRequest: "heartbeat",
    service_pb2.RespondActivityTaskCanceledRequest: "canceled",
}


class HomeAnsweredError(ServiceError):
    """The run's home refused a forwarded answer: its status, passed on to the worker."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = next((c for c in grpc.StatusCode if c.value[0] == code), self.code)
        self.kind = _KIND_OF_CODE.get(self.code, self.kind)


def _remote(task: TaskRow) -> rp.RemoteTask:
    key = task.key
    return rp.RemoteTask(
        run=rp.RunRef(namespace=key.namespace, workflow_id=key.workflow_id, run_id=key.run_id),
        task_queue=task.task_queue,
        scheduled_event_id=task.ref_id,
        attempt=task.attempt,
        placement=task.placement,
    )


def _queue_of(task: TaskRow) -> tuple[str, str]:
    return task.key.namespace, task.task_queue


def _row(task: rp.RemoteTask, home: str = "") -> TaskRow:
    fields = {
        "key": RunKey(
            namespace=task.run.namespace,
            workflow_id=task.run.workflow_id,
            run_id=task.run.run_id,
        ),
        "task_queue": task.task_queue,
        "kind": TaskKind.ACTIVITY,
        "ref_id": task.scheduled_event_id,
        "attempt": task.attempt,
        "placement": task.placement,
    }
    return RemoteTaskRow(home=home, **fields) if home else TaskRow(**fields)  # type: ignore[arg-type]


class RemoteTasks:
    """This site's side of placement across sites: offers to peers, the starts and
    answers of tasks homed here, and the peer's tasks served to workers here."""

    def __init__(
        self,
        engine: HistoryEngine,
        matching: Matching,
        policy: PlacementPolicy,
        tokens: TaskTokenSigner,
        link_to: Callable[[str], SiteLink | None],
    ) -> None:
        self._engine = engine
        self._matching = matching
        self._policy = policy
        self._tokens = tokens
        self._link_to = link_to
        # One wake-up per link's offer loop: a task with a placement started waiting.
        self._wakeups: set[asyncio.Event] = set()
        # What each link's peer holds of the tasks offered here, by task key.
        self._offered: dict[SiteLink, dict[str, TaskRow]] = {}
        # Offerable tasks each link's peer advertises no worker for, by task key.
        self._declined: dict[SiteLink, set[str]] = {}
        # The shared metadata: this site's advertised workers, the peers' (once open).
        self._metadata: MetadataSync | None = None
        matching.on_waiting = self._task_waiting
        self.handlers: dict[str, Handler] = {
            "offer": self._serve_offer,
            "start_remote": self._serve_start,
            "activity_response": self._serve_answer,
        }
        # The other nodes of this site (server/_site_nodes.py): their queues' tasks are
        # offered over this node's link, and the peer's offers go to the nodes serving
        # their queues.
        self._nodes: SiteNodes | None = None
        self._routes: MatchingRoutes | None = None

    def join_nodes(self, nodes: SiteNodes, routes: MatchingRoutes) -> None:
        """Offer and serve the tasks of every node's queues, whichever holds a link."""
        self._nodes, self._routes = nodes, routes
        nodes.handlers.update(
            {
                "offerable": self._node_offerable,
                "start_remote": self._node_start,
                "activity_response": self._node_answer,
                "offer": self._node_offer,
            }
        )

    def use_metadata(self, sync: MetadataSync) -> None:
        """Advertise this site's workers in its site record and read the peers'."""
        self._metadata = sync

    async def _advertise(self) -> None:
        """Publish what this node's activity workers offer, per queue, as this node's
        entry of the ``workers`` collection (written only when it changed)."""
        if self._metadata is None:
            return
        entries = sorted(
            {
                (namespace, task_queue, w.tier, tuple(sorted(w.labels)), w.memory_mb, w.cores)
                for namespace, task_queue, w in self._matching.advertised()
            }
        )[:_MAX_ADVERTISED]
        document = self._metadata.metadata
        key = f"{document.site}@{document.node_id or 'node'}"
        advertised = [
            [ns, tq, tier, list(labels), mem, cores] for ns, tq, tier, labels, mem, cores in entries
        ]
        if document.get(_WORKERS, key) != advertised:
            await document.put(_WORKERS, key, advertised)

    def _peer_workers(self, peer: str) -> dict[tuple[str, str], list[WorkerSite]]:
        """The workers ``peer``'s nodes advertise, by (namespace, task queue)."""
        found: dict[tuple[str, str], list[WorkerSite]] = {}
        if self._metadata is None:
            return found
        for key, entries in self._metadata.metadata.entries(_WORKERS).items():
            if key.partition("@")[0] != peer:
                continue
            for namespace, task_queue, tier, labels, memory_mb, cores in entries or []:
                worker = WorkerSite("", peer, int(tier), frozenset(labels), memory_mb, cores)
                found.setdefault((namespace, task_queue), []).append(worker)
        return found

    def _task_waiting(self) -> None:
        for wakeup in self._wakeups:
            wakeup.set()

    # ------------------------------------------------------------ at the home

    async def offer_loop(self, link: SiteLink) -> None:
        """While ``link`` is up: keep the peer's copy of the offerable tasks current."""
        wakeup = asyncio.Event()
        self._wakeups.add(wakeup)
        offered = self._offered[link] = {}
        first = True
        try:
            while True:
                wakeup.clear()
                await self._advertise()
                current = self._meeting(link, await self._offerable())
                new = [task for k, task in current.items() if k not in offered]
                gone = [task for k, task in offered.items() if k not in current]
                if first or new or gone:
                    request = rp.OfferTasksRequest(
                        tasks=[_remote(t) for t in new],
                        withdrawn=[_remote(t) for t in gone],
                        reset=first,
                    )
                    first = False
                    offered.update((t.task_key, t) for t in new)
                    for task in gone:
                        offered.pop(task.task_key, None)
                    if not await self._offer(link, request):
                        offered.clear()
                        first = True
                        await asyncio.sleep(_REFUSED_OFFER_PAUSE_S)
                        continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_OFFER_RESCAN_S):
                        await wakeup.wait()
        finally:
            self._wakeups.discard(wakeup)
            self._offered.pop(link, None)
            self._declined.pop(link, None)

    def _meeting(self, link: SiteLink, offerable: list[TaskRow]) -> dict[str, TaskRow]:
        """The ``offerable`` tasks some worker ``link.peer`` advertises could meet, by
        task key (the others noted for describe). A queue the peer advertises no worker
        for is offered: its record may lag behind a worker that just started polling."""
        workers = self._peer_workers(link.peer)
        meeting: dict[str, TaskRow] = {}
        declined = self._declined[link] = set()
        for task in offerable:
            placement = decode(task.placement)
            candidates = workers.get(_queue_of(task))
            if placement is None or not candidates or any(map(placement.admits, candidates)):
                meeting[task.task_key] = task
            else:
                declined.add(task.task_key)
        return meeting

    async def _offerable(self) -> list[TaskRow]:
        """The offerable tasks of this node's queues and of the other nodes' (a node
        that does not answer now has its tasks offered on a later round)."""
        found = self._matching.offerable()
        if self._nodes is not None:
            asked = rp.OfferTasksRequest()
            for reply in await self._nodes.at_every_other_node(
                "offerable", "", asked, rp.OfferTasksRequest
            ):
                found.extend(_row(task) for task in reply.tasks)
        return found

    async def _node_offerable(self, call: cluster_pb2.SiteCallRequest) -> rp.OfferTasksRequest:
        # The link's node asks every round: a node without a link advertises its own
        # workers here, so the peer sees every node's (it reads their union).
        await self._advertise()
        return rp.OfferTasksRequest(tasks=[_remote(t) for t in self._matching.offerable()])

    def withdraw(self, namespace: str, tasks: list[tuple[str, str]]) -> None:
        """Tasks of a run handed to another site (``(task queue, task key)``): no
        longer this site's to dispatch, nor to offer (the offer loops withdraw them)."""
        for task_queue, task_key in tasks:
            self._matching.take(namespace, task_queue, task_key)
        if tasks:
            self._task_waiting()

    async def _offer(self, link: SiteLink, request: rp.OfferTasksRequest) -> bool:
        """Send offers; False if the peer refused them (a site of an older version
        knows no "offer": the link itself stays up for replication)."""
        try:
            await link.call("offer", request, rp.OfferTasksResponse)
        except LinkDown as error:
            if link.closed.is_set():
                raise
            log.warning("site %s refused task offers: %s", link.peer, error)
            return False
        return True

    async def _serve_start(self, link: SiteLink, body: bytes) -> rp.StartRemoteTaskResponse:
        """A peer's worker took a task homed here: record it started by that worker
        (on the node serving the task's queue)."""
        request = message_of(body, rp.StartRemoteTaskRequest)
        wanted = _row(request.task)
        owner = self._queue_node(wanted)
        if owner is None or self._nodes is None:
            return await self._start_here(request, link)
        reply = await self._nodes.at_node(
            owner, "start_remote", link.peer, request, rp.StartRemoteTaskResponse
        )
        if not reply.started:  # offered to that peer again
            self._offered.get(link, {}).pop(wanted.task_key, None)
            self._task_waiting()
        return reply

    async def _node_start(self, call: cluster_pb2.SiteCallRequest) -> rp.StartRemoteTaskResponse:
        return await self._start_here(rp.StartRemoteTaskRequest.FromString(call.body), None)

    def _queue_node(self, task: TaskRow) -> Peer | None:
        """The other node serving ``task``'s queue (None: this node, or not known)."""
        routes = self._routes
        if routes is None:
            return None
        owner = routes.queue_owner(task.key.namespace, task.task_queue, TaskKind.ACTIVITY)
        return None if owner is None or routes.is_here(owner) else owner

    async def _start_here(
        self, request: rp.StartRemoteTaskRequest, link: SiteLink | None
    ) -> rp.StartRemoteTaskResponse:
        worker = self._policy.worker(request.identity, request.worker)
        wanted = _row(request.task)
        task = self._matching.take(wanted.key.namespace, wanted.task_queue, wanted.task_key)
        if task is None:
            return rp.StartRemoteTaskResponse(started=False)
        placement = decode(task.placement)
        if worker.site == self._policy.cluster_name or (
            placement is not None and not placement.admits(worker)
        ):
            self._not_started(link, task)
            return rp.StartRemoteTaskResponse(started=False)
        try:
            response = await self._record_started(task, worker)
        except BaseException:
            self._not_started(link, task)
            raise
        if response is None:
            return rp.StartRemoteTaskResponse(started=False)  # stale: the engine dropped it
        log.info("task %s started at site %s by %s", task.task_key, worker.site, worker.identity)
        response.task_token = await self._tokens.seal(response.task_token)
        return rp.StartRemoteTaskResponse(started=True, task=response)

    async def _record_started(
        self, task: TaskRow, worker: WorkerSite
    ) -> service_pb2.PollActivityTaskResponse | None:
        """The run's owner records ``task`` started (this node, or the node holding the
        run's shard); None if stale. UnavailableError if no owner could do it now."""
        routes = self._routes
        if routes is None or routes.owns_run(task.key):
            return await self._engine.record_activity_started(task, worker)
        started = await routes.record_started(task, worker.identity, worker.to_proto())
        if started is None:
            raise UnavailableError(f"no owner of {task.key} could record it started now")
        response = started.response
        assert response is None or isinstance(response, service_pb2.PollActivityTaskResponse)
        return response

    def _not_started(self, link: SiteLink | None, task: TaskRow) -> None:
        """A task a peer's poller took was not started: it waits here again, and is
        offered to that peer again (its poller dropped it)."""
        self._matching.give_back(task)
        if link is not None:
            self._offered.get(link, {}).pop(task.task_key, None)
        self._task_waiting()

    async def _serve_answer(self, link: SiteLink, body: bytes) -> rp.ForwardedActivityReply:
        """A worker's answer to a task of a run homed here, forwarded by the site it
        ran at, or by the run's former home (``former_home``: the token is plain);
        applied by the node holding the run's shard."""
        request = message_of(body, rp.ForwardedActivityResponse)
        if self._nodes is None:
            return await self._answer_here(request)
        try:
            token = await self._token_of(request)
        except ServiceError as error:
            return rp.ForwardedActivityReply(code=error.code.value[0], message=error.message)
        key = RunKey(namespace=token.namespace, workflow_id=token.workflow_id, run_id=token.run_id)
        return await self._nodes.at_owner(
            key, "activity_response", link.peer, request, rp.ForwardedActivityReply
        )

    async def _node_answer(self, call: cluster_pb2.SiteCallRequest) -> rp.ForwardedActivityReply:
        return await self._answer_here(rp.ForwardedActivityResponse.FromString(call.body))

    async def _token_of(self, request: rp.ForwardedActivityResponse) -> state_pb2.TaskToken:
        which = request.WhichOneof("request")
        if which is None:
            raise InvalidArgumentError("an empty activity response")
        answer: ActivityAnswer = getattr(request, which)
        former = request.former_home
        opened = answer.task_token if former else await self._tokens.open(answer.task_token)
        return decode_token(opened, activity=True)

    async def _answer_here(
        self, request: rp.ForwardedActivityResponse
    ) -> rp.ForwardedActivityReply:
        which = request.WhichOneof("request")
        if which is None:
            raise LinkDown("an empty activity response")
        answer: ActivityAnswer = getattr(request, which)
        former = request.former_home
        try:
            token = await self._token_of(request)
            if token.home_site:
                raise InvalidArgumentError("a forwarded task token names yet another site")
            try:
                if former:
                    await self._taken_over(token)
                cancel = await self._apply(token, answer)
            except NotHomeError as error:
                if former and error.home == former:
                    raise UnavailableError(
                        f"the run was handed here from site {former!r} and is not taken "
                        "over yet; try again"
                    ) from None
                if former:
                    raise
                # Handed to another site since the task started: it is that site's.
                return await self.forward(token, answer, moved_to=error.home)
        except ServiceError as error:
            return rp.ForwardedActivityReply(code=error.code.value[0], message=error.message)
        return rp.ForwardedActivityReply(cancel_requested=cancel)

    async def _taken_over(self, token: state_pb2.TaskToken) -> None:
        """An answer sent on by the run's former home waits (UNAVAILABLE: the worker
        retries) until this site took the run over: before, its replica may name it
        home while the run's task and timer rows are not re-created here yet."""
        key = RunKey(namespace=token.namespace, workflow_id=token.workflow_id, run_id=token.run_id)
        ms = await self._engine.state_of(key)
        if ms.activated_version < ms.version:
            raise UnavailableError(f"run {key} was handed here and is not taken over yet")

    async def _apply(self, token: state_pb2.TaskToken, answer: ActivityAnswer) -> bool:
        """Apply a worker's answer here; whether the activity's cancellation is asked."""
        engine = self._engine
        if isinstance(answer, service_pb2.RespondActivityTaskCompletedRequest):
            result = answer.result if answer.HasField("result") else None
            await engine.complete_activity(token, result, answer.identity)
        elif isinstance(answer, service_pb2.RespondActivityTaskFailedRequest):
            details = (
                answer.last_heartbeat_details if answer.HasField("last_heartbeat_details") else None
            )
            await engine.fail_activity(token, answer.failure, answer.identity, details)
        elif isinstance(answer, service_pb2.RecordActivityHeartbeatRequest):
            details = answer.details if answer.HasField("details") else None
            return await engine.record_heartbeat(token, details)
        else:
            details = answer.details if answer.HasField("details") else None
            await engine.activity_canceled(token, details, answer.identity)
        return False

    def annotate(
        self, ms: state_pb2.MutableState, response: service_pb2.DescribeWorkflowResponse
    ) -> None:
        """Describe: a waiting task of a run homed here says which sites it is offered to."""
        for pending in response.pending_activities:
            act = ms.pending_activities.get(pending.scheduled_event_id)
            if not pending.waiting_reason or act is None:
                continue
            peers = sorted(
                link.peer for link, keys in self._offered.items() if act.task_key in keys
            )
            if peers:
                pending.waiting_reason += f"; offered to site {', '.join(peers)}"
            declined = sorted(
                link.peer for link, keys in self._declined.items() if act.task_key in keys
            )
            if declined:
                pending.waiting_reason += (
                    f"; not offered to site {', '.join(declined)}: no worker it advertises meets it"
                )

    # ------------------------------------------------------------ at the peer

    async def _serve_offer(self, link: SiteLink, body: bytes) -> rp.OfferTasksResponse:
        """Tasks the peer offers to this site's workers, held in the matching of the
        node serving each task's queue (a reset and the withdrawals go to every node)."""
        request = message_of(body, rp.OfferTasksRequest)
        if self._nodes is None:
            return self._hold_offer(link.peer, request)
        elsewhere: dict[str, tuple[Peer, rp.OfferTasksRequest]] = {}
        here = rp.OfferTasksRequest(withdrawn=request.withdrawn, reset=request.reset)
        for task in request.tasks:
            owner = self._queue_node(_row(task))
            if owner is None:
                here.tasks.append(task)
                continue
            _, part = elsewhere.setdefault(owner.node_id, (owner, rp.OfferTasksRequest()))
            part.tasks.append(task)
        if request.reset or request.withdrawn:
            for node in self._routes.shards.peers() if self._routes and self._routes.shards else []:
                elsewhere.setdefault(node.node_id, (node, rp.OfferTasksRequest()))
        for node, part in elsewhere.values():
            part.withdrawn.extend(request.withdrawn)
            part.reset = request.reset
            try:
                await self._nodes.at_node(node, "offer", link.peer, part, rp.OfferTasksResponse)
            except Exception as error:  # held here instead: this node's pollers get them
                log.info("offers for node %s held here: %s", node.node_id, error)
                here.tasks.extend(part.tasks)
        return self._hold_offer(link.peer, here)

    async def _node_offer(self, call: cluster_pb2.SiteCallRequest) -> rp.OfferTasksResponse:
        return self._hold_offer(call.peer, rp.OfferTasksRequest.FromString(call.body))

    def _hold_offer(self, peer: str, request: rp.OfferTasksRequest) -> rp.OfferTasksResponse:
        if request.reset:
            self._matching.drop_remote(peer)
        for task in request.withdrawn:
            row = _row(task)
            self._matching.take(row.key.namespace, row.task_queue, row.task_key, remote=True)
        self._matching.add_many([_row(task, peer) for task in request.tasks])
        return rp.OfferTasksResponse()

    async def start(
        self, task: RemoteTaskRow, worker: WorkerSite
    ) -> service_pb2.PollActivityTaskResponse | None:
        """A poller here took a task another site offered: have its home record it
        started. None if it is no longer waiting there, or the link is down (the home
        offers it again on the next link)."""
        request = rp.StartRemoteTaskRequest(
            task=_remote(task), identity=worker.identity, worker=worker.to_proto()
        )
        try:
            reply = await self._call_home(
                task.home, "start_remote", request, rp.StartRemoteTaskResponse
            )
        except Exception as error:  # the link, or the node holding it, went away
            log.info("task %s not started at %s: %s", task.task_key, task.home, error)
            return None
        if reply is None or not reply.started:
            return None
        response = reply.task
        key = task.key
        # The worker's token: this site's own (sealed by the frontend), carrying the
        # home's, which only the home can open.
        response.task_token = state_pb2.TaskToken(
            namespace=key.namespace,
            workflow_id=key.workflow_id,
            run_id=key.run_id,
            scheduled_event_id=task.ref_id,
            attempt=task.attempt,
            is_activity=True,
            home_site=task.home,
            home_token=response.task_token,
        ).SerializeToString()
        return response

    async def forward(
        self, token: state_pb2.TaskToken, answer: ActivityAnswer, *, moved_to: str = ""
    ) -> rp.ForwardedActivityReply:
        """A worker's answer to a task homed at ``token.home_site``, applied there; or,
        ``moved_to``, to a task of a run homed here when it started and handed to that
        site since (``token`` is then this site's, opened). UNAVAILABLE while the link
        is down (the worker retries); the home's refusal (a stale or repeated answer:
        NOT_FOUND) is the worker's."""
        home = moved_to or token.home_site
        request = rp.ForwardedActivityResponse()
        field = getattr(request, _ANSWER_FIELDS[type(answer)])
        field.CopyFrom(answer)
        if moved_to:
            request.former_home = self._policy.cluster_name
            field.task_token = token.SerializeToString()
            log.info(
                "answer to activity %s (attempt %d) of %s/%s forwarded to its new home %s",
                token.scheduled_event_id,
                token.attempt,
                token.workflow_id,
                token.run_id,
                moved_to,
            )
        else:
            field.task_token = token.home_token
        if isinstance(field, service_pb2.RespondActivityTaskCompletedRequest):
            # The next workflow task is the home's to hand out, not this site's.
            field.eager_workflow_task_queue = ""
            field.sticky_task_queue = ""
        try:
            reply = await self._call_home(
                home, "activity_response", request, rp.ForwardedActivityReply
            )
        except Exception as error:  # the link, or the node holding it, went away
            raise UnavailableError(f"site {home!r}: {error}") from None
        if reply is None:
            raise UnavailableError(f"the task's run is homed at site {home!r}, not reachable now")
        if reply.code:
            raise HomeAnsweredError(reply.code, reply.message)
        return reply

    async def _call_home(
        self, home: str, method: str, request: Message, reply_type: type[M]
    ) -> M | None:
        """``method`` at site ``home`` over this node's link, or the one another node
        of this site holds; None if no node holds one."""
        link = self._link_to(home)
        if self._nodes is None:
            return None if link is None else await link.call(method, request, reply_type)
        return await self._nodes.over_link(link, home, method, request, reply_type)
