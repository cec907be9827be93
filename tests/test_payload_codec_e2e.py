"""Payload codecs end to end: a real server and worker with AES-GCM, on SQLite and
PostgreSQL.

The server never holds the key: after a run with activities, a failing activity, heartbeat
details, signals, queries, a patch marker, a child workflow, continue-as-new, memo and a
failed workflow, no marker of any input or result is found in plain text anywhere in the
database (the SQLite file and its WAL, or every row of every PostgreSQL table), while the
client gets every value back right. Search attribute values stay in clear text, since the
server indexes them. Also: replay of encoded histories (Replayer, worker cache off,
``decode_history``), key rotation across a running workflow, chained codecs, the DAG layer
and schedules through the same boundary.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from helpers import bounded, eventually

from tideflow.server import TideflowServer
from tideflow.worker_sdk import (
    AESGCMCodec,
    Client,
    DataConverter,
    PayloadCodecError,
    Replayer,
    RetryPolicy,
    Worker,
    WorkflowHandle,
    WorkflowHistory,
    ZlibCodec,
    activity,
    dag,
    decode_history,
    workflow,
)
from tideflow.worker_sdk.codec import ENCODING_AES_GCM, KEY_ID, collect_payloads
from tideflow.worker_sdk.dag import DagWorkflow, Task
from tideflow.worker_sdk.exceptions import (
    ActivityError,
    ApplicationError,
    NonDeterminismError,
    WorkflowFailureError,
    WorkflowQueryFailedError,
)
from tideflow.worker_sdk.schedules import ScheduleActionStartWorkflow, ScheduleSpec

KEY_A = bytes.fromhex("11" * 32)
KEY_B = bytes.fromhex("22" * 32)


def aes(active: str = "a", **keys: bytes) -> DataConverter:
    return DataConverter(payload_codec=AESGCMCodec(keys=keys or {"a": KEY_A}, active_key_id=active))


# ------------------------------------------------------------------ workflows


@activity.defn
async def seal(text: str) -> str:
    """The first attempt heartbeats and fails; the second gets the heartbeat details
    back from the server (so they were stored there, encoded) and succeeds."""
    beat = text.replace("ACTIN", "HEARTBEAT")
    info = activity.info()
    if info.attempt == 1:
        activity.heartbeat(beat)
        raise RuntimeError("first attempt fails after a heartbeat")
    if info.heartbeat_details != [beat]:
        return f"wrong heartbeat details: {info.heartbeat_details!r}"
    return text.replace("ACTIN", "ACTRES")


@activity.defn
async def refuse(text: str) -> str:
    raise ApplicationError(
        "refused: this message is clear text", text.replace("ACTIN", "ACTFAIL"), non_retryable=True
    )


@workflow.defn
class CodecChild:
    @workflow.run
    async def run(self, text: str) -> str:
        return text.replace("CHIN", "CHRES")


_TIMEOUT = timedelta(seconds=30)


@workflow.defn
class CodecParent:
    """Lap 0: patch marker, activity, failing activity, a signal, a child, then
    continue-as-new with all of it. Lap 1: answers queries until ``finish``."""

    def __init__(self) -> None:
        self.signals: list[str] = []
        self.finished = False

    @workflow.run
    async def run(self, job: dict[str, Any]) -> dict[str, Any]:
        u = job["u"]
        if job["lap"] == 0:
            patched = workflow.patched("codec-patch")
            sealed = await workflow.execute_activity(
                seal,
                f"ACTIN{u}",
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=50)),
            )
            try:
                await workflow.execute_activity(
                    refuse, f"ACTIN{u}", start_to_close_timeout=_TIMEOUT
                )
                refused: list[Any] = []
            except ActivityError as error:
                assert isinstance(error.cause, ApplicationError)
                refused = list(error.cause.details)
            await workflow.wait_condition(lambda: bool(self.signals))
            child = await workflow.execute_child_workflow(
                CodecChild.run, f"CHIN{u}", id=f"{workflow.info().workflow_id}-child"
            )
            carried = {
                "input": job["tag"],
                "patched": patched,
                "activity": sealed,
                "refused": refused,
                "signals": list(self.signals),
                "child": child,
                "can": f"CAN{u}",
            }
            workflow.continue_as_new({"u": u, "lap": 1, "carried": carried, "tag": job["tag"]})
        await workflow.wait_condition(lambda: self.finished)
        return {**job["carried"], "result": f"RES{u}"}

    @workflow.signal
    def add(self, value: str) -> None:
        self.signals.append(value)

    @workflow.signal
    def finish(self) -> None:
        self.finished = True

    @workflow.query
    def state(self, arg: str) -> str:
        return arg.replace("QARG", "QRES")

    @workflow.query
    def refuse_query(self, arg: str) -> str:
        raise ApplicationError("query refused", arg.replace("QARG", "QFAIL"))


@workflow.defn
class CodecFails:
    @workflow.run
    async def run(self, u: str) -> None:
        raise ApplicationError("workflow failed: clear message", f"WFFAIL{u}", non_retryable=True)


@workflow.defn
class CodecWaits:
    """Holds a run open across a worker restart (key rotation)."""

    def __init__(self) -> None:
        self.values: list[str] = []

    @workflow.run
    async def run(self, first: str) -> list[str]:
        await workflow.wait_condition(lambda: len(self.values) == 2)
        return [first, *self.values]

    @workflow.signal
    def add(self, value: str) -> None:
        self.values.append(value)


WORKFLOWS = [CodecParent, CodecChild, CodecFails, CodecWaits]
ACTIVITIES = [seal, refuse]


def markers(u: str) -> list[str]:
    """Every value the scenario sends or receives, each unique to the test. Without a
    codec all of them are stored in plain text except the query ones (queries are not
    recorded) and the heartbeat's (kept by the server only while the activity is pending;
    the second attempt proves they went through it)."""
    kinds = ["WFIN", "ACTIN", "ACTRES", "ACTFAIL", "HEARTBEAT", "SIG", "CHIN", "CHRES", "CAN"]
    return [f"{k}{u}" for k in [*kinds, "QARG", "QRES", "RES", "MEMO", "WFFAIL"]]


# -------------------------------------------------------------------- helpers


@asynccontextmanager
async def connected(server: TideflowServer, converter: DataConverter) -> AsyncIterator[Client]:
    client = await Client.connect(server.address, data_converter=converter)
    try:
        yield client
    finally:
        await client.close()


async def run_scenario(client: Client, queue: str, u: str) -> tuple[WorkflowHandle[Any], str]:
    """Runs CodecParent through both laps; returns its handle and the first run's id."""
    wid = f"codec-{u}"
    handle = await client.start_workflow(
        CodecParent.run,
        {"u": u, "lap": 0, "tag": f"WFIN{u}"},
        id=wid,
        task_queue=queue,
        memo={"note": f"MEMO{u}"},
        search_attributes={"Customer": f"SEARCHABLE{u}"},
    )
    first_run = handle.run_id
    assert first_run is not None
    await handle.signal(CodecParent.add, f"SIG{u}")

    async def answered() -> str | None:
        current = client.get_workflow_handle(wid)
        if (await current.describe()).run_id == first_run:
            return None  # still lap 0
        return await current.query(CodecParent.state, f"QARG{u}")

    assert await eventually(answered, "a query of lap 1") == f"QRES{u}"
    # A failed query's failure comes back in the status details, decoded too.
    with pytest.raises(WorkflowQueryFailedError) as refused:
        await client.get_workflow_handle(wid).query(CodecParent.refuse_query, f"QARG{u}")
    assert isinstance(refused.value.cause, ApplicationError)
    assert list(refused.value.cause.details) == [f"QFAIL{u}"]
    await client.get_workflow_handle(wid).signal(CodecParent.finish)
    result = await bounded(client.get_workflow_handle(wid).result())
    assert result == {
        "input": f"WFIN{u}",
        "patched": True,
        "activity": f"ACTRES{u}",
        "refused": [f"ACTFAIL{u}"],
        "signals": [f"SIG{u}"],
        "child": f"CHRES{u}",
        "can": f"CAN{u}",
        "result": f"RES{u}",
    }
    return handle, first_run


