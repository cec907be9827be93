"""The client's API against a live server.

Typed error details across the wire (``tideflow/api/v1/errors.proto``): the server
attaches an ``ErrorDetail`` to every error status in the standard
``grpc-status-details-bin`` trailer; the client picks the exception class from its
kind and fills the exception's fields from it, never from the message text.

One set of start options: ``execute_workflow`` takes every option ``start_workflow``
takes (id policies, signal-with-start), and both refuse unknown or missing ones.
"""

from __future__ import annotations

import grpc
import pytest
from google.rpc import status_pb2
from helpers import bounded, new_id

from tideflow.api.v1 import errors_pb2, service_pb2, service_pb2_grpc
from tideflow.server import _errors as server_errors
from tideflow.worker_sdk import (
    Client,
    Worker,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
    workflow,
)
from tideflow.worker_sdk.client import WorkflowStartOptions
from tideflow.worker_sdk.exceptions import (
    AlreadyExistsError,
    ApplicationError,
    InvalidArgumentError,
    NamespaceNotFoundError,
    NotFoundError,
    RPCError,
    WorkflowAlreadyStartedError,
    WorkflowQueryFailedError,
    rpc_error_from_status,
)


@workflow.defn
class Parked:
    """Runs until told to finish; its query fails on demand."""

    def __init__(self) -> None:
        self.done = False

    @workflow.run
    async def run(self) -> str:
        await workflow.wait_condition(lambda: self.done)
        return "finished"

    @workflow.signal
    def finish(self) -> None:
        self.done = True

    @workflow.query
    def explode(self, why: str) -> str:
        raise ApplicationError(why, type="Exploded")


async def test_second_start_names_the_run_that_holds_the_id(client: Client) -> None:
    wid = new_id("twice")
    first = await client.start_workflow(Parked.run, id=wid, task_queue=new_id("q"))
    with pytest.raises(WorkflowAlreadyStartedError) as refused:
        await client.start_workflow(Parked.run, id=wid, task_queue=new_id("q"))
    error = refused.value
    assert (error.workflow_id, error.run_id) == (wid, first.run_id)
    assert (error.status, error.kind) == (
        "ALREADY_EXISTS",
        errors_pb2.ERROR_KIND_WORKFLOW_ALREADY_STARTED,
    )
    assert first.run_id


async def test_signal_with_start_refused_by_reuse_policy_names_the_closed_run(
    client: Client,
) -> None:
    wid, queue = new_id("sws"), new_id("q")
    async with Worker(client, task_queue=queue, workflows=[Parked]):
        # Signal-with-start on a running id only signals: the same run finishes.
        first = await client.start_workflow(Parked.run, id=wid, task_queue=queue)
        again = await client.start_workflow(
            Parked.run, id=wid, task_queue=queue, start_signal=Parked.finish
        )
        assert again.run_id == first.run_id
        assert await bounded(first.result()) == "finished"
    with pytest.raises(WorkflowAlreadyStartedError) as refused:
        await client.start_workflow(
            Parked.run,
            id=wid,
            task_queue=queue,
            start_signal=Parked.finish,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        )
    assert (refused.value.workflow_id, refused.value.run_id) == (wid, first.run_id)


async def test_failed_query_carries_the_handler_failure(client: Client) -> None:
    wid, queue = new_id("query"), new_id("q")
    async with Worker(client, task_queue=queue, workflows=[Parked]):
        handle = await client.start_workflow(Parked.run, id=wid, task_queue=queue)
        with pytest.raises(WorkflowQueryFailedError) as failed:
            await bounded(handle.query(Parked.explode, "on purpose"))
        error = failed.value
        assert error.query_type == "explode"
        assert error.kind == errors_pb2.ERROR_KIND_QUERY_FAILED
        assert isinstance(error.cause, ApplicationError)
        assert (error.cause.message, error.cause.type) == ("on purpose", "Exploded")
        # An unknown query is a failed query too, not some other FAILED_PRECONDITION.
        with pytest.raises(WorkflowQueryFailedError) as unknown:
            await bounded(handle.query("no_such_query"))
        assert unknown.value.query_type == "no_such_query"
        await handle.signal(Parked.finish)
        assert await bounded(handle.result()) == "finished"


