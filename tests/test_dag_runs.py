"""The DAG model (``tideflow.worker_sdk.dag``) and its interpreter workflow.

Definitions: the builder, YAML / JSON round trips (also of random definitions),
every validation error, expressions, durations. Execution against a real server
(port 0, over SQLite and over PostgreSQL: conftest's ``client``; a fresh uuid task
queue per test): dependency order and parallelism on random DAGs (hypothesis),
retries with backoff, timeouts, pause / resume while tasks run, both failure
policies, saga compensation order, schema violations at start and at completion,
unknown executors, version pinning, cancellation, executor mappings. Executors
record their own start / end with a counter, never with clocks; waiting polls a
condition, and concurrency is proven with barriers, so nothing depends on timing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import ServerProcess, eventually, new_id, running_server
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tideflow.api.v1.history_pb2 import EventType
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

ET = EventType
ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 30.0
FAST = ExponentialBackoff(timedelta(milliseconds=50), timedelta(milliseconds=200))


# ------------------------------------------------------------------ helpers


@asynccontextmanager
async def dag_worker(client: Client, queue: str, activities: list[Any]) -> AsyncIterator[Worker]:
    async with Worker(
        client, task_queue=queue, workflows=[DagWorkflow], activities=activities
    ) as worker:
        yield worker


class Clock:
    """A logical clock: executors take ticks instead of reading time."""

    def __init__(self) -> None:
        self._ticks = itertools.count(1)

    def tick(self) -> int:
        return next(self._ticks)


async def assert_replays(handle: dag.DagHandle) -> None:
    """The run's history replays against the interpreter without non-determinism,
    and a replay answers the status query as a worker does."""
    history = await handle.workflow.fetch_history()
    Replayer(workflows=[DagWorkflow]).replay(history)
    assert (await handle.status(from_history=True)).to_dict() == (await handle.status()).to_dict()


async def history_types(handle: dag.DagHandle) -> list[int]:
    return [e.event_type for e in (await handle.workflow.fetch_history()).events]


# ------------------------------------------------------ definitions: builder


def etl_definition() -> Workflow:
    """The document's ETL example, with its builder calls."""
    wf = dag.new_workflow("data-etl-process", "1.0.0")
    extract = (
        dag.new_task("extract-data")
        .with_executor("data-connector")
        .with_parameter("source", "postgres")
        .with_parameter("query", "SELECT * FROM events")
        .with_timeout(timedelta(minutes=5))
        .with_retry_policy(
            RetryPolicy(
                max_attempts=3,
                backoff=ExponentialBackoff(timedelta(seconds=1), timedelta(seconds=30)),
            )
        )
    )
    transform = (
        dag.new_task("transform-data")
        .with_executor("data-transformer")
        .with_parameter("operations", ["filter.removeNull", "format.timestamp", "enrich.geoip"])
        .with_parameter("rows", "${tasks.extract-data.result.rows}")
        .with_timeout(timedelta(minutes=10))
        .depends_on(extract.id)
    )
    load = (
        dag.new_task("load-data")
        .with_executor("data-writer")
        .with_parameter("destination", "elasticsearch")
        .with_parameter("index", "events-processed")
        .with_timeout(timedelta(minutes=5))
        .depends_on(transform)
    )
    wf.add_task(extract)
    wf.add_task(transform)
    wf.add_task(load)
    return wf


def test_builder_is_the_documents_api_and_round_trips(tmp_path: Path) -> None:
    wf = etl_definition().validate(executors=["data-connector", "data-transformer", "data-writer"])
    assert wf.topological_order() == ["extract-data", "transform-data", "load-data"]
    assert wf.task("load-data").dependencies == ["transform-data"]
    assert wf.task("extract-data").retry_policy.delay(1) == timedelta(seconds=1)
    assert wf.task("extract-data").retry_policy.delay(10) == timedelta(seconds=30)
    text = dag.dumps(wf)
    assert "timeout: 5m" in text and "depends_on:" in text
    assert dag.loads(text) == wf
    assert dag.loads(dag.dumps(wf, "json"), "json") == wf
    for name in ("etl.yaml", "etl.yml", "etl.json"):
        dag.dump(wf, tmp_path / name)
        assert dag.load(tmp_path / name) == wf
    assert json.loads((tmp_path / "etl.json").read_text())["tasks"][0]["id"] == "extract-data"


