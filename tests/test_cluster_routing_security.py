"""Forwarding between nodes with security on (issue 11, server/_routing.py and
server/_peers.py):

- TLS and mTLS between nodes, with certificates made for the test: a node forwards a
  client's calls to the owner over TLS (presenting its own certificate under mTLS),
  and transfers reach the owner's ClusterService the same way. Under plain TLS a node
  trusts its peers by the system's roots, which the test points at its own CA
  (``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``, gRPC's standard setting).
- ``--auth api-key`` on every node: a forwarded call is authorized as the client (a
  reader's start is refused; the owner's audit line names the client's principal, not
  the forwarding node); the forwarded mark grants nothing; a client cannot call the
  internal ClusterService, with or without an API key, or with a forged node
  credential.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import grpc
import pytest
from helpers import Processes
from helpers_cluster import CONDITION_TIMEOUT_S, workflow_ids
from helpers_cluster_routing import (
    QUEUE,
    Inbox,
    Parent,
    audit_lines,
    node_starter,
    start_inbox,
    wait_split,
    workers,
    write_cluster_pki,
)

from tideflow.api.v1 import cluster_pb2, cluster_pb2_grpc, common_pb2, service_pb2
from tideflow.history import HistoryStore
from tideflow.worker_sdk import Client, TLSConfig
from tideflow.worker_sdk import exceptions as exc

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture
def store_url(pg_url: str) -> str:
    """PostgreSQL only: several processes on one database."""
    return pg_url


async def _drive_across_nodes(client: Client, owners: dict[int, str], tag: str) -> None:
    """Through node-a: a run of node-c's shard (forwarded calls), and a parent of
    node-a's shard whose children live on node-c's (the ClusterService)."""
    inbox, child, doomed, cancelled = workflow_ids(owners, "node-c", 4, tag)
    (parent,) = workflow_ids(owners, "node-a", 1, f"{tag}-parent")
    await start_inbox(client, inbox)
    handle = client.get_workflow_handle(inbox)
    await handle.signal(Inbox.add, "secure")
    await handle.signal(Inbox.close)
    assert await asyncio.wait_for(handle.result(), CONDITION_TIMEOUT_S) == "secure"
    await start_inbox(client, cancelled)
    started = await client.start_workflow(
        Parent.run, args=[child, doomed, cancelled], id=parent, task_queue=QUEUE
    )
    assert await asyncio.wait_for(started.result(), CONDITION_TIMEOUT_S) == "from-parent"


@pytest.mark.parametrize("mode", ["tls", "mtls"])
async def test_forwarding_over_tls_and_mtls_between_nodes(
    mode: str,
    procs: Processes,
    pg_url: str,
    store: HistoryStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pki = write_cluster_pki(tmp_path)
    flags = ["--tls-cert", str(pki["node"]), "--tls-key", str(pki["node_key"])]
    tls = TLSConfig(server_root_ca_cert=pki["ca"].read_bytes())
    if mode == "mtls":
        flags += ["--tls-client-ca", str(pki["ca"])]
        tls = TLSConfig(
            server_root_ca_cert=pki["ca"].read_bytes(),
            client_cert=pki["node"].read_bytes(),
            client_private_key=pki["node_key"].read_bytes(),
        )
    else:
        # The nodes' "system" roots: the test's CA (peers are checked against them).
        monkeypatch.setenv("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", str(pki["ca"]))
    start = node_starter(procs, pg_url, *flags)
    a = await start("node-a")
    c = await start("node-c")
    owners = await wait_split(store, "node-a", "node-c")
    async with (
        workers(a.address, c.address, tls=tls),
        await Client.connect(a.address, tls=tls) as client,
    ):
        await _drive_across_nodes(client, owners, mode)
    # Plaintext is refused by the nodes, as before.
    with pytest.raises(exc.ConnectError):
        await Client.connect(a.address, connect_timeout=2)


async def test_with_api_keys_a_forwarded_call_is_authorized_as_its_client(
    procs: Processes, pg_url: str, store: HistoryStore
) -> None:
    keys = store.api_keys
    _, writer = await keys.create("app", ["default:writer"])
    _, reader = await keys.create("dashboard", ["default:reader"])
    _, worker = await keys.create("worker", ["default:worker"])
    start = node_starter(procs, pg_url, "--auth", "api-key")
    a = await start("node-a")
    c = await start("node-c")
    owners = await wait_split(store, "node-a", "node-c")
    async with (
        workers(a.address, c.address, api_key=worker),
        await Client.connect(a.address, api_key=writer) as client,
        await Client.connect(a.address, api_key=reader) as reading,
    ):
        await _drive_across_nodes(client, owners, "keyed")
        # The owner authorized the client's forwarded start, and audited it as the
        # client's (the forwarding node wrote no line).
        (inbox,) = workflow_ids(owners, "node-c", 1, "keyed")
        (line,) = audit_lines(c, "StartWorkflow", inbox, "OK")
        assert "principal=app " in line and "forwarded_by=node-a " in line, line
        assert audit_lines(a, "StartWorkflow", inbox, "OK") == []
        # A reader reads through node-a, and cannot start there.
        assert (await reading.get_workflow_handle(inbox).describe()).status.name == "COMPLETED"
        (other,) = workflow_ids(owners, "node-c", 1, "reader")
        with pytest.raises(exc.RPCError) as refused:
            await start_inbox(reading, other)
        assert refused.value.status == "PERMISSION_DENIED"

    async with grpc.aio.insecure_channel(c.address) as channel:
        # The forwarded mark grants nothing: the owner checks the caller's key itself.
        start_call = channel.unary_unary(
            "/tideflow.api.v1.WorkflowService/StartWorkflow",
            request_serializer=service_pb2.StartWorkflowRequest.SerializeToString,
            response_deserializer=service_pb2.StartWorkflowResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as forged_forward:
            await start_call(
                _start_request(other),
                timeout=10,
                metadata=(("authorization", f"Bearer {reader}"), ("x-tideflow-forwarded", "a")),
            )
        assert forged_forward.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Clients cannot call the internal service: no key, a writer's key, a forged
        # node credential.
        internal = cluster_pb2_grpc.ClusterServiceStub(channel)  # type: ignore[no-untyped-call]
        for metadata in [
            (),
            (("authorization", f"Bearer {writer}"),),
            (("x-tideflow-node", "node-a:1:" + "00" * 32),),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await internal.StartChildWorkflow(
                    cluster_pb2.StartChildWorkflowRequest(start=_start_request(other)),
                    timeout=10,
                    metadata=metadata,
                )
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
    assert not await store.get_current("default", other)  # nothing was started


def _start_request(workflow_id: str) -> service_pb2.StartWorkflowRequest:
    return service_pb2.StartWorkflowRequest(
        namespace="default",
        workflow_id=workflow_id,
        workflow_type=common_pb2.WorkflowType(name="Inbox"),
        task_queue=common_pb2.TaskQueue(name=QUEUE),
        request_id=str(uuid.uuid4()),
    )
