"""Payload codecs without a server: AES-GCM, zlib, zstd, chains, and the proto walk that
applies them at the client's wire boundary (search attributes excepted)."""

from __future__ import annotations

import builtins
import sys
from collections.abc import Sequence
from typing import Any

import pytest

from tideflow.api.v1 import service_pb2
from tideflow.api.v1.common_pb2 import Payload
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.worker_sdk import (
    AESGCMCodec,
    DataConverter,
    PayloadCodecChain,
    PayloadCodecError,
    WorkflowHistory,
    ZlibCodec,
    ZstdCodec,
    decode_history,
)
from tideflow.worker_sdk.codec import ENCODING_AES_GCM, KEY_ID, collect_payloads
from tideflow.worker_sdk.exceptions import ApplicationError

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))


def payloads(*values: Any) -> list[Payload]:
    return list(DataConverter().to_payloads(list(values)).payloads)


async def test_aes_gcm_round_trip_hides_data_and_metadata() -> None:
    codec = AESGCMCodec(keys={"a": KEY_A}, active_key_id="a")
    plain = payloads({"card": "SECRET-4111"}, None, b"raw-SECRET")
    sealed = await codec.encode(plain)
    for p in sealed:
        assert p.metadata["encoding"] == ENCODING_AES_GCM
        assert p.metadata[KEY_ID] == b"a"
        assert b"SECRET" not in p.SerializeToString()
        assert b"json/plain" not in p.data  # the original metadata is inside the ciphertext
    assert await codec.decode(sealed) == plain
    # A fresh nonce per payload: the same value never encrypts to the same bytes.
    again = await codec.encode(plain)
    assert [p.data for p in again] != [p.data for p in sealed]


async def test_aes_gcm_key_rotation_and_clear_errors() -> None:
    old = AESGCMCodec(keys={"a": KEY_A}, active_key_id="a")
    rotated = AESGCMCodec(keys={"a": KEY_A, "b": KEY_B}, active_key_id="b")
    by_a = await old.encode(payloads("v1"))
    by_b = await rotated.encode(payloads("v2"))
    assert by_b[0].metadata[KEY_ID] == b"b"
    # The rotated codec reads both generations; the old one cannot read the new key.
    assert DataConverter().from_payloads(_wrap(await rotated.decode(by_a + by_b))) == [
        "v1",
        "v2",
    ]
    with pytest.raises(PayloadCodecError, match=r"key id 'b'.*not among.*\['a'\]"):
        await old.decode(by_b)
    # A wrong key under a known id, and a flipped ciphertext bit, fail the tag.
    impostor = AESGCMCodec(keys={"a": KEY_B}, active_key_id="a")
    with pytest.raises(PayloadCodecError, match="failed authentication"):
        await impostor.decode(by_a)
    tampered = Payload()
    tampered.CopyFrom(by_a[0])
    tampered.data = tampered.data[:-1] + bytes([tampered.data[-1] ^ 1])
    with pytest.raises(PayloadCodecError, match="failed authentication"):
        await old.decode([tampered])
    # The key id is bound by the associated data: relabelling a payload is detected.
    relabelled = Payload()
    relabelled.CopyFrom(by_a[0])
    relabelled.metadata[KEY_ID] = b"b"
    with pytest.raises(PayloadCodecError, match="failed authentication"):
        await AESGCMCodec(keys={"a": KEY_A, "b": KEY_A}, active_key_id="a").decode([relabelled])


def test_aes_gcm_rejects_bad_keys() -> None:
    with pytest.raises(ValueError, match="32"):
        AESGCMCodec(keys={"a": b"short"}, active_key_id="a")
    with pytest.raises(ValueError, match="active_key_id"):
        AESGCMCodec(keys={"a": KEY_A}, active_key_id="b")


def _wrap(items: Sequence[Payload]) -> Any:
    return service_pb2.SignalWorkflowRequest(input={"payloads": list(items)}).input


