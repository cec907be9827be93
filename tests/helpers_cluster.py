"""Shared harness of the multi-node tests: ``tideflow server start`` nodes on one
PostgreSQL database, who owns which shard, workflow ids of a given node's shards, and
node certificates for TLS between nodes."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from helpers import Processes, ServerProcess, eventually
from test_security_tls import make_ca

from tideflow.history import HistoryStore, ShardRecord, now_micros, shard_of

# Leases of the test nodes: a killed node's shards move within a few seconds.
LEASE_S = 2.0
CONDITION_TIMEOUT_S = 40.0
SHARDS = 16

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


async def owners(store: HistoryStore) -> dict[int, str]:
    """shard -> owner of every live lease."""
    now = now_micros()
    rows: list[ShardRecord] = await store.read_shards()
    return {r.shard_id: r.owner for r in rows if not r.free_at(now)}


async def split(store: HistoryStore, *names: str) -> dict[int, str] | None:
    """The owners once every shard is held by one of ``names``, each holding its
    balanced share (ceil(16 / len(names)) at most); else None."""
    held = await owners(store)
    count = Counter(held.values())
    share = -(-store.shard_count // len(names))
    if len(held) != store.shard_count or not set(count) <= set(names):
        return None
    if all(0 < count[n] <= share for n in names):
        return held
    return None


async def wait_split(store: HistoryStore, *names: str) -> dict[int, str]:
    """The owners, once ``names`` hold every shard between them."""
    found: dict[int, str] = await eventually(
        lambda: split(store, *names), f"{names} to split the shards", timeout=CONDITION_TIMEOUT_S
    )
    return found


def workflow_ids(
    held: dict[int, str], node: str | Sequence[str], count: int, tag: str
) -> list[str]:
    """``count`` workflow ids (``tag-N``) of namespace default whose shards ``node``
    (or one of several nodes) holds by ``held``."""
    wanted = {node} if isinstance(node, str) else set(node)
    ids = []
    for i in range(100_000):
        workflow_id = f"{tag}-{i}"
        if held.get(shard_of("default", workflow_id, SHARDS)) in wanted:
            ids.append(workflow_id)
            if len(ids) == count:
                return ids
    raise AssertionError(f"no workflow ids on {node}")


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
