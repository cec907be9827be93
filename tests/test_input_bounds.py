"""Regression tests for inputs found by an adversarial probe (issue 10), each sent over
raw gRPC the way the probe sent it, on every store under test:

- every client-supplied field is bounded (INVALID_ARGUMENT naming the field), and a run
  whose history is larger than the gRPC message limit still replays, completes and
  reads back, because history travels in pages;
- inputs that used to crash the engine (INTERNAL with a traceback) are refused at the
  frontend: huge durations, unknown command types, deeply nested search attributes, NUL
  characters (PostgreSQL cannot store them);
- an undecodable request body logs one rate-limited line, not a traceback each;
- thousands of concurrent long polls park until their timeout or a task (gRPC core used
  to cancel them), and a configured limit answers RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from helpers import running_server

from tideflow.api.v1 import command_pb2, common_pb2, service_pb2, service_pb2_grpc
from tideflow.api.v1.history_pb2 import EventType
from tideflow.server import ServerConfig, TideflowServer
from tideflow.worker_sdk import Client, Worker, workflow

NS = "default"
CommandType = command_pb2.CommandType
# Small limits so that a history past the message limit takes a few hundred KB, not
# hundreds of MB: same code paths, a fraction of the time.
SMALL = {
    "grpc_max_message_bytes": 1024 * 1024,
    "max_payload_bytes": 100 * 1024,
    "history_page_bytes": 256 * 1024,
}


@asynccontextmanager
async def serve(store_url: str, **config: Any) -> AsyncIterator[TideflowServer]:
    async with running_server(store_url, ServerConfig(**config)) as server:
        yield server


@asynccontextmanager
async def raw_stub(address: str) -> AsyncIterator[service_pb2_grpc.WorkflowServiceStub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]


async def refused(call: Awaitable[Any], *words: str) -> str:
    """Await a call that must fail with INVALID_ARGUMENT whose message has ``words``."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(call, 30)
    details = info.value.details() or ""
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (info.value.code(), details)
    for word in words:
        assert word in details, (word, details)
    return details


def start_request(
    workflow_id: str, task_queue: str, **fields: Any
) -> service_pb2.StartWorkflowRequest:
    defaults: dict[str, Any] = {
        "namespace": NS,
        "workflow_id": workflow_id,
        "request_id": str(uuid.uuid4()),
        "workflow_type": common_pb2.WorkflowType(name="Raw"),
        "task_queue": common_pb2.TaskQueue(name=task_queue),
    }
    return service_pb2.StartWorkflowRequest(**{**defaults, **fields})


def poll_request(task_queue: str) -> service_pb2.PollWorkflowTaskRequest:
    request = service_pb2.PollWorkflowTaskRequest(namespace=NS, identity="raw-test")
    request.task_queue.name = task_queue
    return request


def blob(size: int) -> common_pb2.Payload:
    return common_pb2.Payload(metadata={"encoding": b"binary/plain"}, data=b"x" * size)


def keyword(data: bytes) -> common_pb2.Payload:
    return common_pb2.Payload(metadata={"encoding": b"json/plain", "type": b"Keyword"}, data=data)


def complete() -> command_pb2.Command:
    return command_pb2.Command(
        command_type=CommandType.COMMAND_TYPE_COMPLETE_WORKFLOW_EXECUTION,
        complete_workflow_execution_command_attributes=(
            command_pb2.CompleteWorkflowExecutionCommandAttributes()
        ),
    )


async def poll_task(
    stub: service_pb2_grpc.WorkflowServiceStub, task_queue: str
) -> service_pb2.PollWorkflowTaskResponse:
    for _ in range(10):
        response: service_pb2.PollWorkflowTaskResponse = await stub.PollWorkflowTask(
            poll_request(task_queue), timeout=30
        )
        if response.task_token:
            return response
    raise AssertionError(f"no workflow task on {task_queue}")


async def whole_history(
    stub: service_pb2_grpc.WorkflowServiceStub, workflow_id: str, token: bytes = b""
) -> list[Any]:
    """Every event through GetHistory's pages; each page is checked against the limit."""
    events: list[Any] = []
    while True:
        request = service_pb2.GetHistoryRequest(namespace=NS, next_page_token=token)
        request.execution.workflow_id = workflow_id
        response = await stub.GetHistory(request, timeout=30)
        assert response.ByteSize() <= SMALL["grpc_max_message_bytes"]
        events.extend(response.history.events)
        token = response.next_page_token
        if not token:
            return events


