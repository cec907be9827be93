"""Links between the nodes of one cluster: channels to peers and the node credential.

Nodes of one database talk to each other over gRPC on their advertised addresses (the
``cluster_members`` rows): a node that does not own a run's shard forwards the request
to the owner, and a node hands task rows and polls to the owner of a task queue. This
module gives every such caller the same two things:

- ``PeerChannels``: one long-lived channel per peer address, plaintext or TLS as the
  node itself listens (a cluster is all TLS or none; with mTLS the node presents its own
  certificate, since its peers require one signed by the cluster's client CA);
- ``NodeCredential``: proof that a call comes from a node of this cluster and not from
  a client, for the calls a node makes on its own behalf (cross-run transfers, matching
  internals). It is an HMAC of the node id under the store's current task token key
  (``TaskTokenSigner``): whoever holds a key of the database is a node. A call that
  forwards a client's request carries the client's own credentials instead, so the
  owner authenticates and authorizes the client exactly as if it had called it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from ._config import ServerConfig, grpc_server_options
from ._errors import ServiceError
from ._task_tokens import TaskTokenSigner
from ._tls import ServerTLSConfig

#: Metadata header of the node credential: ``<node id>:<key id>:<hex HMAC>``.
NODE_HEADER = "x-tideflow-node"
#: Metadata header set on a request one node forwards to another: the receiver serves it
#: itself (or refuses it), never forwards it again, so a stale view cannot loop a call.
FORWARDED_HEADER = "x-tideflow-forwarded"

_CREDENTIAL_CONTEXT = b"tideflow-node-credential:"
# Headers of the caller's call that travel with a request forwarded on its behalf.
_CLIENT_HEADERS = frozenset({"authorization", "x-tideflow-api-key"})


@dataclass(frozen=True, slots=True)
class Peer:
    """A node of the cluster as its membership row names it."""

    node_id: str
    address: str


class NodeCredential:
    """Signs and verifies the node credential under the store's task token keys."""

    def __init__(self, node_id: str, signer: TaskTokenSigner) -> None:
        self.node_id = node_id
        self._signer = signer

    async def metadata(self) -> tuple[tuple[str, str], ...]:
        """The header that proves this node's calls (one per call: keys rotate)."""
        key_id, mac = await self._signer.sign(_CREDENTIAL_CONTEXT + self.node_id.encode())
        return ((NODE_HEADER, f"{self.node_id}:{key_id}:{mac.hex()}"),)

    async def verify(self, value: str) -> str | None:
        """The node id a credential header proves, or None if it proves nothing (a
        malformed value, an unknown or retired key, a MAC that does not match)."""
        node_id, _, rest = value.rpartition(":")
        node_id, _, key_text = node_id.rpartition(":")
        if not node_id or not key_text.isdigit():
            return None
        try:
            mac = bytes.fromhex(rest)
        except ValueError:
            return None
        data = _CREDENTIAL_CONTEXT + node_id.encode()
        if not await self._signer.verify(data, int(key_text), mac):
            return None
        return node_id


async def require_node(
    credential: NodeCredential, metadata: Iterable[tuple[str, Any]] | None
) -> str:
    """The id of the node that made this call; UNAUTHENTICATED unless it carries a valid
    node credential. The cluster's internal RPCs call this first, whatever the auth mode:
    a client that could hand a node task rows or record tasks started would mint task
    tokens for runs it was never given."""
    header = node_of(metadata)
    node_id = None if header is None else await credential.verify(header)
    if node_id is None:
        raise NodeUnauthenticatedError(
            "this RPC is internal to the cluster: only its nodes may call it"
        )
    return node_id


class NodeUnauthenticatedError(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


def node_of(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The unverified node credential header of a call's metadata, if any."""
    for name, value in metadata or ():
        if name == NODE_HEADER:
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return None


def is_forwarded(metadata: Iterable[tuple[str, Any]] | None) -> bool:
    """Whether another node forwarded this call (it must not be forwarded again)."""
    return any(name == FORWARDED_HEADER for name, _ in metadata or ())


def forwarding_metadata(
    metadata: Iterable[tuple[str, Any]] | None, node_id: str
) -> tuple[tuple[str, str], ...]:
    """What a forwarded call carries: the caller's own credentials (the owner checks
    them as if the caller had called it) and the forwarded mark naming this node."""
    kept = [
        (name, value.decode() if isinstance(value, bytes) else str(value))
        for name, value in metadata or ()
        if name in _CLIENT_HEADERS
    ]
    return (*kept, (FORWARDED_HEADER, node_id))


class PeerChannels:
    """One channel per peer address, opened on first use and kept (gRPC reconnects by
    itself after a peer restarts on the same address)."""

    def __init__(self, config: ServerConfig, tls: ServerTLSConfig | None) -> None:
        # Same message limits as the node's own port: a forwarded request or response
        # must fit wherever it fits the node.
        self._options: list[tuple[str, Any]] = [
            (name, value)
            for name, value in grpc_server_options(config)
            if name.startswith("grpc.max_")
        ]
        self._options.append(("grpc.keepalive_time_ms", 30_000))
        # A restarted peer is dialled again within 2 s (gRPC's default backoff grows
        # to 120 s, during which calls to it fail fast).
        self._options.append(("grpc.max_reconnect_backoff_ms", 2_000))
        self._tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self._open(address)
        return channel

    def _open(self, address: str) -> grpc.aio.Channel:
        if self._tls is None:
            return grpc.aio.insecure_channel(address, options=self._options)
        tls = self._tls
        # Peers' certificates chain to the cluster's CA: the client CA under mTLS (one CA
        # for the cluster), else the system roots (a certificate from a public CA).
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.client_ca,
            private_key=tls.private_key if tls.client_ca is not None else None,
            certificate_chain=tls.cert_chain if tls.client_ca is not None else None,
        )
        return grpc.aio.secure_channel(address, credentials, options=self._options)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
