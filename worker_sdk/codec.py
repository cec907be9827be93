"""Payload codecs: encryption and compression of payloads at the SDK's wire boundary.

A ``PayloadCodec`` turns a list of ``Payload`` protos into another list of the same length
(``encode``) and back (``decode``). Plug one in with
``DataConverter(payload_codec=...)``; the client then encodes every payload of every
request it sends (workflow and activity inputs and results, signal and query arguments,
heartbeat details, failure details, memo, headers, schedule actions, markers) and decodes
every payload of every response it receives (histories, poll tasks, describe results,
failures) before the payload converter sees it. Workers send and receive through their
client, so they are covered by the same boundary, and workflow code only ever runs on
decoded values: replay matches commands to events by type and id, never by payload, so a
codec whose output differs on every call (AES-GCM draws a fresh nonce) keeps replay
deterministic.

Search attribute values are never encoded: the server indexes them. Failure messages and
stack traces stay in clear text too; put secrets in an ``ApplicationError``'s details.

Built in: ``AESGCMCodec`` (AES-256-GCM, key id in the payload metadata, key rotation),
``ZlibCodec`` and ``ZstdCodec`` (the ``zstd`` extra). Several codecs chain:
``DataConverter(payload_codec=[ZlibCodec(), AESGCMCodec(...)])`` compresses then encrypts
on encode and decrypts then decompresses on decode.

Tools that read histories elsewhere (CI replays, the CLI) use ``decode_history``.
"""

from __future__ import annotations

import os
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from tideflow.api.v1.common_pb2 import Payload

if TYPE_CHECKING:
    from .client import WorkflowHistory
    from .converter import DataConverter

ENCODING = "encoding"
ENCODING_AES_GCM = b"binary/encrypted+aes256gcm"
ENCODING_ZLIB = b"binary/zlib"
ENCODING_ZSTD = b"binary/zstd"
KEY_ID = "encryption-key-id"

_PAYLOAD = Payload.DESCRIPTOR.full_name
# The server reads and indexes these values: encoding them would break visibility queries.
_NOT_ENCODED = frozenset({"tideflow.api.v1.SearchAttributes"})


class PayloadCodecError(ValueError):
    """A payload could not be decoded: unknown key id, failed authentication tag, corrupt
    compressed data."""


class PayloadCodec(ABC):
    """Encodes and decodes lists of payloads. ``encode`` and ``decode`` return a list of
    the same length as their input; ``decode`` must pass through any payload it did not
    encode (payloads written before the codec was configured, or by the server)."""

    @abstractmethod
    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]: ...

    @abstractmethod
    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]: ...


class PayloadCodecChain(PayloadCodec):
    """Several codecs as one: applied in order on encode, in reverse order on decode."""

    def __init__(self, codecs: Sequence[PayloadCodec]) -> None:
        if not codecs:
            raise ValueError("a codec chain needs at least one codec")
        self.codecs: tuple[PayloadCodec, ...] = tuple(codecs)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = list(payloads)
        for codec in self.codecs:
            out = _same_length(codec, out, await codec.encode(out))
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = list(payloads)
        for codec in reversed(self.codecs):
            out = _same_length(codec, out, await codec.decode(out))
        return out


def _same_length(codec: PayloadCodec, before: list[Payload], after: list[Payload]) -> list[Payload]:
    if len(after) != len(before):
        raise PayloadCodecError(
            f"{type(codec).__name__} returned {len(after)} payloads for {len(before)}"
        )
    return after


def as_codec(codec: PayloadCodec | Sequence[PayloadCodec] | None) -> PayloadCodec | None:
    """``DataConverter``'s ``payload_codec`` argument as one codec (a list becomes a chain)."""
    if codec is None or isinstance(codec, PayloadCodec):
        return codec
    codecs = list(codec)
    for c in codecs:
        if not isinstance(c, PayloadCodec):
            raise TypeError(f"payload_codec entries must be PayloadCodec, not {type(c).__name__}")
    return codecs[0] if len(codecs) == 1 else PayloadCodecChain(codecs)


# ------------------------------------------------------------------ AES-GCM


