"""Sites: a cloud and the edges that connect to it (tla/Replication.tla).

A site is a tideflow server with a name (``--cluster-name``). An edge also has an
upstream (``--upstream HOST:PORT``), the cloud, and it opens every connection: one
``SiteService.Link`` stream that it dials, redials with exponential backoff while the
cloud cannot be reached, and over which both sides then call each other
(server/_site_link.py). The cloud learns its edges from the streams they open (no
static list) and never dials one. An edge that never reached the cloud runs anyway:
nothing here blocks the engine.

Every run has a home, its only writer (``MutableState.home_cluster``): the site that
started it, until a handoff (server/_handoff.py). Other sites hold read-only replicas,
kept up to date by pulls (server/_replication.py); a signal, cancel or terminate for a
replica waits in the site inbox until it is handed to the home (server/_inbox.py).
This module wires those together, serves the ``SiteService`` and answers for the
frontend about runs homed elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import wrappers_pb2
from google.protobuf.message import Message

from tideflow.api.v1 import cluster_pb2, replication_pb2_grpc, service_pb2, state_pb2
from tideflow.api.v1 import replication_pb2 as rp
from tideflow.history import HistoryStore, ReplicaVerdict, RunKey, StoreError, home_of, now_micros

from ._audit import AuditEntry, note_principal
from ._auth import ANY_NAMESPACE, AuthGate
from ._config import ServerConfig
from ._engine import HistoryEngine
from ._errors import (
    InvalidArgumentError,
    NotHomeError,
    ServiceError,
    UnavailableError,
    abort_with_detail,
)
from ._handoff import handoff, take_over
from ._inbox import Inbox, apply_request, forwarded_run
from ._matching_routes import MatchingRoutes
from ._metadata_link import MetadataExchange
from ._peers import NodeCredential
from ._remote_tasks import RemoteTasks
from ._replication import Replicator, hint_loop, takes_over
from ._replication_trace import ReplicationTracer
from ._routing import Router
from ._shards import ShardController
from ._site_link import CallRefused, Handler, LinkDown, SiteLink, message_of
from ._site_nodes import SiteNodes, run_of
from ._tls_probe import refused_handshake

log = logging.getLogger("tideflow.server.sites")

_Context = grpc.aio.ServicerContext[Any, Any]
R = TypeVar("R")
M = TypeVar("M", bound=Message)
_RECONNECT_INITIAL_S = 0.1
# The backoff's cap while the upstream is unreachable or the link was lost (a network
# outage: the link must come back soon after the network does)...
_RECONNECT_MAX_S = 2.0
# ... and while the upstream answers and refuses the link (TLS verification, auth, a
# site of the same name): that lasts until someone mends a configuration.
_REFUSED_MAX_S = 60.0
# What a refusal's reason names (a gRPC status code, an OpenSSL error, our own hello).
_REFUSAL_MARKS = (
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "CERTIFICATE",
    "HANDSHAKE",
    "SSL",
    "ALSO NAMED",
    "REFUSED THE LINK",
)
_HELLO_TIMEOUT_S = 10.0
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


@dataclass
class _Peer:
    role: str
    address: str = ""
    connected_at: int = 0


class Sites:
    """This server as a site: its links, replication, inbox and handoffs."""

    def __init__(self, store: HistoryStore, engine: HistoryEngine, config: ServerConfig) -> None:
        self.name = config.cluster_name
        self.upstream = config.upstream
        # Several nodes of the upstream site may be named (``h1:p1,h2:p2``): the edge
        # links to one at a time and dials the next when a dial fails.
        self._upstreams = config.upstream_nodes
        self._upstream_at = 0
        # An API key (or JWT) with the admin role on every namespace of an upstream
        # whose auth is on, sent on the link's stream.
        key = config.upstream_api_key
        self._credentials = (("authorization", f"Bearer {key}"),) if key else ()
        self._tls = config.upstream_tls
        # Why the last dial of the upstream failed; "" while linked or before a dial.
        self.upstream_error = ""
        self.upstream_failures = 0  # failed dials in a row, and the backoff before the next
        self.upstream_backoff_s = _RECONNECT_INITIAL_S
        self._store = store
        self._engine = engine
        # Trace mode (TIDEFLOW_TRACE_DIR): the replication steps of this site.
        tracer = ReplicationTracer.from_environment(self.name)
        engine.replication_tracer = tracer
        self.replicator = Replicator(store, self.name, self._applied, tracer=tracer)
        self.inbox = Inbox(
            store, engine, self.name, self.link_to, self.replicator.peer_stats, tracer=tracer
        )
        self._links: dict[str, SiteLink] = {}
        self._peers: dict[str, _Peer] = {}
        self._changed: asyncio.Queue[RunKey] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._untaken: set[RunKey] = set()  # take-overs that failed, tried again
        self._owned_seen: frozenset[int] = frozenset()  # shards held at the last look
        self.handlers: dict[str, Handler] = {
            "hello": self._hello,
            "runs": self.replicator.serve_runs,
            "events": self.replicator.serve_events,
            "changed": self.replicator.hinted,
            "forward": self.inbox.serve_forwarded,
            "start": self._serve_start,
            "handoff": self._serve_handoff,
            "metadata": self._serve_metadata,
        }
        # The shared metadata document's exchange (server/_metadata_link.py), once the
        # server has opened the document (after this object is made).
        self.metadata: MetadataExchange | None = None
        # Placement across sites (server/_remote_tasks.py), once matching exists.
        self.remote_tasks: RemoteTasks | None = None
        # The other nodes of this site (server/_site_nodes.py); alone until joined.
        self.nodes = SiteNodes(None, None, None, self.links)
        self.nodes.handlers.update(
            {
                "apply": self._node_apply,
                "forward": self._node_forward,
                "take_over": self._node_take_over,
                "start": self._node_start,
                "handoff": self._node_handoff,
            }
        )
        self.replicator.apply = self._apply_at_owner
        self.inbox.apply_at_home = self._forward_at_owner

    def join_nodes(
        self, shards: ShardController, router: Router, credential: NodeCredential
    ) -> SiteNodes:
        """Act as one site with the other nodes on this store: a run's writes on the
        owner of its shard, links announced (server/_site_nodes.py)."""
        self.nodes.join(shards, router, credential)
        self.inbox.owns = shards.owns
        return self.nodes

    def use_remote_tasks(self, remote_tasks: RemoteTasks, routes: MatchingRoutes) -> None:
        """Offer tasks to the peers and serve theirs, on every link from now on, for
        the queues of every node of this site."""
        self.remote_tasks = remote_tasks
        self.handlers.update(remote_tasks.handlers)
        remote_tasks.join_nodes(self.nodes, routes)

    # ------------------------------------------------------------ wiring

    def committed(self, key: RunKey) -> None:
        """The engine committed a transition of ``key``: hint the peers."""
        if self._links:  # none yet: the hint would go to nobody (a link's pass catches up)
            self._changed.put_nowait(key)

    def memory_held(self) -> dict[str, int]:
        return {
            "sites_hints_queued": self._changed.qsize(),
            "sites_untaken_runs": len(self._untaken),
            "sites_inbox_sent": self.inbox.sent_remembered(),
            # Runs the peers hinted as changed, not pulled yet (emptied by each pull).
            "sites_hinted_runs": sum(len(s.hinted) for s in self.replicator.stats.values()),
        }

    def link_to(self, site: str) -> SiteLink | None:
        link = self._links.get(site)
        return None if link is None or link.closed.is_set() else link

    def reachable(self, site: str) -> bool:
        """Placement's link state (server/_placement.py ``LinkState``): this site, or
        a peer whose link is up now."""
        return site == self.name or self.link_to(site) is not None

    def links(self) -> list[SiteLink]:
        return [link for link in self._links.values() if not link.closed.is_set()]

    async def run(self) -> None:
        """The site's loops: hints to peers, the upstream link (an edge), and the
        take-over of runs handed here while this site was down."""
        self._owned_seen = self.nodes.owned()  # the pass below covers these
        async with asyncio.TaskGroup() as group:
            group.create_task(hint_loop(self.links, self._changed, self.nodes.relay_hint))
            group.create_task(self.nodes.announce_loop())
            group.create_task(self._inbox_loop())
            if self.upstream:
                group.create_task(self._dial_loop())
            await self._take_over_pending()

    async def _inbox_loop(self) -> None:
        """Retry take-overs that failed; apply inbox entries of runs that became homed
        here (a handoff) while no link is up (the links' forward loops do it too)."""
        while True:
            self.inbox.changed.clear()
            for key in list(self._untaken):
                await self._take_over(key)
            owned = self.nodes.owned()
            if owned - self._owned_seen:
                # Shards taken from a node that died: the runs it left untaken (a
                # SIGKILL between applying a HANDOFF and taking the run over) are ours.
                await self._take_over_pending()
            self._owned_seen = owned
            if not self.links():
                with contextlib.suppress(Exception):
                    await self.inbox.flush(None)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self.inbox.changed.wait()

    async def _take_over_pending(self) -> None:
        """Take over the runs handed here that a crash left untaken (their HANDOFF
        applied, the take-over not committed); tried again while the store fails."""
        while True:
            try:
                keys = await self._store.replication.runs_to_take_over(self.name)
            except StoreError:
                log.warning("site %s: runs to take over unreadable; trying again", self.name)
                await asyncio.sleep(1.0)
                continue
            for key in keys:
                await self._take_over(key)
            return

    async def _applied(self, key: RunKey, state: state_pb2.MutableState | None) -> None:
        """A replicated batch of ``key`` was applied (server/_replication.py)."""
        self._engine.invalidate(key)
        if state is not None and takes_over(state, self.name):
            await self._take_over(key)
        self.inbox.changed.set()

    async def _take_over(self, key: RunKey) -> None:
        try:
            await self.nodes.at_owner(key, "take_over", "", rp.RunRef(), rp.RunRef)
        except Exception:  # the inbox loop tries again
            log.exception("taking over run %s failed", key)
            self._untaken.add(key)
            return
        self._untaken.discard(key)
        log.info("site %s took over run %s", self.name, key)

    # ------------------------------------------------------------ on the run's owner

    async def _apply_at_owner(
        self, key: RunKey, peer: str, batch: rp.ReadEventsResponse
    ) -> tuple[ReplicaVerdict, str]:
        reply = await self.nodes.at_owner(key, "apply", peer, batch, rp.ForwardedResponse)
        return ReplicaVerdict(reply.outcome), reply.detail

    async def _node_apply(self, call: cluster_pb2.SiteCallRequest) -> rp.ForwardedResponse:
        batch = rp.ReadEventsResponse.FromString(call.body)
        key = run_of(call)
        verdict, detail = await self.replicator.apply_batch(key, call.peer, batch)
        return rp.ForwardedResponse(outcome=verdict.value, detail=detail)

    async def _forward_at_owner(self, request: rp.ForwardedRequest) -> rp.ForwardedResponse:
        key = forwarded_run(request)
        return await self.nodes.at_owner(key, "forward", "", request, rp.ForwardedResponse)

    async def _node_forward(self, call: cluster_pb2.SiteCallRequest) -> rp.ForwardedResponse:
        return await apply_request(self._engine, rp.ForwardedRequest.FromString(call.body))

    async def _node_take_over(self, call: cluster_pb2.SiteCallRequest) -> rp.RunRef:
        await take_over(self._engine, run_of(call))
        return rp.RunRef()

    # ------------------------------------------------------------ links

    async def _dial_loop(self) -> None:
        """Keep a link to the upstream, redialled with exponential backoff (capped
        higher while the upstream refuses than while it is unreachable)."""
        while True:
            address = self._upstreams[self._upstream_at % len(self._upstreams)]
            try:
                linked = await self._dial_once(address)
            except Exception:  # a defect must not end the site's link for good
                log.exception("link to upstream %s failed", address)
                linked = False
            if linked:
                self.upstream_failures = 0
                self.upstream_backoff_s = _RECONNECT_INITIAL_S
            else:
                # The next node of the upstream site, if it has several.
                self._upstream_at += 1
                self.upstream_failures += 1
                cap = _REFUSED_MAX_S if _refusal(self.upstream_error) else _RECONNECT_MAX_S
                self.upstream_backoff_s = min(self.upstream_backoff_s * 2, cap)
            await asyncio.sleep(self.upstream_backoff_s * random.uniform(0.5, 1.0))

    def _open_channel(self, address: str) -> grpc.aio.Channel:
        tls = self._tls
        if tls is None:
            return grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        options = [*_CHANNEL_OPTIONS, *tls.channel_options()]
        return grpc.aio.secure_channel(address, tls.credentials(), options=options)

    async def _dial_once(self, address: str) -> bool:
        """One link to the upstream node at ``address``, for as long as it lasts;
        whether it came up."""
        channel = self._open_channel(address)
        try:
            stub = replication_pb2_grpc.SiteServiceStub(channel)  # type: ignore[no-untyped-call]
            call = stub.Link(metadata=self._credentials)

            async def receive() -> rp.SiteFrame | None:
                frame = await call.read()
                return None if frame is grpc.aio.EOF else frame

            link = SiteLink("", "upstream", call.write, receive, self.handlers)
            reader = asyncio.create_task(_quietly(link.run()))
            try:
                async with asyncio.timeout(_HELLO_TIMEOUT_S):
                    hello = await link.call("hello", rp.SiteHello(site=self.name), rp.SiteHello)
            except (LinkDown, TimeoutError) as error:
                link.close()
                reason = None
                if isinstance(error, CallRefused | TimeoutError):
                    # The stream is open: the upstream refused hello, or is silent.
                    reason = (
                        f"the upstream refused the link: {error}"
                        if isinstance(error, CallRefused)
                        else f"no answer to hello in {_HELLO_TIMEOUT_S:g} s"
                    )
                    call.cancel()
                await reader
                self._link_failed(reason or await self._why_closed(await _status_of(call)))
                return False
            if hello.site == self.name:
                self._link_failed(f"the upstream is also named {self.name!r}: not linking")
                link.close()
                await reader
                return False
            link.peer = hello.site
            self.upstream_error = ""
            await self._attach(link, address)
            await reader
            return True
        except grpc.aio.AioRpcError as error:
            self._link_failed(await self._why_closed(f"{error.code().name}: {error.details()}"))
            return False
        except OSError as error:
            self._link_failed(str(error))
            return False
        finally:
            await channel.close(None)

    async def _why_closed(self, reason: str) -> str:
        """A TLS upstream that refused this edge's certificate reads as unavailable
        ("Socket closed") under TLS 1.3: asked directly, it tells
        (server/_tls_probe.py). A refused TCP connection needs no asking."""
        upper = reason.upper()
        if self._tls is None or not upper.startswith("UNAVAILABLE"):
            return reason
        if "CONNECTION REFUSED" in upper:
            return reason
        return await refused_handshake(self.upstream, self._tls) or reason

    def _link_failed(self, reason: str) -> None:
        """Keep why the upstream refused or could not be reached, for ``site status``;
        logged when it changes (the first failure after a link, another reason), not
        on every redial."""
        if reason != self.upstream_error:
            log.warning(
                "site %s: cannot link to upstream %s: %s (%s; redialled with backoff up to %g s)",
                self.name,
                self.upstream,
                reason,
                "refused" if _refusal(reason) else "unreachable",
                _REFUSED_MAX_S if _refusal(reason) else _RECONNECT_MAX_S,
            )
        self.upstream_error = reason

    async def _hello(self, link: SiteLink, body: bytes) -> rp.SiteHello:
        """An edge introduces itself on the stream it opened."""
        hello = message_of(body, rp.SiteHello)
        if not hello.site or hello.site == self.name:
            raise LinkDown(f"a site must have a name other than {self.name!r}")
        if link.role == "edge" and not link.peer:
            link.peer = hello.site
            task = asyncio.create_task(self._attach(link, self.nodes.here()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return rp.SiteHello(site=self.name)

    async def _attach(self, link: SiteLink, address: str) -> None:
        """Run replication and the inbox over ``link`` until it goes down."""
        previous = self._links.get(link.peer)
        if previous is not None and previous is not link:
            previous.close()  # the peer reconnected: its old stream is dead
        self._links[link.peer] = link
        peer = self._peers.setdefault(link.peer, _Peer(link.role))
        peer.role, peer.address, peer.connected_at = link.role, address, now_micros()
        log.info("site %s: link to %s (%s) up", self.name, link.peer, link.role)
        self.nodes.announce_now.set()
        companions = [
            asyncio.create_task(_until_down(link, self.replicator.pull_loop(link))),
            asyncio.create_task(_until_down(link, self.inbox.forward_loop(link))),
        ]
        if self.metadata is not None:
            companions.append(asyncio.create_task(_until_down(link, self.metadata.pull_loop(link))))
        if self.remote_tasks is not None:
            offers = self.remote_tasks.offer_loop(link)
            companions.append(asyncio.create_task(_until_down(link, offers)))
        try:
            await link.closed.wait()
        finally:
            for task in companions:
                task.cancel()
            await asyncio.gather(*companions, return_exceptions=True)
            if self._links.get(link.peer) is link:
                del self._links[link.peer]
            self.nodes.announce_now.set()
            log.info("site %s: link to %s down", self.name, link.peer)

    async def serve_link(
        self,
        receive: Callable[[], Awaitable[rp.SiteFrame | None]],
        send: Callable[[rp.SiteFrame], Awaitable[None]],
    ) -> None:
        """The cloud's end of a stream an edge opened."""
        await SiteLink("", "edge", send, receive, self.handlers).run()

    # ------------------------------------------------------------ runs homed elsewhere

    async def redirect(
        self, request: rp.ForwardedRequest, key: RunKey, error: NotHomeError
    ) -> bool:
        """A signal, cancel or terminate for a replica: into the inbox; True while it
        is pending delivery."""
        return await self.inbox.accept(request, key, error.home)

    async def start_at_home(
        self, request: service_pb2.StartWorkflowRequest
    ) -> service_pb2.StartWorkflowResponse:
        """A start naming another site as the run's home, sent to it over the link."""
        home = request.home_cluster
        refusal = await self.unknown_site(home)
        if refusal:
            raise InvalidArgumentError(f"home_cluster {refusal}")
        what = f"home_cluster {home!r}"
        reply = await self._call_site(home, "start", request, rp.ForwardedResponse, what)
        if reply.outcome != "applied":
            raise UnavailableError(f"home_cluster {home!r}: {reply.detail}")
        return service_pb2.StartWorkflowResponse(run_id=reply.run_id, started=reply.started)

    async def _call_site(
        self, site: str, method: str, message: Message, reply_type: type[M], what: str
    ) -> M:
        """``method`` on ``site`` over the link this node, or another node of this
        site, holds; UNAVAILABLE (``what`` says for what) while none is up."""
        try:
            link = self.link_to(site)
            reply = await self.nodes.over_link(link, site, method, message, reply_type)
        except Exception as error:  # the link, or the node holding it, went away
            raise UnavailableError(f"{what}: {error}") from None
        if reply is None:
            raise UnavailableError(f"{what}: no link to it now (this site is {self.name!r})")
        return reply

    async def known_sites(self) -> set[str]:
        """This site, the sites linked with since this start (by any node of this
        site), those whose runs are replicated here (a restarted edge whose cloud is
        unreachable still knows it) and those of the shared metadata document (every
        site that ever linked, directly or through its peer, publishes its record)."""
        known = {
            self.name,
            *self._peers,
            *self.nodes.linked_elsewhere(),
            *await self._store.replication.lag_by_peer(),
        }
        if self.metadata is not None:
            known |= self.metadata.sites()
        return known

    async def unknown_site(self, site: str) -> str:
        """Why ``site``, named a run's home, is refused ("" if it is not): a name
        this site does not know (``known_sites``). Only a site that can tell: one
        whose metadata is open and that knows another site, or has no upstream. An
        edge that never reached its upstream does not know the upstream's name (it
        has only an address), so it refuses nothing and the start waits for a link."""
        known = await self.known_sites()
        if site in known or self.metadata is None:
            return ""
        if self.upstream and known == {self.name}:
            return ""
        return f"{site!r}: unknown site (known: {', '.join(sorted(known))})"

    async def _serve_metadata(self, link: SiteLink, body: bytes) -> wrappers_pb2.BytesValue:
        if self.metadata is None:
            raise LinkDown(f"site {self.name!r} has not opened its metadata yet")
        return await self.metadata.serve(link, body)

    async def _serve_start(self, link: SiteLink, body: bytes) -> rp.ForwardedResponse:
        request = message_of(body, service_pb2.StartWorkflowRequest)
        key = RunKey(namespace=request.namespace, workflow_id=request.workflow_id, run_id="")
        return await self.nodes.at_owner(key, "start", link.peer, request, rp.ForwardedResponse)

    async def _node_start(self, call: cluster_pb2.SiteCallRequest) -> rp.ForwardedResponse:
        """A start homed here that a peer sent, on the owner of the run's shard."""
        request = service_pb2.StartWorkflowRequest.FromString(call.body)
        if request.home_cluster != self.name:
            return rp.ForwardedResponse(outcome="not_home", detail=f"this is {self.name!r}")
        request.home_cluster = ""
        run_id, started = await self._engine.start_workflow(request)
        return rp.ForwardedResponse(outcome="applied", run_id=run_id, started=started)

    async def annotate(
        self,
        key: RunKey,
        ms: state_pb2.MutableState,
        response: service_pb2.DescribeWorkflowResponse,
    ) -> None:
        """Describe's home and, for a replica, how far it is behind; for a run homed
        here, the sites its waiting tasks are offered to."""
        home = home_of(ms, self.name)
        response.home_cluster = home
        if home == self.name:
            if self.remote_tasks is not None:
                self.remote_tasks.annotate(ms, response)
            return
        info = await self._store.replication.replica_info(key)
        lag = response.replica
        lag.events_behind = 0
        if info is not None:
            lag.events_behind = max(0, info.home_last_event_id - (ms.next_event_id - 1))
            lag.last_synced.FromMicroseconds(info.synced_at)
            lag.seconds_since_sync = max(0.0, (now_micros() - info.synced_at) / 1e6)

    # ------------------------------------------------------------ handoff, status

    async def handoff(self, request: rp.HandoffWorkflowRequest) -> rp.HandoffWorkflowResponse:
        """Hand a run to ``to_cluster`` (on the node holding the run's shard)."""
        key = RunKey(
            namespace=request.namespace, workflow_id=request.execution.workflow_id, run_id=""
        )
        return await self.nodes.at_owner(key, "handoff", "", request, rp.HandoffWorkflowResponse)

    async def _node_handoff(self, call: cluster_pb2.SiteCallRequest) -> rp.HandoffWorkflowResponse:
        """A handoff: here if this site is the run's home, else at its home over the
        link (this node's, or the one another node holds)."""
        request = rp.HandoffWorkflowRequest.FromString(call.body)
        execution = request.execution
        key = await self._engine.resolve_run_id(
            request.namespace, execution.workflow_id, execution.run_id
        )
        ms = await self._engine.state_of(key)
        home = home_of(ms, self.name)
        if home != self.name:
            forwarded = rp.HandoffWorkflowRequest()
            forwarded.CopyFrom(request)
            forwarded.execution.run_id = key.run_id
            what = f"run {key} is homed at {home!r}"
            return await self._call_site(
                home, "handoff", forwarded, rp.HandoffWorkflowResponse, what
            )
        target = request.to_cluster
        known = await self.known_sites()
        if target not in known:
            raise InvalidArgumentError(
                f"to_cluster {target!r}: unknown site (known: {', '.join(sorted(known))})"
            )
        version, waiting = await handoff(self._engine, key, self.name, target)
        if self.remote_tasks is not None:
            self.remote_tasks.withdraw(key.namespace, waiting)
        self.committed(key)
        return rp.HandoffWorkflowResponse(new_version=version, from_cluster=self.name)

    async def _serve_handoff(self, link: SiteLink, body: bytes) -> rp.HandoffWorkflowResponse:
        return await self.handoff(message_of(body, rp.HandoffWorkflowRequest))

    async def describe(self) -> rp.DescribeSiteResponse:
        replication = self._store.replication
        response = rp.DescribeSiteResponse(
            site=self.name,
            upstream=self.upstream,
            upstream_error=self.upstream_error,
            upstream_failures=self.upstream_failures,
            upstream_backoff_s=self.upstream_backoff_s if self.upstream_failures else 0.0,
        )
        response.inbox_depth = await replication.inbox_depth()
        response.replication_alarms, recent = await replication.alarms()
        response.recent_alarms.extend(recent)
        lag = await replication.lag_by_peer()
        # Links other nodes of this site hold (server/_site_nodes.py): the site is
        # linked, through that node.
        elsewhere = self.nodes.linked_elsewhere()
        for name in sorted(set(self._peers) | set(lag) | set(elsewhere)):
            peer = self._peers.get(name, _Peer(role="edge"))
            stats = self.replicator.peer_stats(name)
            runs, events, synced = lag.get(name, (0, 0, 0))
            node = None if self.link_to(name) is not None else elsewhere.get(name)
            entry = response.peers.add(
                site=name,
                role=peer.role,
                connected=self.link_to(name) is not None or node is not None,
                runs_behind=runs,
                events_behind=events,
                events_pulled=stats.events_pulled,
                requests_forwarded=stats.requests_forwarded,
                address=peer.address if node is None else self.nodes.name(node),
            )
            link = self.link_to(name)
            if link is not None:
                entry.link_bytes_received = link.bytes_received
                entry.link_bytes_sent = link.bytes_sent
            if peer.connected_at:
                entry.last_connected.FromMicroseconds(peer.connected_at)
            if max(synced, stats.last_sync):
                entry.last_sync.FromMicroseconds(max(synced, stats.last_sync))
        return response


async def _until_down(link: SiteLink, work: Awaitable[None]) -> None:
    """Run a companion of ``link``; a failed call ends the link (it is redialled)."""
    try:
        await work
    except LinkDown as error:
        log.info("link to %s: %s", link.peer, error)
        link.close()
    except Exception:
        log.exception("link to %s failed", link.peer)
        link.close()


def _refusal(reason: str) -> bool:
    """Whether a failed dial's reason is the upstream refusing (as opposed to not being
    reachable). A TLS upstream refusing this edge's certificate only closes the
    socket under TLS 1.3: ``_why_closed`` tells that apart first."""
    upper = reason.upper()
    return any(mark in upper for mark in _REFUSAL_MARKS)


async def _status_of(call: Any) -> str:
    """Why a Link stream ended before hello was answered: its gRPC status, as the TLS
    handshake, the network or the upstream's auth set it (a TLS failure says so in the
    details)."""
    code: grpc.StatusCode = await call.code()
    details: str = await call.details() or ""
    return f"{code.name}: {details}".strip().rstrip(":")


async def _quietly(work: Awaitable[None]) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError, OSError):
        await work


# The role table (server/_auth.py RPC_ACCESS) lists the WorkflowService: a SiteService
# call is authorized as the WorkflowService call that needs the same access. A link and
# the site status span every namespace, as DescribeCluster does (admin on "*"); a
# handoff moves where a run is written, a write like a start.
_AUTHORIZED_AS = {
    "Link": "DescribeCluster",
    "DescribeSite": "DescribeCluster",
    "HandoffWorkflow": "StartWorkflow",
}


class SiteService(replication_pb2_grpc.SiteServiceServicer):
    """The gRPC face of a site (replication.proto). With auth on, a caller needs
    the admin role on every namespace to open a link or read the site status, and
    write access to the run's namespace to hand it off (server/_auth.py)."""

    def __init__(self, sites: Sites, gate: AuthGate | None) -> None:
        self._sites = sites
        self._gate = gate

    async def _authorized(
        self, rpc: str, namespace: str, context: _Context, audit: AuditEntry | None = None
    ) -> None:
        try:
            if self._gate is not None:
                principal = await self._gate.authenticate(context.invocation_metadata())
                note_principal(principal.name)
                self._gate.authorize(principal, _AUTHORIZED_AS[rpc], namespace)
        except ServiceError as error:
            if audit is not None:
                audit.done(error.code.name, None)
            await abort_with_detail(context, error)
        if audit is not None:
            audit.done(grpc.StatusCode.OK.name, None)

    async def Link(self, request_iterator: Any, context: _Context) -> None:
        # Who opened a link (principal, client certificate, address) is audited like a
        # mutating RPC, accepted or refused: a link reads and writes every namespace.
        audit = AuditEntry("Link", rp.DescribeSiteRequest(), context)
        await self._authorized("Link", ANY_NAMESPACE, context, audit)

        async def receive() -> rp.SiteFrame | None:
            try:
                frame = await context.read()
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                return None
            return None if frame is grpc.aio.EOF else frame

        await self._sites.serve_link(receive, context.write)

    async def DescribeSite(
        self, request: rp.DescribeSiteRequest, context: _Context
    ) -> rp.DescribeSiteResponse:
        await self._authorized("DescribeSite", ANY_NAMESPACE, context)
        return await self._answer(self._sites.describe(), context)

    async def HandoffWorkflow(
        self, request: rp.HandoffWorkflowRequest, context: _Context
    ) -> rp.HandoffWorkflowResponse:
        await self._authorized("HandoffWorkflow", request.namespace, context)
        return await self._answer(self._sites.handoff(request), context)

    async def _answer(self, work: Awaitable[R], context: _Context) -> R:
        try:
            return await work
        except ServiceError as error:
            await abort_with_detail(context, error)
            raise
        except StoreError as error:
            await abort_with_detail(context, UnavailableError(f"store: {error}"))
            raise
