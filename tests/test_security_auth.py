"""Authentication (API keys, JWTs) and namespace isolation of workers
(server/_auth.py), through the SDK (``Client.connect(api_key=...)``) and raw gRPC,
on both stores; the API key commands through the CLI.

Every role boundary of every RPC: tests/test_security_auth_roles.py.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
import uuid
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from helpers import TIDEFLOW_CLI, Processes

from tideflow.api.v1 import common_pb2, service_pb2, service_pb2_grpc
from tideflow.server import (
    AuthConfig,
    AuthMode,
    JWTConfig,
    Principal,
    Role,
    TideflowServer,
)
from tideflow.worker_sdk import Client, Worker, activity, workflow
from tideflow.worker_sdk.exceptions import RPCError

_SECRET = b"a test secret of thirty-two bytes!"
AUTH_ON = ("--port", "0", "--auth", "api-key")


@activity.defn
async def double(n: int) -> int:
    return n * 2


@workflow.defn
class DoubleWorkflow:
    @workflow.run
    async def run(self, n: int) -> int:
        return await workflow.execute_activity(
            double, n, start_to_close_timeout=timedelta(seconds=30)
        )


def _api_key_server(store_url: str) -> TideflowServer:
    return TideflowServer(store_url, port=0, auth=AuthConfig(mode=AuthMode.API_KEY))


async def _register(server: TideflowServer, *namespaces: str) -> None:
    _, root = await server.store.api_keys.create("root", ["*:admin"])
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        for namespace in namespaces:
            await stub.RegisterNamespace(
                service_pb2.RegisterNamespaceRequest(namespace=namespace),
                metadata=(("authorization", f"Bearer {root}"),),
            )


async def test_workers_and_clients_with_api_keys(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tideflow.audit")
    async with _api_key_server(store_url) as server:
        await _register(server, "ns-a")
        keys = server.store.api_keys
        _, worker_key = await keys.create("worker-a", ["ns-a:worker"])
        _, writer_key = await keys.create("app-a", ["ns-a:writer"])
        worker_client = await Client.connect(server.address, namespace="ns-a", api_key=worker_key)
        # The API key header works as well as the bearer token.
        app = await Client.connect(
            server.address, namespace="ns-a", rpc_metadata={"x-tideflow-api-key": writer_key}
        )
        async with worker_client, app:
            tq = f"auth-{uuid.uuid4()}"
            async with Worker(
                worker_client, task_queue=tq, workflows=[DoubleWorkflow], activities=[double]
            ):
                results = await asyncio.wait_for(
                    asyncio.gather(
                        *(
                            app.execute_workflow(
                                DoubleWorkflow.run, n, id=f"auth-{uuid.uuid4()}", task_queue=tq
                            )
                            for n in range(3)
                        )
                    ),
                    timeout=120,
                )
            assert results == [0, 2, 4]
            # The writer may not act as a worker, nor the worker start runs.
            with pytest.raises(RPCError) as denied:
                await worker_client.start_workflow(DoubleWorkflow.run, 1, id="x", task_queue=tq)
            assert denied.value.status == "PERMISSION_DENIED"
            assert "StartWorkflow" in denied.value.message and "'ns-a'" in denied.value.message
    lines = [r.getMessage() for r in caplog.records if r.name == "tideflow.audit"]
    assert any(
        "rpc=StartWorkflow outcome=OK" in line and "principal=app-a" in line for line in lines
    )
    assert any(
        "rpc=RespondActivityTaskCompleted outcome=OK" in line and "principal=worker-a" in line
        for line in lines
    )
    assert any(
        "rpc=StartWorkflow outcome=PERMISSION_DENIED" in line and "principal=worker-a" in line
        for line in lines
    )


async def test_a_worker_of_a_cannot_see_or_act_on_tasks_of_b(store_url: str) -> None:
    async with _api_key_server(store_url) as server:
        await _register(server, "ns-a", "ns-b")
        keys = server.store.api_keys
        _, worker_a = await keys.create("worker-a", ["ns-a:worker"])
        _, root_b = await keys.create("owner-b", ["ns-b:admin"])
        queue = common_pb2.TaskQueue(name="shared-name")
        as_a = (("authorization", f"Bearer {worker_a}"),)
        as_b = (("authorization", f"Bearer {root_b}"),)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            await stub.StartWorkflow(
                service_pb2.StartWorkflowRequest(
                    namespace="ns-b",
                    workflow_id="secret-of-b",
                    workflow_type=common_pb2.WorkflowType(name="Raw"),
                    task_queue=queue,
                    request_id=str(uuid.uuid4()),
                ),
                metadata=as_b,
            )
            # A cannot poll B's queue...
            with pytest.raises(grpc.aio.AioRpcError) as polled:
                await stub.PollWorkflowTask(
                    service_pb2.PollWorkflowTaskRequest(namespace="ns-b", task_queue=queue),
                    metadata=as_a,
                    timeout=10,
                )
            assert polled.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "PollWorkflowTask" in (polled.value.details() or "")
            # ...and its own queue of the same name holds nothing of B.
            own = await stub.PollWorkflowTask(
                service_pb2.PollWorkflowTaskRequest(namespace="ns-a", task_queue=queue),
                metadata=as_a,
                timeout=2,
            )
            assert not own.task_token
            # Holding a genuine token of B (leaked), A still cannot complete B's task:
            # the namespace authorized is the token's, not the one A names.
            task = await stub.PollWorkflowTask(
                service_pb2.PollWorkflowTaskRequest(namespace="ns-b", task_queue=queue),
                metadata=as_b,
                timeout=30,
            )
            assert task.task_token
            for namespace in ("", "ns-a"):
                with pytest.raises(grpc.aio.AioRpcError) as completed:
                    await stub.RespondWorkflowTaskCompleted(
                        service_pb2.RespondWorkflowTaskCompletedRequest(
                            task_token=task.task_token, identity="worker-a"
                        ),
                        metadata=as_a,
                    )
                assert completed.value.code() == grpc.StatusCode.PERMISSION_DENIED, namespace
                assert "namespace 'ns-b'" in (completed.value.details() or "")
            described = await stub.DescribeWorkflow(
                service_pb2.DescribeWorkflowRequest(
                    namespace="ns-b",
                    execution=common_pb2.WorkflowExecution(workflow_id="secret-of-b"),
                ),
                metadata=as_b,
            )
            # The task is still B's to complete: A's attempts changed nothing.
            assert described.workflow_execution_info.history_length == 3


async def test_a_revoked_api_key_is_refused(store_url: str) -> None:
    async with _api_key_server(store_url) as server:
        keys = server.store.api_keys
        record, key = await keys.create("temp", ["default:reader"])
        async with await Client.connect(server.address, api_key=key) as client:
            assert await client.count_workflows() == 0
            assert await keys.revoke(record.key_id)
            with pytest.raises(RPCError) as refused:
                await client.count_workflows()
            assert refused.value.status == "UNAUTHENTICATED"
            assert not await keys.revoke(record.key_id)  # already revoked
        # A key with a wrong secret but a real key id is refused too.
        _, other = await keys.create("other", ["default:reader"])
        with pytest.raises(RPCError) as wrong:
            await Client.connect(server.address, api_key=other[:-4] + "AAAA")
        assert wrong.value.status == "UNAUTHENTICATED"
        listed = {r.key_id: r for r in await keys.list()}
        assert listed[record.key_id].revoked_at is not None


def _hs256(claims: Mapping[str, Any], secret: bytes = _SECRET) -> str:
    return jwt.encode(dict(claims), secret, algorithm="HS256")


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "ci-bot",
        "iss": "https://issuer.example",
        "aud": "tideflow",
        "iat": now,
        "exp": now + 600,
        "permissions": ["default:writer", "other:reader"],
    }
    claims.update(overrides)
    return claims


async def test_jwt_hs256_claims_and_refusals(store_url: str) -> None:
    auth = AuthConfig(
        mode=AuthMode.JWT,
        jwt=JWTConfig(
            key=_SECRET,
            algorithms=("HS256",),
            issuer="https://issuer.example",
            audience="tideflow",
            leeway_s=0,
        ),
    )
    async with TideflowServer(store_url, port=0, auth=auth) as server:
        async with await Client.connect(server.address, api_key=_hs256(_claims())) as client:
            handle = await client.start_workflow("Nobody", id="jwt-1", task_queue="q")
            await handle.terminate("done")
        reader = _hs256(_claims(permissions=["default:reader"]))
        async with await Client.connect(server.address, api_key=reader) as client:
            with pytest.raises(RPCError) as denied:
                await client.start_workflow("Nobody", id="jwt-2", task_queue="q")
            assert denied.value.status == "PERMISSION_DENIED"
            assert "'ci-bot'" in denied.value.message
        now = int(time.time())
        refused = {
            "expired": _hs256(_claims(iat=now - 7200, exp=now - 3600)),
            "no expiry": _hs256({k: v for k, v in _claims().items() if k != "exp"}),
            "wrong signature": _hs256(_claims(), b"another secret, thirty-two bytes"),
            "wrong audience": _hs256(_claims(aud="someone-else")),
            "wrong issuer": _hs256(_claims(iss="https://evil.example")),
            "not a JWT": "hello",
            "alg none": jwt.encode(_claims(), "", algorithm="none"),
        }
        for why, token in refused.items():
            with pytest.raises(RPCError) as caught:
                await Client.connect(server.address, api_key=token)
            assert caught.value.status == "UNAUTHENTICATED", why
            assert "JWT is not valid" in caught.value.message, why


def _pem_pair(private: Any) -> tuple[Any, bytes]:
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_jwt_public_key_algorithms(tmp_path: Path, algorithm: str) -> None:
    private, public = _pem_pair(
        rsa.generate_private_key(65537, 2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    stranger, _ = _pem_pair(
        rsa.generate_private_key(65537, 2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    auth = AuthConfig(mode=AuthMode.JWT, jwt=JWTConfig(key=public, audience="tideflow"))
    async with TideflowServer(f"sqlite:///{tmp_path}/t.db", port=0, auth=auth) as server:
        good = jwt.encode(_claims(), private, algorithm=algorithm)
        async with await Client.connect(server.address, api_key=good) as client:
            assert await client.count_workflows() == 0
        forged = jwt.encode(_claims(), stranger, algorithm=algorithm)
        # The public key used as an HMAC secret: the algorithm confusion attack.
        confused = jwt.encode(_claims(), b"x" * 32, algorithm="HS256")
        for token in (forged, confused):
            with pytest.raises(RPCError) as caught:
                await Client.connect(server.address, api_key=token)
            assert caught.value.status == "UNAUTHENTICATED"


class GroupsMapper:
    """A custom claim mapper: members of group ``ops`` administer every namespace."""

    def map_claims(self, claims: Mapping[str, Any]) -> Principal:
        admin = "ops" in claims.get("groups", [])
        return Principal(str(claims["sub"]), {"*": frozenset({Role.ADMIN})} if admin else {})


class NoTerminations:
    """A custom authorizer: everything but TerminateWorkflow, for everyone."""

    def authorize(self, principal: Principal, rpc: str, namespace: str) -> str | None:
        return "terminations are off today" if rpc == "TerminateWorkflow" else None


async def test_pluggable_claim_mapper_and_authorizer(tmp_path: Path) -> None:
    config = JWTConfig(key=_SECRET, algorithms=("HS256",))
    mapped = AuthConfig(mode=AuthMode.JWT, jwt=config, claim_mapper=GroupsMapper())
    async with TideflowServer(f"sqlite:///{tmp_path}/a.db", port=0, auth=mapped) as server:
        ops = _hs256(_claims(groups=["ops"], permissions=[]))
        async with await Client.connect(server.address, api_key=ops) as client:
            await client.start_workflow("Nobody", id="mapped", task_queue="q")
        # Without the group the mapper grants nothing: even GetSystemInfo is refused.
        with pytest.raises(RPCError) as caught:
            await Client.connect(server.address, api_key=_hs256(_claims(groups=["dev"])))
        assert caught.value.status == "PERMISSION_DENIED"
    custom = AuthConfig(mode=AuthMode.JWT, jwt=config, authorizer=NoTerminations())
    async with (
        TideflowServer(f"sqlite:///{tmp_path}/b.db", port=0, auth=custom) as server,
        await Client.connect(server.address, api_key=_hs256(_claims())) as client,
    ):
        handle = await client.start_workflow("Nobody", id="kept", task_queue="q")
        with pytest.raises(RPCError) as caught:
            await handle.terminate()
        assert caught.value.status == "PERMISSION_DENIED"
        assert "terminations are off today" in caught.value.message


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TIDEFLOW_CLI, "server", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_api_key_commands_and_start_dev_with_auth(tmp_path: Path, procs: Processes) -> None:
    url = f"sqlite:///{tmp_path}/t.db"
    created = await asyncio.to_thread(
        _cli, "create-api-key", "--db-url", url, "--name", "ci", "--grant", "default:writer"
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[0]
    assert key.startswith("tfk_")
    key_id = key.split("_")[1]
    listed = await asyncio.to_thread(_cli, "list-api-keys", "--db-url", url)
    assert f"{key_id}  ci  default:writer" in listed.stdout and "live" in listed.stdout
    assert key.split("_", 2)[2] not in listed.stdout  # never the secret
    for args, message in (
        (["--grant", "default:owner"], "unknown role 'owner'"),
        (["--grant", "default"], "is not NAMESPACE:ROLE"),
    ):
        bad = await asyncio.to_thread(_cli, "create-api-key", "--db-url", url, "--name", "x", *args)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    bad_flags = await asyncio.to_thread(
        _cli, "start-dev", "--db", str(tmp_path / "t.db"), "--port", "0", "--auth", "jwt"
    )
    assert bad_flags.returncode == 2
    assert "--auth jwt needs one of --auth-jwt-key" in bad_flags.stderr

    proc = procs.spawn(
        "server",
        [*TIDEFLOW_CLI, "server", "start-dev", "--db", str(tmp_path / "t.db"), *AUTH_ON],
    )
    line = await procs.wait_for_line(proc, "tideflow server listening on ")
    address = line.rsplit(" ", 1)[1].strip()
    with pytest.raises(RPCError) as anonymous:
        await Client.connect(address)
    assert anonymous.value.status == "UNAUTHENTICATED"
    # The SDK's commands take the key too (--api-key, or $TIDEFLOW_API_KEY).
    listing = [*TIDEFLOW_CLI, "dag", "list", "--address", address]
    anonymous_list = await asyncio.to_thread(
        subprocess.run, listing, capture_output=True, text=True, timeout=120
    )
    assert anonymous_list.returncode == 2 and "authentication required" in anonymous_list.stderr
    keyed_list = await asyncio.to_thread(
        subprocess.run, [*listing, "--api-key", key], capture_output=True, text=True, timeout=120
    )
    assert keyed_list.returncode == 0, keyed_list.stderr
    async with await Client.connect(address, api_key=key) as client:
        await client.start_workflow("Nobody", id="cli-key", task_queue="q")
        revoked = await asyncio.to_thread(
            _cli, "revoke-api-key", "--db-url", url, "--key-id", key_id
        )
        assert revoked.returncode == 0 and f"API key {key_id} revoked" in revoked.stdout
        with pytest.raises(RPCError) as refused:
            await client.count_workflows()
        assert refused.value.status == "UNAUTHENTICATED"
    again = await asyncio.to_thread(_cli, "revoke-api-key", "--db-url", url, "--key-id", key_id)
    assert again.returncode == 2 and "no such live API key" in again.stderr


async def test_auth_off_needs_no_credentials(tmp_path: Path) -> None:
    # Today's behaviour: no --auth, no credentials, everything allowed; credentials
    # sent anyway are ignored.
    async with TideflowServer(f"sqlite:///{tmp_path}/t.db", port=0) as server:
        async with await Client.connect(server.address) as client:
            await client.start_workflow("Nobody", id="open", task_queue="q")
        async with await Client.connect(server.address, api_key="anything") as client:
            assert await client.count_workflows() == 1
            # A task token of the open server works without credentials too.
            polled = await client.service.PollWorkflowTask(
                service_pb2.PollWorkflowTaskRequest(
                    namespace="default", task_queue=common_pb2.TaskQueue(name="q")
                ),
                timeout=30,
            )
            assert polled.task_token


def test_client_credentials_are_checked() -> None:
    from tideflow.worker_sdk._credentials import credential_metadata

    assert credential_metadata("k", {"x-team": "a"}) == (
        ("x-team", "a"),
        ("authorization", "Bearer k"),
    )
    with pytest.raises(ValueError, match="not both"):
        credential_metadata("k", {"authorization": "Bearer j"})
    with pytest.raises(ValueError, match="lower case"):
        credential_metadata(None, {"X-Team": "a"})
    with pytest.raises(ValueError, match="empty"):
        credential_metadata(" ", None)
