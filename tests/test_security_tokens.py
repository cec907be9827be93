"""Task tokens are signed (server/_task_tokens.py): a client that reads a run's fields
through GetHistory/DescribeWorkflow cannot build a token the server accepts, nor move a
genuine token to another run; keys rotate without failing the tasks in flight.

Workflow and activity tasks are driven over raw gRPC (tests/raw_workflow.py), so each
test holds the exact tokens the server handed out.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import pytest
from google.protobuf.duration_pb2 import Duration
from raw_workflow import RawWorkflows, complete_workflow

from tideflow.api.v1 import command_pb2, common_pb2, service_pb2, state_pb2
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.history import HistoryStore
from tideflow.server import TideflowServer
from tideflow.server._task_tokens import TaskTokenSigner
from tideflow.worker_sdk import Client
from tideflow.worker_sdk.exceptions import InvalidArgumentError, NotFoundError

ET = EventType
# A sealed token: b"tft1", the key id (4 bytes), the HMAC (32 bytes), the TaskToken.
_HEAD = 8
_MAC = 32


@pytest.fixture
async def server(store_url: str) -> AsyncIterator[TideflowServer]:
    async with TideflowServer(store_url, port=0) as srv:
        yield srv


@pytest.fixture
async def client(server: TideflowServer) -> AsyncIterator[Client]:
    async with await Client.connect(server.address) as connected:
        yield connected


def schedule_activity(activity_id: str, task_queue: str) -> command_pb2.Command:
    return command_pb2.Command(
        command_type=command_pb2.CommandType.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK,
        schedule_activity_task_command_attributes=command_pb2.ScheduleActivityTaskCommandAttributes(
            activity_id=activity_id,
            activity_type=common_pb2.ActivityType(name="A"),
            task_queue=common_pb2.TaskQueue(name=task_queue),
            start_to_close_timeout=Duration(seconds=600),
        ),
    )


async def poll_activity(client: Client, task_queue: str) -> service_pb2.PollActivityTaskResponse:
    request = service_pb2.PollActivityTaskRequest(
        namespace="default", task_queue=common_pb2.TaskQueue(name=task_queue), identity="raw"
    )
    while True:
        task: service_pb2.PollActivityTaskResponse = await client.call(
            client.service.PollActivityTask, request
        )
        if task.task_token:
            return task


async def history(client: Client, workflow_id: str, run_id: str) -> list[HistoryEvent]:
    response: service_pb2.GetHistoryResponse = await client.call(
        client.service.GetHistory,
        service_pb2.GetHistoryRequest(
            namespace="default",
            execution=common_pb2.WorkflowExecution(workflow_id=workflow_id, run_id=run_id),
        ),
    )
    return list(response.history.events)


async def complete_activity(client: Client, token: bytes, result: str) -> None:
    request = service_pb2.RespondActivityTaskCompletedRequest(task_token=token, identity="raw")
    request.result.payloads.add(data=result.encode())
    await client.call(client.service.RespondActivityTaskCompleted, request)


def body_of(token: bytes) -> state_pb2.TaskToken:
    return state_pb2.TaskToken.FromString(token[_HEAD + _MAC :])


def with_body(token: bytes, body: state_pb2.TaskToken) -> bytes:
    """``token``'s key id and MAC around another body (what an attacker who edits a
    genuine token sends)."""
    return token[: _HEAD + _MAC] + body.SerializeToString()


async def test_forged_and_moved_tokens_are_refused(client: Client) -> None:
    tq = f"tq-{uuid.uuid4()}"
    raw = RawWorkflows(client, tq)
    id_a, id_b = f"a-{uuid.uuid4()}", f"b-{uuid.uuid4()}"
    run_a = await raw.start(id_a)
    await raw.complete((await raw.poll()).task_token, schedule_activity("act", tq))
    activity = await poll_activity(client, tq)
    run_b = await raw.start(id_b)
    task_b = await raw.poll()
    assert task_b.workflow_execution.run_id == run_b

    # An activity token built from what history shows: refused, nothing recorded.
    events_a = await history(client, id_a, run_a)
    scheduled = next(e for e in events_a if e.event_type == ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)
    forged = state_pb2.TaskToken(
        namespace="default",
        workflow_id=id_a,
        run_id=run_a,
        scheduled_event_id=scheduled.event_id,
        attempt=1,
        is_activity=True,
        # When the attempt was scheduled (the metrics' end-to-end latency): the event's time.
        scheduled_time_us=scheduled.event_time.ToMicroseconds(),
    )
    assert body_of(activity.task_token) == forged  # the forgery names the real task
    fake_mac = activity.task_token[:_HEAD] + bytes(_MAC) + forged.SerializeToString()
    for token in (forged.SerializeToString(), fake_mac):
        with pytest.raises(InvalidArgumentError) as refused:
            await complete_activity(client, token, "attacker")
        assert refused.value.status == "INVALID_ARGUMENT"
        assert "task token" in refused.value.message
    assert await history(client, id_a, run_a) == events_a

    # A workflow task token built from run B's history: refused, run B still open.
    events_b = await history(client, id_b, run_b)
    started = next(e for e in events_b if e.event_type == ET.EVENT_TYPE_WORKFLOW_TASK_STARTED)
    forged_wft = state_pb2.TaskToken(
        namespace="default",
        workflow_id=id_b,
        run_id=run_b,
        scheduled_event_id=started.workflow_task_started_event_attributes.scheduled_event_id,
        started_event_id=started.event_id,
        attempt=1,
    )
    wft_scheduled = next(e for e in events_b if e.event_id == forged_wft.scheduled_event_id)
    forged_wft.scheduled_time_us = wft_scheduled.event_time.ToMicroseconds()
    assert body_of(task_b.task_token) == forged_wft
    with pytest.raises(InvalidArgumentError) as refused:
        await raw.complete(forged_wft.SerializeToString(), complete_workflow())
    assert "malformed" in refused.value.message

    # Genuine tokens moved to the other run (the MAC kept, the fields edited): refused.
    moved = body_of(activity.task_token)
    moved.workflow_id, moved.run_id = id_b, run_b
    with pytest.raises(InvalidArgumentError) as refused:
        await complete_activity(client, with_body(activity.task_token, moved), "attacker")
    assert "signature" in refused.value.message
    moved_wft = body_of(task_b.task_token)
    moved_wft.workflow_id, moved_wft.run_id = id_a, run_a
    with pytest.raises(InvalidArgumentError):
        await raw.complete(with_body(task_b.task_token, moved_wft), complete_workflow())
    other_attempt = body_of(task_b.task_token)
    other_attempt.attempt = 2
    with pytest.raises(InvalidArgumentError):
        await raw.complete(with_body(task_b.task_token, other_attempt), complete_workflow())
    assert await history(client, id_b, run_b) == events_b
    assert await history(client, id_a, run_a) == events_a

    # The genuine tokens still work, and a second use is stale: NOT_FOUND as before.
    await complete_activity(client, activity.task_token, "worker")
    await raw.complete(task_b.task_token, complete_workflow())
    with pytest.raises(NotFoundError):
        await complete_activity(client, activity.task_token, "again")
    with pytest.raises(NotFoundError):
        await raw.complete(task_b.task_token, complete_workflow())
    completed = [
        e
        for e in await history(client, id_a, run_a)
        if e.event_type == ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
    ]
    assert [
        e.activity_task_completed_event_attributes.result.payloads[0].data for e in completed
    ] == [b"worker"]
    assert (await history(client, id_b, run_b))[-1].event_type == (
        ET.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
    )


async def test_signed_token_of_unknown_run_and_other_namespace(
    server: TideflowServer, client: Client
) -> None:
    # Signed with the server's own key (read from the store, as another node would):
    # past the signature, the engine answers an unknown run as it always did.
    signer = TaskTokenSigner(server.store.token_keys, refresh_s=60)
    unknown = state_pb2.TaskToken(
        namespace="default",
        workflow_id="nobody",
        run_id=str(uuid.uuid4()),
        scheduled_event_id=5,
        attempt=1,
        is_activity=True,
    )
    with pytest.raises(NotFoundError):
        await complete_activity(client, await signer.seal(unknown.SerializeToString()), "x")
    query = state_pb2.TaskToken(
        namespace="default", workflow_id="w", run_id=str(uuid.uuid4()), query_id="q"
    )
    with pytest.raises(InvalidArgumentError) as refused:
        await client.call(
            client.service.RespondQueryTaskCompleted,
            service_pb2.RespondQueryTaskCompletedRequest(
                task_token=await signer.seal(query.SerializeToString()), namespace="other"
            ),
        )
    assert "belongs to namespace 'default'" in refused.value.message


async def test_rotation_keeps_tasks_in_flight_completing(
    server: TideflowServer, client: Client, store_url: str
) -> None:
    tq = f"tq-{uuid.uuid4()}"
    raw = RawWorkflows(client, tq)
    workflow_id = f"rot-{uuid.uuid4()}"
    run_id = await raw.start(workflow_id)
    await raw.complete(
        (await raw.poll()).task_token, schedule_activity("a1", tq), schedule_activity("a2", tq)
    )
    first = await poll_activity(client, tq)
    assert first.task_token[4:8] == (1).to_bytes(4, "big")

    # Rotated by the admin command, against the database, while the server runs.
    out = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "tideflow.server._cli",
            "server",
            "rotate-token-key",
            "--db-url",
            store_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "task token key 2 signs from now on; live keys: [1, 2]" in out.stdout
    assert await server.reload_token_keys() == 2

    second = await poll_activity(client, tq)
    assert second.task_token[4:8] == (2).to_bytes(4, "big")
    # The task started under key 1 completes after the rotation.
    await complete_activity(client, first.task_token, "one")

    # Key 1 retired: what it signed is refused as such, not looked up.
    assert await server.store.token_keys.retire(1)
    with pytest.raises(ValueError, match="newest"):
        await server.store.token_keys.retire(2)
    await server.reload_token_keys()
    with pytest.raises(InvalidArgumentError) as refused:
        await complete_activity(client, first.task_token, "again")
    assert "unknown or retired key (id 1)" in refused.value.message
    await complete_activity(client, second.task_token, "two")
    results = [
        e.activity_task_completed_event_attributes.result.payloads[0].data
        for e in await history(client, workflow_id, run_id)
        if e.event_type == ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
    ]
    assert results == [b"one", b"two"]


async def test_keys_are_shared_and_rotations_never_collide(store: HistoryStore) -> None:
    # Two nodes starting on a new database agree on one first key...
    first, second = await asyncio.gather(store.token_keys.keys(), store.token_keys.keys())
    assert first == second
    assert [key.key_id for key in first] == [1]
    assert first[0].secret.hex() not in repr(first[0])
    # ...and two rotations at once take distinct ids (the key id is the primary key).
    rotated = await asyncio.gather(store.token_keys.rotate(), store.token_keys.rotate())
    assert sorted(key.key_id for key in rotated) == [2, 3]
    assert [key.key_id for key in await store.token_keys.keys()] == [1, 2, 3]
    assert not await store.token_keys.retire(7)
