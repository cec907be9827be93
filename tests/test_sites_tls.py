"""The edge-to-cloud link over TLS and mTLS (``--upstream-tls*``, server/_tls.py
``UpstreamTLSConfig``, server/_sites.py): real ``start-dev`` processes, each site on its
own SQLite file, certificates made for the test.

The cloud's certificate names only ``cloud.tideflow.test`` while the edges dial
127.0.0.1, so each edge must be told the name to check (``--upstream-tls-server-name``).
An edge that cannot link (another CA, no client certificate under mTLS, no API key
under auth) says why in ``site status`` and its log, and keeps running its own runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from helpers import TIDEFLOW_CLI, Processes, ServerProcess, eventually
from helpers_sites import linked, same_history, site_cli, site_status
from test_security_tls import issue, make_ca

from tideflow.history import HistoryStore
from tideflow.server import ServerConfig, UpstreamTLSConfig, _cli
from tideflow.worker_sdk import Client, TLSConfig, Worker, WorkflowExecutionStatus, workflow

pytestmark = pytest.mark.slow

CLOUD_NAME = "cloud.tideflow.test"


@dataclass(frozen=True)
class SitePki:
    """PEM files: the sites' CA, the cloud's certificate, an edge's client
    certificate, a CA that signed neither, and a client certificate it signed."""

    ca: Path
    cloud_cert: Path
    cloud_key: Path
    edge_cert: Path
    edge_key: Path
    other_ca: Path
    stranger_cert: Path
    stranger_key: Path

    def cloud_tls(self) -> TLSConfig:
        """How a test client reaches the cloud."""
        return TLSConfig(server_root_ca_cert=self.ca, domain=CLOUD_NAME)

    def dial(self, ca: Path | None = None) -> tuple[str, ...]:
        """An edge's flags for a TLS upstream signed by ``ca`` (default: the sites')."""
        return (
            "--upstream-tls-ca",
            str(ca or self.ca),
            "--upstream-tls-server-name",
            CLOUD_NAME,
        )

    def client_cert(self, *, stranger: bool = False) -> tuple[str, ...]:
        """An edge's flags for its client certificate (``stranger``: the other CA's)."""
        return (
            "--upstream-tls-cert",
            str(self.stranger_cert if stranger else self.edge_cert),
            "--upstream-tls-key",
            str(self.stranger_key if stranger else self.edge_key),
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SitePki:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca("tideflow sites CA")
    cloud = issue(ca, "cloud", server=True, names=[x509.DNSName(CLOUD_NAME)])
    edge = issue(ca, "edge1", server=False)
    other_ca = make_ca("some other CA")
    stranger = issue(other_ca, "edge4", server=False)
    files = {
        "ca": ca[0].cert,
        "cloud_cert": cloud.cert,
        "cloud_key": cloud.key,
        "edge_cert": edge.cert,
        "edge_key": edge.key,
        "other_ca": other_ca[0].cert,
        "stranger_cert": stranger.cert,
        "stranger_key": stranger.key,
    }
    for name, data in files.items():
        (folder / f"{name}.pem").write_bytes(data)
    return SitePki(**{name: folder / f"{name}.pem" for name in files})


@workflow.defn
class Greeter:
    """Ends with the first greeting it is sent."""

    def __init__(self) -> None:
        self.greeting: str | None = None

    @workflow.run
    async def run(self) -> str:
        await workflow.wait_condition(lambda: self.greeting is not None)
        assert self.greeting is not None
        return self.greeting

    @workflow.signal
    def greet(self, text: str) -> None:
        self.greeting = text


class Sites:
    """A cloud process and edge processes dialling it, each on its own SQLite file."""

    cloud: ServerProcess

    def __init__(self, procs: Processes, folder: Path) -> None:
        self._procs = procs
        self._folder = folder

    def url(self, site: str) -> str:
        return f"sqlite:///{self._folder / f'{site}.db'}"

    async def start_cloud(self, *flags: str) -> None:
        self.cloud = ServerProcess(
            self._procs,
            self.url("cloud"),
            name="cloud",
            flags=("--cluster-name", "cloud", "--no-ui", *flags),
        )
        await self.cloud.start()

    async def edge(self, name: str, *flags: str) -> ServerProcess:
        edge = ServerProcess(
            self._procs,
            self.url(name),
            name=name,
            flags=("--cluster-name", name, "--upstream", self.cloud.address, "--no-ui", *flags),
        )
        await edge.start()
        return edge


def _refused(client: Client, reason: str) -> Callable[[], Awaitable[bool]]:
    """Whether the site's last dial of its upstream failed naming ``reason``."""

    async def check() -> bool:
        return reason in (await site_status(client)).upstream_error

    return check


def _failed_dials(client: Client, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await site_status(client)).upstream_failures >= count

    return check