async def stored_bytes(store_url: str) -> bytes:
    """Everything the server stored: the SQLite file with its WAL and journal (raw bytes:
    freed pages count too), or the text and bytes of every row of every PostgreSQL table."""
    if store_url.startswith("sqlite"):
        path = Path(store_url.removeprefix("sqlite:///"))
        files = sorted(path.parent.glob(path.name + "*"))
        assert files, f"no database file at {path}"
        return b"".join(f.read_bytes() for f in files)
    conn = await asyncpg.connect(store_url, timeout=10)
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
        chunks = []
        for table in tables:
            for row in await conn.fetch(f'SELECT * FROM "{table["table_name"]}"'):
                for value in row.values():
                    if isinstance(value, (bytes, bytearray, memoryview)):
                        chunks.append(bytes(value))
                    else:
                        chunks.append(str(value).encode())
        return b"\n".join(chunks)
    finally:
        await conn.close()


# ---------------------------------------------------------------------- tests


async def test_server_never_sees_plain_payloads(store_url: str) -> None:
    u = uuid.uuid4().hex
    queue = f"codec-{u}"
    converter = aes()
    async with TideflowServer(store_url, port=0) as server, connected(server, converter) as client:
        async with Worker(client, task_queue=queue, workflows=WORKFLOWS, activities=ACTIVITIES):
            handle, first_run = await run_scenario(client, queue, u)
            with pytest.raises(WorkflowFailureError) as failed:
                await bounded(
                    client.execute_workflow(CodecFails.run, u, id=f"f-{u}", task_queue=queue)
                )
        cause = failed.value.cause
        assert isinstance(cause, ApplicationError)
        assert list(cause.details) == [f"WFFAIL{u}"]
        assert cause.message == "workflow failed: clear message"
        # Memo comes back decoded; search attributes were indexed in clear.
        listed = [wf async for wf in client.list_workflows(f"Customer = 'SEARCHABLE{u}'")]
        # (the run continued-as-new does not carry them)
        assert [(wf.run_id, wf.memo) for wf in listed] == [(first_run, {"note": f"MEMO{u}"})]
        # The history this client reads is decoded...
        history = await handle.fetch_history()
        started = history.events[0].workflow_execution_started_event_attributes
        assert converter.from_payloads(started.input)[0]["tag"] == f"WFIN{u}"
        # ...while a client without the codec sees only ciphertext under key id "a".
        async with connected(server, DataConverter()) as blind:
            raw = await blind.get_workflow_handle(handle.id, run_id=handle.run_id).fetch_history()
        encoded = [p for e in raw.events for p in collect_payloads(e)]
        assert encoded
        assert {(p.metadata["encoding"], p.metadata[KEY_ID]) for p in encoded} == {
            (ENCODING_AES_GCM, b"a")
        }
    stored = await stored_bytes(store_url)
    assert f"codec-{u}".encode() in stored  # the scan reads the data: ids are clear text
    assert f"SEARCHABLE{u}".encode() in stored  # indexed, so not encoded
    assert b"refused: this message is clear text" in stored  # failure messages are clear
    leaked = [m for m in markers(u) if m.encode() in stored]
    assert leaked == [], f"payload values stored in plain text: {leaked}"


