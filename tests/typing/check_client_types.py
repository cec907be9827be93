"""Checked by ``mypy --strict`` (tests/test_client_typing.py), never run.

``assert_type`` pins what mypy infers at the call sites users write; a line ending in
``# type: ignore[code]`` must be an error of that code (strict mode reports an unused
ignore, so a misuse that stops being an error fails the check).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, assert_type

from tideflow.worker_sdk import Client, WorkflowHandle, WorkflowIDReusePolicy, activity, workflow
from tideflow.worker_sdk.client import WorkflowStartOptions


@workflow.defn
class Greeter:
    @workflow.run
    async def run(self, name: str) -> str:
        return f"hello {name}"

    @workflow.signal
    def rename(self, name: str) -> None:
        pass

    @workflow.query
    def greeting(self) -> str:
        return ""

    @workflow.query
    def letter(self, index: int) -> str:
        return ""


@workflow.defn
class Counter:
    @workflow.run
    async def run(self) -> list[int]:
        return []


@workflow.defn
class Adder:
    @workflow.run
    async def run(self, a: int, b: int) -> float:
        return a + b


@activity.defn
async def fetch(url: str) -> bytes:
    return b""


@activity.defn
def count_rows() -> int:
    return 0


@activity.defn
async def add(a: int, b: int) -> int:
    return a + b


@workflow.defn
class Crawler:
    @workflow.run
    async def run(self, url: str) -> int:
        timeout = timedelta(seconds=10)
        page = await workflow.execute_activity(fetch, url, start_to_close_timeout=timeout)
        assert_type(page, bytes)
        rows = await workflow.execute_activity(count_rows, start_to_close_timeout=timeout)
        assert_type(rows, int)
        total = await workflow.execute_activity(add, args=[1, 2], start_to_close_timeout=timeout)
        assert_type(total, int)
        assert_type(await workflow.execute_activity("fetch", url, result_type=bytes), Any)
        await workflow.execute_activity(fetch, 42, start_to_close_timeout=timeout)  # type: ignore[arg-type]
        await workflow.execute_activity(fetch, url, start_to_close_timeout=10)  # type: ignore[call-overload]
        # Local activities are typed the same way.
        local = await workflow.execute_local_activity(fetch, url, start_to_close_timeout=timeout)
        assert_type(local, bytes)
        summed = await workflow.execute_local_activity(
            add, args=[1, 2], schedule_to_close_timeout=timeout
        )
        assert_type(summed, int)
        assert_type(await workflow.execute_local_activity("fetch", url), Any)
        await workflow.execute_local_activity(fetch, 42, start_to_close_timeout=timeout)  # type: ignore[arg-type]
        await workflow.execute_local_activity(fetch, url, task_queue="q")  # type: ignore[call-overload]
        return rows


async def inferred(client: Client) -> None:
    # The result type is the run method's return type.
    assert_type(await client.execute_workflow(Greeter.run, "x", id="g", task_queue="q"), str)
    assert_type(await client.execute_workflow(Counter.run, id="c", task_queue="q"), list[int])
    assert_type(
        await client.execute_workflow(Adder.run, args=[1, 2], id="a", task_queue="q"), float
    )
    handle = await client.start_workflow(Greeter.run, "x", id="g", task_queue="q")
    assert_type(handle, WorkflowHandle[str])
    assert_type(await handle.result(), str)
    # By type name or class the result is unknown.
    assert_type(await client.execute_workflow("Greeter", "x", id="g", task_queue="q"), Any)
    assert_type(await client.start_workflow(Greeter, "x", id="g", task_queue="q"), WorkflowHandle)
    # Queries are typed by their method.
    assert_type(await handle.query(Greeter.greeting), str)
    assert_type(await handle.query(Greeter.letter, 1), str)
    assert_type(await handle.query("greeting"), Any)
    # Handles to existing runs.
    assert_type(client.get_workflow_handle("g"), WorkflowHandle[Any])
    assert_type(client.get_workflow_handle("g", result_type=int), WorkflowHandle[int])
    assert_type(client.get_workflow_handle_for(Greeter.run, "g"), WorkflowHandle[str])


async def one_set_of_start_options(client: Client) -> None:
    # start_workflow and execute_workflow take the same options, signal-with-start too.
    options: WorkflowStartOptions = {
        "id": "g",
        "task_queue": "q",
        "execution_timeout": timedelta(minutes=1),
        "id_reuse_policy": WorkflowIDReusePolicy.REJECT_DUPLICATE,
        "start_signal": Greeter.rename,
        "start_signal_args": ["y"],
    }
    assert_type(await client.start_workflow(Greeter.run, "x", **options), WorkflowHandle[str])
    assert_type(await client.execute_workflow(Greeter.run, "x", **options), str)


async def misuse(client: Client) -> None:
    # An argument of the wrong type.
    await client.execute_workflow(Greeter.run, 42, id="g", task_queue="q")  # type: ignore[misc]
    # A handle's result is not what the run returns.
    handle = await client.start_workflow(Counter.run, id="c", task_queue="q")
    wrong: str = await handle.result()  # type: ignore[assignment]
    # The id and the task queue are required; options are checked by name and type.
    await client.start_workflow(Counter.run, id="c")  # type: ignore[call-overload]
    await client.start_workflow(Counter.run, id="c", task_queue="q", run_timeout=5)  # type: ignore[call-overload]
    await client.execute_workflow(Counter.run, id="c", task_queue="q", colour="red")  # type: ignore[call-overload]
    # A query's argument is checked too.
    await handle.query(Greeter.letter, "first")  # type: ignore[misc]
    print(wrong)
