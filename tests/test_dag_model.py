"""The DAG model (``tideflow.worker_sdk.dag``) without a server: the builder, YAML /
JSON round trips (also of random definitions), every validation error, load errors,
expressions, durations.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from helpers_dag import etl_definition, workflow_of
from hypothesis import given, settings
from hypothesis import strategies as st

from tideflow.worker_sdk import dag
from tideflow.worker_sdk.dag import (
    DagValidationError,
    ExponentialBackoff,
    RetryPolicy,
    Task,
    Workflow,
)

ROOT = Path(__file__).resolve().parent.parent


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


VALIDATION_CASES: list[tuple[str, Callable[[], Workflow], list[str]]] = [
    (
        "cycle",
        lambda: workflow_of(
            Task("a", executor="x", depends_on=["c"]),
            Task("b", executor="x", depends_on=["a"]),
            Task("c", executor="x", depends_on=["b"]),
            Task("d", executor="x"),
        ),
        ["cycle: ", "a -> b -> c -> a"],
    ),
    (
        "self-cycle",
        lambda: workflow_of(Task("a", executor="x", depends_on=["a"])),
        ["task 'a': cycle: a -> a"],
    ),
    (
        "unknown dependency",
        lambda: workflow_of(Task("a", executor="x"), Task("b", executor="x", depends_on=["nope"])),
        ["task 'b': depends on unknown task 'nope'"],
    ),
    (
        "duplicate id",
        lambda: workflow_of(
            Task("a", executor="x"), Task("b", executor="x"), Task("a", executor="y")
        ),
        ["task 'a': duplicate task id (tasks[0] and tasks[2])"],
    ),
    (
        "zero timeout",
        lambda: workflow_of(Task("slow", executor="x", timeout=timedelta(0))),
        ["task 'slow': bad timeout 0s: must be positive"],
    ),
    (
        "negative timeout",
        lambda: workflow_of(Task("slow", executor="x", timeout="-5s")),
        ["task 'slow': bad timeout -5s"],
    ),
    (
        "bad compensation timeout",
        lambda: workflow_of(Task("a", executor="x").with_compensation("u", timeout="-1s")),
        ["task 'a' compensation: bad timeout -1s"],
    ),
    (
        "no executor",
        lambda: workflow_of(Task("a")),
        ["task 'a': no executor"],
    ),
    (
        "bad id",
        lambda: workflow_of(Task("a.b", executor="x")),
        ["task 'a.b': id must match"],
    ),
    (
        "bad retry policy",
        lambda: workflow_of(Task("a", executor="x", retry_policy=RetryPolicy(max_attempts=0))),
        ["task 'a' retry_policy: max_attempts must be >= 1"],
    ),
    (
        "bad backoff",
        lambda: workflow_of(
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
        lambda: workflow_of(
            Task("a", executor="x"),
            Task("b", executor="x", parameters={"v": "${tasks.a.result}"}),
        ),
        ["task 'b' parameters: ${tasks.a.result} refers to task 'a', which is not one of its"],
    ),
    (
        "reference to an unknown task",
        lambda: workflow_of(Task("a", executor="x", parameters={"v": ["${tasks.zz.result.n}"]})),
        ["task 'a' parameters: ${tasks.zz.result.n} refers to unknown task 'zz'"],
    ),
    (
        "malformed expression",
        lambda: workflow_of(Task("a", executor="x", parameters={"v": "${env.HOME}"})),
        ["task 'a' parameters: unknown expression root in ${env.HOME}"],
    ),
    (
        "invalid input schema",
        lambda: workflow_of(Task("a", executor="x"), input_schema={"type": "bogus"}),
        ["workflow: input_schema is not a valid JSON Schema"],
    ),
    (
        "no tasks",
        lambda: workflow_of(),
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
    wf = workflow_of(
        Task("a", executor="known"), Task("b", executor="typo").with_compensation("undo")
    )
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
