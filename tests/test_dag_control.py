"""Steering a running DAG against a real server (port 0, over SQLite and over
PostgreSQL: conftest's ``client``; a fresh uuid task queue per test): pause / resume
while tasks run, both failure policies, saga compensation order, cancellation (also
while paused), and a server SIGKILL mid-DAG that must not re-run completed tasks.
Executors are released by events the test sets, never by clocks.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from helpers import ET, WAIT_S, ServerProcess, eventually, new_id
from helpers_dag import FAST, Clock, dag_worker, history_types, paused_status, workflow_of

from tideflow.worker_sdk import Client, Worker, dag
from tideflow.worker_sdk.dag import (
    DagFailureError,
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
)


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

    wf = workflow_of(
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
    wf = workflow_of(
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

    wf = workflow_of(
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
    wf = workflow_of(
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


def blocking_step_and_undo() -> tuple[asyncio.Event, list[str], list[Any]]:
    """Executors for the cancellation tests: ``step`` blocks until cancelled (the worker
    shuts down) where its ``block`` parameter says so, after setting the returned event;
    ``undo`` (a compensation) records the task it undoes in the returned list."""
    running = asyncio.Event()
    undone: list[str] = []

    @dag.executor("step")
    async def step(params: dict[str, Any]) -> str:
        if params["block"]:
            running.set()
            await asyncio.Event().wait()
        return "done"

    @dag.executor("undo")
    async def undo(params: dict[str, Any]) -> None:
        undone.append(params["task_id"])

    return running, undone, [step, undo]


async def test_cancel_stops_running_tasks_and_compensates(client: Client) -> None:
    queue = new_id("dag")
    running, undone, executors = blocking_step_and_undo()
    wf = workflow_of(
        Task("a", executor="step", parameters={"block": False}).with_compensation("undo"),
        Task("b", executor="step", parameters={"block": True}, depends_on=["a"]),
        Task("c", executor="step", parameters={"block": False}, depends_on=["b"]),
    )
    async with dag_worker(client, queue, executors):
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


async def test_cancel_while_paused_ends_the_run_and_compensates(client: Client) -> None:
    queue = new_id("dag")
    running, undone, executors = blocking_step_and_undo()
    wf = workflow_of(
        Task("a", executor="step", parameters={"block": False}).with_compensation("undo"),
        Task("b", executor="step", parameters={"block": True}, depends_on=["a"]),
    )
    async with dag_worker(client, queue, executors):
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
