"""Regressions of the DAG layer found by review (issue 10).

- graph walks recursed: a 1,000-task chain written in reverse order crashed
  ``tideflow dag validate`` with RecursionError; 100,000 tasks must validate;
- YAML errors named ``<unicode string>`` instead of the file and line;
- ``tideflow dag status`` waited 60 s for a worker that was not there, and
  ``dag run --wait`` did not say that nothing polls the queue (DescribeTaskQueue).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest

from tideflow.api.v1 import common_pb2, service_pb2
from tideflow.server import TideflowServer
from tideflow.worker_sdk import Client, Worker, activity, dag
from tideflow.worker_sdk.dag import _graph
from tideflow.worker_sdk.exceptions import InvalidArgumentError
from tideflow.worker_sdk.task_queues import TaskQueueDescription, describe_task_queue

CLI_TIMEOUT_S = 120


def tideflow_dag(*args: str) -> tuple[int, str, str]:
    """``tideflow dag ARGS`` in a subprocess (from async tests: in a thread, so the
    test's event loop keeps serving the server meanwhile)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tideflow.cli", "dag", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    return proc.returncode, proc.stdout, proc.stderr


def chain(n: int, *, reverse: bool) -> dag.Workflow:
    """``t0 -> t1 -> ... -> t{n-1}``; with ``reverse`` the last task is listed first."""
    tasks = [
        dag.Task(f"t{i}", executor="step", depends_on=[f"t{i - 1}"] if i else []) for i in range(n)
    ]
    return dag.Workflow("chain", "1", tasks=reversed(tasks) if reverse else tasks)


# ------------------------------------------------------------- graph walks


def test_cli_validates_a_reversed_1000_task_chain(tmp_path: Path) -> None:
    path = tmp_path / "chain.json"
    dag.dump(chain(1000, reverse=True), path)
    code, out, err = tideflow_dag("validate", str(path))
    assert code == 0, err
    assert "valid: DAG 'chain' v1, 1000 tasks, 999 edges" in out
    code, out, err = tideflow_dag("graph", str(path))
    assert code == 0, err
    assert "stage 999:\n  t999 [step] <- t998" in out


def test_100000_task_chain_validates_and_orders() -> None:
    wf = chain(100_000, reverse=True)
    # The last task uses the first one's result: a reference beyond its direct
    # dependency, checked by walking the whole chain once.
    wf.task("t99999").with_parameter("first", "${tasks.t0.result}")
    wf.validate()
    order = wf.topological_order()
    assert order[0] == "t0" and order[-1] == "t99999" and len(order) == 100_000
    graph = dag.render_graph(wf)
    assert "stage 99999:" in graph


def test_100000_task_cycle_is_reported_with_its_path() -> None:
    wf = chain(100_000, reverse=False)
    wf.task("t0").depends_on("t99999")
    with pytest.raises(dag.DagValidationError) as caught:
        wf.validate()
    cycle = [issue.message for issue in caught.value.issues if "cycle" in issue.message]
    assert len(cycle) == 1
    assert cycle[0].startswith("task 't0': cycle: t0 -> t1 -> t2 -> ")
    assert cycle[0].endswith(" -> t99999 -> t0")


def test_reference_to_a_task_that_is_not_upstream_is_still_refused() -> None:
    wf = chain(1000, reverse=True)
    wf.add_task(dag.Task("side", executor="step"))
    wf.task("t500").with_parameter("x", "${tasks.t700.result}")
    wf.task("t10").with_parameter("y", "${tasks.side.result}")
    with pytest.raises(dag.DagValidationError) as caught:
        wf.validate()
    messages = [issue.message for issue in caught.value.issues]
    # In task order, as before: t500 is listed before t10 in the reversed chain.
    assert messages == [
        "task 't500' parameters: ${tasks.t700.result} refers to task 't700', which is not "
        "one of its (transitive) dependencies",
        "task 't10' parameters: ${tasks.side.result} refers to task 'side', which is not "
        "one of its (transitive) dependencies",
    ]


def test_compensation_readiness_follows_reverse_dependency_order() -> None:
    # a -> b -> c and a -> d; only a, c, d compensate. a's compensation waits for
    # c and d (through b, which has none); c and d are ready at once.
    graph = {"a": [], "b": ["a"], "c": ["b"], "d": ["a"]}
    assert _graph.dependents(graph) == {"a": ["b", "d"], "b": ["c"], "c": [], "d": []}
    assert _graph.reachable(_graph.dependents(graph), "a") == {"b", "c", "d"}
    assert _graph.topological_order(graph) == ["a", "b", "d", "c"]
    assert _graph.topological_order({"x": ["y"], "y": ["x"]}) is None
    assert _graph.find_cycle({"x": ["y"], "y": ["x"]}) == ["x", "y", "x"]


# -------------------------------------------------------------- YAML errors


def test_yaml_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text('id: x\nversion: "1"\ntasks:\n  - id: a\n    executor: e\n   bad: [1\n')
    with pytest.raises(dag.DagValidationError) as caught:
        dag.load(path)
    message = str(caught.value)
    assert "<unicode string>" not in message
    assert f"cannot parse {path}: line 6, column 4:" in message
    code, _, err = tideflow_dag("validate", str(path))
    assert code == 1
    assert f"cannot parse {path}: line 6, column 4:" in err
    assert "<unicode string>" not in err


def test_json_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"id": "x",\n "version": 1,,}')
    with pytest.raises(dag.DagValidationError, match=rf"cannot parse {path}: line 2, column 15"):
        dag.load(path)


