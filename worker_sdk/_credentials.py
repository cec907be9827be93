"""Credentials on every call of a client's channel (a server with ``--auth`` on).

An interceptor on the channel adds them, so every RPC carries them: the client's own,
its workers' polls and completions, and any call made through ``client.service``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import grpc


def credential_metadata(
    api_key: str | None, rpc_metadata: Mapping[str, str] | None
) -> tuple[tuple[str, str], ...]:
    """The metadata pairs to send: ``rpc_metadata`` as given, then ``authorization:
    Bearer <api_key>`` (an API key or a JWT). ValueError for names gRPC refuses."""
    pairs: list[tuple[str, str]] = []
    for name, value in (rpc_metadata or {}).items():
        if name != name.lower() or not name or name.startswith("grpc-"):
            raise ValueError(f"rpc_metadata name {name!r}: must be lower case, not grpc-*")
        pairs.append((name, value))
    if api_key is not None:
        if not api_key.strip():
            raise ValueError("api_key is empty")
        if any(name == "authorization" for name, _ in pairs):
            raise ValueError("give api_key or an 'authorization' entry in rpc_metadata, not both")
        pairs.append(("authorization", f"Bearer {api_key.strip()}"))
    return tuple(pairs)


class CredentialInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds fixed metadata to every unary call (every WorkflowService RPC is one)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()), *self._metadata)
        details = grpc.aio.ClientCallDetails(
            client_call_details.method,
            client_call_details.timeout,
            metadata,
            client_call_details.credentials,
            client_call_details.wait_for_ready,
        )
        return await continuation(details, request)
