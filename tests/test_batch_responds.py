"""RespondTasksCompleted (server/_batch_responds.py) and the worker's batcher
(worker_sdk/_completions.py), against a server process:

- a batch mixing good and bad items gets one answer per item, in order: the good ones
  commit, an item with another namespace's token among them (served as its own RPC
  would serve it); a forged token, a token used twice in the batch (one wins), a token
  of a closed run and an empty item each get their own status (with its typed
  detail), and fail nothing else;
- with auth on, the batch needs the worker role on its namespace and each item what
  its own RPC needs (authorization on its token's namespace);
- a worker SIGKILLed after the server applied its batch but before it dispatched the
  answers (an eagerly started workflow task among them): the lost task times out and
  is retried by another worker; every activity ran once, every completion was
  recorded once.
"""

from __future__ import annotations

import logging
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from helpers import ET, Processes, ServerProcess, assert_well_formed, bounded, events_of, of_type

from tideflow.api.v1 import command_pb2, common_pb2, service_pb2, service_pb2_grpc
from tideflow.server import AuthConfig, AuthMode, TideflowServer
from tideflow.server._audit import AuditEntry
from tideflow.server._batch_responds import ItemContext
from tideflow.worker_sdk import Client
from tideflow.worker_sdk.exceptions import error_detail

BATCH_WORKER = Path(__file__).parent / "procs" / "batch_worker.py"
NS = "default"
OTHER_NS = "batch-other"
# Activities of the killed worker's run, completed together (procs/batch_worker.py).
FANOUT = 6
QUEUE = common_pb2.TaskQueue(name="batch-q")


def _schedule_activity() -> command_pb2.Command:
    return command_pb2.Command(
        command_type=command_pb2.CommandType.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK,
        schedule_activity_task_command_attributes=command_pb2.ScheduleActivityTaskCommandAttributes(
            activity_id="a1",
            activity_type=common_pb2.ActivityType(name="A"),
            task_queue=QUEUE,
            start_to_close_timeout=Duration(seconds=600),
        ),
    )


async def _workflow_task(
    stub: service_pb2_grpc.WorkflowServiceStub, namespace: str = NS
) -> tuple[bytes, str]:
    """A new run's first workflow task token (no worker: polled here), and its id."""
    workflow_id = f"batch-{uuid.uuid4()}"
    await stub.StartWorkflow(
        service_pb2.StartWorkflowRequest(
            namespace=namespace,
            workflow_id=workflow_id,
            workflow_type=common_pb2.WorkflowType(name="Raw"),
            task_queue=QUEUE,
            request_id=str(uuid.uuid4()),
        )
    )
    polled = await stub.PollWorkflowTask(
        service_pb2.PollWorkflowTaskRequest(namespace=namespace, task_queue=QUEUE), timeout=30
    )
    assert polled.task_token and polled.workflow_execution.workflow_id == workflow_id
    return polled.task_token, workflow_id


async def _activity_task(stub: service_pb2_grpc.WorkflowServiceStub) -> tuple[bytes, str]:
    """An activity task token of a new run, and the run's id."""
    token, workflow_id = await _workflow_task(stub)
    await stub.RespondWorkflowTaskCompleted(
        service_pb2.RespondWorkflowTaskCompletedRequest(
            task_token=token, commands=[_schedule_activity()]
        )
    )
    polled = await stub.PollActivityTask(
        service_pb2.PollActivityTaskRequest(namespace=NS, task_queue=QUEUE), timeout=30
    )
    assert polled.task_token and polled.workflow_execution.workflow_id == workflow_id
    return polled.task_token, workflow_id


def _mixed_batch(
    good: bytes, twice: bytes, closed: bytes, other: bytes, activity: bytes, failing: bytes
) -> list[service_pb2.RespondTaskItem]:
    completed = service_pb2.RespondWorkflowTaskCompletedRequest
    item = service_pb2.RespondTaskItem
    result = common_pb2.Payloads(payloads=[common_pb2.Payload(data=b"1")])
    return [
        item(workflow_task_completed=completed(task_token=good, commands=[_schedule_activity()])),
        item(workflow_task_completed=completed(task_token=b"forged")),
        item(workflow_task_completed=completed(task_token=twice)),
        item(workflow_task_completed=completed(task_token=twice)),
        item(workflow_task_completed=completed(task_token=closed)),
        item(workflow_task_completed=completed(task_token=other)),
        item(),
        item(
            activity_task_completed=service_pb2.RespondActivityTaskCompletedRequest(
                task_token=activity, result=result
            )
        ),
        item(
            activity_task_failed=service_pb2.RespondActivityTaskFailedRequest(
                task_token=failing, failure=common_pb2.Failure(message="boom")
            )
        ),
    ]


