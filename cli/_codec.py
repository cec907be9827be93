"""The payload codec of the ``tideflow workflow`` commands (issue 16: the CLI "can be
given a codec endpoint or key to display decoded payloads").

``--codec-key KEY_ID=SOURCE`` (repeatable; the first one encrypts what the CLI sends)
builds the SDK's ``AESGCMCodec``; SOURCE is a file holding the 32-byte key (raw, or as
64 hex digits or base64) or ``env:VAR``, an environment variable holding it as hex or
base64. ``--codec zlib|zstd`` adds a compression codec, applied before encryption on
encode, as ``DataConverter(payload_codec=[ZlibCodec(), AESGCMCodec(...)])`` does.
``--codec-endpoint URL`` sends payloads to a remote codec server instead, in Temporal's
codec server convention: ``POST URL/encode`` and ``POST URL/decode`` with
``{"payloads": [{"metadata": {name: base64}, "data": base64}]}``, answered in the same
shape.

Decoding is lenient (``LenientCodec``): a CLI shows what it can read. A payload the
codec cannot decode (no key for its key id, a corrupt one) is left encoded, and the
renderer prints it as ``<encrypted: key id X>`` instead of the call failing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence

from tideflow.api.v1.common_pb2 import Payload
from tideflow.worker_sdk.codec import (
    AESGCMCodec,
    PayloadCodec,
    PayloadCodecChain,
    PayloadCodecError,
    ZlibCodec,
    ZstdCodec,
)

KEY_SIZE = 32


def add_codec_arguments(parser: argparse.ArgumentParser, default: object) -> None:
    """The codec flags; ``default`` is ``argparse.SUPPRESS`` on subcommand parsers so a
    flag given before the subcommand is not overwritten by the subcommand's default."""
    parser.add_argument(
        "--codec-key",
        action="append",
        metavar="KEY_ID=FILE|KEY_ID=env:VAR",
        default=default,
        help="AES-256-GCM key to decode (and encode) payloads with; repeatable, the "
        "first one encrypts (default: $TIDEFLOW_CODEC_KEY)",
    )
    parser.add_argument(
        "--codec",
        action="append",
        choices=("zlib", "zstd"),
        default=default,
        help="compression codec of the payloads (repeatable, in encode order)",
    )
    parser.add_argument(
        "--codec-endpoint",
        metavar="URL",
        default=default,
        help="a remote codec server (POST URL/encode, URL/decode), Temporal's convention",
    )


def codec_from_args(args: argparse.Namespace) -> PayloadCodec | None:
    """The codec the flags describe, or None when none is given. Raises ValueError
    saying which flag is wrong."""
    keys: list[str] = list(args.codec_key or [])
    if not keys and os.environ.get("TIDEFLOW_CODEC_KEY"):
        keys = [os.environ["TIDEFLOW_CODEC_KEY"]]
    codecs: list[PayloadCodec] = []
    for name in args.codec or []:
        try:
            codecs.append(ZlibCodec() if name == "zlib" else ZstdCodec())
        except ImportError as error:  # zstandard not installed: say so in one line
            raise ValueError(f"--codec {name}: {error}") from None
    if keys:
        parsed = [_parse_key(spec) for spec in keys]
        codecs.append(AESGCMCodec(keys=dict(parsed), active_key_id=parsed[0][0]))
    if args.codec_endpoint:
        codecs.append(RemoteCodec(args.codec_endpoint, args.namespace))
    if not codecs:
        return None
    return LenientCodec(codecs)


def _parse_key(spec: str) -> tuple[str, bytes]:
    key_id, sep, source = spec.partition("=")
    if not sep or not key_id or not source:
        raise ValueError(f"--codec-key {spec!r}: expected KEY_ID=FILE or KEY_ID=env:VAR")
    if source.startswith("env:"):
        var = source[4:]
        text = os.environ.get(var)
        if text is None:
            raise ValueError(f"--codec-key {key_id}: environment variable {var} is not set")
        raw = text.encode()
    else:
        try:
            with open(source, "rb") as f:
                raw = f.read()
        except OSError as error:
            raise ValueError(
                f"--codec-key {key_id}: cannot read {source}: {error.strerror}"
            ) from None
    return key_id, _key_bytes(key_id, raw)


def _key_bytes(key_id: str, raw: bytes) -> bytes:
    """The 32-byte key in ``raw``: the bytes themselves, or hex, or base64 text."""
    if len(raw) == KEY_SIZE:
        return raw
    text = raw.strip()
    candidates = []
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        candidates.append(bytes.fromhex(text.decode()))
    with contextlib.suppress(ValueError, binascii.Error):
        candidates.append(base64.b64decode(text, validate=True))
    for key in candidates:
        if len(key) == KEY_SIZE:
            return key
    raise ValueError(
        f"--codec-key {key_id}: the key must be {KEY_SIZE} bytes (raw, 64 hex digits or base64)"
    )


class LenientCodec(PayloadCodec):
    """A chain that decodes each payload as far as it can: a payload one codec of the
    chain cannot decode stays as that codec received it, so the renderer can say what
    it is (encrypted with key id X) rather than the whole command failing."""

    def __init__(self, codecs: Sequence[PayloadCodec]) -> None:
        self._chain = PayloadCodecChain(codecs)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return await self._chain.encode(payloads)

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for payload in payloads:
            current = payload
            for codec in reversed(self._chain.codecs):
                try:
                    current = (await codec.decode([current]))[0]
                except PayloadCodecError:
                    break
            out.append(current)
        return out


class RemoteCodec(PayloadCodec):
    """A codec server reached over HTTP (Temporal's codec server convention)."""

    def __init__(self, endpoint: str, namespace: str) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.namespace = namespace

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return await asyncio.to_thread(self._post, "encode", payloads)

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return await asyncio.to_thread(self._post, "decode", payloads)

    def _post(self, verb: str, payloads: Sequence[Payload]) -> list[Payload]:
        if not payloads:
            return []
        body = json.dumps({"payloads": [payload_to_json(p) for p in payloads]}).encode()
        request = urllib.request.Request(
            f"{self.endpoint}/{verb}",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "X-Namespace": self.namespace},
        )
        url = request.full_url
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                answer = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as error:
            # Not a PayloadCodecError: an unreachable codec server is the user's to fix,
            # not a payload to show encoded.
            raise ConnectionError(f"codec endpoint {url}: {error}") from None
        try:
            return [payload_from_json(p) for p in answer["payloads"]]
        except (KeyError, TypeError, ValueError, binascii.Error) as error:
            raise PayloadCodecError(
                f"codec endpoint {url} answered malformed payloads: {error}"
            ) from None


def payload_to_json(payload: Payload) -> dict[str, object]:
    return {
        "metadata": {k: base64.b64encode(v).decode() for k, v in payload.metadata.items()},
        "data": base64.b64encode(payload.data).decode(),
    }


def payload_from_json(data: dict[str, object]) -> Payload:
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError("metadata is not an object")
    return Payload(
        metadata={str(k): base64.b64decode(str(v)) for k, v in metadata.items()},
        data=base64.b64decode(str(data.get("data") or "")),
    )
