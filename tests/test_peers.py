"""The node credential (server/_peers.py): a node of the cluster proves its calls with an
HMAC under the database's task token keys; clients cannot make one, and one made for
another database or altered in any part is refused."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tideflow.api.v1 import service_pb2, service_pb2_grpc
from tideflow.history import HistoryStore
from tideflow.server import AuthConfig, AuthMode, TideflowServer
from tideflow.server._peers import (
    NODE_HEADER,
    NodeCredential,
    forwarding_metadata,
    is_forwarded,
    require_node,
)
from tideflow.server._task_tokens import TaskTokenSigner


def _credential(store: HistoryStore, node_id: str) -> NodeCredential:
    return NodeCredential(node_id, TaskTokenSigner(store.token_keys, refresh_s=60))


async def test_credentials_verify_only_unaltered_and_on_their_own_database(
    store: HistoryStore, tmp_path: Path
) -> None:
    signer = TaskTokenSigner(store.token_keys, refresh_s=60)
    node_a = NodeCredential("node-a", signer)
    ((name, value),) = await node_a.metadata()
    assert name == NODE_HEADER
    assert await node_a.verify(value) == "node-a"
    # Another node of the same database verifies it too (the keys are shared).
    assert await _credential(store, "node-b").verify(value) == "node-a"
    node_id, key_id, mac = value.rsplit(":", 2)
    for forged in (
        f"node-c:{key_id}:{mac}",  # claims another node
        f"{node_id}:{int(key_id) + 7}:{mac}",  # an unknown key
        f"{node_id}:{key_id}:{'0' * len(mac)}",  # a made-up MAC
        f"{node_id}:{key_id}:zz",  # not hex
        "no-separators",
        f"{node_id}::{mac}",
    ):
        assert await node_a.verify(forged) is None, forged
    other = await HistoryStore.open(f"sqlite:///{tmp_path}/other.db")
    try:
        assert await _credential(other, "node-a").verify(value) is None
    finally:
        await other.close()
    # After a rotation the old key still verifies until it is retired; new calls
    # carry the new key.
    await store.token_keys.rotate()
    await signer.load()
    ((_, rotated),) = await node_a.metadata()
    assert rotated != value
    assert await node_a.verify(rotated) == "node-a"
    assert await node_a.verify(value) == "node-a"


async def test_internal_calls_need_the_credential_whatever_the_auth_mode(
    store: HistoryStore,
) -> None:
    node = _credential(store, "node-a")
    assert await require_node(node, await node.metadata()) == "node-a"
    for metadata in (None, (), (("authorization", "Bearer x"),), ((NODE_HEADER, "x:1:00"),)):
        with pytest.raises(Exception, match="internal to the cluster"):
            await require_node(node, metadata)


def test_forwarded_calls_carry_the_callers_credentials_and_the_mark() -> None:
    incoming = (("authorization", "Bearer k"), ("user-agent", "grpc"), (NODE_HEADER, "n:1:00"))
    out = forwarding_metadata(incoming, "node-a")
    assert ("authorization", "Bearer k") in out
    assert all(name != NODE_HEADER and name != "user-agent" for name, _ in out)
    assert is_forwarded(out) and not is_forwarded(incoming)


async def test_a_node_credential_passes_the_auth_gate(store_url: str) -> None:
    server = TideflowServer(store_url, port=0, auth=AuthConfig(mode=AuthMode.API_KEY))
    async with server, grpc.aio.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        request = service_pb2.RegisterNamespaceRequest(namespace="by-a-node")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RegisterNamespace(request)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as forged:
            await stub.RegisterNamespace(request, metadata=((NODE_HEADER, "n:1:00"),))
        assert forged.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "node credential" in (forged.value.details() or "")
        assert server.node_credential is not None
        metadata = await server.node_credential.metadata()
        await stub.RegisterNamespace(request, metadata=metadata)
        assert await server.store.namespace_exists("by-a-node")