def test_yaml_keywords_and_aliases() -> None:
    wf = dag.loads(
        """
id: w
version: 2          # a number is read as text
tasks:
  - {id: a, executor: x, timeout: 90}
  - {id: b, executor: x, dependencies: a, compensation: undo-x}
"""
    )
    assert wf.version == "2"
    assert wf.task("a").timeout == timedelta(seconds=90)
    assert wf.task("b").dependencies == ["a"]
    compensation = wf.task("b").compensation
    assert compensation is not None and compensation.executor == "undo-x"
    assert dag.loads(dag.dumps(wf)) == wf


@pytest.mark.parametrize("path", ["examples/etl/etl.yaml", "examples/saga/order.yaml"])
def test_example_definitions_are_valid_and_round_trip(path: str) -> None:
    wf = dag.load(ROOT / path).validate()
    assert dag.loads(dag.dumps(wf)) == wf
    assert dag.loads(dag.dumps(wf, "json")) == wf
    assert dag.dumps(dag.loads(dag.dumps(wf))) == dag.dumps(wf)


_names = st.text("abcdefghij-_0123456789", min_size=1, max_size=8).map(lambda s: "t" + s)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_durations = st.integers(1, 10**12).map(lambda us: timedelta(microseconds=us))


@st.composite
def definitions(draw: st.DrawFn) -> Workflow:
    ids = draw(st.lists(_names, min_size=1, max_size=8, unique=True))
    wf = Workflow(
        draw(_names),
        draw(st.sampled_from(["1", "1.0.0", "2024-01"])),
        description=draw(st.none() | st.text(max_size=20)),
        metadata=draw(st.dictionaries(st.text(max_size=5), _json, max_size=2)),
        failure_policy=draw(st.sampled_from(list(dag.FailurePolicy))),
        input_schema=draw(st.none() | st.just({"type": "object"})),
    )
    for index, task_id in enumerate(ids):
        task = Task(
            task_id,
            executor=draw(st.sampled_from(["a", "b.c", "d-e"])),
            name=draw(st.none() | st.text(max_size=10)),
            parameters=draw(st.dictionaries(st.text(max_size=5), _json, max_size=3)),
            timeout=draw(st.none() | _durations),
            retry_policy=RetryPolicy(
                max_attempts=draw(st.integers(1, 5)),
                backoff=ExponentialBackoff(
                    draw(_durations), draw(_durations), draw(st.sampled_from([1.0, 1.5, 2.0]))
                ),
                non_retryable_errors=tuple(draw(st.lists(st.sampled_from(["E1", "E2"])))),
            ),
            depends_on=draw(st.lists(st.sampled_from(ids[:index]), unique=True)) if index else [],
        )
        if draw(st.booleans()):
            task.with_compensation("undo", timeout=draw(st.none() | _durations))
        wf.add_task(task)
    return wf


@settings(max_examples=60, deadline=None)
@given(wf=definitions())
def test_random_definitions_round_trip_through_yaml_and_json(wf: Workflow) -> None:
    assert dag.loads(dag.dumps(wf, "yaml")) == wf
    assert dag.loads(dag.dumps(wf, "json"), "json") == wf


@settings(max_examples=200, deadline=None)
@given(value=_durations)
def test_durations_round_trip(value: timedelta) -> None:
    assert dag.parse_duration(dag.format_duration(value)) == value


def test_duration_syntax() -> None:
    assert dag.parse_duration("1h30m") == timedelta(minutes=90)
    assert dag.parse_duration("250ms") == timedelta(milliseconds=250)
    assert dag.parse_duration("1.5s") == timedelta(seconds=1.5)
    assert dag.parse_duration(2) == timedelta(seconds=2)
    assert dag.format_duration(timedelta(days=1, seconds=61, milliseconds=5)) == "1d1m1s5ms"
    for bad in ("5 minutes", "m5", "", "1x", True):
        with pytest.raises(ValueError):
            dag.parse_duration(bad)


# ----------------------------------------------------- definitions: validation


def _wf(*tasks: Task, **kwargs: Any) -> Workflow:
    return Workflow("w", "1", tasks=tasks, **kwargs)