async def _runs_on_its_own(client: Client) -> None:
    """A run at an unlinked edge, from start to end."""
    tq = f"alone-{uuid.uuid4()}"
    async with Worker(client, task_queue=tq, workflows=[Greeter]):
        handle = await client.start_workflow(Greeter.run, id=tq, task_queue=tq)
        await handle.signal(Greeter.greet, "offline")
        assert await handle.result() == "offline"


async def _connected(stack: AsyncExitStack, address: str, tls: TLSConfig | None = None) -> Client:
    return await stack.enter_async_context(await Client.connect(address, tls=tls or False))


async def test_an_edge_links_over_tls_replicates_and_forwards_a_signal(
    procs: Processes, tmp_path: Path, pki: SitePki
) -> None:
    sites = Sites(procs, tmp_path)
    await sites.start_cloud("--tls-cert", str(pki.cloud_cert), "--tls-key", str(pki.cloud_key))
    edge = await sites.edge("edge1", *pki.dial())
    lost = await sites.edge("edge2", *pki.dial(pki.other_ca))
    async with AsyncExitStack() as stack:
        at_cloud = await _connected(stack, sites.cloud.address, pki.cloud_tls())
        at_edge = await _connected(stack, edge.address)
        at_lost = await _connected(stack, lost.address)
        await eventually(lambda: linked(at_edge, "cloud"), "edge1 linked over TLS")
        tq = f"tls-{uuid.uuid4()}"
        async with Worker(at_edge, task_queue=tq, workflows=[Greeter]):
            handle = await at_edge.start_workflow(Greeter.run, id=tq, task_queue=tq)
            replica = at_cloud.get_workflow_handle(tq, run_id=handle.run_id)
            copied = await same_history(at_edge, at_cloud, tq, handle.run_id or "")
            await eventually(copied, "the cloud holds the run's replica")
            assert (await replica.describe()).home_cluster == "edge1"
            # Sent to the cloud, forwarded over the TLS link to the run's home.
            await replica.signal(Greeter.greet, "over tls")
            assert await handle.result() == "over tls"

        async def replica_completed() -> bool:
            return (await replica.describe()).status == WorkflowExecutionStatus.COMPLETED

        await eventually(replica_completed, "the cloud's replica completed")
        # Another CA's edge: the handshake fails, it says so and runs on its own.
        await eventually(_refused(at_lost, "CERTIFICATE_VERIFY_FAILED"), "edge2 refused")
        await _runs_on_its_own(at_lost)
        code, out, err = await site_cli("site", "status", "--address", lost.address)
        assert code == 0, err
        assert "upstream link down: " in out and "CERTIFICATE_VERIFY_FAILED" in out, out
        # It redials with exponential backoff past the 2 s of an unreachable cloud,
        # and said why once, not on every redial.
        await eventually(_failed_dials(at_lost, 6), "edge2's sixth failed dial")
        assert (await site_status(at_lost)).upstream_backoff_s > 2.0
        said = [line for line in lost.proc.err.read_text().splitlines() if "cannot link" in line]
        assert len(said) == 1 and "(refused; redialled with backoff up to 60 s)" in said[0], said
        assert [peer.site for peer in (await site_status(at_cloud)).peers] == ["edge1"]


