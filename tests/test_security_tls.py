"""TLS and mTLS on the server's port (server/_tls.py) and in the client
(``Client.connect(tls=...)``), with certificates generated for each test run.

Refusals are handshake failures: the client never reaches an RPC and ``connect``
raises ``ConnectError`` once its (short) connect timeout is spent.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tideflow.server import ServerTLSConfig, TideflowServer
from tideflow.worker_sdk import Client, TLSConfig, Worker, activity, workflow
from tideflow.worker_sdk.exceptions import ConnectError

# Refusals wait this long for a handshake that cannot succeed.
_REFUSED_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(common_name: str) -> tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)), cert, key


def issue(
    ca: tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey],
    common_name: str,
    *,
    server: bool,
    names: Sequence[x509.GeneralName] = (
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ),
) -> Pem:
    """A certificate of ``ca`` for a server (named ``names``) or a client."""
    _, ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    other_ca: Pem
    other_client: Pem


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca = make_ca("tideflow test CA")
    other = make_ca("some other CA")
    return Pki(
        ca=ca[0],
        server=issue(ca, "localhost", server=True),
        client=issue(ca, "worker-1", server=False),
        other_ca=other[0],
        other_client=issue(other, "intruder", server=False),
    )


@activity.defn
async def shout(text: str) -> str:
    return text.upper()


@workflow.defn
class ShoutWorkflow:
    @workflow.run
    async def run(self, text: str) -> str:
        return await workflow.execute_activity(
            shout, text, start_to_close_timeout=timedelta(seconds=30)
        )


async def run_workflow(client: Client) -> str:
    tq = f"tls-{uuid.uuid4()}"
    async with Worker(client, task_queue=tq, workflows=[ShoutWorkflow], activities=[shout]):
        handle = await client.start_workflow(
            ShoutWorkflow.run, "over tls", id=f"tls-{uuid.uuid4()}", task_queue=tq
        )
        result: str = await asyncio.wait_for(handle.result(), timeout=60)
    return result


@pytest.fixture
async def tls_server(store_url: str, pki: Pki) -> AsyncIterator[TideflowServer]:
    tls = ServerTLSConfig.load(cert=pki.server.cert, key=pki.server.key)
    async with TideflowServer(store_url, port=0, tls=tls) as server:
        yield server


@pytest.fixture
async def mtls_server(store_url: str, pki: Pki) -> AsyncIterator[TideflowServer]:
    tls = ServerTLSConfig.load(cert=pki.server.cert, key=pki.server.key, client_ca=pki.ca.cert)
    async with TideflowServer(store_url, port=0, tls=tls) as server:
        yield server


async def test_tls_end_to_end_and_plaintext_refused(
    tls_server: TideflowServer, pki: Pki, tmp_path: Path
) -> None:
    # The CA as a file path (the other tests pass bytes); the address is an IP, which
    # the server certificate names too.
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(pki.ca.cert)
    async with await Client.connect(
        tls_server.address, tls=TLSConfig(server_root_ca_cert=ca_file)
    ) as client:
        assert await run_workflow(client) == "OVER TLS"
    # `domain`: the name checked when it is not the host connected to.
    async with await Client.connect(
        f"127.0.0.1:{tls_server.port}",
        tls=TLSConfig(server_root_ca_cert=pki.ca.cert, domain="localhost"),
    ) as client:
        assert await client.count_workflows() == 1  # the run above

    with pytest.raises(ConnectError):
        await Client.connect(tls_server.address, connect_timeout=_REFUSED_TIMEOUT_S)
    # A client that does not trust the server's CA refuses the server.
    with pytest.raises(ConnectError):
        await Client.connect(
            tls_server.address,
            tls=TLSConfig(server_root_ca_cert=pki.other_ca.cert),
            connect_timeout=_REFUSED_TIMEOUT_S,
        )


async def test_mtls_requires_a_client_certificate_of_its_ca(
    mtls_server: TideflowServer, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConnectError):
        await Client.connect(
            mtls_server.address,
            tls=TLSConfig(server_root_ca_cert=pki.ca.cert),
            connect_timeout=_REFUSED_TIMEOUT_S,
        )
    with pytest.raises(ConnectError):
        await Client.connect(
            mtls_server.address,
            tls=TLSConfig(
                server_root_ca_cert=pki.ca.cert,
                client_cert=pki.other_client.cert,
                client_private_key=pki.other_client.key,
            ),
            connect_timeout=_REFUSED_TIMEOUT_S,
        )
    tls = TLSConfig(
        server_root_ca_cert=pki.ca.cert,
        client_cert=pki.client.cert,
        client_private_key=pki.client.key,
    )
    caplog.set_level(logging.INFO, logger="tideflow.audit")
    async with await Client.connect(mtls_server.address, tls=tls) as client:
        assert await run_workflow(client) == "OVER TLS"
    # The audit log names the certificate the connection proved, not only the identity
    # the client claims.
    starts = [r for r in caplog.records if r.name == "tideflow.audit" and "StartWorkflow" in r.msg]
    assert len(starts) == 1
    assert "client_cert=worker-1" in starts[0].getMessage()


def test_tls_config_checks_its_inputs(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ValueError, match="go together"):
        TLSConfig(client_cert=pki.client.cert)
    with pytest.raises(ValueError, match="cannot read"):
        TLSConfig(server_root_ca_cert=tmp_path / "missing.pem").credentials()
    with pytest.raises(ValueError, match="not PEM"):
        ServerTLSConfig.load(cert=b"garbage", key=pki.server.key)
    assert "BEGIN" not in repr(ServerTLSConfig.load(cert=pki.server.cert, key=pki.server.key))


async def test_start_dev_with_tls_flags(tmp_path: Path, pki: Pki) -> None:
    files = {}
    for name, data in (
        ("cert", pki.server.cert),
        ("key", pki.server.key),
        ("ca", pki.ca.cert),
    ):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_bytes(data)
    base = [sys.executable, "-m", "tideflow.server._cli", "server", "start-dev"]
    base += ["--db", str(tmp_path / "t.db")]

    # Incomplete flag sets are usage errors, said in one line.
    for flags, message in (
        (["--tls-cert", str(files["cert"])], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", str(files["ca"])], "--tls-client-ca needs --tls-cert"),
        (
            ["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(files["key"])],
            "cannot read the TLS certificate",
        ),
    ):
        done = await asyncio.to_thread(
            subprocess.run, [*base, "--port", "0", *flags], capture_output=True, text=True
        )
        assert done.returncode == 2
        assert message in done.stderr

    proc = await asyncio.create_subprocess_exec(
        *base,
        "--port",
        "0",
        "--tls-cert",
        str(files["cert"]),
        "--tls-key",
        str(files["key"]),
        "--tls-client-ca",
        str(files["ca"]),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=60)).decode()
        assert line.startswith("tideflow server listening on "), line
        address = line.rsplit(" ", 1)[1].strip()
        tls = TLSConfig(
            server_root_ca_cert=files["ca"],
            client_cert=pki.client.cert,
            client_private_key=pki.client.key,
        )
        async with await Client.connect(address, tls=tls) as client:
            assert await run_workflow(client) == "OVER TLS"
        with pytest.raises(ConnectError):
            await Client.connect(
                address,
                tls=TLSConfig(server_root_ca_cert=files["ca"]),
                connect_timeout=_REFUSED_TIMEOUT_S,
            )
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout=60)
