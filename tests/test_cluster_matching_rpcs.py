"""The MatchingService (proto/tideflow/api/v1/matching.proto) on one real node, both
stores: every call without a valid node credential is UNAUTHENTICATED, whatever the auth
mode (a client that could hand a node task rows or have it record tasks started would
mint task tokens); with one, AddTasks queues rows of the queues the node serves and
RecordTaskStarted starts a task of a run the node owns, once."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from helpers import new_id

from tideflow.api.v1 import common_pb2, matching_pb2, matching_pb2_grpc, service_pb2
from tideflow.history import RunKey, TaskKind, TaskRow
from tideflow.server import TideflowServer
from tideflow.server._matching_routes import task_message
from tideflow.server._peers import NODE_HEADER
from tideflow.worker_sdk import Client

_REQUESTS: dict[str, Any] = {
    "AddTasks": matching_pb2.AddTasksRequest(),
    "RecordTaskStarted": matching_pb2.RecordTaskStartedRequest(),
    "DispatchQuery": matching_pb2.DispatchQueryRequest(),
    "Unstick": matching_pb2.UnstickRequest(),
}


@pytest.mark.parametrize("rpc", sorted(_REQUESTS))
@pytest.mark.parametrize("header", [None, "node-x:1:00", "dev@vm:1:" + "ab" * 32])
async def test_internal_calls_without_a_node_credential_are_unauthenticated(
    server: TideflowServer, rpc: str, header: str | None
) -> None:
    metadata = () if header is None else ((NODE_HEADER, header),)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = matching_pb2_grpc.MatchingServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await getattr(stub, rpc)(_REQUESTS[rpc], timeout=30, metadata=metadata)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "only its nodes may call it" in (raised.value.details() or "")


async def test_a_node_queues_added_rows_and_starts_a_task_once(
    server: TideflowServer, client: Client
) -> None:
    """AddTasks with the node's own credential: the row is queued (DescribeTaskQueue
    counts it once, though added twice); RecordTaskStarted of a task whose run does not
    exist is stale."""
    assert server.node_credential is not None
    metadata = await server.node_credential.metadata()
    queue = new_id("tq")
    row = TaskRow(
        key=RunKey(namespace="default", workflow_id=new_id("wf"), run_id=str(uuid.uuid4())),
        task_queue=queue,
        kind=TaskKind.ACTIVITY,
        ref_id=5,
        attempt=1,
    )
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = matching_pb2_grpc.MatchingServiceStub(channel)  # type: ignore[no-untyped-call]
        request = matching_pb2.AddTasksRequest(tasks=[task_message(row), task_message(row)])
        added = await stub.AddTasks(request, timeout=30, metadata=metadata)
        assert list(added.refused_task_keys) == []
        described = await client.service.DescribeTaskQueue(
            service_pb2.DescribeTaskQueueRequest(
                namespace="default",
                task_queue=common_pb2.TaskQueue(name=queue),
                task_queue_type=service_pb2.TASK_QUEUE_TYPE_ACTIVITY,
            )
        )
        assert described.backlog_count_hint == 1
        started = await stub.RecordTaskStarted(
            matching_pb2.RecordTaskStartedRequest(task=task_message(row), identity="test"),
            timeout=30,
            metadata=metadata,
        )
    assert started.outcome == matching_pb2.RECORD_TASK_STARTED_OUTCOME_STALE