VALIDATION_CASES: list[tuple[str, Callable[[], Workflow], list[str]]] = [
    (
        "cycle",
        lambda: _wf(
            Task("a", executor="x", depends_on=["c"]),
            Task("b", executor="x", depends_on=["a"]),
            Task("c", executor="x", depends_on=["b"]),
            Task("d", executor="x"),
        ),
        ["cycle: ", "a -> b -> c -> a"],
    ),
    (
        "self-cycle",
        lambda: _wf(Task("a", executor="x", depends_on=["a"])),
        ["task 'a': cycle: a -> a"],
    ),
    (
        "unknown dependency",
        lambda: _wf(Task("a", executor="x"), Task("b", executor="x", depends_on=["nope"])),
        ["task 'b': depends on unknown task 'nope'"],
    ),
    (
        "duplicate id",
        lambda: _wf(Task("a", executor="x"), Task("b", executor="x"), Task("a", executor="y")),
        ["task 'a': duplicate task id (tasks[0] and tasks[2])"],
    ),
    (
        "zero timeout",
        lambda: _wf(Task("slow", executor="x", timeout=timedelta(0))),
        ["task 'slow': bad timeout 0s: must be positive"],
    ),
    (
        "negative timeout",
        lambda: _wf(Task("slow", executor="x", timeout="-5s")),
        ["task 'slow': bad timeout -5s"],
    ),
    (
        "bad compensation timeout",
        lambda: _wf(Task("a", executor="x").with_compensation("u", timeout="-1s")),
        ["task 'a' compensation: bad timeout -1s"],
    ),
    (
        "no executor",
        lambda: _wf(Task("a")),
        ["task 'a': no executor"],
    ),
    (
        "bad id",
        lambda: _wf(Task("a.b", executor="x")),
        ["task 'a.b': id must match"],
    ),
    (
        "bad retry policy",
        lambda: _wf(Task("a", executor="x", retry_policy=RetryPolicy(max_attempts=0))),
        ["task 'a' retry_policy: max_attempts must be >= 1"],
    ),
    (
        "bad backoff",
        lambda: _wf(
            Task(
                "a",
                executor="x",
                retry_policy=RetryPolicy(
                    backoff=ExponentialBackoff(timedelta(seconds=5), timedelta(seconds=1))
                ),
            )
        ),
        ["task 'a' retry_policy: backoff maximum_interval must be >= initial_interval"],
    ),
    (
        "reference to a task that is not upstream",
        lambda: _wf(
            Task("a", executor="x"),
            Task("b", executor="x", parameters={"v": "${tasks.a.result}"}),
        ),
        ["task 'b' parameters: ${tasks.a.result} refers to task 'a', which is not one of its"],
    ),
    (
        "reference to an unknown task",
        lambda: _wf(Task("a", executor="x", parameters={"v": ["${tasks.zz.result.n}"]})),
        ["task 'a' parameters: ${tasks.zz.result.n} refers to unknown task 'zz'"],
    ),
    (
        "malformed expression",
        lambda: _wf(Task("a", executor="x", parameters={"v": "${env.HOME}"})),
        ["task 'a' parameters: unknown expression root in ${env.HOME}"],
    ),
    (
        "invalid input schema",
        lambda: _wf(Task("a", executor="x"), input_schema={"type": "bogus"}),
        ["workflow: input_schema is not a valid JSON Schema"],
    ),
    (
        "no tasks",
        lambda: _wf(),
        ["workflow: has no tasks"],
    ),
]


@pytest.mark.parametrize(
    ("build", "expected"),
    [pytest.param(build, expected, id=name) for name, build, expected in VALIDATION_CASES],
)
def test_each_validation_error_names_the_task(
    build: Callable[[], Workflow], expected: list[str]
) -> None:
    with pytest.raises(DagValidationError) as caught:
        build().validate()
    message = str(caught.value)
    for fragment in expected:
        assert fragment in message, message
    assert message.startswith("invalid DAG 'w'") or "has no tasks" in message