async def test_replay_and_cache_eviction_with_chained_codec(store_url: str) -> None:
    u = uuid.uuid4().hex
    queue = f"codec-{u}"
    # Compress, then encrypt: the worker caches nothing, so every task replays the full
    # (encoded) history fetched from the server.
    converter = DataConverter(
        payload_codec=[
            ZlibCodec(min_size=0),
            AESGCMCodec(keys={"a": KEY_A}, active_key_id="a"),
        ]
    )
    async with TideflowServer(store_url, port=0) as server, connected(server, converter) as client:
        async with Worker(
            client,
            task_queue=queue,
            workflows=WORKFLOWS,
            activities=ACTIVITIES,
            max_cached_workflows=0,
        ):
            handle, first_run = await run_scenario(client, queue, u)
        replayer = Replayer(workflows=WORKFLOWS, data_converter=converter)
        for run_id in (first_run, None):
            history = await client.get_workflow_handle(handle.id, run_id=run_id).fetch_history()
            assert replayer.replay(history).events_replayed == len(history.events)
        # An encoded history (as a tool without the codec exports it) replays once decoded.
        async with connected(server, DataConverter()) as blind:
            raw = await blind.get_workflow_handle(handle.id, run_id=first_run).fetch_history()
        outer = {p.metadata["encoding"] for e in raw.events for p in collect_payloads(e)}
        assert outer == {ENCODING_AES_GCM}
        with pytest.raises(NonDeterminismError, match="decode_history"):
            replayer.replay(raw)
        decoded = await decode_history(WorkflowHistory.from_json(raw.to_json()), converter)
        assert replayer.replay(decoded).events_replayed == len(raw.events)
    stored = await stored_bytes(store_url)
    leaked = [m for m in markers(u) if m.encode() in stored]
    assert leaked == [], f"payload values stored in plain text: {leaked}"


async def test_key_rotation_across_a_running_workflow(store_url: str) -> None:
    u = uuid.uuid4().hex
    queue = f"codec-{u}"
    old, rotated = aes("a", a=KEY_A), aes("b", a=KEY_A, b=KEY_B)
    async with TideflowServer(store_url, port=0) as server:
        async with (
            connected(server, old) as client,
            Worker(client, task_queue=queue, workflows=[CodecWaits]),
        ):
            handle = await client.start_workflow(
                CodecWaits.run, f"first{u}", id=f"rot-{u}", task_queue=queue
            )
            await handle.signal(CodecWaits.add, f"under-a{u}")
            await eventually(lambda: _signals_seen(handle, 1), "the first signal in the history")
        # Restarted with both keys, B active: the run started under A completes.
        async with connected(server, rotated) as client:
            async with Worker(client, task_queue=queue, workflows=[CodecWaits]):
                rotated_handle = client.get_workflow_handle(handle.id)
                await rotated_handle.signal(CodecWaits.add, f"under-b{u}")
                assert await bounded(rotated_handle.result()) == [
                    f"first{u}",
                    f"under-a{u}",
                    f"under-b{u}",
                ]
            history = await rotated_handle.fetch_history()
            Replayer(workflows=[CodecWaits], data_converter=rotated).replay(history)
        async with connected(server, DataConverter()) as blind:
            raw = await blind.get_workflow_handle(handle.id).fetch_history()
        key_ids = {p.metadata[KEY_ID] for e in raw.events for p in collect_payloads(e)}
        assert key_ids == {b"a", b"b"}
        # A client that only has the old key cannot read what B encrypted, and says why.
        async with connected(server, old) as client:
            with pytest.raises(PayloadCodecError, match=r"key id 'b'"):
                await client.get_workflow_handle(handle.id).result()


