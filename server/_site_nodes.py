"""A site of several nodes acting as one site (server/_sites.py, docs/cluster.md).

An edge links to one node of a cloud of several nodes at a time (the one it dialled,
``--upstream`` naming several), but the runs it replicates, and the runs its requests
act on, live on shards any node may hold. So the node holding the link does only what
any node may do (read the store: the run listings and event batches the edge pulls,
the inbox) and hands the rest to the node that may do it, with ``SiteCall``
(cluster.proto, node credential required):

- to the owner of a run's shard (``at_owner``, routed like any run-keyed call:
  server/_routing.py, retried while the shard moves): applying a batch pulled from the
  peer (fenced by the shard, and the owner's cache of the replica is the one to drop),
  a request another site forwards for a run homed here, a take-over of a run handed
  here, a start or a handoff;
- to the node holding the link to a peer (``over_link``), from any other node: a start
  homed at the peer, a handoff forwarded to the run's home; and the hints of runs that
  changed (``relay_hint``), so the peer pulls at once whichever node committed them.

Which node holds which link is announced: a node holding links tells the other live
nodes every ``_ANNOUNCE_S`` (and at once when a link comes up or goes down); an
announcement lapses after ``_ANNOUNCED_FOR_S``, so a killed node's links are forgotten.
Two nodes may both hold a link to the same peer for a while (the peer failed over and
the old stream has not timed out yet): that is harmless, since everything done over a
link is idempotent (pulls read, batches apply only where they continue the replica,
forwarded requests carry request ids) and every write is fenced at the shard's owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf import wrappers_pb2
from google.protobuf.message import Message

from tideflow.api.v1 import cluster_pb2
from tideflow.api.v1 import replication_pb2 as rp
from tideflow.history import RunKey

from ._peers import FORWARDED_HEADER, NodeCredential, Peer
from ._routing import RemoteStatusError, Router
from ._shards import ShardController
from ._site_link import SiteLink

log = logging.getLogger("tideflow.server.sites")

M = TypeVar("M", bound=Message)
#: A node call's handler: the call -> its reply message.
NodeHandler = Callable[[cluster_pb2.SiteCallRequest], Awaitable[Message]]
_SITE_CALL = "/tideflow.api.v1.ClusterService/SiteCall"
_CALL_TIMEOUT_S = 30.0
_ANNOUNCE_S = 2.0
_ANNOUNCED_FOR_S = 3 * _ANNOUNCE_S


@dataclass
class LinkElsewhere:
    """A link another node of this site announced holding."""

    node: Peer
    until: float


class SiteNodes:
    """The nodes of this site, for the site's calls (module docstring)."""

    def __init__(
        self,
        shards: ShardController | None,
        router: Router | None,
        credential: NodeCredential | None,
        local_links: Callable[[], list[SiteLink]],
    ) -> None:
        """Without ``router`` (a server whose engine is alone) every call is served
        here."""
        self._shards = shards
        self._router = router
        self._credential = credential
        self._local_links = local_links
        self.handlers: dict[str, NodeHandler] = {
            "links": self._announced,
            "hint": self._hinted,
            "over_link": self._serve_over_link,
        }
        self._elsewhere: dict[str, LinkElsewhere] = {}
        self.announce_now = asyncio.Event()

    def join(self, shards: ShardController, router: Router, credential: NodeCredential) -> None:
        """Serve with the other nodes on this database (until then: alone)."""
        self._shards, self._router, self._credential = shards, router, credential

    # ------------------------------------------------------------ calls to a run's owner

    async def at_owner(
        self, key: RunKey, method: str, peer: str, message: Message, reply_type: type[M]
    ) -> M:
        """``method`` served by the owner of ``key``'s shard (this node, or another
        one), with ``message``; its reply."""
        call = cluster_pb2.SiteCallRequest(
            method=method,
            peer=peer,
            namespace=key.namespace,
            workflow_id=key.workflow_id,
            run_id=key.run_id,
            body=message.SerializeToString(),
        )

        async def local() -> M:
            reply = await self.handlers[method](call)
            assert isinstance(reply, reply_type)
            return reply

        router = self._router
        if router is None:
            return await local()

        async def remote(owner: Peer) -> M:
            return reply_type.FromString(await self._invoke(owner, call))

        return await router.call(key.namespace, key.workflow_id, local, remote, None)

    async def serve(self, call: cluster_pb2.SiteCallRequest) -> cluster_pb2.SiteCallResponse:
        """A call another node of this site handed here (``ClusterService.SiteCall``).
        One for a run's owner is refused (UNAVAILABLE: the caller looks again) unless
        this node holds the run's shard."""
        shards = self._shards
        if call.workflow_id and shards is not None and not shards.owns(run_of(call)):
            if self._router is not None:
                await self._router.refresh()
            shards.check(call.namespace, call.workflow_id)
        handler = self.handlers.get(call.method)
        if handler is None:
            raise ValueError(f"unknown site call {call.method!r}")
        reply = await handler(call)
        return cluster_pb2.SiteCallResponse(body=reply.SerializeToString())

    async def at_node(
        self, node: Peer, method: str, peer: str, message: Message, reply_type: type[M]
    ) -> M:
        """``method`` served by ``node`` (this node: here), with ``message``."""
        call = cluster_pb2.SiteCallRequest(
            method=method, peer=peer, body=message.SerializeToString()
        )
        if self._router is None or node.node_id == self._router.node_id:
            reply = await self.handlers[method](call)
            assert isinstance(reply, reply_type)
            return reply
        return reply_type.FromString(await self._invoke(node, call))

    async def at_every_other_node(
        self, method: str, peer: str, message: Message, reply_type: type[M]
    ) -> list[M]:
        """``method`` served by every other live node; the replies of those that
        answered in time (a node down or slow is left out: the caller tries again)."""
        if self._shards is None:
            return []
        call = cluster_pb2.SiteCallRequest(
            method=method, peer=peer, body=message.SerializeToString()
        )
        replies = []
        for node in self._shards.peers():
            try:
                replies.append(reply_type.FromString(await self._invoke(node, call, _ANNOUNCE_S)))
            except Exception as error:  # told again on the caller's next round
                log.debug("site call %s on node %s: %s", method, node.node_id, error)
        return replies

    async def _invoke(
        self, node: Peer, call: cluster_pb2.SiteCallRequest, timeout: float = _CALL_TIMEOUT_S
    ) -> bytes:
        assert self._router is not None and self._credential is not None
        call.from_node = self._router.node_id
        metadata = (*await self._credential.metadata(), (FORWARDED_HEADER, self._router.node_id))
        reply = await self._router.invoke(
            node,
            _SITE_CALL,
            call,
            cluster_pb2.SiteCallResponse,
            timeout=timeout,
            metadata=metadata,
        )
        return bytes(reply.body)

    def owned(self) -> frozenset[int]:
        """The shards this node holds now (none known: a server alone)."""
        return frozenset() if self._shards is None else frozenset(self._shards.owned())

    # ------------------------------------------------------------ links held by other nodes

    def here(self) -> str:
        """This node, as ``site status`` names the node holding a link ("" alone)."""
        shards = self._shards
        return "" if shards is None else f"node {shards.node_id} ({shards.address})"

    def link_node(self, peer: str) -> Peer | None:
        """The other node of this site that announced a link to ``peer`` (None: no
        node does, or only this one)."""
        held = self._elsewhere.get(peer)
        loop = asyncio.get_running_loop()
        if held is None or held.until < loop.time():
            return None
        return held.node

    def linked_elsewhere(self) -> dict[str, Peer]:
        """peer site -> the other node holding a link to it, by the announcements."""
        return {peer: node for peer in list(self._elsewhere) if (node := self.link_node(peer))}

    def name(self, node: Peer) -> str:
        return f"node {node.node_id} ({node.address})"

    async def over_link(
        self, link: SiteLink | None, peer: str, method: str, message: Message, reply_type: type[M]
    ) -> M | None:
        """``method`` called on ``peer`` over ``link`` (this node's), else over the
        link another node holds; None if no node of this site holds one."""
        if link is not None:
            return await link.call(method, message, reply_type)
        node = self.link_node(peer)
        if node is None:
            return None
        frame = rp.SiteFrame(method=method, body=message.SerializeToString())
        call = cluster_pb2.SiteCallRequest(
            method="over_link", peer=peer, body=frame.SerializeToString()
        )
        try:
            frame = rp.SiteFrame.FromString(await self._invoke(node, call))
            return reply_type.FromString(frame.body)
        except RemoteStatusError as error:
            raise RuntimeError(f"{method} over the link at node {node.node_id}: {error}") from None

    async def _serve_over_link(self, call: cluster_pb2.SiteCallRequest) -> Message:
        frame = rp.SiteFrame.FromString(call.body)
        link = next((x for x in self._local_links() if x.peer == call.peer), None)
        if link is None:
            raise LookupError(f"no link to {call.peer!r} here any more")
        # The reply's type is the caller's business: it travels serialized both ways.
        reply = await link.call_serialized(frame.method, frame.body)
        return rp.SiteFrame(method=frame.method, reply=True, body=reply)

    async def relay_hint(self, hint: rp.RunsChanged) -> None:
        """Tell the nodes holding links which runs changed here (they tell their
        peers); a lost hint costs a sync interval, no more."""
        nodes = {node.node_id: node for node in self.linked_elsewhere().values()}
        call = cluster_pb2.SiteCallRequest(method="hint", body=hint.SerializeToString())
        for node in nodes.values():
            with contextlib.suppress(Exception):
                # Short: a node that does not answer must not hold up this node's hints.
                await self._invoke(node, call, timeout=_ANNOUNCE_S)

    async def _hinted(self, call: cluster_pb2.SiteCallRequest) -> Message:
        hint = rp.RunsChanged.FromString(call.body)
        for link in self._local_links():
            with contextlib.suppress(Exception):
                await link.call("changed", hint, rp.RunsChanged)
        return rp.RunsChanged()

    async def _announced(self, call: cluster_pb2.SiteCallRequest) -> Message:
        names = wrappers_pb2.StringValue.FromString(call.body).value.split()
        until = asyncio.get_running_loop().time() + _ANNOUNCED_FOR_S
        sender = Peer(call.from_node, call.peer)  # the announcer's address rides in peer
        for peer, held in list(self._elsewhere.items()):
            if held.node.node_id == sender.node_id and peer not in names:
                del self._elsewhere[peer]
        for peer in names:
            self._elsewhere[peer] = LinkElsewhere(sender, until)
        return rp.RunsChanged()

    async def announce_loop(self) -> None:
        """Tell the other live nodes which links this node holds: every few seconds
        while it holds any, at once when one comes up or goes down."""
        if self._shards is None or self._router is None:
            return
        held_before: set[str] = set()
        while True:
            held = {link.peer for link in self._local_links() if link.peer}
            if held or held != held_before:
                call = cluster_pb2.SiteCallRequest(
                    method="links",
                    peer=self._shards.address,
                    body=wrappers_pb2.StringValue(value=" ".join(sorted(held))).SerializeToString(),
                )
                for node in self._shards.peers():
                    try:
                        await self._invoke(node, call, timeout=_ANNOUNCE_S)
                    except Exception as error:  # told again in a moment
                        log.debug("announcing links to node %s: %s", node.node_id, error)
                held_before = held
            self.announce_now.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_ANNOUNCE_S):
                    await self.announce_now.wait()


def run_of(call: cluster_pb2.SiteCallRequest) -> RunKey:
    """The run a call to a run's owner names."""
    return RunKey(namespace=call.namespace, workflow_id=call.workflow_id, run_id=call.run_id)