class AESGCMCodec(PayloadCodec):
    """AES-256-GCM encryption of whole payloads.

    ``keys`` maps key ids to 32-byte keys; ``active_key_id`` names the key that encrypts.
    Every payload gets a fresh random 96-bit nonce. The encrypted payload carries only the
    encoding marker and the key id in clear; the original metadata and data are inside
    the ciphertext, so the tag authenticates them, and the associated data binds the
    clear metadata (marker and key id) to the ciphertext. Decoding picks the key by the
    payload's key id, so keys rotate by adding a new active key and keeping the old ones
    for as long as histories encrypted with them are read.
    """

    NONCE_SIZE = 12

    def __init__(self, *, keys: Mapping[str, bytes], active_key_id: str) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if active_key_id not in keys:
            raise ValueError(f"active_key_id {active_key_id!r} is not among the keys")
        self._ciphers: dict[str, AESGCM] = {}
        for key_id, key in keys.items():
            if not key_id or not key_id.isprintable():
                raise ValueError(f"key id {key_id!r} must be a non-empty printable string")
            if len(key) != 32:
                raise ValueError(f"key {key_id!r} is {len(key)} bytes; AES-256 needs 32")
            self._ciphers[key_id] = AESGCM(bytes(key))
        self.active_key_id = active_key_id

    @staticmethod
    def _associated_data(key_id: str) -> bytes:
        return ENCODING_AES_GCM + b"\x00" + key_id.encode()

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        cipher = self._ciphers[self.active_key_id]
        aad = self._associated_data(self.active_key_id)
        out = []
        for payload in payloads:
            nonce = os.urandom(self.NONCE_SIZE)
            sealed = cipher.encrypt(nonce, payload.SerializeToString(deterministic=True), aad)
            out.append(
                Payload(
                    metadata={ENCODING: ENCODING_AES_GCM, KEY_ID: self.active_key_id.encode()},
                    data=nonce + sealed,
                )
            )
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        from cryptography.exceptions import InvalidTag

        out = []
        for payload in payloads:
            if payload.metadata.get(ENCODING) != ENCODING_AES_GCM:
                out.append(payload)
                continue
            key_id = payload.metadata.get(KEY_ID, b"").decode(errors="replace")
            cipher = self._ciphers.get(key_id)
            if cipher is None:
                raise PayloadCodecError(
                    f"payload encrypted with key id {key_id!r}, which is not among this "
                    f"codec's keys {sorted(self._ciphers)}"
                )
            nonce, sealed = payload.data[: self.NONCE_SIZE], payload.data[self.NONCE_SIZE :]
            try:
                plain = cipher.decrypt(nonce, sealed, self._associated_data(key_id))
            except InvalidTag:
                raise PayloadCodecError(
                    f"payload encrypted with key id {key_id!r} failed authentication: "
                    "wrong key for this id, or the payload was altered"
                ) from None
            out.append(_parse_payload(plain, "decrypted"))
        return out


def _parse_payload(data: bytes, what: str) -> Payload:
    try:
        return Payload.FromString(data)
    except DecodeError as error:
        raise PayloadCodecError(f"{what} payload is not a Payload message: {error}") from None


# -------------------------------------------------------------- compression


class _CompressionCodec(PayloadCodec):
    """Compresses the serialized payload; keeps the original when compressing would not
    gain (below ``min_size`` bytes, or the output is not smaller)."""

    marker: bytes

    def __init__(self, *, min_size: int) -> None:
        if min_size < 0:
            raise ValueError("min_size must be >= 0")
        self.min_size = min_size

    @abstractmethod
    def _compress(self, data: bytes) -> bytes: ...

    @abstractmethod
    def _decompress(self, data: bytes) -> bytes: ...

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for payload in payloads:
            raw = payload.SerializeToString(deterministic=True)
            packed = self._compress(raw) if len(raw) >= self.min_size else raw
            if len(packed) < len(raw):
                out.append(Payload(metadata={ENCODING: self.marker}, data=packed))
            else:
                out.append(payload)
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for payload in payloads:
            if payload.metadata.get(ENCODING) != self.marker:
                out.append(payload)
                continue
            try:
                raw = self._decompress(payload.data)
            except Exception as error:
                raise PayloadCodecError(
                    f"{self.marker.decode()} payload does not decompress: {error}"
                ) from None
            out.append(_parse_payload(raw, "decompressed"))
        return out


class ZlibCodec(_CompressionCodec):
    """zlib (deflate) compression of payloads of at least ``min_size`` bytes."""

    marker = ENCODING_ZLIB

    def __init__(self, *, level: int = 6, min_size: int = 128) -> None:
        super().__init__(min_size=min_size)
        self.level = level

    def _compress(self, data: bytes) -> bytes:
        return zlib.compress(data, self.level)

    def _decompress(self, data: bytes) -> bytes:
        return zlib.decompress(data)


class ZstdCodec(_CompressionCodec):
    """Zstandard compression of payloads of at least ``min_size`` bytes. Needs the
    ``zstandard`` package (``pip install 'tideflow[zstd]'``)."""

    marker = ENCODING_ZSTD

    def __init__(self, *, level: int = 3, min_size: int = 128) -> None:
        super().__init__(min_size=min_size)
        try:
            import zstandard
        except ImportError as error:
            raise ImportError(
                "ZstdCodec needs the 'zstandard' package: pip install 'tideflow[zstd]' "
                "(or use ZlibCodec, which needs nothing extra)"
            ) from error
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._decompressor = zstandard.ZstdDecompressor()

    def _compress(self, data: bytes) -> bytes:
        return self._compressor.compress(data)

    def _decompress(self, data: bytes) -> bytes:
        # Frames written by ZstdCompressor.compress carry their content size.
        return self._decompressor.decompress(data)