# ----------------------------------------------------------- 1: field bounds


async def test_every_client_field_is_bounded(store_url: str) -> None:
    """Memo, headers, identity and friends were not size-checked: each is now refused
    with INVALID_ARGUMENT naming it, and nothing of it reaches the store."""
    async with serve(store_url, **SMALL) as server, raw_stub(server.address) as stub:
        tq = f"tq-{uuid.uuid4()}"
        big = SMALL["max_payload_bytes"] + 1
        memo = common_pb2.Memo(fields={"m": blob(big)})
        await refused(stub.StartWorkflow(start_request("w-memo", tq, memo=memo)), "memo")
        header = common_pb2.Header(fields={"h": blob(big)})
        await refused(stub.StartWorkflow(start_request("w-hdr", tq, header=header)), "header")
        await refused(
            stub.StartWorkflow(start_request("w-id", tq, identity="i" * 1001)),
            "identity",
            "1000 characters",
        )
        await refused(stub.StartWorkflow(start_request("w" * 1001, tq)), "workflow_id")
        await refused(
            stub.StartWorkflow(start_request("w-rid", tq, request_id="r" * 256)), "request_id"
        )
        await refused(stub.PollWorkflowTask(poll_request("q" * 1001)), "task_queue.name")

        started = await stub.StartWorkflow(start_request("w-ok", tq), timeout=30)
        signal = service_pb2.SignalWorkflowRequest(
            namespace=NS, signal_name="s", request_id=str(uuid.uuid4()), header=header
        )
        signal.workflow_execution.workflow_id = "w-ok"
        await refused(stub.SignalWorkflow(signal), "header")
        signal.ClearField("header")
        signal.identity = "i" * 1001
        await refused(stub.SignalWorkflow(signal), "identity")
        terminate = service_pb2.TerminateWorkflowRequest(namespace=NS, reason="r" * 40_000)
        terminate.workflow_execution.workflow_id = "w-ok"
        await refused(stub.TerminateWorkflow(terminate), "reason")

        # Commands: every payload-bearing field, and failures, are bounded too.
        task = await poll_task(stub, tq)
        failure = common_pb2.Failure(message="m" * big)
        fail = command_pb2.Command(
            command_type=CommandType.COMMAND_TYPE_FAIL_WORKFLOW_EXECUTION,
            fail_workflow_execution_command_attributes=(
                command_pb2.FailWorkflowExecutionCommandAttributes(failure=failure)
            ),
        )
        respond = service_pb2.RespondWorkflowTaskCompletedRequest(
            task_token=task.task_token, commands=[fail], identity="raw-test"
        )
        await refused(stub.RespondWorkflowTaskCompleted(respond), "commands[0]", "failure")

        # Nothing above reached the run but the bad command, which failed its workflow
        # task (tests/test_command_refusals.py): the retry completes it normally.
        task = await poll_task(stub, tq)
        respond = service_pb2.RespondWorkflowTaskCompletedRequest(
            task_token=task.task_token, commands=[complete()], identity="raw-test"
        )
        await stub.RespondWorkflowTaskCompleted(respond, timeout=30)
        events = await whole_history(stub, "w-ok")
        assert [e.event_type for e in events] == [
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED,
            EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
            EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
            EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED,
            EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
            EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
            EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
        ]
        assert events[0].workflow_execution_started_event_attributes.identity == ""
        assert started.run_id