def test_unknown_executor_is_a_validation_error_given_the_known_ones() -> None:
    wf = _wf(Task("a", executor="known"), Task("b", executor="typo").with_compensation("undo"))
    with pytest.raises(DagValidationError) as caught:
        wf.validate(executors=["known"])
    message = str(caught.value)
    assert "task 'b': unknown executor 'typo'" in message
    assert "task 'b' compensation: unknown executor 'undo'" in message
    assert "task 'a'" not in message
    wf.validate(executors=["known", "typo", "undo"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "id: w\nversion: '1'\ntasks:\n  - {id: a, executor: x, timeout: 5 minutes}\n",
            "task 'a': bad timeout: invalid duration '5 minutes'",
        ),
        (
            "id: w\nversion: '1'\ntasks:\n  - {id: a, executor: x, dependson: [b]}\n",
            "task 'a': unknown field(s) 'dependson'",
        ),
        ("id: w\ntasks: []\n", "'version' is required"),
        ("id: w\nversion: '1'\nfailure_policy: maybe\ntasks: []\n", "failure_policy 'maybe'"),
        (
            "id: w\nversion: '1'\ntasks: [{id: a, executor: x, retry_policy: {max_attempts: x}}]\n",
            "max_attempts must be an integer",
        ),
        ("{not yaml", "cannot parse definition"),
    ],
)
def test_load_errors_are_clear(text: str, expected: str) -> None:
    with pytest.raises(DagValidationError) as caught:
        dag.loads(text)
    assert expected in str(caught.value)


# ------------------------------------------------------------- expressions


def test_expressions_resolve_values_and_text() -> None:
    context = {
        "input": {"source": "db", "limit": 5, "tags": ["x", "y"]},
        "tasks": {"extract-data": {"result": {"rows": [{"id": 7}], "n": 1}}},
        "workflow": {"id": "w", "version": "1", "instance_id": "run-1"},
    }
    params = {
        "whole": "${input.limit}",
        "list": ["${tasks.extract-data.result.rows}", "${input.tags.1}"],
        "text": "from ${input.source} (${input.limit} rows, ${tasks.extract-data.result.rows.0})",
        "escaped": "$${input.source}",
        "default": "${input.missing ?? 10}",
        "nested": {"run": "${workflow.instance_id}", "v": "v${workflow.version}"},
        "plain": 3,
    }
    assert dag.resolve(params, context) == {
        "whole": 5,
        "list": [[{"id": 7}], "y"],
        "text": 'from db (5 rows, {"id": 7})',
        "escaped": "${input.source}",
        "default": 10,
        "nested": {"run": "run-1", "v": "v1"},
        "plain": 3,
    }
    for bad, message in (
        ("${input.nope}", "input has no key 'nope'"),
        ("${input.tags.5}", "has 2 items, no index 5"),
        ("${input.limit.x}", "is int, cannot take 'x'"),
        ("${tasks.other.result}", "task 'other' has no result"),
        ("${input.a b}", "malformed expression"),
        ("${input.x ?? nope}", "must be JSON"),
    ):
        with pytest.raises(dag.ExpressionError, match=message):
            dag.resolve(bad, context)


# ------------------------------------------------------ execution: ordering


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


