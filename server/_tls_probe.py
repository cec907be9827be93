"""Why a TLS upstream closed the connection: a refusal of this edge's certificate,
told apart from an upstream that cannot be reached (server/_sites.py).

Under TLS 1.3 the client's side of the handshake completes before the server has
checked the client's certificate. A gRPC server that then refuses it (none presented
while it requires one, or one from a CA it does not trust) closes the connection
without a TLS alert, and gRPC reports only "Socket closed": the words of an upstream
that went away. So after such a failure the edge dials once more itself, with the
same TLS settings, and says the HTTP/2 preface: a gRPC server that accepted the
handshake answers with its SETTINGS frame; one that refused it closes the connection
(or sends an alert) before its first byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import tempfile

from ._tls import UpstreamTLSConfig

# The client connection preface and an empty SETTINGS frame (RFC 9113 section 3.4).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_PROBE_TIMEOUT_S = 5.0


def _context(tls: UpstreamTLSConfig) -> ssl.SSLContext:
    """An SSL context with the settings of the edge's gRPC channel."""
    if tls.root_ca is None:
        context = ssl.create_default_context()
    else:
        context = ssl.create_default_context(cadata=tls.root_ca.decode())
    context.set_alpn_protocols(["h2"])
    if tls.cert_chain is not None and tls.private_key is not None:
        # The ssl module loads a key pair only from files: written for the call, to
        # a private directory, and removed at once.
        with tempfile.TemporaryDirectory(prefix="tideflow-tls-") as folder:
            cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
            for path, data in ((cert, tls.cert_chain), (key, tls.private_key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
            context.load_cert_chain(cert, key)
    return context


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _refusal_reason(tls: UpstreamTLSConfig, detail: str) -> str:
    if tls.cert_chain is None:
        why = (
            "it requires a client certificate and this edge has none "
            "(--upstream-tls-cert, --upstream-tls-key)"
        )
    else:
        why = (
            "it did not accept this edge's client certificate "
            "(signed by a CA it does not trust, expired or revoked)"
        )
    return f"the upstream refused the TLS handshake ({detail}): {why}"


async def refused_handshake(address: str, tls: UpstreamTLSConfig) -> str | None:
    """A refusal's reason if the upstream at ``address`` completes the TLS handshake
    and then closes the connection (or sends an alert) before its first HTTP/2 frame;
    None if it cannot be reached, fails the handshake itself, or answers."""
    try:
        host, port = _host_port(address)
        context = await asyncio.to_thread(_context, tls)
        async with asyncio.timeout(_PROBE_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=tls.server_name or host
            )
    except (OSError, ValueError, TimeoutError):
        return None  # unreachable, or the handshake failed: gRPC said so already
    try:
        writer.write(_HTTP2_PREFACE)
        async with asyncio.timeout(_PROBE_TIMEOUT_S):
            await writer.drain()
            first = await reader.read(1)
    except ssl.SSLError as error:
        return _refusal_reason(tls, f"alert: {error.reason or error}")
    except (ConnectionError, asyncio.IncompleteReadError):
        return _refusal_reason(tls, "the connection was reset after it")
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    if first:
        return None  # the upstream speaks HTTP/2: whatever failed, it was not this
    return _refusal_reason(tls, "closed right after it, before any HTTP/2 frame")