async def test_list_pages_fit_the_message_limit(store_url: str) -> None:
    """Each run's memo and each schedule's action are bounded, a page of a thousand of
    them was not: listing failed for ever once a page passed the message limit. Pages
    now shrink to fit, and paging still returns every item once."""
    async with serve(store_url, **SMALL) as server, raw_stub(server.address) as stub:
        tq = f"tq-{uuid.uuid4()}"
        memo = common_pb2.Memo(fields={"m": blob(90 * 1024)})
        for index in range(16):
            await stub.StartWorkflow(start_request(f"memo-{index}", tq, memo=memo), timeout=30)
            create = service_pb2.CreateScheduleRequest(
                namespace=NS, schedule_id=f"sched-{index}", request_id=str(uuid.uuid4())
            )
            create.schedule.spec.cron_expressions.append("0 0 1 1 *")
            create.schedule.state.paused = True
            action = create.schedule.action.start_workflow
            action.workflow_id, action.workflow_type.name, action.task_queue.name = "x", "T", tq
            action.memo.CopyFrom(memo)
            await stub.CreateSchedule(create, timeout=30)
        limit = SMALL["grpc_max_message_bytes"]
        runs: list[str] = []
        token = b""
        while True:
            listed = await stub.ListWorkflowExecutions(
                service_pb2.ListWorkflowExecutionsRequest(namespace=NS, next_page_token=token),
                timeout=30,
            )
            assert listed.ByteSize() <= limit
            runs += [e.execution.workflow_id for e in listed.executions]
            token = listed.next_page_token
            if not token:
                break
        assert sorted(runs) == sorted(f"memo-{index}" for index in range(16))
        schedules: list[str] = []
        token = b""
        while True:
            page = await stub.ListSchedules(
                service_pb2.ListSchedulesRequest(namespace=NS, next_page_token=token), timeout=30
            )
            assert page.ByteSize() <= limit
            schedules += [entry.schedule_id for entry in page.schedules]
            token = page.next_page_token
            if not token:
                break
        assert sorted(schedules) == sorted(f"sched-{index}" for index in range(16))


async def test_describe_fits_with_many_heartbeating_activities(store_url: str) -> None:
    """Heartbeat details are bounded per activity, pending activities per run are not:
    DescribeWorkflow fits the message limit and still lists every activity."""
    async with serve(store_url, **SMALL) as server, raw_stub(server.address) as stub:
        tq = f"tq-{uuid.uuid4()}"
        await stub.StartWorkflow(start_request("w-busy", tq), timeout=30)
        task = await poll_task(stub, tq)
        commands = [
            command_pb2.Command(
                command_type=CommandType.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK,
                schedule_activity_task_command_attributes=(
                    command_pb2.ScheduleActivityTaskCommandAttributes(
                        activity_id=f"a{index}",
                        activity_type=common_pb2.ActivityType(name="A"),
                        task_queue=common_pb2.TaskQueue(name=tq),
                        start_to_close_timeout=Duration(seconds=600),
                    )
                ),
            )
            for index in range(16)
        ]
        await stub.RespondWorkflowTaskCompleted(
            service_pb2.RespondWorkflowTaskCompletedRequest(
                task_token=task.task_token, commands=commands, identity="raw-test"
            ),
            timeout=30,
        )
        poll = service_pb2.PollActivityTaskRequest(namespace=NS, identity="raw-test")
        poll.task_queue.name = tq
        details = common_pb2.Payloads(payloads=[blob(90 * 1024)])
        for _ in range(16):
            activity = await stub.PollActivityTask(poll, timeout=30)
            assert activity.task_token
            await stub.RecordActivityHeartbeat(
                service_pb2.RecordActivityHeartbeatRequest(
                    task_token=activity.task_token, details=details
                ),
                timeout=30,
            )
        request = service_pb2.DescribeWorkflowRequest(namespace=NS)
        request.execution.workflow_id = "w-busy"
        described = await stub.DescribeWorkflow(request, timeout=30)
        assert described.ByteSize() <= SMALL["grpc_max_message_bytes"]
        assert len(described.pending_activities) == 16
        assert described.pending_activities[0].heartbeat_details == details


# ------------------------------------------------ 1: history beyond the limit

SIGNALS = 16
SIGNAL_BYTES = 90 * 1024


@workflow.defn
class Collector:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    @workflow.run
    async def run(self, expected: int) -> list[int]:
        await workflow.wait_condition(lambda: len(self.sizes) >= expected)
        return self.sizes

    @workflow.signal
    def add(self, data: str) -> None:
        self.sizes.append(len(data))

    @workflow.query
    def count(self) -> int:
        return len(self.sizes)