async def test_an_mtls_cloud_links_only_an_edge_with_a_certificate_and_a_key(
    procs: Processes, tmp_path: Path, pki: SitePki
) -> None:
    sites = Sites(procs, tmp_path)
    store = await HistoryStore.open(sites.url("cloud"))
    try:
        _, admin_key = await store.api_keys.create("edges", ["*:admin"])
    finally:
        await store.close()
    await sites.start_cloud(
        *("--tls-cert", str(pki.cloud_cert), "--tls-key", str(pki.cloud_key)),
        *("--tls-client-ca", str(pki.ca), "--auth", "api-key"),
    )
    key = ("--upstream-api-key", admin_key)
    edge = await sites.edge("edge1", *pki.dial(), *pki.client_cert(), *key)
    bare = await sites.edge("edge2", *pki.dial(), *key)
    keyless = await sites.edge("edge3", *pki.dial(), *pki.client_cert())
    stranger = await sites.edge("edge4", *pki.dial(), *pki.client_cert(stranger=True), *key)
    async with AsyncExitStack() as stack:
        at_edge = await _connected(stack, edge.address)
        at_bare = await _connected(stack, bare.address)
        at_keyless = await _connected(stack, keyless.address)
        at_stranger = await _connected(stack, stranger.address)
        await eventually(lambda: linked(at_edge, "cloud"), "edge1 linked over mTLS")
        # Without a client certificate, or with another CA's, the cloud ends the
        # connection after a TLS 1.3 handshake the edge saw complete: gRPC says only
        # "Socket closed", the edge's own probe tells it was refused.
        await eventually(_refused(at_bare, "requires a client certificate"), "edge2 refused")
        await eventually(
            _refused(at_stranger, "did not accept this edge's client certificate"),
            "edge4 refused",
        )
        # With one but no API key the cloud's auth refuses the link.
        await eventually(_refused(at_keyless, "UNAUTHENTICATED"), "edge3 refused")
        await _runs_on_its_own(at_bare)
        # Refused, not unreachable: the backoff grows past the 2 s cap of an
        # unreachable cloud, and the log says so once.
        for at_refused, refused in ((at_bare, bare), (at_stranger, stranger)):
            await eventually(_failed_dials(at_refused, 6), "a sixth failed dial")
            assert (await site_status(at_refused)).upstream_backoff_s > 2.0
            said = [ln for ln in refused.proc.err.read_text().splitlines() if "cannot link" in ln]
            assert len(said) == 1, said
            assert "TLS handshake" in said[0], said
            assert "(refused; redialled with backoff up to 60 s)" in said[0], said
        code, out, err = await site_cli("site", "status", "--address", bare.address)
        assert code == 0, err
        assert "upstream link down: the upstream refused the TLS handshake" in out, out
        # The cloud's own status, asked by the CLI over mTLS with the admin key.
        code, out, err = await site_cli(
            *("site", "status", "--address", sites.cloud.address, "-o", "json"),
            *("--tls-ca", str(pki.ca), "--tls-server-name", CLOUD_NAME, "--api-key", admin_key),
            *("--tls-cert", str(pki.edge_cert), "--tls-key", str(pki.edge_key)),
        )
        assert code == 0, err
        peers = json.loads(out)["peers"]
        assert [(peer["site"], peer.get("connected")) for peer in peers] == [("edge1", True)]
        assert not (await site_status(at_edge)).upstream_error
    # The cloud's audit log names who linked and who was refused, key and certificate.
    links = [line for line in sites.cloud.proc.err.read_text().splitlines() if "rpc=Link " in line]
    assert any(
        "outcome=OK principal=edges" in line and "client_cert=edge1" in line for line in links
    )
    assert any("outcome=UNAUTHENTICATED" in line and "client_cert=edge1" in line for line in links)


def _start_dev(argv: list[str]) -> int:
    """``tideflow server start-dev ARGV`` in this process (the flags are refused before
    anything is opened)."""
    parser = argparse.ArgumentParser()
    _cli.add_parser(parser.add_subparsers(dest="group", required=True))
    return _cli.main(parser.parse_args(["server", "start-dev", *argv]))


def test_bad_upstream_tls_flags_are_one_line_errors(
    tmp_path: Path, pki: SitePki, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--db", str(tmp_path / "edge.db"), "--port", "0", "--no-ui"]
    edge = [*base, "--cluster-name", "edge1", "--upstream", "127.0.0.1:7233"]
    cert, key = str(pki.edge_cert), str(pki.edge_key)
    for flags, message in (
        ([*base, "--upstream-tls-ca", str(pki.ca)], "--upstream-tls-ca needs --upstream"),
        ([*base, "--upstream-tls"], "--upstream-tls needs --upstream"),
        ([*edge, "--upstream-tls-cert", cert], "--upstream-tls-cert and --upstream-tls-key go"),
        ([*edge, "--upstream-tls-key", key], "--upstream-tls-cert and --upstream-tls-key go"),
        (
            [*edge, "--upstream-tls-ca", str(tmp_path / "missing.pem")],
            "cannot read the TLS upstream CA",
        ),
        ([*edge, "--upstream-tls-ca", key], "upstream CA holds no readable PEM certificate"),
        (
            [*edge, "--upstream-tls-cert", cert, "--upstream-tls-key", str(pki.cloud_key)],
            "upstream client key is not the key of its certificate",
        ),
        ([*edge, "--upstream-tls-server-name", ""], "must not be empty"),
    ):
        assert _start_dev(flags) == 2, flags
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (flags, err)
    assert not (tmp_path / "edge.db").exists()
    # Embedded, the same checks: the config is read and checked where it is made.
    with pytest.raises(ValueError, match="needs upstream"):
        ServerConfig(upstream_tls=UpstreamTLSConfig(root_ca=pki.ca.read_bytes()))
    with pytest.raises(ValueError, match="go together"):
        UpstreamTLSConfig(cert_chain=pki.edge_cert.read_bytes())
    with pytest.raises(ValueError, match="not the key of its certificate"):
        UpstreamTLSConfig.load(cert=pki.edge_cert, key=pki.cloud_key)
    assert "BEGIN" not in repr(UpstreamTLSConfig.load(cert=pki.edge_cert, key=pki.edge_key))


async def test_the_real_command_refuses_a_certificate_without_its_key(
    tmp_path: Path, pki: SitePki
) -> None:
    argv = [*TIDEFLOW_CLI, "server", "start-dev", "--db", str(tmp_path / "edge.db"), "--port", "0"]
    argv += ["--cluster-name", "edge1", "--upstream", "127.0.0.1:7233"]
    argv += ["--upstream-tls-cert", str(pki.edge_cert)]
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "tideflow server start-dev: --upstream-tls-cert and --upstream-tls-key go together"
    ]