# ------------------------------------------------------- no worker running


def _definition(tmp_path: Path) -> Path:
    path = tmp_path / "one.yaml"
    dag.dump(dag.Workflow("one", "1", tasks=[dag.Task("only", executor="step")]), path)
    return path


async def test_status_without_worker_reads_the_history_at_once(
    server: TideflowServer, tmp_path: Path
) -> None:
    queue = f"q-{uuid.uuid4().hex}"
    async with await Client.connect(server.address) as client:
        handle = await dag.start_dag(client, dag.load(_definition(tmp_path)), {}, task_queue=queue)
    code, out, err = await asyncio.to_thread(
        tideflow_dag, "status", handle.id, "--address", server.address
    )
    assert code == 0, err
    assert f"no worker polls task queue {queue!r}" in err
    assert "replayed from the run's history" in err
    assert f"run {handle.id}" in out.splitlines()[0]
    code, out, err = await asyncio.to_thread(
        tideflow_dag, "status", handle.id, "--address", server.address, "--json"
    )
    assert code == 0, err
    # The replay runs the interpreter up to where a worker would be: the first
    # attempt is scheduled, and nothing has run it.
    state = json.loads(out)["task_states"]["only"]
    assert state["status"] == "SCHEDULED" and state["attempts"] == 1


async def test_run_wait_without_worker_says_nothing_polls(
    server: TideflowServer, tmp_path: Path
) -> None:
    queue = f"q-{uuid.uuid4().hex}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tideflow.cli",
        "dag",
        "run",
        str(_definition(tmp_path)),
        "--wait",
        "--address",
        server.address,
        "--task-queue",
        queue,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), CLI_TIMEOUT_S)
        assert f"note: no worker polls task queue {queue!r}" in line.decode()
        # Still waiting for the run (a worker may come); the user stops it.
        assert proc.returncode is None
    finally:
        proc.kill()
        await proc.wait()


# ------------------------------------------------------- DescribeTaskQueue


@activity.defn(name="step")
async def step(parameters: dict[str, object]) -> str:
    return "done"


async def until_polling(
    client: Client, queue: str, polling: bool, *, activity: bool = False
) -> TaskQueueDescription:
    """DescribeTaskQueue once a poll of the queue's one worker is (or is no longer)
    parked on the server; 30 s at most."""
    for _ in range(1500):
        described = await describe_task_queue(client, queue, activity=activity)
        if described.pollers and described.pollers[0].polling is polling:
            return described
        await asyncio.sleep(0.02)
    raise AssertionError(f"no poller of {queue} with polling={polling}")