async def test_history_larger_than_the_message_limit_replays(store_url: str) -> None:
    """Signals made the history larger than a gRPC message, so GetHistory and
    PollWorkflowTask failed for ever. Now both page: a worker that caches nothing
    replays the whole history on every task, answers a query and completes."""
    async with serve(store_url, **SMALL) as server:
        client = await Client.connect(server.address)
        try:
            tq = f"tq-{uuid.uuid4()}"
            workflow_id = f"big-{uuid.uuid4()}"
            handle = await client.start_workflow(
                Collector.run, SIGNALS, id=workflow_id, task_queue=tq
            )
            for index in range(SIGNALS - 1):
                await handle.signal(Collector.add, chr(ord("a") + index) * SIGNAL_BYTES)
            async with Worker(client, task_queue=tq, workflows=[Collector], max_cached_workflows=0):
                count = await asyncio.wait_for(handle.query(Collector.count), 60)
                assert count == SIGNALS - 1
                await handle.signal(Collector.add, "z" * SIGNAL_BYTES)
                sizes = await asyncio.wait_for(handle.result(), 60)
            assert sizes == [SIGNAL_BYTES] * SIGNALS
            history = await handle.fetch_history()
            total = sum(event.ByteSize() for event in history.events)
            assert total > SMALL["grpc_max_message_bytes"]
            assert [e.event_id for e in history.events] == list(range(1, len(history.events) + 1))
            async with raw_stub(server.address) as stub:
                assert len(await whole_history(stub, workflow_id)) == len(history.events)
        finally:
            await client.close()