# ----------------------------------------------- execution: attempts, timeouts


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
    wf = _wf(Task("t", executor="flaky", retry_policy=policy))
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
    wf = _wf(
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

    wf = _wf(
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

    wf = _wf(
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


# ------------------------------------------------------- execution: control


async def test_pause_stops_scheduling_running_tasks_finish_resume_continues(
    client: Client,
) -> None:
    queue = new_id("dag")
    started = asyncio.Event()
    release = asyncio.Event()
    runs: list[str] = []

    @dag.executor("work")
    async def work(params: dict[str, Any]) -> str:
        runs.append(params["name"])
        if params["name"] == "a":
            started.set()
            await release.wait()
        return str(params["name"])

    wf = _wf(
        Task("a", executor="work", parameters={"name": "a"}),
        Task("b", executor="work", parameters={"name": "b"}, depends_on=["a"]),
    )
    async with dag_worker(client, queue, [work]):
        handle = await client.start_dag(wf, {}, task_queue=queue)
        await asyncio.wait_for(started.wait(), WAIT_S)

        async def a_running() -> bool:
            return (await handle.status()).task_states["a"].status is TaskStatus.RUNNING

        await eventually(a_running, "task a RUNNING (seen through describe)")
        await handle.pause("maintenance")
        await eventually(
            lambda: paused_status(handle, WorkflowStatus.PAUSED), "the run to be PAUSED"
        )

        async def listed_as_paused() -> bool:
            # Visibility follows once the workflow task that handled the signal commits.
            found = [w.id async for w in client.list_workflows("DagStatus = 'PAUSED'")]
            return found == [handle.id]

        await eventually(listed_as_paused, "the run to be listed as PAUSED")
        release.set()

        async def a_recorded() -> bool:
            # a's completion was handled by a workflow task that completed.
            types = await history_types(handle)
            if ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED not in types:
                return False
            done = types.index(ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED)
            return ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED in types[done:]

        await eventually(a_recorded, "a's completion to be processed")
        paused = await handle.status()
        assert paused.status is WorkflowStatus.PAUSED
        assert paused.task_states["a"].status is TaskStatus.COMPLETED
        assert paused.task_states["b"].status is TaskStatus.PENDING
        history = (await handle.workflow.fetch_history()).events
        ids = [
            e.activity_task_scheduled_event_attributes.activity_id
            for e in history
            if e.event_type == ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        ]
        assert ids == ["a#1"]  # nothing new while paused
        await handle.resume()
        assert await handle.result() == {"b": "b"}
        final = await handle.status()
    assert runs == ["a", "b"]
    assert [t.status for t in final.transitions] == [
        "CREATED", "RUNNING", "PAUSED", "RUNNING", "COMPLETED"
    ]  # fmt: skip
    assert final.transitions[2].note == "maintenance"
    assert [w.id async for w in client.list_workflows("DagStatus = 'COMPLETED'")] == [handle.id]


async def paused_status(handle: dag.DagHandle, status: WorkflowStatus) -> bool:
    return (await handle.status()).status is status


async def test_fail_workflow_policy_lets_running_tasks_finish_and_stops_the_rest(
    client: Client,
) -> None:
    queue = new_id("dag")
    release = asyncio.Event()
    fail_now = asyncio.Event()

    @dag.executor("job")
    async def job(params: dict[str, Any]) -> str:
        kind: str = params["kind"]
        if kind == "slow":
            await release.wait()
        if kind == "flaky":
            raise RuntimeError("try again much later")
        if kind == "fail":
            await fail_now.wait()
            raise ApplicationError("fatal", non_retryable=True)
        return kind

    long_backoff = RetryPolicy(
        max_attempts=5, backoff=ExponentialBackoff(timedelta(hours=1), timedelta(hours=1))
    )
    wf = _wf(
        Task("slow", executor="job", parameters={"kind": "slow"}),
        Task("after-slow", executor="job", parameters={"kind": "ok"}, depends_on=["slow"]),
        Task("flaky", executor="job", parameters={"kind": "flaky"}, retry_policy=long_backoff),
        Task("fail", executor="job", parameters={"kind": "fail"}),
    )
    async with dag_worker(client, queue, [job]):
        handle = await client.start_dag(wf, {}, task_queue=queue)

        async def in_state(**expected: TaskStatus) -> bool:
            states = (await handle.status()).task_states
            return all(states[tid].status is status for tid, status in expected.items())

        await eventually(
            lambda: in_state(slow=TaskStatus.RUNNING, flaky=TaskStatus.RETRY),
            "slow running and flaky waiting to retry",
        )
        fail_now.set()
        await eventually(lambda: in_state(fail=TaskStatus.FAILED), "task 'fail' to fail")
        release.set()
        with pytest.raises(DagFailureError) as caught:
            await handle.result()
        states = (await handle.status()).task_states
    assert caught.value.failed_tasks == ["fail"]
    assert states["slow"].status is TaskStatus.COMPLETED  # it was running: it finished
    assert states["after-slow"].status is TaskStatus.SKIPPED  # never started
    # The retry an hour away is not waited for: the run stops it at once.
    assert states["flaky"].status is TaskStatus.CANCELLED
    assert states["flaky"].statuses()[-2:] == ["RETRY", "CANCELLED"]
    assert caught.value.skipped_tasks == ["after-slow"]


async def test_continue_policy_runs_independent_branches(client: Client) -> None:
    queue = new_id("dag")

    @dag.executor("node")
    async def node(params: dict[str, Any]) -> str:
        if params.get("fail"):
            raise RuntimeError(f"{params['name']} broke")
        return str(params["name"])

    def t(name: str, *deps: str, fail: bool = False) -> Task:
        return Task(name, executor="node", parameters={"name": name, "fail": fail}, depends_on=deps)

    wf = _wf(
        t("a"),
        t("b", "a"),
        t("c", "a", fail=True),
        t("d", "b", "c"),
        t("e", "d"),
        t("f"),
        t("g", "b", "f"),
        failure_policy=dag.FailurePolicy.CONTINUE,
    )
    async with dag_worker(client, queue, [node]):
        handle = await client.start_dag(wf, {}, task_queue=queue)
        with pytest.raises(DagFailureError) as caught:
            await handle.result()
        instance = await handle.status()
    assert caught.value.failed_tasks == ["c"]
    assert caught.value.skipped_tasks == ["d", "e"]
    assert instance.status is WorkflowStatus.FAILED
    assert {tid for tid, s in instance.task_states.items() if s.status is TaskStatus.COMPLETED} == {
        "a",
        "b",
        "f",
        "g",
    }
    assert instance.task_states["d"].transitions[-1].note == "dependency 'c' FAILED"
    assert instance.task_states["e"].transitions[-1].note == "dependency 'd' SKIPPED"


async def test_compensations_run_in_reverse_dependency_order(client: Client) -> None:
    queue = new_id("dag")
    clock = Clock()
    spans: dict[str, tuple[int, int]] = {}
    attempts: Counter[str] = Counter()

    @dag.executor("do")
    async def do(params: dict[str, Any]) -> dict[str, str]:
        if params.get("fail"):
            raise RuntimeError("cannot")
        return {"did": params["name"]}

    @dag.executor("undo")
    async def undo(params: dict[str, Any]) -> str:
        name = params["task_id"]
        attempts[name] += 1
        begin = clock.tick()
        await asyncio.sleep(0)
        if name == "b" and attempts[name] == 1:
            raise RuntimeError("undo b: transient")
        if name == "c":
            raise RuntimeError("undo c: always broken")
        assert params["result"] == {"did": name}
        spans[name] = (begin, clock.tick())
        return f"undid {name}"

    def t(name: str, *deps: str, fail: bool = False, compensate: bool = True) -> Task:
        task = Task(name, executor="do", parameters={"name": name, "fail": fail}, depends_on=deps)
        if compensate:
            policy = RetryPolicy(max_attempts=2, backoff=FAST)
            task.with_compensation("undo", retry_policy=policy)
        return task

    #   a -> b -> d(no compensation) -> e ; a -> c ; x (independent) ; b, c -> boom (fails)
    wf = _wf(
        t("a"),
        t("b", "a"),
        t("c", "a"),
        t("d", "b", compensate=False),
        t("e", "d"),
        t("x"),
        t("boom", "b", "c", "e", fail=True),
        t("never", "boom"),
    )
    async with dag_worker(client, queue, [do, undo]):
        handle = await client.start_dag(wf, {}, task_queue=queue)
        with pytest.raises(DagFailureError) as caught:
            await handle.result()
        instance = await handle.status()
    assert caught.value.failed_tasks == ["boom"]
    assert caught.value.compensations == {
        "a": "COMPLETED",
        "b": "COMPLETED",
        "c": "FAILED",
        "e": "COMPLETED",
        "x": "COMPLETED",
    }
    states = instance.task_states
    assert states["boom"].compensation is None and states["never"].compensation is None
    assert states["d"].compensation is None  # completed, but nothing to undo
    assert states["b"].compensation is not None and states["b"].compensation.attempts == 2
    c_undo = states["c"].compensation
    assert c_undo is not None and c_undo.status is TaskStatus.FAILED and c_undo.attempts == 2
    assert c_undo.error is not None and c_undo.error.message == "undo c: always broken"
    # Reverse dependency order: a task's compensation starts after the compensations
    # of everything downstream of it ended (c's failed one included; d has none, so
    # e's comes before b's).
    end_of_c = max(t.seq or 0 for t in c_undo.transitions if t.status in ("FAILED", "COMPLETED"))
    scheduled = {
        tid: min(t.seq or 0 for t in s.compensation.transitions if t.status == "SCHEDULED")
        for tid, s in states.items()
        if s.compensation is not None
    }
    assert spans["e"][1] < spans["b"][0]
    assert spans["b"][1] < spans["a"][0]
    assert end_of_c < scheduled["a"]
    assert attempts == Counter({"b": 2, "c": 2, "a": 1, "e": 1, "x": 1})
    assert instance.phase == "done"


# --------------------------------------------------------- execution: schemas


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
    wf = _wf(Task("double", executor="double", parameters={"n": "${input.n}"}), **SCHEMA_WF)
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
    cyclic = _wf(
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

    wf = _wf(
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
    wf = _wf(Task("double", executor="double", parameters={"n": "${input.n}"}), **SCHEMA_WF)
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


# ------------------------------------------------- execution: misc features


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


async def test_cancel_stops_running_tasks_and_compensates(client: Client) -> None:
    queue = new_id("dag")
    running = asyncio.Event()
    undone: list[str] = []

    @dag.executor("step")
    async def step(params: dict[str, Any]) -> str:
        if params["block"]:
            running.set()
            await asyncio.Event().wait()  # until cancelled (the worker shuts down)
        return "done"

    @dag.executor("undo")
    async def undo(params: dict[str, Any]) -> None:
        undone.append(params["task_id"])

    wf = _wf(
        Task("a", executor="step", parameters={"block": False}).with_compensation("undo"),
        Task("b", executor="step", parameters={"block": True}, depends_on=["a"]),
        Task("c", executor="step", parameters={"block": False}, depends_on=["b"]),
    )
    async with dag_worker(client, queue, [step, undo]):
        handle = await client.start_dag(wf, {}, task_queue=queue)
        await asyncio.wait_for(running.wait(), WAIT_S)
        await handle.cancel("no longer needed")
        with pytest.raises(DagFailureError) as caught:
            await handle.result()
        instance = await handle.status()
    assert caught.value.status is WorkflowStatus.CANCELLED
    assert instance.status is WorkflowStatus.CANCELLED
    states = instance.task_states
    assert [states[t].status for t in "abc"] == [
        TaskStatus.COMPLETED,
        TaskStatus.CANCELLED,
        TaskStatus.CANCELLED,
    ]
    assert undone == ["a"]
    described = await handle.describe()
    assert described.status.name == "CANCELED"


async def test_executor_mapping_to_activity_types_and_queues(client: Client) -> None:
    queue, edge_queue = new_id("dag"), new_id("dag")

    @activity.defn(name="impl.fetch-v2")
    async def fetch(params: dict[str, Any]) -> int:
        return int(params["n"]) + 1

    @dag.executor("edge.sense", executed_at="edge")
    def sense(params: dict[str, Any]) -> int:  # a sync executor, in the thread pool
        return int(params["n"]) * 10

    wf = _wf(
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
        Worker(client, task_queue=edge_queue, activities=[sense]),
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
    assert states["sense"].executed_at == "edge"
    assert states["fetch"].executed_at is None  # a plain activity does not say
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

    wf = _wf(
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
    wf = _wf(
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


async def test_cancel_while_paused_ends_the_run_and_compensates(client: Client) -> None:
    queue = new_id("dag")
    running = asyncio.Event()
    undone: list[str] = []

    @dag.executor("step")
    async def step(params: dict[str, Any]) -> str:
        if params["block"]:
            running.set()
            await asyncio.Event().wait()  # until cancelled (the worker shuts down)
        return "ok"

    @dag.executor("undo")
    async def undo(params: dict[str, Any]) -> None:
        undone.append(params["task_id"])

    wf = _wf(
        Task("a", executor="step", parameters={"block": False}).with_compensation("undo"),
        Task("b", executor="step", parameters={"block": True}, depends_on=["a"]),
    )
    async with dag_worker(client, queue, [step, undo]):
        handle = await client.start_dag(wf, {}, task_queue=queue)
        await asyncio.wait_for(running.wait(), WAIT_S)
        await handle.pause()
        await eventually(
            lambda: paused_status(handle, WorkflowStatus.PAUSED), "the run to be PAUSED"
        )
        await handle.cancel()
        with pytest.raises(DagFailureError) as caught:
            await handle.result()
        instance = await handle.status()
    assert caught.value.status is WorkflowStatus.CANCELLED
    assert instance.task_states["b"].status is TaskStatus.CANCELLED
    assert undone == ["a"]  # the compensation did not wait for a resume
    assert [t.status for t in instance.transitions] == [
        "CREATED", "RUNNING", "PAUSED", "CANCELLED"
    ]  # fmt: skip


# ------------------------------------------------ the server dies mid-DAG


@pytest.mark.slow
async def test_server_sigkill_mid_dag_resumes_without_rerunning_completed_tasks(
    server_process: ServerProcess,
) -> None:
    """20 tasks in 4 layers of 5 (each on two tasks of the layer before). The server
    process is SIGKILLed while layer 2 runs; a new server on the same file and port
    takes over. Every task whose completion history had recorded before the kill ran
    exactly once, the run completes with the right values, and history is intact."""
    client = await Client.connect(server_process.address)
    queue = new_id("dag")
    calls: Counter[str] = Counter()
    entered: set[str] = set()
    gate = asyncio.Event()

    @dag.executor("layered")
    async def layered(params: dict[str, Any]) -> dict[str, int]:
        name = dag.executor_info().task_id
        calls[name] += 1
        if params["layer"] == 2:
            entered.add(name)
            await gate.wait()
        return {"v": params["i"] + sum(params["inputs"])}

    def task_id(layer: int, j: int) -> str:
        return f"l{layer}-{j}"

    wf = Workflow("layers", "1")
    deps: dict[str, list[str]] = {}
    for layer in range(4):
        for j in range(5):
            ups = [task_id(layer - 1, j), task_id(layer - 1, (j + 1) % 5)] if layer else []
            deps[task_id(layer, j)] = ups
            wf.add_task(
                Task(
                    task_id(layer, j),
                    executor="layered",
                    timeout="60s",
                    depends_on=ups,
                    parameters={
                        "layer": layer,
                        "i": layer * 5 + j,
                        "inputs": [f"${{tasks.{u}.result.v}}" for u in ups],
                    },
                )
            )
    values: dict[str, int] = {}
    for layer in range(4):
        for j in range(5):
            tid = task_id(layer, j)
            values[tid] = layer * 5 + j + sum(values[u] for u in deps[tid])
    worker = Worker(client, task_queue=queue, workflows=[DagWorkflow], activities=[layered])
    worker.start()
    try:
        handle = await client.start_dag(wf, {}, task_queue=queue)
        await eventually(lambda: len(entered) == 5, "all of layer 2 to be running")
        history = (await handle.workflow.fetch_history()).events
        activity_of = {
            e.event_id: e.activity_task_scheduled_event_attributes.activity_id
            for e in history
            if e.event_type == ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        }
        recorded = {
            activity_of[e.activity_task_completed_event_attributes.scheduled_event_id].split("#")[0]
            for e in history
            if e.event_type == ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
        }
        assert recorded == {task_id(layer, j) for layer in (0, 1) for j in range(5)}

        await server_process.kill()
        await server_process.start()
        gate.set()

        output = await asyncio.wait_for(handle.result(), 90)
        instance = await handle.status()
    finally:
        gate.set()
        await worker.shutdown()
        await client.close()
    assert output == {task_id(3, j): {"v": values[task_id(3, j)]} for j in range(5)}
    assert {tid: calls[tid] for tid in recorded} == dict.fromkeys(recorded, 1)
    assert set(calls) == set(values) and max(calls.values()) <= 2
    assert all(s.status is TaskStatus.COMPLETED for s in instance.task_states.values())
    assert {tid: s.result for tid, s in instance.task_states.items()} == {
        tid: {"v": v} for tid, v in values.items()
    }
    events = (await _history_after(server_process.address, handle.id)).events
    assert [e.event_id for e in events] == list(range(1, len(events) + 1))
    completed = [e for e in events if e.event_type == ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED]
    assert len(completed) == 20


async def _history_after(address: str, workflow_id: str) -> Any:
    async with await Client.connect(address) as fresh:
        return await fresh.get_workflow_handle(workflow_id).fetch_history()