async def test_not_found_says_what_was_not_found(client: Client) -> None:
    wid = new_id("missing")
    with pytest.raises(NotFoundError) as by_id:
        await client.get_workflow_handle(wid).describe()
    assert (by_id.value.resource, by_id.value.workflow_id, by_id.value.run_id) == (
        "workflow",
        wid,
        "",
    )
    started = await client.start_workflow(Parked.run, id=wid, task_queue=new_id("q"))
    other_run = "00000000-0000-0000-0000-000000000000"
    with pytest.raises(NotFoundError) as by_run:
        await client.get_workflow_handle(wid, run_id=other_run).describe()
    assert (by_run.value.workflow_id, by_run.value.run_id) == (wid, other_run)
    assert started.run_id != other_run


async def test_unknown_namespace_and_existing_namespace(client: Client) -> None:
    elsewhere = Client(
        client._channel,
        namespace="no-such-namespace",
        data_converter=client.data_converter,
        identity=client.identity,
    )
    with pytest.raises(NamespaceNotFoundError) as missing:
        await elsewhere.start_workflow(Parked.run, id=new_id("ns"), task_queue=new_id("q"))
    assert missing.value.namespace == "no-such-namespace"
    assert missing.value.resource == "namespace"
    # ALREADY_EXISTS is not always a workflow start: here the namespace exists.
    with pytest.raises(AlreadyExistsError) as exists:
        await client.call(
            client.service.RegisterNamespace,
            service_pb2.RegisterNamespaceRequest(namespace=client.namespace),
        )
    assert not isinstance(exists.value, WorkflowAlreadyStartedError)
    assert (exists.value.resource, exists.value.id) == ("namespace", client.namespace)


async def test_invalid_argument_has_its_kind(client: Client) -> None:
    with pytest.raises(InvalidArgumentError) as invalid:
        await client.start_workflow(Parked.run, id="", task_queue=new_id("q"))
    assert (invalid.value.status, invalid.value.kind) == (
        "INVALID_ARGUMENT",
        errors_pb2.ERROR_KIND_INVALID_ARGUMENT,
    )


async def test_raw_grpc_caller_reads_the_standard_status_details(client: Client) -> None:
    """Any gRPC client (not just this SDK) finds the detail as a google.rpc.Status."""
    wid = new_id("raw")
    first = await client.start_workflow(Parked.run, id=wid, task_queue=new_id("q"))
    request = service_pb2.StartWorkflowRequest(
        namespace=client.namespace, workflow_id=wid, request_id=new_id("req")
    )
    request.workflow_type.name = "Parked"
    request.task_queue.name = new_id("q")
    stub = service_pb2_grpc.WorkflowServiceStub(client._channel)  # type: ignore[no-untyped-call]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.StartWorkflow(request, timeout=30)
    error = raised.value
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    trailer = dict(error.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailer["grpc-status-details-bin"])
    assert (status.code, status.message) == (
        grpc.StatusCode.ALREADY_EXISTS.value[0],
        error.details(),
    )
    [packed] = status.details
    detail = errors_pb2.ErrorDetail()
    assert packed.Unpack(detail)
    assert detail.kind == errors_pb2.ERROR_KIND_WORKFLOW_ALREADY_STARTED
    assert detail.workflow_already_started.workflow_id == wid
    assert detail.workflow_already_started.run_id == first.run_id


@pytest.mark.parametrize(
    ("server_error", "client_class"),
    [
        (server_errors.InvalidArgumentError("bad"), InvalidArgumentError),
        (server_errors.NotFoundError("gone"), NotFoundError),
        (server_errors.WorkflowNotFoundError("gone", workflow_id="w"), NotFoundError),
        (server_errors.NamespaceNotFoundError("gone", namespace="n"), NamespaceNotFoundError),
        (
            server_errors.WorkflowAlreadyStartedError("taken", workflow_id="w", run_id="r"),
            WorkflowAlreadyStartedError,
        ),
        (server_errors.AlreadyExistsError("taken"), AlreadyExistsError),
        (server_errors.QueryFailedError("raised"), WorkflowQueryFailedError),
        (server_errors.FailedPreconditionError("closed"), RPCError),
        (server_errors.UnavailableError("later"), RPCError),
        (server_errors.DeadlineExceededError("slow"), RPCError),
        (server_errors.ResourceExhaustedError("full"), RPCError),
    ],
)
def test_every_server_error_maps_to_its_client_class(
    server_error: server_errors.ServiceError, client_class: type[RPCError]
) -> None:
    status = server_error.code.name
    error = rpc_error_from_status(server_error.message, status=status, detail=server_error.detail())
    assert type(error) is client_class
    assert (error.message, error.status, error.kind) == (
        server_error.message,
        status,
        server_error.kind,
    )


