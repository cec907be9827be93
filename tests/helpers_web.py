"""What the HTTP API and web UI suites (test_http_api.py, test_web_ui.py) share: a
server with its UI port open, a worker running a small workflow and the DAG
interpreter, and a JSON client of the HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp

from tideflow.server import TideflowServer
from tideflow.worker_sdk import Client, RetryPolicy, Worker, activity, workflow
from tideflow.worker_sdk.dag import DagWorkflow

QUEUE = "web"


@activity.defn
async def greet(name: str) -> str:
    # The first attempt fails: a run's timeline shows a retried attempt.
    if activity.info().attempt == 1:
        raise RuntimeError("flaky greeting service")
    return f"hello {name}"


@workflow.defn
class Greeter:
    """Greets after an activity with one retry; with ``wait``, only once signalled
    ``approve`` (so it stays running for as long as a test needs)."""

    def __init__(self) -> None:
        self.approved = False

    @workflow.signal
    def approve(self) -> None:
        self.approved = True

    @workflow.query
    def progress(self) -> str:
        return "approved" if self.approved else "waiting"

    @workflow.run
    async def run(self, name: str, wait: bool = False) -> str:
        if wait:
            await workflow.wait_condition(lambda: self.approved)
        return await workflow.execute_activity(
            greet,
            name,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=50)),
        )


@workflow.defn
class Parent:
    """Runs a Greeter as its child (id: its own id + ``-child``): the run pages link
    parent and child."""

    @workflow.run
    async def run(self, name: str) -> str:
        child_id = f"{workflow.info().workflow_id}-child"
        greeting = await workflow.execute_child_workflow(Greeter.run, name, id=child_id)
        return f"parent of {greeting}"


@dataclass
class Gates:
    """DAG executors that wait until a test opens their gate (by task id)."""

    opened: dict[str, asyncio.Event] = field(default_factory=dict)

    def gate(self, task: str) -> asyncio.Event:
        return self.opened.setdefault(task, asyncio.Event())


GATES = Gates()


@activity.defn(name="step")
async def step(params: dict[str, Any]) -> dict[str, Any]:
    gate = params.get("gate")
    if gate:
        await GATES.gate(gate).wait()
    return {"done": params.get("name", "")}


@activity.defn(name="explode")
async def explode(params: dict[str, Any]) -> None:
    raise RuntimeError(f"{params.get('name', '')} exploded")


def states_definition(dag_id: str) -> dict[str, Any]:
    """A DAG that settles with a task in each state a test can hold still: ``boom``
    FAILED, ``again`` RETRY (an hour's backoff), ``queued`` SCHEDULED (its queue has
    no worker), ``after`` PENDING behind it, ``fine`` COMPLETED."""
    hour = {"max_attempts": 2, "backoff": {"initial_interval": "1h", "maximum_interval": "1h"}}
    return {
        "id": dag_id,
        "version": "1",
        "failure_policy": "continue",
        "executors": {"nowhere": {"activity": "step", "task_queue": "no-worker-polls-this"}},
        "tasks": [
            {"id": "fine", "executor": "step", "parameters": {"name": "fine"}},
            {"id": "boom", "executor": "explode", "parameters": {"name": "boom"}},
            {
                "id": "again",
                "executor": "explode",
                "parameters": {"name": "again"},
                "retry_policy": hour,
            },
            {"id": "queued", "executor": "nowhere", "depends_on": ["fine"]},
            {"id": "after", "executor": "step", "depends_on": ["queued"]},
        ],
    }


def dag_definition(dag_id: str, gate: str | None = None) -> dict[str, Any]:
    """extract -> (clean, enrich) -> load; ``gate`` names a task that waits for its gate."""

    def task(tid: str, deps: list[str]) -> dict[str, Any]:
        params: dict[str, Any] = {"name": tid}
        if tid == gate:
            params["gate"] = f"{dag_id}/{tid}"
        return {"id": tid, "executor": "step", "parameters": params, "depends_on": deps}

    return {
        "id": dag_id,
        "version": "1",
        "tasks": [
            task("extract", []),
            task("clean", ["extract"]),
            task("enrich", ["extract"]),
            task("load", ["clean", "enrich"]),
        ],
    }


def schedule_body(schedule_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The HTTP API's CreateSchedule body: Greeter on ``QUEUE`` at ``spec``."""
    action = {
        "workflowId": schedule_id,
        "workflowType": {"name": "Greeter"},
        "taskQueue": {"name": QUEUE},
        "input": {"payloads": [schedule_id]},
    }
    return {"schedule": {"spec": spec, "action": {"startWorkflow": action}}}


@dataclass
class WebEnv:
    server: TideflowServer
    client: Client
    http: aiohttp.ClientSession

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.ui_port}"

    async def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """``method path`` of the HTTP API: the status and the parsed JSON body."""
        data = None if body is None else (body if isinstance(body, str) else json.dumps(body))
        async with self.http.request(
            method, self.base + path, data=data, headers=headers or {}
        ) as response:
            text = await response.text()
            return response.status, json.loads(text) if text else None


@contextlib.asynccontextmanager
async def web_env(folder: Path) -> AsyncIterator[WebEnv]:
    """A server on ``folder``'s SQLite file with the UI on a free port, a worker on
    ``QUEUE`` and an HTTP session."""
    server = TideflowServer(f"sqlite:///{folder / 'tideflow.db'}", port=0, ui_port=0)
    async with (
        server,
        await Client.connect(server.address) as client,
        Worker(
            client,
            task_queue=QUEUE,
            workflows=[Greeter, Parent, DagWorkflow],
            activities=[greet, step, explode],
        ),
        aiohttp.ClientSession() as http,
    ):
        yield WebEnv(server, client, http)
