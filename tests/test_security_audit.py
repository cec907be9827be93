"""The audit log (server/_audit.py): exactly one ``tideflow.audit`` line per mutating
RPC, with who, where and the outcome; none for reads."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from raw_workflow import RawWorkflows, complete_workflow

from tideflow.server import TideflowServer
from tideflow.worker_sdk import Client
from tideflow.worker_sdk.exceptions import NotFoundError


@pytest.fixture
async def client(store_url: str) -> AsyncIterator[Client]:
    async with (
        TideflowServer(store_url, port=0) as server,
        await Client.connect(server.address, identity="auditor@test") as connected,
    ):
        yield connected


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    records = [r for r in caplog.records if r.name == "tideflow.audit"]
    for record in records:
        # The line itself is logfmt; the same fields ride along for JSON handlers.
        fields: dict[str, str] = record.audit  # type: ignore[attr-defined]
        assert record.getMessage().startswith(f"rpc={fields['rpc']} outcome={fields['outcome']}")
    caplog.clear()
    return [r.audit for r in records]  # type: ignore[attr-defined]


async def test_one_line_per_mutating_rpc_none_for_reads(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tideflow.audit")
    tq = f"tq-{uuid.uuid4()}"
    workflow_id = f"audited-{uuid.uuid4()}"
    handle = await client.start_workflow("Nobody", id=workflow_id, task_queue=tq)
    [start] = audit_lines(caplog)
    assert start["rpc"] == "StartWorkflow"
    assert start["outcome"] == "OK"
    assert start["namespace"] == "default"
    assert start["identity"] == "auditor@test"
    assert start["workflow_id"] == workflow_id
    assert start["run_id"] == handle.run_id
    assert start["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))

    await handle.signal("poke", "secret-payload")
    [signal] = audit_lines(caplog)
    assert {k: signal[k] for k in ("rpc", "outcome", "namespace", "identity", "workflow_id")} == {
        "rpc": "SignalWorkflow",
        "outcome": "OK",
        "namespace": "default",
        "identity": "auditor@test",
        "workflow_id": workflow_id,
    }
    assert "secret-payload" not in caplog.text  # payloads are never logged

    # Reads: nothing.
    await handle.describe()
    assert (await handle.fetch_history()).events
    assert await client.count_workflows() == 1
    assert audit_lines(caplog) == []

    await handle.terminate("audit test")
    [terminate] = audit_lines(caplog)
    assert terminate["rpc"] == "TerminateWorkflow"
    assert terminate["outcome"] == "OK"
    assert terminate["workflow_id"] == workflow_id
    assert terminate["identity"] == "auditor@test"

    # A refused mutation is audited with its status.
    with pytest.raises(NotFoundError):
        await client.get_workflow_handle(f"missing-{uuid.uuid4()}").signal("poke")
    [refused] = audit_lines(caplog)
    assert (refused["rpc"], refused["outcome"]) == ("SignalWorkflow", "NOT_FOUND")


async def test_task_rpcs_name_the_run_of_their_token(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    raw = RawWorkflows(client, f"tq-{uuid.uuid4()}")
    workflow_id = f"raw-{uuid.uuid4()}"
    run_id = await raw.start(workflow_id)
    caplog.set_level(logging.INFO, logger="tideflow.audit")
    task = await raw.poll()
    await raw.complete(task.task_token, complete_workflow())
    poll, completed = audit_lines(caplog)
    assert (poll["rpc"], poll["workflow_id"], poll["run_id"]) == (
        "PollWorkflowTask",
        workflow_id,
        run_id,
    )
    assert completed["rpc"] == "RespondWorkflowTaskCompleted"
    assert (completed["namespace"], completed["workflow_id"], completed["run_id"]) == (
        "default",
        workflow_id,
        run_id,
    )
    assert (completed["outcome"], completed["identity"]) == ("OK", "raw")