async def test_retried_task_pages_carry_its_unstored_events(store_url: str) -> None:
    """A retried (transient) workflow task's last two events are not in the store: its
    page token carries them, so the paged history ends with them all the same."""
    async with serve(store_url, **SMALL) as server, raw_stub(server.address) as stub:
        tq = f"tq-{uuid.uuid4()}"
        workflow_id = f"transient-{uuid.uuid4()}"
        await stub.StartWorkflow(start_request(workflow_id, tq), timeout=30)
        for _ in range(16):
            signal = service_pb2.SignalWorkflowRequest(
                namespace=NS,
                signal_name="s",
                request_id=str(uuid.uuid4()),
                input=common_pb2.Payloads(payloads=[blob(90 * 1024)]),
            )
            signal.workflow_execution.workflow_id = workflow_id
            await stub.SignalWorkflow(signal, timeout=30)
        first = await poll_task(stub, tq)
        await stub.RespondWorkflowTaskFailed(
            service_pb2.RespondWorkflowTaskFailedRequest(
                task_token=first.task_token, failure=common_pb2.Failure(message="boom")
            ),
            timeout=30,
        )
        retried = await poll_task(stub, tq)
        assert retried.attempt == 2
        assert retried.next_page_token, "the history must not fit one page"
        assert retried.ByteSize() <= SMALL["grpc_max_message_bytes"]
        events = list(retried.history.events)
        events += await whole_history(stub, workflow_id, retried.next_page_token)
        assert [e.event_id for e in events] == list(range(1, len(events) + 1))
        assert events[-2].event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED
        assert events[-2].workflow_task_scheduled_event_attributes.attempt == 2
        assert events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED
        assert events[-1].event_id == retried.started_event_id
        respond = service_pb2.RespondWorkflowTaskCompletedRequest(
            task_token=retried.task_token, commands=[complete()], identity="raw-test"
        )
        await stub.RespondWorkflowTaskCompleted(respond, timeout=30)
        stored = await whole_history(stub, workflow_id)
        assert stored[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED


# ------------------------------------------------- 2: crashes become refusals


def huge_timer() -> command_pb2.Command:
    return command_pb2.Command(
        command_type=CommandType.COMMAND_TYPE_START_TIMER,
        start_timer_command_attributes=command_pb2.StartTimerCommandAttributes(
            timer_id="t", start_to_fire_timeout=Duration(seconds=2**62)
        ),
    )


def upsert(attributes: common_pb2.SearchAttributes) -> command_pb2.Command:
    return command_pb2.Command(
        command_type=CommandType.COMMAND_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES,
        upsert_workflow_search_attributes_command_attributes=(
            command_pb2.UpsertWorkflowSearchAttributesCommandAttributes(
                search_attributes=attributes
            )
        ),
    )


async def test_inputs_that_crashed_the_engine_are_refused(store_url: str) -> None:
    """Each of these was INTERNAL with a traceback (int64 overflow arming a timer,
    RecursionError in the JSON decoder, PostgreSQL refusing NUL, an unknown command
    type); each is now INVALID_ARGUMENT naming the field, and the server and the runs
    it stores carry on unharmed."""
    async with serve(store_url) as server, raw_stub(server.address) as stub:
        tq = f"tq-{uuid.uuid4()}"
        start = stub.StartWorkflow
        await refused(
            start(start_request("w1", tq, workflow_run_timeout=Duration(seconds=2**62))),
            "workflow_run_timeout",
            "maximum",
        )
        largest = Duration(seconds=315_576_000_000, nanos=999_999_999)
        await refused(
            start(start_request("w2", tq, workflow_execution_timeout=largest)),
            "workflow_execution_timeout",
        )
        nested = b"[" * 100_000 + b"]" * 100_000
        deep = common_pb2.SearchAttributes(indexed_fields={"Deep": keyword(nested)})
        await refused(start(start_request("w3", tq, search_attributes=deep)), "search_attributes")
        await refused(start(start_request("w\x00id", tq)), "workflow_id", "NUL")
        await refused(
            start(start_request("w4", tq, workflow_type=common_pb2.WorkflowType(name="T\x00"))),
            "workflow_type.name",
            "NUL",
        )
        await refused(start(start_request("w5", "tq\x00")), "task_queue.name", "NUL")
        nul_keyword = common_pb2.SearchAttributes(indexed_fields={"K": keyword(b'"a\\u0000b"')})
        await refused(
            start(start_request("w6", tq, search_attributes=nul_keyword)),
            "search_attributes",
            "NUL",
        )
        await refused(stub.PollWorkflowTask(poll_request("sticky\x00")), "task_queue.name")
        schedule = service_pb2.CreateScheduleRequest(
            namespace=NS, schedule_id="s\x00", request_id=str(uuid.uuid4())
        )
        await refused(stub.CreateSchedule(schedule), "schedule_id", "NUL")
        # Year 9999 overflowed the scheduler's date arithmetic.
        schedule.schedule_id = "s-9999"
        schedule.schedule.spec.cron_expressions.append("* * * * *")
        schedule.schedule.spec.start_time.FromSeconds(253_402_300_000)
        action = schedule.schedule.action.start_workflow
        action.workflow_id, action.workflow_type.name, action.task_queue.name = "x", "T", tq
        await refused(stub.CreateSchedule(schedule), "schedule.spec.start_time")
        negative = common_pb2.RetryPolicy(maximum_attempts=-1)
        await refused(
            start(start_request("w7", tq, retry_policy=negative)), "retry_policy.maximum_attempts"
        )

        # Commands of a real workflow task.
        run = await start(start_request("w-ok", tq), timeout=30)
        task = await poll_task(stub, tq)

        async def respond(*commands: command_pb2.Command, **fields: Any) -> Any:
            request = service_pb2.RespondWorkflowTaskCompletedRequest(
                task_token=task.task_token, commands=commands, identity="raw-test", **fields
            )
            return await stub.RespondWorkflowTaskCompleted(request, timeout=30)

        # Each bad command fails the workflow task (tests/test_command_refusals.py):
        # the next one goes to the task's retry.
        mismatched = complete()
        mismatched.command_type = CommandType.COMMAND_TYPE_START_TIMER
        for bad, words in [
            (huge_timer(), ["commands[0].start_timer_command_attributes.start_to_fire"]),
            (command_pb2.Command(command_type=999), ["commands[0].command_type"]),  # type: ignore[arg-type]
            (mismatched, ["commands[0]", "start_timer_command_attributes"]),
            (upsert(deep), ["commands[0]", "search_attributes"]),
            (upsert(nul_keyword), ["commands[0]", "NUL"]),
        ]:
            await refused(respond(bad), *words)
            task = await poll_task(stub, tq)
        sticky = service_pb2.StickyExecutionAttributes()
        sticky.worker_task_queue.name = "sticky\x00"
        await refused(respond(complete(), sticky_attributes=sticky), "sticky_attributes", "NUL")

        # The run is intact (one failed task recorded, later attempts transient) and
        # the server keeps working.
        await respond(complete())
        events = await whole_history(stub, "w-ok")
        assert events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
        assert len(events) == 8
        # A page token past int64 overflowed the store's integer.
        request = service_pb2.GetHistoryRequest(namespace=NS, next_page_token=b"9" * 30)
        request.execution.workflow_id = "w-ok"
        await refused(stub.GetHistory(request), "next_page_token")
        again = await start(start_request("w-after", tq), timeout=30)
        assert again.run_id and again.run_id != run.run_id
        listed = await stub.ListWorkflowExecutions(
            service_pb2.ListWorkflowExecutionsRequest(namespace=NS), timeout=30
        )
        assert {e.execution.workflow_id for e in listed.executions} == {"w-ok", "w-after"}


async def test_huge_backoff_coefficient_is_capped_not_a_crash(store_url: str) -> None:
    """A client-chosen backoff coefficient of 1e300 made the third retry's delay
    overflow a float (OverflowError: INTERNAL on every failure of that activity); the
    delay is capped at maximum_interval instead."""
    async with serve(store_url) as server, raw_stub(server.address) as stub:
        tq = f"tq-{uuid.uuid4()}"
        await stub.StartWorkflow(start_request("w-retry", tq), timeout=30)
        task = await poll_task(stub, tq)
        millisecond = Duration(nanos=1_000_000)
        schedule = command_pb2.Command(
            command_type=CommandType.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK,
            schedule_activity_task_command_attributes=(
                command_pb2.ScheduleActivityTaskCommandAttributes(
                    activity_id="a",
                    activity_type=common_pb2.ActivityType(name="A"),
                    task_queue=common_pb2.TaskQueue(name=tq),
                    start_to_close_timeout=Duration(seconds=60),
                    retry_policy=common_pb2.RetryPolicy(
                        initial_interval=millisecond,
                        maximum_interval=millisecond,
                        backoff_coefficient=1e300,
                    ),
                )
            ),
        )
        await stub.RespondWorkflowTaskCompleted(
            service_pb2.RespondWorkflowTaskCompletedRequest(
                task_token=task.task_token, commands=[schedule], identity="raw-test"
            ),
            timeout=30,
        )
        poll = service_pb2.PollActivityTaskRequest(namespace=NS, identity="raw-test")
        poll.task_queue.name = tq
        for attempt in range(1, 5):
            activity = await stub.PollActivityTask(poll, timeout=30)
            assert activity.attempt == attempt
            await stub.RespondActivityTaskFailed(
                service_pb2.RespondActivityTaskFailedRequest(
                    task_token=activity.task_token,
                    failure=common_pb2.Failure(message=f"attempt {attempt}"),
                ),
                timeout=30,
            )


# ------------------------------------------------------- 3: undecodable bodies


async def test_undecodable_bodies_log_one_line(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An undecodable body logged a full traceback per request; now the caller gets
    INVALID_ARGUMENT and the log one line per interval, without a traceback."""
    caplog.set_level(logging.INFO)
    async with serve(store_url) as server:
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with grpc.aio.insecure_channel(server.address) as channel:
            # No serializers: the bytes go on the wire as they are.
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/tideflow.api.v1.WorkflowService/StartWorkflow"
            )
            for _ in range(200):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(b"\xff\xff\xff\xff", timeout=30)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "StartWorkflowRequest" in (info.value.details() or "")
            stub = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            info_response = await stub.GetSystemInfo(service_pb2.GetSystemInfoRequest())
            assert info_response.server_version
        elapsed = loop.time() - began
    records = [r for r in caplog.records if "undecodable" in r.getMessage()]
    assert records, "the first undecodable body is logged"
    assert len(records) <= 1 + int(elapsed / 10.0)  # one line per 10 s interval
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in records)
    assert not [r for r in caplog.records if r.exc_info is not None]
    assert not [r for r in caplog.records if "deserializ" in r.getMessage().lower()]


# ------------------------------------------------------------ 4: long polls

POLLS = 4000
CHANNELS = 8


async def test_thousands_of_concurrent_polls_park(store_url: str) -> None:
    """Under a burst of long polls, gRPC core cancelled all but about 3,000 before any
    handler ran (its pending-request limit). Now every poll parks until its timeout
    (an empty answer, never CANCELLED), and a task reaches exactly one of them."""
    async with serve(store_url, long_poll_timeout_s=2.0) as server:
        channels = [
            grpc.aio.insecure_channel(
                server.address, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(CHANNELS)
        ]
        stubs = [service_pb2_grpc.WorkflowServiceStub(c) for c in channels]  # type: ignore[no-untyped-call]
        try:
            tq = f"tq-{uuid.uuid4()}"
            # Each delivered task by (run id, attempt): how many polls it reached.
            delivered: collections.Counter[tuple[str, int]] = collections.Counter()

            async def burst(until_delivered: bool) -> collections.Counter[str]:
                """POLLS pollers at once, each polling once, or (``until_delivered``)
                again after an empty answer until some poll got a task: the task then
                arrives while thousands wait, however long its start takes to commit."""
                outcomes: collections.Counter[str] = collections.Counter()

                async def one(index: int) -> None:
                    while True:
                        try:
                            response = await stubs[index % CHANNELS].PollWorkflowTask(
                                poll_request(tq), timeout=120
                            )
                        except grpc.aio.AioRpcError as error:
                            outcomes[error.code().name] += 1
                            return
                        outcomes["OK"] += 1
                        if response.task_token:
                            run = response.workflow_execution.run_id
                            delivered[(run, response.attempt)] += 1
                        if delivered or not until_delivered:
                            return

                await asyncio.gather(*(one(i) for i in range(POLLS)))
                return outcomes

            assert await burst(until_delivered=False) == {"OK": POLLS}
            assert not delivered

            polls = asyncio.ensure_future(burst(until_delivered=True))
            # A long task timeout: nobody completes the task, and a burst that outlasts
            # the timeout on a loaded machine would see its next attempt delivered too.
            wid = f"w-{uuid.uuid4()}"
            start = start_request(wid, tq, workflow_task_timeout=Duration(seconds=120))
            await stubs[0].StartWorkflow(start, timeout=30)
            outcomes = await polls
            assert set(outcomes) == {"OK"} and outcomes["OK"] >= POLLS, outcomes
            # Each task attempt reached exactly one poll; an attempt after the first
            # exists only because the one before timed out, which history records.
            assert delivered and set(delivered.values()) == {1}, delivered
            attempts = sorted(attempt for _, attempt in delivered)
            assert attempts == list(range(1, len(attempts) + 1)), delivered
            if len(attempts) > 1:
                history = await stubs[0].GetHistory(
                    service_pb2.GetHistoryRequest(
                        namespace=NS, execution=common_pb2.WorkflowExecution(workflow_id=wid)
                    ),
                    timeout=30,
                )
                assert EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT in {
                    e.event_type for e in history.history.events
                }, delivered
        finally:
            for channel in channels:
                await channel.close()


async def test_poll_limit_answers_resource_exhausted(store_url: str) -> None:
    """Past ``max_concurrent_polls`` a poll gets a clear RESOURCE_EXHAUSTED (clients
    back off and retry it), never CANCELLED; the parked ones are served as usual."""
    async with serve(store_url, long_poll_timeout_s=2.0, max_concurrent_polls=20) as server:
        async with raw_stub(server.address) as stub:
            tq = f"tq-{uuid.uuid4()}"
            outcomes: collections.Counter[str] = collections.Counter()
            messages: set[str] = set()

            async def one() -> None:
                try:
                    await stub.PollWorkflowTask(poll_request(tq), timeout=60)
                except grpc.aio.AioRpcError as error:
                    outcomes[error.code().name] += 1
                    messages.add(error.details() or "")
                else:
                    outcomes["OK"] += 1

            await asyncio.gather(*(one() for _ in range(100)))
            assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"}, outcomes
            assert outcomes["OK"] >= 20 and outcomes["RESOURCE_EXHAUSTED"] >= 1
            assert all("max_concurrent_polls" in m for m in messages)

        # The SDK's worker backs off on it and still gets its tasks.
        client = await Client.connect(server.address)
        try:
            handle = await client.start_workflow(
                Collector.run, 0, id=f"after-{uuid.uuid4()}", task_queue=tq
            )
            async with Worker(
                client,
                task_queue=tq,
                workflows=[Collector],
                workflow_pollers=30,
                sticky_queue_schedule_to_start_timeout=timedelta(seconds=5),
            ):
                assert await asyncio.wait_for(handle.result(), 60) == []
        finally:
            await client.close()
