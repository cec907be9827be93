"""TLS and mutual TLS for the server's gRPC port.

``ServerTLSConfig`` is what an embedding program passes to ``TideflowServer(tls=...)``;
``add_tls_arguments`` and ``tls_from_args`` give every server command
(``start-dev``, ``start``) the same ``--tls-cert``, ``--tls-key`` and ``--tls-client-ca``
flags, checked the same way.

With ``client_ca`` set the server requires a client certificate on every connection and
verifies it against that CA (mTLS): a client without one, or with one from another CA,
fails the handshake and never reaches an RPC.

``UpstreamTLSConfig`` is the other direction: how an edge site dials its upstream cloud
(``--upstream-tls*`` flags, ``ServerConfig.upstream_tls``), with the CA it trusts, the
certificate it presents under mTLS and the name the cloud's certificate must carry. Its
files are read and checked when the server is configured, so a missing file or a key
that does not match its certificate stops the start instead of failing every dial.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

PathOrPem = bytes | str | os.PathLike[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerTLSConfig:
    """The server's certificate chain and key (PEM), and optionally the CA that client
    certificates must chain to (mTLS).

    Use ``ServerTLSConfig.load(cert=..., key=..., client_ca=...)`` to read PEM files (or
    take PEM bytes as they are).
    """

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    def __repr__(self) -> str:
        # Never print the private key.
        return f"ServerTLSConfig(mtls={self.client_ca is not None})"

    @classmethod
    def load(
        cls, *, cert: PathOrPem, key: PathOrPem, client_ca: PathOrPem | None = None
    ) -> ServerTLSConfig:
        """A config from PEM bytes or paths of PEM files."""
        return cls(
            cert_chain=_pem("certificate", cert),
            private_key=_pem("private key", key),
            client_ca=None if client_ca is None else _pem("client CA", client_ca),
        )

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


def _pem(what: str, value: PathOrPem) -> bytes:
    if isinstance(value, bytes):
        data = value
    else:
        try:
            with open(value, "rb") as f:
                data = f.read()
        except OSError as error:
            raise ValueError(
                f"cannot read the TLS {what} {os.fspath(value)}: {error.strerror}"
            ) from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"the TLS {what} is not PEM (no -----BEGIN line)")
    return data


def add_tls_arguments(parser: Any) -> None:
    """Add the TLS flags to a server command's parser."""
    group = parser.add_argument_group("TLS")
    group.add_argument(
        "--tls-cert", default=None, help="PEM certificate chain of the server (enables TLS)"
    )
    group.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    group.add_argument(
        "--tls-client-ca",
        default=None,
        help="PEM CA certificate(s): require client certificates signed by it (mTLS)",
    )


def tls_from_args(args: argparse.Namespace) -> ServerTLSConfig | None:
    """The TLS config the flags ask for; None without ``--tls-cert``. ValueError with a
    one-line reason for an incomplete set or an unreadable file."""
    cert, key, client_ca = args.tls_cert, args.tls_key, args.tls_client_ca
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mTLS runs over TLS)")
        return None
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    return ServerTLSConfig.load(cert=cert, key=key, client_ca=client_ca)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamTLSConfig:
    """How an edge dials its upstream over TLS (PEM bytes; ``load`` reads files).

    ``root_ca`` None trusts the system's root CAs; ``cert_chain`` and ``private_key``
    (together) are presented to an upstream that requires client certificates (mTLS);
    ``server_name`` is the name the upstream's certificate is checked against when it
    is not the host of ``--upstream`` (an IP address, a load balancer, a tunnel).
    """

    root_ca: bytes | None = None
    cert_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_chain is None) != (self.private_key is None):
            raise ValueError("the upstream client certificate and its key go together")

    def __repr__(self) -> str:
        # Never print the private key.
        return (
            f"UpstreamTLSConfig(custom_ca={self.root_ca is not None}, "
            f"mtls={self.cert_chain is not None}, server_name={self.server_name!r})"
        )

    @classmethod
    def load(
        cls,
        *,
        ca: PathOrPem | None = None,
        cert: PathOrPem | None = None,
        key: PathOrPem | None = None,
        server_name: str | None = None,
    ) -> UpstreamTLSConfig:
        """A config from PEM bytes or paths, checked: the CA and certificate parse,
        and the key is the certificate's."""
        config = cls(
            root_ca=None if ca is None else _pem("upstream CA", ca),
            cert_chain=None if cert is None else _pem("upstream client certificate", cert),
            private_key=None if key is None else _pem("upstream client key", key),
            server_name=server_name,
        )
        if config.root_ca is not None:
            _certificates("upstream CA", config.root_ca)
        if config.cert_chain is not None and config.private_key is not None:
            _check_key_pair(config.cert_chain, config.private_key)
        return config

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_ca,
            private_key=self.private_key,
            certificate_chain=self.cert_chain,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def _certificates(what: str, data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"the TLS {what} holds no readable PEM certificate") from None


