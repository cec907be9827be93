"""Trace validation of eager activity execution: TLC decides whether real runs are
behaviours of tla/EngineCore.tla (how: helpers_tla.py), whose ``ScheduleActivity``
starts an activity in the completing transaction when the worker asked and fewer than
``MaxEager`` (the code's ``_MAX_EAGER_ACTIVITIES``) were started by it. Scenarios of
helpers_eager.py: five eager requests in one completion (three started, two
dispatched), a failed eager attempt retried through matching, an eager activity and a
second one scheduled when the worker had no free slot, a signal arriving during a
workflow task whose completion then takes the next one (``return_new_workflow_task``,
``CompleteWorkflowTaskWith(.., returnNew)``), and a worker SIGKILLed with
an eager activity in hand (start-to-close timeout, attempt 2 on another worker).
Eager workflow start (helpers_eager_start.py, ``StartRunEagerly``): a run whose first
workflow task started in the start's commit, and a starter SIGKILLed holding the task
(it times out and is retried through matching). (A declined eager start is a plain
start, whose traces the other suites validate.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from helpers import Processes, eventually, new_id
from helpers_eager import (
    RELEASE,
    STARTED,
    WAIT_S,
    AwaitsSignal,
    EagerRetry,
    HeldThenQuick,
    HoldsFirstWorkflowTask,
    completed_activities,
    eager_request_for_another_queue,
    fails_first_attempt,
    five_eager_requests,
    held,
    kill_worker_with_eager_activity,
    new_key,
    quick,
    signal_during_first_task,
)
from helpers_eager_start import eager_run, kill_eager_starter
from helpers_tla import assert_accepted, trace_of, validate

from tideflow.server import TideflowServer
from tideflow.worker_sdk import Client, Worker

pytestmark = [pytest.mark.tla, pytest.mark.slow, pytest.mark.usefixtures("trace_dir")]


async def _worker_runs(client: Client) -> list[str]:
    """The retried eager attempt, the no-free-slot run and a signal arriving during a
    workflow task (the completion takes the next one); their workflow ids."""
    queue, key = new_id("tla-eager"), new_key()
    async with Worker(
        client,
        task_queue=queue,
        workflows=[EagerRetry, HeldThenQuick, AwaitsSignal],
        activities=[fails_first_attempt, held, quick],
        max_concurrent_activities=2,
        activity_pollers=1,
        interceptors=[HoldsFirstWorkflowTask(key)],
    ):
        signalled = await signal_during_first_task(client, queue, key)
        key = new_key()
        retried = await client.start_workflow(
            EagerRetry.run, key, id=new_id("tla-eager-retry"), task_queue=queue
        )
        async with asyncio.timeout(WAIT_S):
            await retried.result()
            slots = await client.start_workflow(
                HeldThenQuick.run, key, id=new_id("tla-eager-slots"), task_queue=queue
            )
            await STARTED[key].wait()
            await slots.signal(HeldThenQuick.proceed)
            await eventually(lambda: completed_activities(slots, 1), "quick to complete")
            RELEASE[key].set()
            await slots.result()
    return [signalled.id, retried.id, slots.id]


def _assert_engine_behaviours(jar: Path, tmp_path: Path, trace_dir: Path, ids: list[str]) -> None:
    """TLC accepts the trace of each of the runs ``ids`` (workflow ids)."""
    traces = [trace_of(trace_dir, workflow_id) for workflow_id in ids]
    verdicts = validate(jar, tmp_path, [(trace, None) for trace in traces])
    for verdict, trace in zip(verdicts, traces, strict=True):
        assert_accepted(verdict, trace)


async def test_eager_activity_traces_are_engine_behaviours(
    jar: Path,
    trace_dir: Path,
    tmp_path: Path,
    server: TideflowServer,
    client: Client,
    procs: Processes,
) -> None:
    ids = [(await five_eager_requests(client)).workflow_id]
    ids.append((await eager_request_for_another_queue(client)).workflow_id)
    ids += await _worker_runs(client)
    killed = await kill_worker_with_eager_activity(tmp_path, server.address, client, procs)
    ids.append(killed.handle.id)
    _assert_engine_behaviours(jar, tmp_path, trace_dir, ids)


async def test_eager_start_traces_are_engine_behaviours(
    jar: Path,
    trace_dir: Path,
    tmp_path: Path,
    server: TideflowServer,
    client: Client,
    procs: Processes,
) -> None:
    ids = [(await eager_run(client, new_id("tla-eager-start"))).id]
    ids.append((await kill_eager_starter(tmp_path, server.address, client, procs)).workflow_id)
    _assert_engine_behaviours(jar, tmp_path, trace_dir, ids)
