"""Running DAGs on the interpreter workflow against a real server (port 0, over SQLite
and over PostgreSQL: conftest's ``client``; a fresh uuid task queue per test):
dependency order and parallelism on random DAGs (hypothesis), retries with backoff,
timeouts, unknown executors, schema violations at start and at completion, version
pinning, executor mappings, unresolvable parameters, deterministic replay. Executors
record their own start / end with a counter, never with clocks; waiting polls a
condition, and concurrency is proven with barriers, so nothing depends on timing.
(The model and its file format: test_dag_model.py; pause, failure policies,
compensation, cancellation and a server SIGKILL: test_dag_control.py.)
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import ET, WAIT_S, eventually, new_id, running_server
from helpers_dag import (
    FAST,
    Clock,
    dag_worker,
    etl_definition,
    history_types,
    paused_status,
    workflow_of,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tideflow.worker_sdk import Client, Replayer, Worker, activity, dag
from tideflow.worker_sdk.dag import (
    DagFailureError,
    DagValidationError,
    DagWorkflow,
    ExponentialBackoff,
    RetryPolicy,
    Task,
    TaskStatus,
    Workflow,
    WorkflowStatus,
)
from tideflow.worker_sdk.exceptions import (
    ApplicationError,
    InvalidArgumentError,
    NotFoundError,
)


async def assert_replays(handle: dag.DagHandle) -> None:
    """The run's history replays against the interpreter without non-determinism,
    and a replay answers the status query as a worker does."""
    history = await handle.workflow.fetch_history()
    Replayer(workflows=[DagWorkflow]).replay(history)
    assert (await handle.status(from_history=True)).to_dict() == (await handle.status()).to_dict()


@st.composite
def random_dags(draw: st.DrawFn) -> tuple[list[list[int]], list[int], list[int]]:
    """Dependencies (each task on up to 3 earlier ones), latencies in ms, and the
    order in which tasks appear in the definition (not topological)."""
    size = draw(st.integers(1, 30))
    deps = [
        sorted(draw(st.sets(st.integers(0, i - 1), max_size=min(3, i)))) if i else []
        for i in range(size)
    ]
    latencies = draw(st.lists(st.integers(0, 15), min_size=size, max_size=size))
    order = draw(st.permutations(list(range(size))))
    return deps, latencies, order


class OrderProbe:
    """What the ``step`` executor records for one random DAG."""

    def __init__(self, deps: list[list[int]]) -> None:
        self.clock = Clock()
        self.start: dict[int, int] = {}
        self.end: dict[int, int] = {}
        self.calls: Counter[int] = Counter()
        # Tasks with identical dependencies become ready together: they must all be
        # executing at once, which a barrier per group proves.
        self.groups: dict[str, list[int]] = {}
        for i, d in enumerate(deps):
            self.groups.setdefault(repr(d), []).append(i)
        self.arrived: Counter[str] = Counter()
        self.open: dict[str, asyncio.Event] = {g: asyncio.Event() for g in self.groups}


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=random_dags())
# Always also: 30 independent tasks (one 30-way barrier), and a chain of 30.
@example(case=([[]] * 30, [0] * 30, list(range(29, -1, -1))))
@example(case=([[]] + [[i] for i in range(29)], [1] * 30, list(range(30))))
async def test_random_dags_respect_every_edge_and_run_siblings_concurrently(
    random_worker: tuple[Client, str], case: tuple[list[list[int]], list[int], list[int]]
) -> None:
    deps, latencies, order = case
    probe = OrderProbe(deps)
    probes[0] = probe
    wf = Workflow("random", "1")
    for i in order:
        wf.add_task(
            Task(
                f"t{i:02d}",
                executor="step",
                depends_on=[f"t{d:02d}" for d in deps[i]],
                parameters={
                    "i": i,
                    "group": repr(deps[i]),
                    "latency_ms": latencies[i],
                    "inputs": [f"${{tasks.t{d:02d}.result.v}}" for d in deps[i]],
                },
            )
        )
    expected: dict[int, int] = {}
    for i in range(len(deps)):
        expected[i] = i + sum(expected[d] for d in deps[i])
    client, queue = random_worker
    handle = await client.start_dag(wf, {}, task_queue=queue)
    output = await handle.result()
    sinks = {i for i in range(len(deps))} - {d for ds in deps for d in ds}
    assert output == {f"t{i:02d}": {"v": expected[i]} for i in sorted(sinks)}
    for i, ds in enumerate(deps):
        for d in ds:
            assert probe.end[d] < probe.start[i], f"t{i:02d} started before t{d:02d} ended"
    assert set(probe.calls.values()) == {1}
    instance = await handle.status()
    assert instance.status is WorkflowStatus.COMPLETED
    assert [s.status for s in instance.task_states.values()] == [TaskStatus.COMPLETED] * len(deps)
    assert list(instance.task_states) == [f"t{i:02d}" for i in order]
    await assert_replays(handle)


probes: dict[int, OrderProbe] = {}


@activity.defn(name="step")
async def step_executor(params: dict[str, Any]) -> dict[str, Any]:
    probe = probes[0]
    i = params["i"]
    probe.calls[i] += 1
    probe.start[i] = probe.clock.tick()
    group = params["group"]
    probe.arrived[group] += 1
    if probe.arrived[group] == len(probe.groups[group]):
        probe.open[group].set()
    try:
        await asyncio.wait_for(probe.open[group].wait(), WAIT_S)
    except TimeoutError:
        raise ApplicationError(
            f"siblings of task {i} never ran at the same time", non_retryable=True
        ) from None
    await asyncio.sleep(params["latency_ms"] / 1000)
    probe.end[i] = probe.clock.tick()
    return {"v": i + sum(params["inputs"])}


@pytest.fixture
async def random_worker(tmp_path: Path) -> AsyncIterator[tuple[Client, str]]:
    """One server, client and worker for all examples of the hypothesis test. SQLite
    only: what it checks (the interpreter's ordering and concurrency) involves no SQL,
    and every other execution test here runs on both stores."""
    queue = new_id("dag")
    async with (
        running_server(tmp_path) as server,
        await Client.connect(server.address) as client,
        dag_worker(client, queue, [step_executor]),
    ):
        yield client, queue


async def test_retries_with_backoff_show_every_state_and_attempt(client: Client) -> None:
    queue = new_id("dag")
    calls: list[int] = []

    @dag.executor("flaky")
    async def flaky(params: dict[str, Any]) -> dict[str, Any]:
        attempt = dag.executor_info().attempt
        calls.append(attempt)
        if attempt < 3:
            raise RuntimeError(f"transient {attempt}")
        return {"ok": attempt}

    policy = RetryPolicy(
        max_attempts=4,
        backoff=ExponentialBackoff(timedelta(milliseconds=100), timedelta(milliseconds=150)),
    )
    wf = workflow_of(Task("t", executor="flaky", retry_policy=policy))
    async with dag_worker(client, queue, [flaky]):
        handle = await client.start_dag(wf, {}, task_queue=queue)
        assert await handle.result() == {"t": {"ok": 3}}
        state = (await handle.status()).task_states["t"]
    assert calls == [1, 2, 3]
    assert state.attempts == 3 and state.max_attempts == 4
    assert state.statuses() == [
        "PENDING",
        *["SCHEDULED", "RUNNING", "FAILED", "RETRY"] * 2,
        "SCHEDULED",
        "RUNNING",
        "COMPLETED",
    ]
    assert [(e.type, e.message, e.attempt) for e in state.errors] == [
        ("RuntimeError", "transient 1", 1),
        ("RuntimeError", "transient 2", 2),
    ]
    assert state.error is None and state.result == {"ok": 3}
    assert state.executed_at == "cloud" and state.worker
    retries = [t.note for t in state.transitions if t.status == "RETRY"]
    assert retries == ["backoff 100ms", "backoff 150ms"]  # exponential, capped
    # Every attempt is its own activity (one attempt each) in history, and every
    # backoff a durable timer of that length.
    history = (await handle.workflow.fetch_history()).events
    scheduled = [
        e.activity_task_scheduled_event_attributes
        for e in history
        if e.event_type == ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    assert [a.activity_id for a in scheduled] == ["t#1", "t#2", "t#3"]
    assert {a.retry_policy.maximum_attempts for a in scheduled} == {1}
    timers = [
        e.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta()
        for e in history
        if e.event_type == ET.EVENT_TYPE_TIMER_STARTED
    ]
    assert timers == [timedelta(milliseconds=100), timedelta(milliseconds=150)]


async def test_last_attempt_and_non_retryable_errors_fail_the_task(client: Client) -> None:
    queue = new_id("dag")

    @dag.executor("broken")
    async def broken(params: dict[str, Any]) -> None:
        if params["kind"] == "fatal":
            raise ApplicationError("bad input", type="BadInput", non_retryable=True)
        if params["kind"] == "listed":
            raise KeyError("listed as non-retryable")
        raise RuntimeError("always")

    policy = RetryPolicy(max_attempts=3, backoff=FAST, non_retryable_errors=("KeyError",))
    wf = workflow_of(
        Task("always", executor="broken", parameters={"kind": "always"}, retry_policy=policy),
        Task("fatal", executor="broken", parameters={"kind": "fatal"}, retry_policy=policy),
        Task("listed", executor="broken", parameters={"kind": "listed"}, retry_policy=policy),
        failure_policy="continue",
    )
    async with dag_worker(client, queue, [broken]):
        handle = await client.start_dag(wf, {}, task_queue=queue)
        with pytest.raises(DagFailureError) as caught:
            await handle.result()
        states = (await handle.status()).task_states
    assert caught.value.failed_tasks == ["always", "fatal", "listed"]
    assert caught.value.status is WorkflowStatus.FAILED
    assert states["always"].attempts == 3
    assert states["fatal"].attempts == 1 and states["fatal"].error is not None
    assert states["fatal"].error.type == "BadInput" and states["fatal"].error.non_retryable
    assert states["listed"].attempts == 1
    assert caught.value.errors["always"].message == "always"
    for state in states.values():
        assert state.statuses()[-1] == "FAILED"


async def test_timeout_fails_the_attempt_and_is_retried(client: Client) -> None:
    queue = new_id("dag")
    release = asyncio.Event()

    @activity.defn(name="hang")
    async def hang(params: dict[str, Any]) -> None:
        await release.wait()

    wf = workflow_of(
        Task(
            "stuck",
            executor="hang",
            timeout="300ms",
            retry_policy=RetryPolicy(max_attempts=2, backoff=FAST),
        )
    )
    try:
        async with dag_worker(client, queue, [hang]):
            handle = await client.start_dag(wf, {}, task_queue=queue)
            with pytest.raises(DagFailureError) as caught:
                await handle.result()
            state = (await handle.status()).task_states["stuck"]
            release.set()
    finally:
        release.set()
    assert caught.value.failed_tasks == ["stuck"]
    assert [e.type for e in state.errors] == ["TimeoutError", "TimeoutError"]
    assert "timed out (START_TO_CLOSE, timeout 300ms)" in state.errors[0].message
    assert state.statuses() == [
        "PENDING", "SCHEDULED", "RUNNING", "FAILED", "RETRY", "SCHEDULED", "RUNNING", "FAILED"
    ]  # fmt: skip
    types = await history_types(handle)
    assert types.count(ET.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT) == 2


async def test_unknown_executor_at_run_time_fails_the_task_clearly(client: Client) -> None:
    queue = new_id("dag")

    @activity.defn(name="known")
    async def known(params: dict[str, Any]) -> int:
        return 1

    wf = workflow_of(
        Task("a", executor="known"),
        Task(
            "b",
            executor="nobody-has-this",
            depends_on=["a"],
            retry_policy=RetryPolicy(max_attempts=5, backoff=FAST),
        ),
    )
    async with dag_worker(client, queue, [known]):
        handle = await client.start_dag(wf, {}, task_queue=queue)
        with pytest.raises(DagFailureError) as caught:
            await handle.result()
        state = (await handle.status()).task_states["b"]
    error = caught.value.errors["b"]
    assert error.type == "UnknownExecutorError"
    assert "unknown executor 'nobody-has-this'" in error.message
    assert f"task queue {queue!r}" in error.message
    assert state.attempts == 1  # not retried


SCHEMA_WF = dict(
    input_schema={
        "type": "object",
        "required": ["n"],
        "properties": {"n": {"type": "integer", "minimum": 0}},
    },
    output_schema={
        "type": "object",
        "required": ["total"],
        "properties": {"total": {"type": "integer"}},
    },
    output={"total": "${tasks.double.result}"},
)


async def test_input_schema_violation_at_start_starts_nothing(client: Client) -> None:
    queue = new_id("dag")
    wf = workflow_of(Task("double", executor="double", parameters={"n": "${input.n}"}), **SCHEMA_WF)
    for bad, fragment in (
        ({"n": -1}, "-1 is less than the minimum of 0"),
        ({}, "'n' is a required property"),
        ({"n": "3"}, "'3' is not of type 'integer'"),
    ):
        with pytest.raises(InvalidArgumentError) as caught:
            await client.start_dag(wf, bad, id=f"bad-{uuid.uuid4().hex}", task_queue=queue)
        assert caught.value.status == "INVALID_ARGUMENT"
        assert fragment in caught.value.message
        assert "input does not match input_schema" in caught.value.message
    with pytest.raises(InvalidArgumentError, match="input must be a JSON object"):
        await client.start_dag(wf, [1, 2], task_queue=queue)
    # An invalid definition is refused the same way, before anything starts.
    cyclic = workflow_of(
        Task("a", executor="x", depends_on=["b"]), Task("b", executor="x", depends_on=["a"])
    )
    with pytest.raises(DagValidationError, match="cycle"):
        await client.start_dag(cyclic, {}, id="cyclic", task_queue=queue)
    assert await client.count_workflows() == 0
    with pytest.raises(NotFoundError):
        await client.get_dag_handle("cyclic").describe()


async def test_output_schema_violation_fails_the_run_and_compensates(client: Client) -> None:
    queue = new_id("dag")
    undone: list[str] = []

    @activity.defn(name="double")
    async def double(params: dict[str, Any]) -> Any:
        n = params["n"]
        return n * 2 if n < 100 else "too big"

    @activity.defn(name="forget")
    async def forget(params: dict[str, Any]) -> None:
        undone.append(params["task_id"])

    wf = workflow_of(
        Task("double", executor="double", parameters={"n": "${input.n}"}).with_compensation(
            "forget"
        ),
        **SCHEMA_WF,
    )
    async with dag_worker(client, queue, [double, forget]):
        ok = await client.start_dag(wf, {"n": 4}, task_queue=queue)
        assert await ok.result() == {"total": 8}
        bad = await client.start_dag(wf, {"n": 100}, task_queue=queue)
        with pytest.raises(DagFailureError) as caught:
            await bad.result()
        instance = await bad.status()
    assert caught.value.failed_tasks == []
    assert caught.value.error is not None
    assert caught.value.error.type == "DagOutputSchemaError"
    assert "'too big' is not of type 'integer'" in caught.value.error.message
    assert instance.task_states["double"].status is TaskStatus.COMPLETED
    assert instance.status is WorkflowStatus.FAILED
    assert undone == ["double"]


async def test_interpreter_rechecks_what_it_is_started_with(client: Client) -> None:
    """Started without ``start_dag`` (a raw start of ``tideflow.dag``), the
    interpreter itself refuses an invalid definition or input: the run fails."""
    queue = new_id("dag")
    wf = workflow_of(Task("double", executor="double", parameters={"n": "${input.n}"}), **SCHEMA_WF)
    cyclic = {
        "id": "c",
        "version": "1",
        "tasks": [
            {"id": "a", "executor": "x", "depends_on": ["b"]},
            {"id": "b", "executor": "x", "depends_on": ["a"]},
        ],
    }
    async with dag_worker(client, queue, []):
        bad_input = dag.DagHandle(
            client,
            (
                await client.start_workflow(
                    dag.DAG_WORKFLOW_TYPE,
                    {"definition": wf.to_dict(), "input": {"n": -1}},
                    id=f"raw-{uuid.uuid4().hex}",
                    task_queue=queue,
                )
            ).id,
        )
        bad_definition = dag.DagHandle(
            client,
            (
                await client.start_workflow(
                    dag.DAG_WORKFLOW_TYPE,
                    {"definition": cyclic, "input": {}},
                    id=f"raw-{uuid.uuid4().hex}",
                    task_queue=queue,
                )
            ).id,
        )
        with pytest.raises(DagFailureError) as first:
            await bad_input.result()
        with pytest.raises(DagFailureError) as second:
            await bad_definition.result()
        instance = await bad_input.status()
    assert first.value.error is not None and first.value.error.type == "DagInputSchemaError"
    assert instance.task_states["double"].status is TaskStatus.SKIPPED
    assert [t.status for t in instance.transitions] == ["CREATED", "FAILED"]
    assert second.value.error is not None and second.value.error.type == "DagValidationError"
    assert "cycle: a -> b -> a" in second.value.error.message


async def test_instances_keep_the_version_they_started_with(client: Client) -> None:
    queue = new_id("dag")
    release = asyncio.Event()

    @dag.executor("v")
    async def v(params: dict[str, Any]) -> str:
        if params["gate"]:
            await release.wait()
        return str(params["tag"])

    v1 = Workflow("versioned", "1").add_task(
        Task("first", executor="v", parameters={"tag": "v1-first", "gate": True})
    )
    v2 = Workflow("versioned", "2").add_task(
        Task("first", executor="v", parameters={"tag": "v2-first", "gate": False}),
        Task("second", executor="v", parameters={"tag": "v2-second", "gate": False},
             depends_on=["first"]),
    )  # fmt: skip
    async with dag_worker(client, queue, [v]):
        old = await client.start_dag(v1, {}, task_queue=queue)
        new = await client.start_dag(v2, {}, task_queue=queue)
        assert await new.result() == {"second": "v2-second"}
        release.set()
        assert await old.result() == {"first": "v1-first"}
        old_instance, new_instance = await old.status(), await new.status()
    assert (old_instance.workflow_id, old_instance.workflow_version) == ("versioned", "1")
    assert list(old_instance.task_states) == ["first"]
    assert new_instance.workflow_version == "2"
    assert list(new_instance.task_states) == ["first", "second"]


async def test_executor_mapping_to_activity_types_and_queues(client: Client) -> None:
    queue, edge_queue = new_id("dag"), new_id("dag")

    @activity.defn(name="impl.fetch-v2")
    async def fetch(params: dict[str, Any]) -> int:
        return int(params["n"]) + 1

    @dag.executor("edge.sense", executed_at="device")  # a claim the server overrides
    def sense(params: dict[str, Any]) -> int:  # a sync executor, in the thread pool
        return int(params["n"]) * 10

    wf = workflow_of(
        Task("fetch", executor="fetch", parameters={"n": "${input.n}"}),
        Task(
            "sense", executor="sensor", parameters={"n": "${tasks.fetch.result}"},
            depends_on=["fetch"],
        ),
        output="${tasks.sense.result}",
    )  # fmt: skip
    wf.with_executor("sensor", activity="edge.sense", task_queue=edge_queue)
    async with (
        dag_worker(client, queue, [fetch]),
        Worker(client, task_queue=edge_queue, activities=[sense], tier="edge", identity="e1"),
    ):
        handle = await client.start_dag(
            wf, {"n": 4}, task_queue=queue, executors={"fetch": "impl.fetch-v2"}
        )
        assert await handle.result() == 50
        states = (await handle.status()).task_states
    assert (states["fetch"].activity_type, states["fetch"].task_queue) == ("impl.fetch-v2", queue)
    assert (states["sense"].activity_type, states["sense"].task_queue) == (
        "edge.sense",
        edge_queue,
    )
    # Where each ran is the server's record of the poll that took it (README "Placement"),
    # for plain activities too.
    assert (states["sense"].executed_at, states["sense"].site) == ("edge", "cloud")
    assert states["sense"].worker == "e1"
    assert states["fetch"].executed_at == "cloud"
    assert states["sense"].parameters == {"n": 5}


def test_graph_and_dot_renderings() -> None:
    wf = etl_definition()
    text = dag.render_graph(wf)
    assert "stage 0:\n  extract-data [data-connector]" in text
    assert "  transform-data -> load-data" in text
    dot = dag.render_dot(wf)
    assert dot.startswith('digraph "data-etl-process" {')
    assert '"extract-data" -> "transform-data";' in dot
    assert dot.rstrip().endswith("}")


async def test_unresolvable_parameters_fail_the_task_without_running_it(client: Client) -> None:
    queue = new_id("dag")
    calls: list[Any] = []

    @activity.defn(name="echo")
    async def echo(params: dict[str, Any]) -> Any:
        calls.append(params)
        return params

    wf = workflow_of(
        Task("ok", executor="echo", parameters={"v": "${input.present}"}),
        Task(
            "bad",
            executor="echo",
            parameters={"v": "${input.missing}"},
            retry_policy=RetryPolicy(max_attempts=3, backoff=FAST),
        ),
        failure_policy="continue",
    )
    async with dag_worker(client, queue, [echo]):
        handle = await client.start_dag(wf, {"present": 1}, task_queue=queue)
        with pytest.raises(DagFailureError) as caught:
            await handle.result()
        state = (await handle.status()).task_states["bad"]
    assert calls == [{"v": 1}]
    assert caught.value.failed_tasks == ["bad"]
    assert state.statuses() == ["PENDING", "FAILED"] and state.attempts == 0
    assert state.error is not None and state.error.type == "ExpressionError"
    assert "${input.missing}: input has no key 'missing'" in state.error.message


async def test_interpreter_replays_deterministically_without_a_worker_cache(
    client: Client,
) -> None:
    """Every workflow task replays the whole history (no cache): retries, a pause
    and resume while a task runs, a failure and compensations with a retry. The
    history then replays in a Replayer, and answers queries from history."""
    queue = new_id("dag")
    running = asyncio.Event()
    release = asyncio.Event()
    undone: list[str] = []

    @dag.executor("work")
    async def work(params: dict[str, Any]) -> int:
        attempt = dag.executor_info().attempt
        if params["name"] == "a" and attempt == 1:
            raise RuntimeError("a: first attempt fails")
        if params["name"] == "b":
            running.set()
            await release.wait()
        if params["name"] == "c":
            raise ApplicationError("c: fatal", non_retryable=True)
        return int(params["n"]) + 1

    @dag.executor("undo")
    async def undo(params: dict[str, Any]) -> None:
        if params["task_id"] == "b" and dag.executor_info().attempt == 1:
            raise RuntimeError("undo b: first attempt fails")
        undone.append(params["task_id"])

    retry = RetryPolicy(max_attempts=2, backoff=FAST)
    wf = workflow_of(
        Task("a", executor="work", parameters={"name": "a", "n": 1}, retry_policy=retry)
        .with_compensation("undo", retry_policy=retry),
        Task("b", executor="work", parameters={"name": "b", "n": "${tasks.a.result}"},
             depends_on=["a"]).with_compensation("undo", retry_policy=retry),
        Task("c", executor="work", parameters={"name": "c", "n": 0}, depends_on=["b"]),
    )  # fmt: skip
    async with Worker(
        client,
        task_queue=queue,
        workflows=[DagWorkflow],
        activities=[work, undo],
        max_cached_workflows=0,
    ):
        handle = await client.start_dag(wf, {}, task_queue=queue)
        await asyncio.wait_for(running.wait(), WAIT_S)
        await handle.pause()
        await eventually(
            lambda: paused_status(handle, WorkflowStatus.PAUSED), "the run to be PAUSED"
        )
        release.set()
        await handle.resume()
        with pytest.raises(DagFailureError) as caught:
            await handle.result()
        instance = await handle.status()
        await assert_replays(handle)
    assert caught.value.failed_tasks == ["c"]
    assert undone == ["b", "a"]
    assert instance.task_states["a"].attempts == 2
    assert instance.task_states["b"].result == 3
    compensation = instance.task_states["b"].compensation
    assert compensation is not None and compensation.attempts == 2
    assert [t.status for t in instance.transitions] == [
        "CREATED", "RUNNING", "PAUSED", "RUNNING", "FAILED"
    ]  # fmt: skip