async def _signals_seen(handle: WorkflowHandle[Any], count: int) -> bool:
    history = await handle.fetch_history()
    return (
        sum(e.HasField("workflow_execution_signaled_event_attributes") for e in history.events)
        >= count
    )


@activity.defn(name="codec-step")
async def codec_step(params: dict[str, Any]) -> dict[str, Any]:
    return {"out": str(params["text"]).replace("DAGIN", "DAGOUT")}


async def test_dag_and_schedule_through_the_codec(store_url: str) -> None:
    u = uuid.uuid4().hex
    queue = f"codec-{u}"
    converter = aes()
    async with (
        TideflowServer(store_url, port=0) as server,
        connected(server, converter) as client,
        Worker(
            client, task_queue=queue, workflows=[DagWorkflow, CodecChild], activities=[codec_step]
        ),
    ):
        wf = dag.Workflow("codec-dag", "1")
        wf.add_task(Task("first", executor="codec-step", parameters={"text": "${input.text}"}))
        wf.add_task(
            Task(
                "second",
                executor="codec-step",
                depends_on=["first"],
                parameters={"text": "${tasks.first.result.out}-DAGIN2"},
            )
        )
        dag_handle = await client.start_dag(wf, {"text": f"DAGIN{u}"}, task_queue=queue)
        assert await bounded(dag_handle.result()) == {"second": {"out": f"DAGOUT{u}-DAGOUT2"}}
        status = await dag_handle.status()
        assert status.task_states["first"].result == {"out": f"DAGOUT{u}"}
        assert (await dag_handle.status(from_history=True)).to_dict() == status.to_dict()

        # A schedule's action input is encoded at creation; the run it starts decodes it.
        schedule = await client.create_schedule(
            f"sched-{u}",
            action=ScheduleActionStartWorkflow(
                CodecChild.run, f"CHIN{u}-sched", id=f"sched-run-{u}", task_queue=queue
            ),
            spec=ScheduleSpec(cron="0 0 1 1 *"),
        )
        described = await schedule.describe()
        assert described.schedule.action.args == [f"CHIN{u}-sched"]
        await schedule.trigger()

        async def started() -> str | None:
            recent = (await schedule.describe()).info.recent_actions
            return recent[0].action.workflow_id if recent else None

        run_id = await eventually(started, "the triggered run")
        assert await bounded(client.get_workflow_handle(run_id).result()) == f"CHRES{u}-sched"
        await schedule.delete()
    stored = await stored_bytes(store_url)
    leaked = [
        m for m in (f"DAGIN{u}", f"DAGOUT{u}", f"CHIN{u}", f"CHRES{u}") if m.encode() in stored
    ]
    assert leaked == [], f"payload values stored in plain text: {leaked}"


async def test_worker_without_the_key_leaves_the_task_to_one_that_has_it(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    u = uuid.uuid4().hex
    queue = f"codec-{u}"
    old, rotated = aes("a", a=KEY_A), aes("b", a=KEY_A, b=KEY_B)
    caplog.set_level(logging.ERROR, logger="tideflow.worker")
    async with TideflowServer(store_url, port=0) as server, connected(server, rotated) as client:
        handle = await client.start_workflow(
            CodecWaits.run,
            f"first{u}",
            id=f"lacks-{u}",
            task_queue=queue,
            task_timeout=timedelta(seconds=1),  # the server retries the task soon
        )
        # A worker that only has key A gets the task, cannot decode it, logs why and
        # keeps running (it shuts down cleanly).
        async with (
            connected(server, old) as lacking,
            Worker(lacking, task_queue=queue, workflows=[CodecWaits]),
        ):

            async def logged() -> bool:
                return any("undecodable task" in r.getMessage() for r in caplog.records)

            await eventually(logged, "the undecodable task logged")
        assert any("key id 'b'" in r.getMessage() for r in caplog.records)
        async with Worker(client, task_queue=queue, workflows=[CodecWaits]):
            await handle.signal(CodecWaits.add, "x")
            await handle.signal(CodecWaits.add, "y")
            assert await bounded(handle.result()) == [f"first{u}", "x", "y"]
