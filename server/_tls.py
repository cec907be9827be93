"""TLS and mutual TLS for the server's gRPC port.

``ServerTLSConfig`` is what an embedding program passes to ``TideflowServer(tls=...)``;
``add_tls_arguments`` and ``tls_from_args`` give every server command
(``start-dev``, ``start``) the same ``--tls-cert``, ``--tls-key`` and ``--tls-client-ca``
flags, checked the same way.

With ``client_ca`` set the server requires a client certificate on every connection and
verifies it against that CA (mTLS): a client without one, or with one from another CA,
fails the handshake and never reaches an RPC.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import grpc

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