def test_an_error_class_that_names_only_its_code_gets_that_codes_kind() -> None:
    class TooManyPolls(server_errors.ServiceError):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED

    error = TooManyPolls("too many polls")
    assert error.detail().kind == errors_pb2.ERROR_KIND_RESOURCE_EXHAUSTED
    assert server_errors.ServiceError("bug").detail().kind == errors_pb2.ERROR_KIND_INTERNAL


def test_a_status_without_detail_maps_by_code_alone() -> None:
    """Statuses the channel makes (no server detail) never guess from the text."""
    error = rpc_error_from_status(
        "query failed: looks like one", status="FAILED_PRECONDITION", detail=None
    )
    assert type(error) is RPCError
    assert error.kind == errors_pb2.ERROR_KIND_FAILED_PRECONDITION
    already = rpc_error_from_status(
        "workflow already started", status="ALREADY_EXISTS", detail=None
    )
    assert type(already) is AlreadyExistsError
    assert type(rpc_error_from_status("x", status="NOT_FOUND", detail=None)) is NotFoundError
    assert rpc_error_from_status("x", status="UNKNOWN", detail=None).kind == (
        errors_pb2.ERROR_KIND_UNSPECIFIED
    )


# ------------------------------------------------------------- start options


@workflow.defn
class Mailbox:
    """Collects signalled words until told to close, then returns them."""

    def __init__(self) -> None:
        self.words: list[str] = []

    @workflow.run
    async def run(self, first: str) -> list[str]:
        await workflow.wait_condition(lambda: "close" in self.words)
        return [first, *self.words]

    @workflow.signal
    def post(self, word: str) -> None:
        self.words.append(word)


async def test_execute_workflow_takes_signal_with_start_and_id_policies(client: Client) -> None:
    wid, queue = new_id("mailbox"), new_id("q")
    async with Worker(client, task_queue=queue, workflows=[Mailbox]):
        first = await client.start_workflow(
            Mailbox.run,
            "a",
            id=wid,
            task_queue=queue,
            start_signal=Mailbox.post,
            start_signal_args=["b"],
        )
        # Signal-with-start through execute_workflow, with the options of a start:
        # it joins the running run and returns its result once the signal it carries
        # closes it.
        options: WorkflowStartOptions = {
            "id": wid,
            "task_queue": queue,
            "start_signal": Mailbox.post,
            "start_signal_args": ["close"],
            "id_conflict_policy": WorkflowIDConflictPolicy.USE_EXISTING,
        }
        joined = await bounded(
            client.execute_workflow(Mailbox.run, "ignored: the run exists", **options)
        )
        assert joined == ["a", "b", "close"]
        assert await first.result() == joined


async def test_unknown_and_missing_start_options_are_refused(client: Client) -> None:
    with pytest.raises(TypeError, match="unknown workflow start options: colour"):
        await client.start_workflow(
            Mailbox.run,
            "a",
            id="x",
            task_queue="q",
            colour="red",  # type: ignore[call-overload]
        )
    with pytest.raises(TypeError, match="needs task_queue"):
        await client.execute_workflow(Mailbox.run, "a", id="x")  # type: ignore[call-overload]


async def test_schedule_errors_name_the_schedule(client: Client) -> None:
    schedule_id = new_id("nightly")
    with pytest.raises(NotFoundError) as missing:
        await client.get_schedule_handle(schedule_id).describe()
    assert (missing.value.resource, missing.value.id) == ("schedule", schedule_id)