@pytest.mark.parametrize("make", [ZlibCodec, ZstdCodec])
async def test_compression_skips_small_payloads_and_round_trips(make: Any) -> None:
    codec: Any = make()
    big, small = payloads("x" * 5000, "tiny")
    packed = await codec.encode([big, small])
    assert packed[0].metadata["encoding"] == codec.marker
    assert len(packed[0].data) < len(big.data) // 10
    assert packed[1] == small  # too small to gain: left as it is
    assert await codec.decode(packed) == [big, small]
    corrupt = Payload(metadata={"encoding": codec.marker}, data=b"not compressed")
    with pytest.raises(PayloadCodecError, match="does not decompress"):
        await codec.decode([corrupt])


def test_zstd_without_the_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_zstandard(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "zstandard":
            raise ImportError("No module named 'zstandard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "zstandard", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_zstandard)
    with pytest.raises(ImportError, match=r"pip install 'tideflow\[zstd\]'"):
        ZstdCodec()


async def test_chain_encodes_in_order_and_decodes_in_reverse() -> None:
    aes = AESGCMCodec(keys={"k": KEY_A}, active_key_id="k")
    chain = PayloadCodecChain([ZlibCodec(min_size=0), aes])
    plain = payloads("y" * 3000)
    sealed = await chain.encode(plain)
    # Outermost is encryption; inside it, the zlib payload.
    assert sealed[0].metadata["encoding"] == ENCODING_AES_GCM
    inner = await aes.decode(sealed)
    assert inner[0].metadata["encoding"] == b"binary/zlib"
    assert len(sealed[0].data) < 200  # compressed before encryption
    assert await chain.decode(sealed) == plain
    # A list given to DataConverter is the same chain.
    converter = DataConverter(payload_codec=[ZlibCodec(min_size=0), aes])
    assert isinstance(converter.codec, PayloadCodecChain)
    assert len(converter.codec.codecs) == 2


async def test_message_walk_skips_search_attributes_and_reaches_nested_failures() -> None:
    converter = DataConverter(payload_codec=AESGCMCodec(keys={"k": KEY_A}, active_key_id="k"))
    request = service_pb2.StartWorkflowRequest(workflow_id="w")
    request.input.CopyFrom(converter.to_payloads(["in-SECRET"]))
    request.memo.fields["m"].CopyFrom(converter.payload_converter.to_payload("memo-SECRET"))
    request.search_attributes.indexed_fields["Customer"].CopyFrom(
        converter.payload_converter.to_payload("indexed-value")
    )
    assert len(collect_payloads(request)) == 2
    await converter.encode_messages([request])
    wire = request.SerializeToString()
    assert b"SECRET" not in wire
    assert b"indexed-value" in wire  # the server must be able to index it
    await converter.decode_messages([request])
    assert converter.from_payloads(request.input) == ["in-SECRET"]

    # A failure chain: details of the cause's cause are found too.
    error = ApplicationError("outer", "d-outer")
    error.__cause__ = ApplicationError("inner", "d-inner-SECRET")
    failure = converter.to_failure(error)
    await converter.encode_messages([failure])
    assert b"d-inner-SECRET" not in failure.SerializeToString()
    await converter.decode_messages([failure])
    decoded = converter.from_failure(failure)
    assert isinstance(decoded.__cause__, ApplicationError)
    assert list(decoded.__cause__.details) == ["d-inner-SECRET"]


async def test_decode_history_copies_and_passes_unencoded_payloads_through() -> None:
    aes = AESGCMCodec(keys={"k": KEY_A}, active_key_id="k")
    converter = DataConverter(payload_codec=aes)
    started = HistoryEvent(event_id=1, event_type=EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED)
    attrs = started.workflow_execution_started_event_attributes
    attrs.input.CopyFrom(converter.to_payloads(["arg-SECRET", "clear"]))
    await converter.encode_messages([attrs.input.payloads[0]])  # one encoded, one not
    history = WorkflowHistory("wf", [started])
    decoded = await decode_history(WorkflowHistory.from_json(history.to_json()), converter)
    got = decoded.events[0].workflow_execution_started_event_attributes.input
    assert converter.from_payloads(got) == ["arg-SECRET", "clear"]
    assert history.events[0].workflow_execution_started_event_attributes.input.payloads[0].metadata[
        "encoding"
    ] == (ENCODING_AES_GCM)
    # Without the codec, the converter names the cause.
    with pytest.raises(ValueError, match="payload_codec"):
        DataConverter().from_payloads(
            history.events[0].workflow_execution_started_event_attributes.input
        )