async def test_describe_task_queue_lists_recent_pollers(server: TideflowServer) -> None:
    queue = f"q-{uuid.uuid4().hex}"
    async with await Client.connect(server.address) as client:
        empty = await describe_task_queue(client, queue)
        assert empty.pollers == [] and empty.backlog_count_hint == 0
        async with Worker(
            client, task_queue=queue, workflows=[dag.DagWorkflow], activities=[step]
        ) as worker:
            for side in (False, True):
                described = await until_polling(client, queue, True, activity=side)
                assert [p.identity for p in described.pollers] == [worker.identity]
                assert described.pollers[0].last_access_time.tzinfo is not None
        described = await until_polling(client, queue, False)
        assert [p.identity for p in described.pollers] == [worker.identity]
        # Another queue's pollers are not this queue's.
        other = await describe_task_queue(client, f"other-{queue}")
        assert other.pollers == []


async def test_describe_task_queue_refuses_bad_input(server: TideflowServer) -> None:
    async with await Client.connect(server.address) as client:
        with pytest.raises(InvalidArgumentError):
            await describe_task_queue(client, "")
        request = service_pb2.DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=common_pb2.TaskQueue(name="q"),
            task_queue_type=7,  # type: ignore[arg-type]
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.service.DescribeTaskQueue(request)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "task_queue_type" in (caught.value.details() or "")


async def test_status_after_the_worker_stopped_reads_the_history(
    server: TideflowServer, tmp_path: Path
) -> None:
    queue = f"q-{uuid.uuid4().hex}"
    async with await Client.connect(server.address) as client:
        async with Worker(client, task_queue=queue, workflows=[dag.DagWorkflow], activities=[step]):
            handle = await dag.start_dag(
                client, dag.load(_definition(tmp_path)), {}, task_queue=queue
            )
            assert await handle.result() == {"only": "done"}
        # The server still lists the stopped worker (for five minutes), but once its
        # last poll is gone no query waits for it.
        await until_polling(client, queue, False)
        described = await describe_task_queue(client, queue)
        assert len(described.pollers) == 1 and not described.pollers[0].polling
    code, out, err = await asyncio.to_thread(
        tideflow_dag, "status", handle.id, "--address", server.address
    )
    assert code == 0, err
    assert f"no worker polls task queue {queue!r}" in err
    assert "status COMPLETED" in out.splitlines()[0]


# ------------------------------------------------------ documented commands

ROOT = Path(__file__).resolve().parent.parent


async def test_the_commands_in_the_etl_yaml_comment_work(
    server: TideflowServer, tmp_path: Path
) -> None:
    """The comment at the top of examples/etl/etl.yaml, run as shown (against the
    test's server instead of one on port 7233), from a scratch directory that links
    to the examples like the repository root."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    commands: list[str] = []
    for line in (ROOT / "examples" / "etl" / "etl.yaml").read_text().splitlines():
        if line.startswith("#   "):  # the indented command lines of the comment
            text = line[1:].strip()
            if commands and commands[-1].endswith("\\"):
                commands[-1] = commands[-1][:-1] + text
            else:
                commands.append(text)
    assert [c.split()[:2] for c in commands] == [
        ["tideflow", "server"],
        ["python", "examples/etl/executors.py"],
        ["tideflow", "dag"],
    ]

    def shell(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )

    seeded = await asyncio.to_thread(shell, *shlex.split(commands[1])[1:])
    assert seeded.returncode == 0, seeded.stderr
    run = shlex.split(commands[2])[1:]
    ran = await asyncio.to_thread(shell, "-m", "tideflow.cli", *run, "--address", server.address)
    assert ran.returncode == 0, ran.stderr
    assert '"rows_loaded": 6' in ran.stdout
    with sqlite3.connect(tmp_path / "dst.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM events_processed").fetchone() == (6,)


async def test_a_missing_source_database_fails_at_once_with_the_fix(
    server: TideflowServer, tmp_path: Path
) -> None:
    code, out, _ = await asyncio.to_thread(
        tideflow_dag,
        "run",
        str(ROOT / "examples" / "etl" / "etl.yaml"),
        "--executors",
        str(ROOT / "examples" / "etl" / "executors.py"),
        "--input",
        json.dumps(
            {"source_db": str(tmp_path / "nope.db"), "target_db": "x.db", "target_table": "t"}
        ),
        "--address",
        server.address,
    )
    assert code == 1
    assert "extract-data             FAILED    attempt 1/3  FileNotFoundError: source" in out
    assert "attempt 2/3" not in out  # not retried: retrying cannot create the file
    assert "python examples/etl/executors.py seed" in out
