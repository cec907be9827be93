"""The HTTP API (server/_http_api.py) against a real server with its UI port open
(port 0, SQLite) and a real worker: every route, the error statuses and their typed
details, the same validation as gRPC, auth, the OpenAPI document, ``/healthz`` and
``tideflow server start-dev``'s UI port. One server for the module: each test uses
its own workflow and schedule ids."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import grpc
import pytest
import pytest_asyncio
from helpers import TIDEFLOW_CLI, Processes, eventually
from helpers_web import QUEUE, WebEnv, schedule_body, web_env
from openapi_spec_validator import validate

from tideflow.api.v1 import service_pb2, service_pb2_grpc
from tideflow.server import TideflowServer, _cli
from tideflow.server._auth import AuthConfig, AuthMode
from tideflow.server._http_routes import ROUTES

pytestmark = pytest.mark.asyncio(loop_scope="module")
NS = "/api/v1/namespaces/default"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WebEnv]:
    async with web_env(tmp_path_factory.mktemp("http")) as running:
        yield running


def wid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def start(env: WebEnv, workflow_id: str, *args: Any) -> str:
    status, body = await env.call(
        "POST",
        f"{NS}/workflows/{workflow_id}",
        {
            "workflowType": {"name": "Greeter"},
            "taskQueue": {"name": QUEUE},
            "input": {"payloads": list(args)},
        },
    )
    assert status == 200, body
    assert body["started"] is True
    run_id: str = body["runId"]
    return run_id


async def status_of(env: WebEnv, workflow_id: str) -> str:
    status, body = await env.call("GET", f"{NS}/workflows/{workflow_id}")
    assert status == 200, body
    return str(body["workflowExecutionInfo"]["status"])


async def closed_with(env: WebEnv, workflow_id: str, status: str) -> None:
    async def done() -> bool:
        return await status_of(env, workflow_id) == f"WORKFLOW_EXECUTION_STATUS_{status}"

    await eventually(done, f"{workflow_id} {status}")


async def events_of(env: WebEnv, workflow_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    token = ""
    while True:
        query = urlencode({"maximumPageSize": 3} | ({"nextPageToken": token} if token else {}))
        status, body = await env.call("GET", f"{NS}/workflows/{workflow_id}/history?{query}")
        assert status == 200, body
        events += body["history"].get("events", [])
        token = body.get("nextPageToken", "")
        if not token:
            return events


async def test_start_describe_and_history_with_json_payloads(env: WebEnv) -> None:
    workflow_id = wid("start")
    run_id = await start(env, workflow_id, "ada")
    await closed_with(env, workflow_id, "COMPLETED")
    status, described = await env.call("GET", f"{NS}/workflows/{workflow_id}?runId={run_id}")
    assert status == 200
    info = described["workflowExecutionInfo"]
    assert info["execution"] == {"workflowId": workflow_id, "runId": run_id}
    assert info["type"] == {"name": "Greeter"} and info["taskQueue"] == QUEUE
    events = await events_of(env, workflow_id)  # read in pages of 3
    types = [e["eventType"] for e in events]
    assert types[0] == "EVENT_TYPE_WORKFLOW_EXECUTION_STARTED"
    assert types[-1] == "EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED"
    assert [e["eventId"] for e in events] == [str(i) for i in range(1, len(events) + 1)]
    # Payloads are their JSON values; the activity's retry is its started attempt.
    started = events[0]["workflowExecutionStartedEventAttributes"]
    assert started["input"]["payloads"] == ["ada"]
    done = events[-1]["workflowExecutionCompletedEventAttributes"]
    assert done["result"]["payloads"] == ["hello ada"]
    (activity,) = [e for e in events if e["eventType"] == "EVENT_TYPE_ACTIVITY_TASK_STARTED"]
    assert activity["activityTaskStartedEventAttributes"]["attempt"] == 2


async def test_signal_and_query(env: WebEnv) -> None:
    workflow_id = wid("signal")
    await start(env, workflow_id, "bo", True)
    path = f"{NS}/workflows/{workflow_id}"
    status, body = await env.call("POST", f"{path}/query/progress", {})
    assert status == 200, body
    assert body["queryResult"]["payloads"] == ["waiting"]
    status, body = await env.call("POST", f"{path}/signal/approve", {})
    assert status == 200 and body == {}
    await closed_with(env, workflow_id, "COMPLETED")
    _, body = await env.call("POST", f"{path}/query/progress")
    assert body["queryResult"]["payloads"] == ["approved"]
    signals = [
        e
        for e in await events_of(env, workflow_id)
        if "workflowExecutionSignaledEventAttributes" in e
    ]
    assert signals[0]["workflowExecutionSignaledEventAttributes"]["signalName"] == "approve"


async def test_cancel_and_terminate(env: WebEnv) -> None:
    cancelled, terminated = wid("cancel"), wid("terminate")
    await start(env, cancelled, "cy", True)
    await start(env, terminated, "di", True)
    status, _ = await env.call("POST", f"{NS}/workflows/{cancelled}/cancel", {"reason": "no"})
    assert status == 200
    status, _ = await env.call("POST", f"{NS}/workflows/{terminated}/terminate", {"reason": "stop"})
    assert status == 200
    await closed_with(env, cancelled, "CANCELED")
    await closed_with(env, terminated, "TERMINATED")
    last = (await events_of(env, terminated))[-1]
    assert last["workflowExecutionTerminatedEventAttributes"]["reason"] == "stop"
    # A closed run cannot be terminated again: the engine's status, mapped.
    status, body = await env.call("POST", f"{NS}/workflows/{terminated}/terminate", {})
    assert status == 400 and body["status"] == "FAILED_PRECONDITION", body


async def test_list_and_count_with_the_query_language_and_paging(env: WebEnv) -> None:
    prefix = wid("list")
    for i in range(3):
        await start(env, f"{prefix}-{i}", "ed")
    query = f'WorkflowId STARTS_WITH "{prefix}" ORDER BY WorkflowId ASC'
    seen: list[str] = []
    token = ""
    while True:
        params = {"query": query, "pageSize": "2"} | ({"nextPageToken": token} if token else {})
        async with env.http.get(env.base + f"{NS}/workflows", params=params) as response:
            assert response.status == 200
            page = await response.json()
        seen += [e["execution"]["workflowId"] for e in page["executions"]]
        token = page.get("nextPageToken", "")
        if not token:
            break
    assert seen == [f"{prefix}-{i}" for i in range(3)]
    async with env.http.get(
        env.base + f"{NS}/workflow-count", params={"query": f'WorkflowId STARTS_WITH "{prefix}"'}
    ) as response:
        assert (await response.json()) == {"count": "3"}
    async with env.http.get(env.base + f"{NS}/workflows", params={"query": "WorkflowId ="}) as bad:
        body = await bad.json()
    assert bad.status == 400 and body["kind"] == "ERROR_KIND_INVALID_ARGUMENT"
    assert body["message"].startswith("invalid query")


async def test_errors_carry_the_grpc_status_and_typed_detail(env: WebEnv) -> None:
    status, body = await env.call("GET", f"{NS}/workflows/no-such-run")
    assert status == 404 and body["status"] == "NOT_FOUND" and body["code"] == 5
    assert body["kind"] == "ERROR_KIND_NOT_FOUND"
    (detail,) = body["details"]
    assert detail["@type"] == "type.googleapis.com/tideflow.api.v1.ErrorDetail"
    assert detail["notFound"] == {"resource": "RESOURCE_TYPE_WORKFLOW", "workflowId": "no-such-run"}

    workflow_id = wid("twice")
    run_id = await start(env, workflow_id, "fa", True)
    status, body = await env.call(
        "POST",
        f"{NS}/workflows/{workflow_id}",
        {"workflowType": {"name": "Greeter"}, "taskQueue": {"name": QUEUE}},
    )
    assert status == 409 and body["kind"] == "ERROR_KIND_WORKFLOW_ALREADY_STARTED"
    assert body["details"][0]["workflowAlreadyStarted"]["runId"] == run_id

    status, body = await env.call("POST", f"{NS}/workflows/{workflow_id}/query/nope", {})
    assert status == 400 and body["kind"] == "ERROR_KIND_QUERY_FAILED", body
    status, body = await env.call("GET", "/api/v1/namespaces/elsewhere/workflows/x")
    assert status == 404 and body["kind"] == "ERROR_KIND_NAMESPACE_NOT_FOUND"
    assert body["details"][0]["namespaceNotFound"] == {"namespace": "elsewhere"}
    status, body = await env.call("POST", f"{NS}/workflows/{workflow_id}/signal/approve", "{oops")
    assert status == 400 and "not JSON" in body["message"]
    status, body = await env.call("POST", f"{NS}/workflows/{workflow_id}/signal/approve", "[1]")
    assert status == 400 and "JSON object" in body["message"]
    status, body = await env.call("POST", f"{NS}/workflows/{workflow_id}/cancel", {"bogus": 1})
    assert status == 400 and "bogus" in body["message"]
    status, body = await env.call(
        "POST", f"{NS}/workflows/{workflow_id}/query/progress", {}, {"X-Tideflow-Timeout": "-1"}
    )
    assert status == 400 and "X-Tideflow-Timeout" in body["message"]
    await env.call("POST", f"{NS}/workflows/{workflow_id}/terminate", {})


async def test_validation_is_the_grpc_frontends(env: WebEnv) -> None:
    """The same bad requests get the same status and message over HTTP and gRPC."""
    too_long = "x" * (env.server.config.max_id_length + 1)
    cases = [
        (
            f"{NS}/workflows/{wid('v')}",
            {"workflowType": {"name": "Greeter"}},
            service_pb2.StartWorkflowRequest,
        ),
        (
            f"{NS}/workflows/{too_long}",
            {"workflowType": {"name": "G"}, "taskQueue": {"name": "q"}},
            None,
        ),
    ]
    async with grpc.aio.insecure_channel(env.server.address) as channel:
        stub = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        for path, body, _ in cases:
            status, answer = await env.call("POST", path, body)
            workflow_id = path.rsplit("/", 1)[-1]
            request = service_pb2.StartWorkflowRequest(namespace="default", workflow_id=workflow_id)
            request.workflow_type.name = body["workflowType"]["name"]
            request.task_queue.name = body.get("taskQueue", {}).get("name", "")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.StartWorkflow(request)
            assert status == 400 and answer["status"] == refused.value.code().name
            assert answer["message"] == refused.value.details()


async def test_raw_payloads_round_trip(env: WebEnv) -> None:
    workflow_id = wid("raw")
    raw = {
        "metadata": {"encoding": base64.b64encode(b"binary/plain").decode()},
        "data": base64.b64encode(b"\x00\x01").decode(),
    }
    await start(env, workflow_id, "gi", True)
    status, _ = await env.call(
        "POST", f"{NS}/workflows/{workflow_id}/terminate", {"details": {"payloads": [raw, None]}}
    )
    assert status == 200
    last = (await events_of(env, workflow_id))[-1]
    assert last["workflowExecutionTerminatedEventAttributes"]["details"]["payloads"] == [raw, None]


async def test_schedules(env: WebEnv) -> None:
    sid = wid("sched")
    path = f"{NS}/schedules/{sid}"
    schedule = schedule_body(sid, {"intervals": [{"interval": "3600s"}]})
    assert (await env.call("POST", path, schedule))[0] == 200
    status, body = await env.call("POST", path, schedule)
    assert status == 409 and body["details"][0]["alreadyExists"]["id"] == sid
    _, listed = await env.call("GET", f"{NS}/schedules")
    assert sid in [s["scheduleId"] for s in listed["schedules"]]
    assert (await env.call("POST", f"{path}/pause", {"patch": {"note": "quiet"}}))[0] == 200
    _, described = await env.call("GET", path)
    assert described["schedule"]["state"] == {"paused": True, "notes": "quiet"}
    assert (await env.call("POST", f"{path}/unpause", {}))[0] == 200
    _, described = await env.call("GET", path)
    assert not described["schedule"]["state"].get("paused", False)
    assert (await env.call("POST", f"{path}/trigger"))[0] == 200

    async def triggered_run_done() -> bool:
        _, body = await env.call("GET", path)
        runs = body["info"].get("recentActions", [])
        return bool(runs) and runs[0].get("triggered", False)

    await eventually(triggered_run_done, "the triggered action")
    assert (await env.call("DELETE", path))[0] == 200
    status, body = await env.call("GET", path)
    assert status == 404 and body["details"][0]["notFound"]["resource"] == "RESOURCE_TYPE_SCHEDULE"


async def test_health_system_info_and_openapi(env: WebEnv) -> None:
    assert await env.call("GET", "/healthz") == (200, {"status": "SERVING"})
    status, info = await env.call("GET", "/api/v1/system-info")
    assert status == 200 and info["store"] == "sqlite"
    status, cluster = await env.call("GET", "/api/v1/cluster-info")
    assert status == 200 and cluster, cluster
    status, body = await env.call("GET", f"{NS}/task-queues/{QUEUE}")
    assert status == 200, body
    status, document = await env.call("GET", "/api/v1/openapi.json")
    assert status == 200
    validate(document)  # a valid OpenAPI 3 document
    operations = {(m.upper(), p) for p, ops in document["paths"].items() for m in ops}
    assert operations == {(r.method, r.path) for r in ROUTES}
    served = {
        (r.method, r.resource.canonical)
        for r in env.server._http.app.router.routes()  # type: ignore[union-attr]
        if r.resource is not None and r.resource.canonical.startswith("/api/v1/namespaces")
    }
    assert served <= operations
    status, body = await env.call("GET", "/api/v1/nowhere")
    assert status == 404


async def test_auth_is_the_grpc_gate(tmp_path: Path) -> None:
    server = TideflowServer(
        f"sqlite:///{tmp_path / 'auth.db'}",
        port=0,
        ui_port=0,
        auth=AuthConfig(mode=AuthMode.API_KEY),
    )
    async with server, aiohttp.ClientSession() as http:
        _, reader = await server.store.api_keys.create("reader", ["default:reader"])
        _, writer = await server.store.api_keys.create("writer", ["default:writer"])
        url = f"http://127.0.0.1:{server.ui_port}{NS}/workflows/w"
        body = json.dumps({"workflowType": {"name": "G"}, "taskQueue": {"name": "q"}})

        async def post(headers: dict[str, str]) -> tuple[int, Any]:
            async with http.post(url, data=body, headers=headers) as response:
                return response.status, await response.json()

        status, answer = await post({})
        assert status == 401 and answer["status"] == "UNAUTHENTICATED"
        status, answer = await post({"Authorization": "Bearer not-a-key"})
        assert status == 401
        status, answer = await post({"Authorization": f"Bearer {reader}"})
        assert status == 403 and answer["status"] == "PERMISSION_DENIED", answer
        # A node credential sent over HTTP is not passed on: still the caller's key.
        status, answer = await post({"x-tideflow-node": "forged", "x-tideflow-api-key": writer})
        assert status == 200 and answer["started"], answer
        async with http.get(f"http://127.0.0.1:{server.ui_port}{NS}/workflows/w") as response:
            assert response.status == 401
        async with http.get(f"http://127.0.0.1:{server.ui_port}/healthz") as response:
            assert response.status == 200


async def test_start_dev_serves_the_ui_port(tmp_path: Path) -> None:
    procs = Processes(tmp_path)
    try:
        proc = procs.spawn(
            "server",
            [
                *TIDEFLOW_CLI,
                "server",
                "start-dev",
                "--db",
                str(tmp_path / "t.db"),
                "--port",
                "0",
                "--ui-port",
                "0",
            ],
        )
        line = await procs.wait_for_line(proc, "tideflow web UI on ")
        base = line.removeprefix("tideflow web UI on ").rstrip("/")
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/healthz") as response:
                assert response.status == 200
            async with http.get(base + "/") as response:
                assert "tideflow" in await response.text()
    finally:
        procs.cleanup()


async def test_a_taken_ui_port_fails_the_start_only_when_asked_for(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        url = f"sqlite:///{tmp_path / 'ui.db'}"
        # start-dev's default port: the server runs, without the UI.
        async with TideflowServer(url, port=0, ui_port=port, ui_required=False) as server:
            assert server.ui_port is None
        with pytest.raises(OSError, match="could not listen"):
            async with TideflowServer(url, port=0, ui_port=port):
                pass


async def test_ids_with_slashes_and_spaces_are_path_escaped(env: WebEnv) -> None:
    workflow_id = wid("orders/2026 may")
    escaped = quote(workflow_id, safe="")
    await start(env, escaped, "hu")
    await closed_with(env, escaped, "COMPLETED")
    status, body = await env.call("GET", f"{NS}/workflows/{escaped}")
    assert status == 200 and body["workflowExecutionInfo"]["execution"]["workflowId"] == workflow_id


async def test_cross_site_browser_posts_are_refused(env: WebEnv) -> None:
    workflow_id = wid("csrf")
    await start(env, workflow_id, "ix", True)
    path = f"{NS}/workflows/{workflow_id}/terminate"
    status, body = await env.call("POST", path, {}, {"Origin": "https://evil.example"})
    assert status == 403 and "cross-origin" in body["message"]
    assert await status_of(env, workflow_id) == "WORKFLOW_EXECUTION_STATUS_RUNNING"
    # The UI's own page posts with its own origin.
    status, _ = await env.call("POST", path, {}, {"Origin": env.base})
    assert status == 200


async def test_ui_flags_of_the_server_commands(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="tideflow")
    _cli.add_parser(parser.add_subparsers(dest="group", required=True))
    url = f"sqlite:///{tmp_path / 'flags.db'}"

    def server_of(*argv: str) -> TideflowServer:
        return _cli._server_of(parser.parse_args(["server", *argv]), url)

    default = server_of("start-dev")
    assert default.ui_port == 8233 and not default._ui_required  # taken: runs without
    explicit = server_of("start-dev", "--ui-port", "9000")
    assert explicit.ui_port == 9000 and explicit._ui_required
    assert server_of("start-dev", "--no-ui").ui_port is None
    assert server_of("start", "--db-url", url).ui_port is None  # opt-in in production
    assert server_of("start", "--db-url", url, "--ui-port", "0").ui_port == 0
    code = _cli.main(
        parser.parse_args(["server", "start-dev", "--port", "7999", "--ui-port", "7999"])
    )
    assert code == _cli.EXIT_USAGE


async def test_history_long_poll_returns_new_events(env: WebEnv) -> None:
    workflow_id = wid("follow")
    await start(env, workflow_id, "jo", True)
    path = f"{NS}/workflows/{workflow_id}/history"

    async def page(token: str) -> Any:
        params = {"waitNewEvent": "true"} | ({"nextPageToken": token} if token else {})
        async with env.http.get(env.base + path, params=params) as response:
            assert response.status == 200
            return await response.json()

    # Follow the history until the run is waiting (nothing new for the poll to return).
    first = await page("")
    token = first["nextPageToken"]
    waiting = asyncio.create_task(page(token))
    status, _ = await env.call("POST", f"{NS}/workflows/{workflow_id}/signal/approve", {})
    assert status == 200
    events: list[dict[str, Any]] = []
    answer = await waiting
    while True:
        events += answer["history"].get("events", [])
        if any(e["eventType"] == "EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED" for e in events):
            break
        answer = await page(answer["nextPageToken"])
    types = [e["eventType"] for e in events]
    assert "EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED" in types
