"""Harness of the routing tests (several ``tideflow server start`` nodes forwarding to
each other): a node starter with extra flags, the workflows and in-process workers of
the routing tests, the audit lines a node wrote, and node certificates for TLS between
nodes. Shard ownership helpers are tests/helpers_cluster.py's."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from helpers import Processes, ServerProcess, eventually
from helpers_cluster import CONDITION_TIMEOUT_S, split
from test_security_tls import make_ca

from tideflow.history import HistoryStore
from tideflow.worker_sdk import Client, Worker, activity, workflow

# Leases of the test nodes: a killed node's shards move within a few seconds.
LEASE_S = 2.0

StartNode = Callable[..., Awaitable[ServerProcess]]


def node_starter(procs: Processes, pg_url: str, *common: str) -> StartNode:
    """``start(node_id, *flags)``: a ``tideflow server start`` node on ``pg_url`` named
    ``node_id`` (2 s leases, ``common`` and ``flags`` added), listening. Auth is off
    unless the flags say otherwise (the last ``--auth`` wins)."""

    async def start(node_id: str, *flags: str) -> ServerProcess:
        argv = ("--node-id", node_id, "--lease-seconds", str(LEASE_S), "--auth", "off")
        node = ServerProcess(
            procs, pg_url, name=node_id, command="start", flags=(*argv, *common, *flags)
        )
        await node.start()
        return node

    return start


async def wait_split(store: HistoryStore, *names: str) -> dict[int, str]:
    """The owners, once ``names`` hold every shard between them."""
    found: dict[int, str] = await eventually(
        lambda: split(store, *names), f"{names} to split the shards", timeout=CONDITION_TIMEOUT_S
    )
    return found


# --------------------------------------------------------- workflows and workers

QUEUE = "cluster-routing"


@activity.defn
async def joined(items: list[str]) -> str:
    return ",".join(items)


@workflow.defn
class Inbox:
    """Collects signalled items until ``close``; returns them joined by an activity."""

    def __init__(self) -> None:
        self._items: list[str] = []
        self._closed = False

    @workflow.signal
    def add(self, item: str) -> None:
        self._items.append(item)

    @workflow.signal
    def close(self) -> None:
        self._closed = True

    @workflow.query
    def items(self) -> list[str]:
        return list(self._items)

    @workflow.run
    async def run(self) -> str:
        await workflow.wait_condition(lambda: self._closed)
        return str(
            await workflow.execute_activity(
                joined, self._items, start_to_close_timeout=timedelta(seconds=10)
            )
        )


@workflow.defn
class Parent:
    """Acts on runs of another node's shards: a child it signals (through an external
    handle) and waits for, a child its close terminates, a run it cancels."""

    @workflow.run
    async def run(self, child_id: str, doomed_id: str, cancelled_id: str) -> str:
        child = await workflow.start_child_workflow(Inbox.run, id=child_id)
        external = workflow.get_external_workflow_handle(child_id)
        await external.signal(Inbox.add, "from-parent")
        await external.signal(Inbox.close)
        result = str(await child)
        await workflow.start_child_workflow(Inbox.run, id=doomed_id)  # TERMINATE on close
        await workflow.get_external_workflow_handle(cancelled_id).cancel()
        return result


@contextlib.asynccontextmanager
async def workers(*addresses: str, **connect: Any) -> AsyncIterator[list[Client]]:
    """A client and an Inbox worker per address (``connect``: Client.connect's
    options); a worker of a dead node is abandoned after a short wait."""
    clients = [await Client.connect(a, **connect) for a in addresses]
    running = [
        Worker(c, task_queue=QUEUE, workflows=[Inbox, Parent], activities=[joined]) for c in clients
    ]
    for w in running:
        w.start()
    try:
        yield clients
    finally:
        for w in running:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.shutdown(), 5)
        for c in clients:
            await c.close()


async def start_inbox(client: Client, workflow_id: str) -> None:
    await client.start_workflow(Inbox.run, id=workflow_id, task_queue=QUEUE)


def audit_lines(node: ServerProcess, rpc: str, workflow_id: str, outcome: str = "") -> list[str]:
    """The audit lines every process of node ``node`` wrote for ``rpc`` (on
    ``workflow_id``, with ``outcome``, when given)."""
    lines = []
    for path in sorted(node.proc.err.parent.glob(f"{node.name}-*.err")):
        for line in path.read_text(errors="replace").splitlines():
            if f"tideflow.audit: rpc={rpc} " not in line:
                continue
            if workflow_id and f"workflow_id={workflow_id} " not in line:
                continue
            if outcome and f"outcome={outcome} " not in line:
                continue
            lines.append(line)
    return lines


# ------------------------------------------------------------------ certificates


def write_cluster_pki(directory: Path) -> dict[str, Path]:
    """A CA and one certificate every node of the test cluster uses, written as PEM
    files ``ca``, ``node`` and ``node_key``. The node certificate names 127.0.0.1 and
    serves both ends of a link: the server (clients and peers call it) and, under
    mTLS, the client (it calls its peers), hence both extended key usages."""
    ca_pem, ca, ca_key = make_ca("tideflow cluster CA")
    now = dt.datetime.now(dt.UTC)
    valid = (now - dt.timedelta(minutes=5), now + dt.timedelta(days=1))
    node_key = ec.generate_private_key(ec.SECP256R1())
    node = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tideflow-node")]))
        .issuer_name(ca.subject)
        .public_key(node_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.pem", "node": directory / "node.pem"}
    paths["node_key"] = directory / "node.key"
    paths["ca"].write_bytes(ca_pem.cert)
    paths["node"].write_bytes(node.public_bytes(serialization.Encoding.PEM))
    paths["node_key"].write_bytes(
        node_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths
