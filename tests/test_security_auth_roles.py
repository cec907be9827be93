"""Every role boundary of the authorization (server/_auth.py): each RPC of the
WorkflowService called by each role, on both stores. A call outside the grant is
PERMISSION_DENIED, naming the RPC, the namespace and the role it needs; a call within
it gets past authorization (whatever its handler then answers to a minimal request).

The expected table is written out here, from the roles' definitions in the README,
rather than read from the server's own table, so a change of the server's table shows.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from tideflow.api.v1 import command_pb2, common_pb2, service_pb2, service_pb2_grpc
from tideflow.server import AuthConfig, AuthMode, TideflowServer
from tideflow.server._auth import RPC_ACCESS

NS = "ns-a"
READ = {
    "GetSystemInfo",
    "GetHistory",
    "DescribeWorkflow",
    "QueryWorkflow",
    "ListWorkflowExecutions",
    "CountWorkflowExecutions",
    "DescribeSchedule",
    "ListSchedules",
    "DescribeTaskQueue",
}
WRITE = {"StartWorkflow", "SignalWorkflow", "RequestCancelWorkflow", "TerminateWorkflow"}
WORK = {
    "PollWorkflowTask",
    "PollActivityTask",
    "RespondWorkflowTaskCompleted",
    "RespondWorkflowTaskFailed",
    "RespondActivityTaskCompleted",
    "RespondActivityTaskFailed",
    "RespondActivityTaskCanceled",
    "RecordActivityHeartbeat",
    "RespondQueryTaskCompleted",
    "ShutdownWorker",
    # The batch's own gate; its items are each authorized as their own RPC
    # (tests/test_batch_responds.py).
    "RespondTasksCompleted",
}
ADMIN = {"RegisterNamespace", "CreateSchedule", "PatchSchedule", "DeleteSchedule"}
# Cluster-wide (no namespace): the admin role on every namespace ("*:admin") only.
CLUSTER = {"DescribeCluster"}
ALL_RPCS = READ | WRITE | WORK | ADMIN | CLUSTER

# Each caller's grants, and the RPCs it may call on NS.
CALLERS: dict[str, tuple[list[str], set[str]]] = {
    "reader": ([f"{NS}:reader"], READ),
    "writer": ([f"{NS}:writer"], READ | WRITE),
    "worker": ([f"{NS}:worker"], READ | WORK),
    "admin": ([f"{NS}:admin"], ALL_RPCS - CLUSTER),
    "admin-everywhere": (["*:admin"], ALL_RPCS),
    "reader-everywhere": (["*:reader"], READ),
    # Every role, but on another namespace: only GetSystemInfo (no namespace) passes.
    "admin-of-b": (["ns-b:admin"], {"GetSystemInfo"}),
}
ROLE_NEEDED = {
    **dict.fromkeys(READ, "reader"),
    **dict.fromkeys(WRITE, "writer"),
    **dict.fromkeys(WORK, "worker"),
    **dict.fromkeys(ADMIN | CLUSTER, "admin"),
}
# Where a refusal says the call was refused.
WHERE = {"GetSystemInfo": "any namespace", "DescribeCluster": "namespace '*'"}


def _auth(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


def _schedule_activity() -> command_pb2.Command:
    return command_pb2.Command(
        command_type=command_pb2.CommandType.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK,
        schedule_activity_task_command_attributes=command_pb2.ScheduleActivityTaskCommandAttributes(
            activity_id="a1",
            activity_type=common_pb2.ActivityType(name="A"),
            task_queue=common_pb2.TaskQueue(name="roles-q"),
            start_to_close_timeout=Duration(seconds=600),
        ),
    )


async def _tokens(stub: Any, admin_key: str) -> tuple[bytes, bytes]:
    """A genuine workflow task token and activity task token of NS, so the task RPCs
    reach their authorization (a forged token is refused before it)."""
    queue = common_pb2.TaskQueue(name="roles-q")

    async def start_and_poll() -> bytes:
        await stub.StartWorkflow(
            service_pb2.StartWorkflowRequest(
                namespace=NS,
                workflow_id=f"roles-{uuid.uuid4()}",
                workflow_type=common_pb2.WorkflowType(name="Raw"),
                task_queue=queue,
                request_id=str(uuid.uuid4()),
            ),
            metadata=_auth(admin_key),
        )
        polled = await stub.PollWorkflowTask(
            service_pb2.PollWorkflowTaskRequest(namespace=NS, task_queue=queue),
            metadata=_auth(admin_key),
            timeout=30,
        )
        assert polled.task_token
        token: bytes = polled.task_token
        return token

    first = await start_and_poll()
    await stub.RespondWorkflowTaskCompleted(
        service_pb2.RespondWorkflowTaskCompletedRequest(
            task_token=first, commands=[_schedule_activity()]
        ),
        metadata=_auth(admin_key),
    )
    activity = await stub.PollActivityTask(
        service_pb2.PollActivityTaskRequest(namespace=NS, task_queue=queue),
        metadata=_auth(admin_key),
        timeout=30,
    )
    assert activity.task_token
    return await start_and_poll(), activity.task_token


def _requests(workflow_token: bytes, activity_token: bytes) -> dict[str, Callable[[], Any]]:
    """A minimal request of each RPC on NS (fresh each call: handlers may modify them)."""
    execution = common_pb2.WorkflowExecution(workflow_id="no-such-run")
    queue = common_pb2.TaskQueue(name="roles-idle-q")
    sp = service_pb2
    return {
        "GetSystemInfo": lambda: sp.GetSystemInfoRequest(),
        "RegisterNamespace": lambda: sp.RegisterNamespaceRequest(namespace=NS),
        "StartWorkflow": lambda: sp.StartWorkflowRequest(
            namespace=NS,
            workflow_id=f"roles-started-{uuid.uuid4()}",
            workflow_type=common_pb2.WorkflowType(name="Nobody"),
            task_queue=queue,
        ),
        "GetHistory": lambda: sp.GetHistoryRequest(namespace=NS, execution=execution),
        "DescribeWorkflow": lambda: sp.DescribeWorkflowRequest(namespace=NS, execution=execution),
        "TerminateWorkflow": lambda: sp.TerminateWorkflowRequest(
            namespace=NS, workflow_execution=execution
        ),
        "SignalWorkflow": lambda: sp.SignalWorkflowRequest(
            namespace=NS, workflow_execution=execution, signal_name="s"
        ),
        "RequestCancelWorkflow": lambda: sp.RequestCancelWorkflowRequest(
            namespace=NS, workflow_execution=execution
        ),
        "QueryWorkflow": lambda: sp.QueryWorkflowRequest(
            namespace=NS, execution=execution, query=sp.WorkflowQuery(query_type="q")
        ),
        "RespondQueryTaskCompleted": lambda: sp.RespondQueryTaskCompletedRequest(
            task_token=workflow_token
        ),
        "RespondActivityTaskCanceled": lambda: sp.RespondActivityTaskCanceledRequest(
            task_token=activity_token
        ),
        "ShutdownWorker": lambda: sp.ShutdownWorkerRequest(
            namespace=NS, sticky_task_queue="roles-sticky"
        ),
        "PollWorkflowTask": lambda: sp.PollWorkflowTaskRequest(namespace=NS, task_queue=queue),
        "RespondWorkflowTaskCompleted": lambda: sp.RespondWorkflowTaskCompletedRequest(
            task_token=workflow_token
        ),
        "RespondWorkflowTaskFailed": lambda: sp.RespondWorkflowTaskFailedRequest(
            task_token=workflow_token
        ),
        "PollActivityTask": lambda: sp.PollActivityTaskRequest(namespace=NS, task_queue=queue),
        "RespondActivityTaskCompleted": lambda: sp.RespondActivityTaskCompletedRequest(
            task_token=activity_token
        ),
        "RespondActivityTaskFailed": lambda: sp.RespondActivityTaskFailedRequest(
            task_token=activity_token
        ),
        "RecordActivityHeartbeat": lambda: sp.RecordActivityHeartbeatRequest(
            task_token=activity_token
        ),
        "RespondTasksCompleted": lambda: sp.RespondTasksCompletedRequest(namespace=NS),
        "ListWorkflowExecutions": lambda: sp.ListWorkflowExecutionsRequest(namespace=NS),
        "CountWorkflowExecutions": lambda: sp.CountWorkflowExecutionsRequest(namespace=NS),
        "CreateSchedule": lambda: sp.CreateScheduleRequest(namespace=NS, schedule_id="s1"),
        "DescribeSchedule": lambda: sp.DescribeScheduleRequest(namespace=NS, schedule_id="s1"),
        "PatchSchedule": lambda: sp.PatchScheduleRequest(namespace=NS, schedule_id="s1"),
        "DeleteSchedule": lambda: sp.DeleteScheduleRequest(namespace=NS, schedule_id="s1"),
        "ListSchedules": lambda: sp.ListSchedulesRequest(namespace=NS),
        "DescribeTaskQueue": lambda: sp.DescribeTaskQueueRequest(namespace=NS, task_queue=queue),
        "DescribeCluster": lambda: sp.DescribeClusterRequest(),
    }


def test_every_rpc_of_the_service_has_a_role() -> None:
    methods = {m.name for m in service_pb2.DESCRIPTOR.services_by_name["WorkflowService"].methods}
    assert methods == ALL_RPCS
    assert set(RPC_ACCESS) == methods


async def test_every_rpc_by_every_role(store_url: str) -> None:
    auth = AuthConfig(mode=AuthMode.API_KEY)
    async with TideflowServer(store_url, port=0, auth=auth) as server:
        keys = server.store.api_keys
        _, root = await keys.create("root", ["*:admin"])
        callers = {
            name: (await keys.create(name, grants))[1] for name, (grants, _) in CALLERS.items()
        }
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            for namespace in (NS, "ns-b"):
                await stub.RegisterNamespace(
                    service_pb2.RegisterNamespaceRequest(namespace=namespace), metadata=_auth(root)
                )
            requests = _requests(*await _tokens(stub, root))
            assert set(requests) == ALL_RPCS
            wrong: list[str] = []
            for rpc in sorted(ALL_RPCS):
                for name, (_, allowed) in CALLERS.items():
                    code, message = await _call(stub, rpc, requests[rpc](), callers[name])
                    denied = code == grpc.StatusCode.PERMISSION_DENIED
                    if code == grpc.StatusCode.UNAUTHENTICATED or denied == (rpc in allowed):
                        wrong.append(f"{rpc} by {name}: {code.name} {message}")
                    elif denied:
                        where = WHERE.get(rpc, f"namespace {NS!r}")
                        expected = f"may not call {rpc} on {where}: it needs the role"
                        if expected not in message or ROLE_NEEDED[rpc] not in message:
                            wrong.append(f"{rpc} by {name}: unclear refusal {message!r}")
            assert wrong == []


async def _call(stub: Any, rpc: str, request: Any, key: str) -> tuple[grpc.StatusCode, str]:
    try:
        # Long polls and queries answer (empty, or DEADLINE_EXCEEDED) before a short
        # deadline: allowed is all that matters here.
        await getattr(stub, rpc)(request, metadata=_auth(key), timeout=2.0)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer tfk_nope_nope"),)])
async def test_unauthenticated_calls_reach_no_rpc(tmp_path: Any, metadata: Any) -> None:
    auth = AuthConfig(mode=AuthMode.API_KEY)
    async with (
        TideflowServer(f"sqlite:///{tmp_path}/t.db", port=0, auth=auth) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        requests = _requests(b"forged", b"forged")
        for rpc in sorted(ALL_RPCS):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await getattr(stub, rpc)(requests[rpc](), metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, rpc
