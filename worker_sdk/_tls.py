"""TLS settings of a client connection (``Client.connect(..., tls=...)``), as Temporal's
``TLSConfig``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import grpc

PathOrPem = bytes | str | os.PathLike[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSConfig:
    """How a client connects over TLS.

    Each certificate or key is PEM, given as ``bytes`` or as the path of a PEM file.

    Attributes:
        server_root_ca_cert: the CA(s) the server's certificate must chain to; None
            trusts the system's root CAs.
        client_cert: this client's certificate chain, for a server that requires client
            certificates (mTLS); give ``client_private_key`` with it.
        client_private_key: the private key of ``client_cert``.
        domain: the name the server's certificate is checked against, when it is not
            the host of the address connected to (an IP address or a load balancer).
    """

    server_root_ca_cert: PathOrPem | None = None
    client_cert: PathOrPem | None = None
    client_private_key: PathOrPem | None = None
    domain: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_private_key is None):
            raise ValueError("TLSConfig: client_cert and client_private_key go together")

    def __repr__(self) -> str:
        # Never print the private key.
        return (
            f"TLSConfig(custom_ca={self.server_root_ca_cert is not None}, "
            f"client_cert={self.client_cert is not None}, domain={self.domain!r})"
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_pem("server_root_ca_cert", self.server_root_ca_cert),
            private_key=_pem("client_private_key", self.client_private_key),
            certificate_chain=_pem("client_cert", self.client_cert),
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [] if self.domain is None else [("grpc.ssl_target_name_override", self.domain)]


def _pem(what: str, value: PathOrPem | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        with open(value, "rb") as f:
            return f.read()
    except OSError as error:
        raise ValueError(
            f"TLSConfig.{what}: cannot read {os.fspath(value)}: {error.strerror}"
        ) from None