async def test_a_batch_answers_each_item_and_commits_the_good_ones(
    store_url: str, procs: Processes
) -> None:
    server = ServerProcess(procs, store_url)
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        await stub.RegisterNamespace(service_pb2.RegisterNamespaceRequest(namespace=OTHER_NS))
        good, good_id = await _workflow_task(stub)
        twice, twice_id = await _workflow_task(stub)
        closed, closed_id = await _workflow_task(stub)
        other, _ = await _workflow_task(stub, OTHER_NS)
        activity, activity_id = await _activity_task(stub)
        failing, _ = await _activity_task(stub)
        await stub.TerminateWorkflow(
            service_pb2.TerminateWorkflowRequest(
                namespace=NS, workflow_execution=common_pb2.WorkflowExecution(workflow_id=closed_id)
            )
        )
        items = _mixed_batch(good, twice, closed, other, activity, failing)
        response = await stub.RespondTasksCompleted(
            service_pb2.RespondTasksCompletedRequest(namespace=NS, items=items)
        )
    results = response.results
    assert len(results) == len(items)
    codes = [grpc.StatusCode[_CODE_NAMES[r.status_code]] for r in results]
    OK = grpc.StatusCode.OK
    assert codes[0] == OK and results[0].HasField("workflow_task_completed")
    assert codes[1] == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(c == OK for c in codes[2:4]) == [False, True]  # one of the two wins
    assert codes[4] == grpc.StatusCode.NOT_FOUND  # the run is closed
    # Served as its own RPC serves it (authorized on its token's namespace: auth is off).
    assert codes[5] == OK
    assert codes[6] == grpc.StatusCode.INVALID_ARGUMENT
    assert codes[7] == OK and results[7].HasField("activity_task_completed")
    assert codes[8] == OK and results[8].HasField("activity_task_failed")
    for failed in (results[1], results[4]):
        detail = error_detail([("grpc-status-details-bin", failed.status_details)])
        assert failed.status_message and detail is not None and detail.kind != 0
    async with await Client.connect(server.address) as client:
        scheduled = await events_of(client.get_workflow_handle(good_id))
        assert len(of_type(scheduled, ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)) == 1
        both = await events_of(client.get_workflow_handle(twice_id))
        assert len(of_type(both, ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)) == 1
        done = await events_of(client.get_workflow_handle(activity_id))
        assert len(of_type(done, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)) == 1
        for events in (scheduled, both, done):
            assert_well_formed(events)


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


async def test_worker_killed_after_its_batch_was_applied(
    tmp_path: Path, store_url: str, procs: Processes
) -> None:
    """The server applied the batch; the worker died before it dispatched the answers.
    Nothing is applied twice; the lost workflow task times out and another worker
    finishes the run."""
    server = ServerProcess(procs, store_url)
    await server.start()
    queue, ledger = f"batch-kill-{uuid.uuid4().hex[:8]}", tmp_path / "ledger"
    ledger.touch()

    def worker(mode: str) -> list[str]:
        return [sys.executable, str(BATCH_WORKER), server.address, queue, str(FANOUT), mode]

    killed = procs.spawn("worker-1", worker("hang-after-batch"))
    await procs.wait_for_line(killed, "worker ready")
    async with await Client.connect(server.address) as client:
        handle = await client.start_workflow(
            "Fanout",
            {"ledger": str(ledger), "fanout": FANOUT},
            id=f"fanout-{uuid.uuid4()}",
            task_queue=queue,
            task_timeout=timedelta(seconds=2),
        )
        line = await procs.wait_for_line(killed, "batch answered ")
        assert int(line.split()[-1]) == FANOUT - 1
        await procs.sigkill(killed)
        survivor = procs.spawn("worker-2", worker("plain"))
        await procs.wait_for_line(survivor, "worker ready")
        assert await bounded(handle.result()) == sum(range(FANOUT))
        events = await events_of(handle)
    assert_well_formed(events)
    assert sorted(ledger.read_text().split()) == sorted(str(i) for i in range(FANOUT))
    assert len(of_type(events, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)) == FANOUT