def _check_key_pair(cert_chain: bytes, private_key: bytes) -> None:
    """ValueError unless ``private_key`` is the key of the chain's first certificate
    (gRPC would only fail each handshake, saying little)."""
    leaf = _certificates("upstream client certificate", cert_chain)[0]
    try:
        key = serialization.load_pem_private_key(private_key, password=None)
    except (ValueError, TypeError):
        raise ValueError(
            "the TLS upstream client key is not an unencrypted PEM private key"
        ) from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != leaf.public_key().public_bytes(
        encoding, public
    ):
        raise ValueError("the TLS upstream client key is not the key of its certificate")


def add_upstream_tls_arguments(parser: Any) -> None:
    """An edge's flags for dialling its upstream over TLS; named as the client flags
    of ``tideflow workflow`` (``--tls``, ``--tls-ca``, ...) with ``upstream-`` before."""
    group = parser.add_argument_group("TLS to the upstream (an edge site)")
    group.add_argument(
        "--upstream-tls",
        action="store_true",
        help="dial --upstream over TLS, trusting the system's root CAs "
        "(implied by any --upstream-tls-* flag)",
    )
    group.add_argument(
        "--upstream-tls-ca", default=None, help="PEM CA certificate(s) the upstream's must chain to"
    )
    group.add_argument(
        "--upstream-tls-cert",
        default=None,
        help="PEM client certificate chain presented to the upstream (its mTLS)",
    )
    group.add_argument("--upstream-tls-key", default=None, help="PEM private key of it")
    group.add_argument(
        "--upstream-tls-server-name",
        default=None,
        help="name to check the upstream's certificate against (default: the --upstream host)",
    )


def upstream_tls_from_args(args: argparse.Namespace) -> UpstreamTLSConfig | None:
    """The upstream TLS config the flags ask for; None for a plaintext upstream.
    ValueError with a one-line reason for an incomplete set or an unusable file."""
    flags = {
        "--upstream-tls-ca": args.upstream_tls_ca,
        "--upstream-tls-cert": args.upstream_tls_cert,
        "--upstream-tls-key": args.upstream_tls_key,
        "--upstream-tls-server-name": args.upstream_tls_server_name,
    }
    given = [flag for flag, value in flags.items() if value is not None]
    if args.upstream_tls:
        given.insert(0, "--upstream-tls")
    if not given:
        return None
    if not args.upstream:
        raise ValueError(f"{given[0]} needs --upstream (only an edge dials an upstream)")
    if (args.upstream_tls_cert is None) != (args.upstream_tls_key is None):
        raise ValueError("--upstream-tls-cert and --upstream-tls-key go together")
    if args.upstream_tls_server_name == "":
        raise ValueError("--upstream-tls-server-name must not be empty")
    return UpstreamTLSConfig.load(
        ca=args.upstream_tls_ca,
        cert=args.upstream_tls_cert,
        key=args.upstream_tls_key,
        server_name=args.upstream_tls_server_name,
    )