# ------------------------------------------------------- proto message walk

# Message types (by full name) that can hold a Payload somewhere below them: the walk
# skips every other sub-message (timestamps, task queues, ...) without looking inside.
_HOLDS_PAYLOADS: dict[str, bool] = {}


def _holds_payloads(descriptor: Descriptor, visiting: frozenset[str] = frozenset()) -> bool:
    name = descriptor.full_name
    known = _HOLDS_PAYLOADS.get(name)
    if known is not None:
        return known
    if name == _PAYLOAD:
        return True
    if name in _NOT_ENCODED or name in visiting:
        return False  # a cycle (Failure.cause) adds nothing its first visit does not find
    result = False
    for field in descriptor.fields:
        sub = _message_type(field)
        if sub is not None and _holds_payloads(sub, visiting | {name}):
            result = True
            break
    if not visiting:
        _HOLDS_PAYLOADS[name] = result  # only results not cut short by a cycle are final
    return result


def _is_repeated(field: FieldDescriptor) -> bool:
    flag = getattr(field, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    # protobuf releases before ``is_repeated`` (LABEL_REPEATED is 3).
    return getattr(field, "label", None) == 3


def _message_type(field: FieldDescriptor) -> Descriptor | None:
    return field.message_type if field.type == FieldDescriptor.TYPE_MESSAGE else None


def collect_payloads(message: Message) -> list[Payload]:
    """Every ``Payload`` inside ``message`` (references, in a stable order), except the
    values of search attributes."""
    found: list[Payload] = []
    _collect(message, found)
    return found


def _collect(message: Message, found: list[Payload]) -> None:
    if message.DESCRIPTOR.full_name == _PAYLOAD:
        found.append(message)  # type: ignore[arg-type]
        return
    for field, value in message.ListFields():
        entry = _message_type(field)
        if entry is None:
            continue
        if entry.GetOptions().map_entry:
            target = _message_type(entry.fields_by_name["value"])
            if target is not None and _holds_payloads(target):
                for item in value.values():
                    _collect(item, found)
        elif not _holds_payloads(entry):
            continue
        elif _is_repeated(field):
            for item in value:
                _collect(item, found)
        else:
            _collect(value, found)


async def encode_messages(messages: Sequence[Message], codec: PayloadCodec) -> None:
    """Encode, in place, every payload of ``messages`` (search attributes excepted), in
    one call of the codec."""
    payloads = [p for message in messages for p in collect_payloads(message)]
    if payloads:
        _replace(payloads, await codec.encode(payloads), codec)


async def decode_messages(messages: Sequence[Message], codec: PayloadCodec) -> None:
    """Decode, in place, every payload of ``messages`` (search attributes excepted), in
    one call of the codec."""
    payloads = [p for message in messages for p in collect_payloads(message)]
    if payloads:
        _replace(payloads, await codec.decode(payloads), codec)


def _replace(targets: list[Payload], results: Sequence[Payload], codec: PayloadCodec) -> None:
    _same_length(codec, targets, list(results))
    # Built first, copied after: a codec may return some of its inputs unchanged, and
    # CopyFrom into one target must not disturb a later result that is still an input.
    copies = [Payload() for _ in results]
    for copy, result in zip(copies, results, strict=True):
        copy.CopyFrom(result)
    for target, copy in zip(targets, copies, strict=True):
        target.CopyFrom(copy)


async def decode_history(history: WorkflowHistory, converter: DataConverter) -> WorkflowHistory:
    """``history`` with every payload decoded by ``converter``'s codec, as a new
    ``WorkflowHistory`` (the input is not changed). For tools that hold an encoded
    history: a JSON export taken by a client without the codec, a history read with the
    raw gRPC API. Histories from ``fetch_history`` are already decoded; decoding them
    again changes nothing, since codecs pass through payloads they did not encode.

    ```python
    raw = WorkflowHistory.from_json(Path("run.json").read_text())
    history = await decode_history(raw, converter)
    Replayer(workflows=[MyWorkflow], data_converter=converter).replay(history)
    ```
    """
    events = []
    for event in history.events:
        copy = type(event)()
        copy.CopyFrom(event)
        events.append(copy)
    await converter.decode_messages(events)
    # type(history): WorkflowHistory lives in the client module, which imports this one.
    return type(history)(history.workflow_id, events)


__all__ = [
    "ENCODING_AES_GCM",
    "ENCODING_ZLIB",
    "ENCODING_ZSTD",
    "KEY_ID",
    "AESGCMCodec",
    "PayloadCodec",
    "PayloadCodecChain",
    "PayloadCodecError",
    "ZlibCodec",
    "ZstdCodec",
    "as_codec",
    "collect_payloads",
    "decode_history",
    "decode_messages",
    "encode_messages",
]