async def test_each_item_is_authorized_on_its_tokens_namespace(store_url: str) -> None:
    """With auth on, the batch needs the worker role on its namespace, and each item
    what its own RPC needs: a worker of NS only holding a token of OTHER_NS gets
    PERMISSION_DENIED for that item, and its own item commits."""
    async with TideflowServer(store_url, port=0, auth=AuthConfig(mode=AuthMode.API_KEY)) as server:
        keys = server.store.api_keys
        _, root = await keys.create("root", ["*:admin"])
        _, worker = await keys.create("worker", [f"{NS}:worker"])
        admin = (("authorization", f"Bearer {root}"),)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            as_admin = _Authorized(stub, admin)
            await stub.RegisterNamespace(
                service_pb2.RegisterNamespaceRequest(namespace=OTHER_NS), metadata=admin
            )
            mine, mine_id = await _workflow_task(as_admin)  # type: ignore[arg-type]
            theirs, _ = await _workflow_task(as_admin, OTHER_NS)  # type: ignore[arg-type]
            completed = service_pb2.RespondWorkflowTaskCompletedRequest
            items = [
                service_pb2.RespondTaskItem(workflow_task_completed=completed(task_token=t))
                for t in (mine, theirs)
            ]
            batch = service_pb2.RespondTasksCompletedRequest(namespace=NS, items=items)
            response = await stub.RespondTasksCompleted(
                batch, metadata=(("authorization", f"Bearer {worker}"),)
            )
            codes = [_CODE_NAMES[r.status_code] for r in response.results]
            assert codes == ["OK", "PERMISSION_DENIED"], response
            assert "may not call RespondWorkflowTaskCompleted" in response.results[1].status_message
            history = await stub.GetHistory(
                service_pb2.GetHistoryRequest(
                    namespace=NS, execution=common_pb2.WorkflowExecution(workflow_id=mine_id)
                ),
                metadata=admin,
            )
            completions = of_type(history.history.events, ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)
            assert len(completions) == 1


class _Authorized:
    """A stub whose calls carry ``metadata`` (for the helpers above)."""

    def __init__(self, stub: service_pb2_grpc.WorkflowServiceStub, metadata: object) -> None:
        self._stub, self._metadata = stub, metadata

    def __getattr__(self, name: str) -> object:
        method = getattr(self._stub, name)
        return lambda request, **kw: method(request, metadata=self._metadata, **kw)


class _EndingCall:
    """A servicer context that answers until the call ends, then fails every read:
    gRPC's peer() of a cancelled call reads freed memory (a server died of a SIGSEGV
    there), so nothing may ask the call once an item outlives it."""

    def __init__(self) -> None:
        self.ended = False

    def _live(self) -> None:
        if self.ended:
            raise AssertionError("the call was read after it ended")

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        self._live()
        return (("x-test", "1"),)

    def peer(self) -> str:
        self._live()
        return "ipv4:127.0.0.1:4242"

    def auth_context(self) -> dict[str, list[bytes]]:
        self._live()
        return {"x509_common_name": [b"worker-cert"]}

    def time_remaining(self) -> float:
        self._live()
        return 30.0


def test_an_item_and_its_audit_line_never_read_the_call_after_it_ended(
    caplog: pytest.LogCaptureFixture,
) -> None:
    call = _EndingCall()
    item = ItemContext(call, None)  # type: ignore[arg-type]
    caplog.set_level(logging.INFO, logger="tideflow.audit")
    request = service_pb2.RespondActivityTaskCompletedRequest()
    entry = AuditEntry("RespondActivityTaskCompleted", request, item)
    call.ended = True
    assert item.peer() == "ipv4:127.0.0.1:4242"
    assert item.invocation_metadata() == (("x-test", "1"),)
    assert item.auth_context() == {"x509_common_name": [b"worker-cert"]}
    remaining = item.time_remaining()
    assert remaining is not None and 0 < remaining <= 30.0
    entry.done("CANCELLED", None)
    lines = [r.__dict__["audit"] for r in caplog.records if r.name == "tideflow.audit"]
    assert lines == [
        {
            "rpc": "RespondActivityTaskCompleted",
            "outcome": "CANCELLED",
            "peer": "ipv4:127.0.0.1:4242",
            "client_cert": "worker-cert",
        }
    ]
