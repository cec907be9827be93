"""Regression tests for the defects the fuzz suite (tests/test_fuzz.py) found, each sent
over raw gRPC as the fuzzer sent it, on every store under test.

- A task's history continuation token (``tfh1:`` + key id + MAC + a JSON head + events;
  sealed since, so these are refused by the seal, test_history_page_tokens.py) comes back
  from the client as GetHistory's ``next_page_token``; its head was trusted: Infinity
  (or 1e400) as an event id answered INTERNAL (OverflowError), a deeply nested head
  INTERNAL (RecursionError), both with a traceback in the log, and an id past int64
  UNAVAILABLE (the database refused the value, reported as an outage, which clients
  retry for ever); a corrupt event tail was INTERNAL too (``DecodeError`` is no
  ``ValueError`` in the upb runtime). Each is now INVALID_ARGUMENT (real continuations:
  test_history_page_tokens.py).
- A list page token (base64 JSON: a query fingerprint anyone can compute, and the
  keyset cursor) was trusted likewise: a deeply nested body (RecursionError), a cursor
  of another length (IndexError) and, on PostgreSQL, a text value for an integer key
  (an SQL error) were INTERNAL. Each is now INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest

from tideflow.api.v1 import service_pb2, service_pb2_grpc
from tideflow.server import TideflowServer

NS = "default"


async def _started_run(stub: service_pb2_grpc.WorkflowServiceStub) -> tuple[str, str]:
    workflow_id = f"w-{uuid.uuid4()}"
    request = service_pb2.StartWorkflowRequest(
        namespace=NS, workflow_id=workflow_id, request_id=str(uuid.uuid4())
    )
    request.workflow_type.name = "Raw"
    request.task_queue.name = f"q-{uuid.uuid4()}"
    response = await stub.StartWorkflow(request, timeout=30)
    return workflow_id, response.run_id


async def _refused(call: Awaitable[Any], what: object) -> str:
    """Await ``call``, which must fail with INVALID_ARGUMENT; its details."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    details = info.value.details() or ""
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, info.value.code(), details)
    return details


def _head(run_id: str, n: str, last: str = "1", buffered: str = "0") -> bytes:
    return f'tfh1:{{"r": "{run_id}", "n": {n}, "l": {last}, "b": {buffered}}}\n'.encode()


async def test_malformed_history_continuation_tokens_are_invalid_argument(
    server: TideflowServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        workflow_id, run_id = await _started_run(stub)
        tokens = [
            _head("x", "Infinity"),
            _head(run_id, "1e400"),
            _head(run_id, "NaN"),
            b"tfh1:" + b"[" * 60_000 + b"\n",
            _head(run_id, str(2**80), last=str(2**80)),
            _head(run_id, "2", buffered=str(-(2**80))),
            _head(run_id, "-5", last="3"),
            _head(run_id, "true"),
            b'tfh1:{"r": 5, "n": 1, "l": 1, "b": 0}\n',
            b"tfh1:[1, 2]\n",
            _head(run_id, "1", last="2") + b"\xff\xff\xff",  # corrupt event tail
        ]
        with caplog.at_level(logging.WARNING, logger="tideflow"):
            for token in tokens:
                request = service_pb2.GetHistoryRequest(namespace=NS, next_page_token=token)
                request.execution.workflow_id = workflow_id
                details = await _refused(stub.GetHistory(request, timeout=30), token[:60])
                # Refused before any field is read: the tokens are sealed now.
                assert details.startswith("next_page_token "), details
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]

        # A well-formed continuation of this run is refused too: it is not sealed
        # (test_history_page_tokens.py).
        request = service_pb2.GetHistoryRequest(
            namespace=NS, next_page_token=_head(run_id, "1", last="2")
        )
        request.execution.workflow_id = workflow_id
        details = await _refused(stub.GetHistory(request, timeout=30), "unsealed")
        assert details.startswith("next_page_token "), details


def _list_token(body: str, query: str = "") -> bytes:
    fingerprint = hashlib.sha256(f"{NS}\0{query}".encode()).hexdigest()[:16]
    text = body if body.startswith("[") else json.dumps({"q": fingerprint, "c": json.loads(body)})
    return base64.urlsafe_b64encode(text.encode())


async def test_malformed_list_page_tokens_are_invalid_argument(
    server: TideflowServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        for _ in range(3):
            await _started_run(stub)
        first = await stub.ListWorkflowExecutions(
            service_pb2.ListWorkflowExecutionsRequest(namespace=NS, page_size=1), timeout=30
        )
        assert first.next_page_token
        bodies = [
            "[" * 3000,
            "[]",
            '["a"]',
            "[1, 2, 3, 4, 5]",
            '["x", "y", "z"]',  # text for the integer StartTime key
            '[1, 2, "z"]',  # an integer for the text WorkflowId key
            "[true, false, null]",
            '[1.5, "w", "r"]',
        ]
        with caplog.at_level(logging.WARNING, logger="tideflow"):
            for body in bodies:
                request = service_pb2.ListWorkflowExecutionsRequest(
                    namespace=NS, page_size=1, next_page_token=_list_token(body)
                )
                await _refused(stub.ListWorkflowExecutions(request, timeout=30), body[:40])
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]

        # The server's own tokens still page through every run.
        seen = [e.execution.workflow_id for e in first.executions]
        token = first.next_page_token
        while token:
            page = await stub.ListWorkflowExecutions(
                service_pb2.ListWorkflowExecutionsRequest(
                    namespace=NS, page_size=1, next_page_token=token
                ),
                timeout=30,
            )
            seen += [e.execution.workflow_id for e in page.executions]
            token = page.next_page_token
        assert len(seen) == len(set(seen)) == 3
