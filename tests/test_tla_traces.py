"""Trace validation of workflow-level scenarios: TLC decides whether real runs are
behaviours of tla/EngineCore.tla (how: helpers_tla.py). Scenarios:

- workflow and activity cancellation; continue-as-new (with a signal racing the
  continue-as-new task); signal-with-start and the run timeout; child workflows and
  requests to other runs, with the parent-close policy;
- signals, a cancelled and a fired timer, a sticky queue given back (the task moves
  to the normal queue), terminate;
- a timer that fires while the workflow task that cancels it runs (raw gRPC, so the
  race is deterministic): the cancel wins and the buffered fire is dropped.

Real traces corrupted on purpose must be rejected (TLC exit 0, the line and reason
printed). (Activity retries and timeouts: test_tla_activity_traces.py; crash
recovery and a DAG: test_tla_crash_and_dag_traces.py.)
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import ET, SteppedClock, eventually, running_server
from helpers_tla import (
    actions,
    assert_accepted,
    assert_rejected,
    first_index,
    hangs,
    read_lines,
    real_accepted_corrupted_rejected,
    t2t,
    trace_of,
    traces_of,
    validate,
    write_lines,
)
from raw_workflow import (
    RACED_TIMER,
    TIMER_RACE_CONFIG,
    RawWorkflows,
    complete_workflow,
    continue_as_new,
)

from tideflow.worker_sdk import (
    Client,
    Worker,
    WorkflowExecutionStatus,
    WorkflowHandle,
    activity,
    workflow,
)
from tideflow.worker_sdk.exceptions import (
    ApplicationError,
    ChildWorkflowError,
    InvalidArgumentError,
    WorkflowFailureError,
)
from tideflow.worker_sdk.workflow import ActivityCancellationType

# Trace mode on before any server of the test starts (conftest: trace_dir).
pytestmark = [pytest.mark.tla, pytest.mark.usefixtures("trace_dir")]


@activity.defn
async def beats_until_cancelled(key: str) -> str:
    """Heartbeats until the server answers a heartbeat with the cancellation, which
    the worker delivers as asyncio.CancelledError (reported as ActivityCanceled)."""
    beats = 0
    while True:
        activity.heartbeat(beats)
        beats += 1
        await asyncio.sleep(0.05)


@workflow.defn
class Cancellable:
    @workflow.run
    async def run(self, key: str) -> str:
        # nobody polls this queue: never started, so cancelled at once
        waiting = workflow.start_activity(
            hangs, key, task_queue="tla-nobody", start_to_close_timeout=timedelta(seconds=60)
        )
        try:
            # running: learns of the cancellation from a heartbeat, and the workflow
            # waits for the worker to confirm it
            await workflow.execute_activity(
                beats_until_cancelled,
                key,
                start_to_close_timeout=timedelta(seconds=60),
                heartbeat_timeout=timedelta(seconds=10),
                cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            )
        except asyncio.CancelledError:
            waiting.cancel()
            raise
        return "not cancelled"


async def test_workflow_and_activity_cancellation(
    jar: Path, trace_dir: Path, client: Client, tmp_path: Path
) -> None:
    """RequestCancel, the RequestCancelActivity commands (an activity not started is
    cancelled at once, a running one through its heartbeat, then ActivityCanceled)
    and CancelWorkflow are steps of EngineCore. A duplicated ActivityCanceled report is
    rejected."""
    async with Worker(
        client,
        task_queue="tla-cancel",
        workflows=[Cancellable],
        activities=[beats_until_cancelled],
    ):
        handle = await client.start_workflow(
            Cancellable.run, "c", id="cancel-1", task_queue="tla-cancel"
        )

        def heartbeat_recorded() -> bool:
            lines = read_lines(trace_of(trace_dir, "cancel-1"))
            return any(ln["action"] == "RecordHeartbeat" for ln in lines)

        await eventually(heartbeat_recorded, "a heartbeat of the running activity")
        await handle.cancel()
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    trace = trace_of(trace_dir, "cancel-1")
    lines = read_lines(trace)
    seen = actions(trace)
    assert seen["RequestCancel"] == 1 and seen["ActivityCanceled"] == 1, seen
    kinds = Counter(e["type"] for ln in lines for e in ln["events"])
    assert kinds["ACTIVITY_TASK_CANCEL_REQUESTED"] == 2 and kinds["ACTIVITY_TASK_CANCELED"] == 2
    assert lines[-1]["events"][-1]["type"] == "WORKFLOW_EXECUTION_CANCELED"

    duplicated = json.loads(json.dumps(lines))
    at = first_index(duplicated, lambda ln: ln["action"] == "ActivityCanceled")
    duplicated.insert(at + 1, duplicated[at])
    real_accepted_corrupted_rejected(
        jar, tmp_path, trace, duplicated, "canceled-twice", at + 2, "guard"
    )


@activity.defn
async def add_one(n: int) -> int:
    return n + 1


@workflow.defn
class Chain:
    @workflow.run
    async def run(self, n: int, left: int) -> int:
        n = await workflow.execute_activity(
            add_one, n, start_to_close_timeout=timedelta(seconds=10)
        )
        if left > 0:
            workflow.continue_as_new(args=[n, left - 1])
        return n


async def test_continue_as_new(jar: Path, trace_dir: Path, client: Client, tmp_path: Path) -> None:
    """Each run of a continue-as-new chain is a behaviour of EngineCore (the old run
    closes CONTINUED_AS_NEW, its successor starts like any run); a signal that arrives
    while the continue-as-new task runs makes the engine refuse it, as CommandsValid
    does (raw gRPC, so the race is deterministic). A completion written after the run
    closed is rejected."""
    async with Worker(client, task_queue="tla-chain", workflows=[Chain], activities=[add_one]):
        handle = await client.start_workflow(
            Chain.run, args=[0, 2], id="chain-1", task_queue="tla-chain"
        )
        assert await handle.result() == 3
    chain = traces_of(trace_dir, "chain-1")
    closes = Counter(read_lines(t)[-1]["events"][-1]["type"] for t in chain)
    assert closes == {"WORKFLOW_EXECUTION_CONTINUED_AS_NEW": 2, "WORKFLOW_EXECUTION_COMPLETED": 1}

    raw = RawWorkflows(client, "tla-raw-can")
    run_id = await raw.start("can-raw-1")
    first = await raw.poll()
    await raw.signal("can-raw-1", run_id, "late")  # buffered: the task is running
    with pytest.raises(InvalidArgumentError, match="unhandled signal"):
        await raw.complete(first.task_token, continue_as_new("Raw", "tla-raw-can"))
    await raw.complete((await raw.poll()).task_token, continue_as_new("Raw", "tla-raw-can"))
    await raw.complete((await raw.poll()).task_token, complete_workflow())
    raw_runs = traces_of(trace_dir, "can-raw-1")
    assert len(raw_runs) == 2
    refused = [
        ln
        for t in raw_runs
        for ln in read_lines(t)
        if ln["action"] == "CompleteWorkflowTask" and "rejected" in ln["args"]
    ]
    assert [ln["args"]["rejected"]["cause"] for ln in refused] == ["UNHANDLED_COMMAND"]

    closed = next(t for t in chain if "CONTINUED_AS_NEW" in json.dumps(read_lines(t)[-1]))
    lines = read_lines(closed)
    after_close = write_lines(tmp_path / "after-close.ndjson", [*lines, lines[-1]])
    traces = [*chain, *raw_runs]
    verdicts = validate(jar, tmp_path, [(t, None) for t in [*traces, after_close]])
    for verdict, trace in zip(verdicts, traces, strict=False):
        assert_accepted(verdict, trace)
    assert_rejected(verdicts[-1], len(lines) + 1, "guard")


async def test_signal_with_start_and_run_timeout(
    jar: Path, trace_dir: Path, client: Client, tmp_path: Path
) -> None:
    """A run started by signal-with-start (the signal is its second event) whose run
    timeout closes it TIMED_OUT: both are EngineCore steps. Without the run timeout's
    timer row at the start, its firing is rejected. (Waiter is defined below.)"""
    async with Worker(client, task_queue="tla-sws", workflows=[Waiter]):
        handle = await client.start_workflow(
            Waiter.run,
            id="sws-1",
            task_queue="tla-sws",
            start_signal=Waiter.poke,
            run_timeout=timedelta(milliseconds=500),
        )
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        assert (await handle.describe()).status == WorkflowExecutionStatus.TIMED_OUT
    trace = trace_of(trace_dir, "sws-1")
    lines = read_lines(trace)
    assert [e["type"] for e in lines[0]["events"]] == [
        "WORKFLOW_EXECUTION_STARTED",
        "WORKFLOW_EXECUTION_SIGNALED",
        "WORKFLOW_TASK_SCHEDULED",
    ]
    assert lines[-1]["action"] == "FireTimer:WORKFLOW_RUN_TIMEOUT"
    assert lines[-1]["events"][-1]["type"] == "WORKFLOW_EXECUTION_TIMED_OUT"

    unarmed = json.loads(json.dumps(lines))
    unarmed[0]["rows"]["new_timers"] = []
    real_accepted_corrupted_rejected(
        jar, tmp_path, trace, unarmed, "run-timeout-unarmed", len(lines), "guard"
    )


@workflow.defn
class Kid:
    def __init__(self) -> None:
        self.letters: list[str] = []

    @workflow.signal
    def post(self, letter: str) -> None:
        self.letters.append(letter)

    @workflow.run
    async def run(self, wait: bool) -> list[str]:
        if wait:
            await workflow.wait_condition(lambda: bool(self.letters))
        return self.letters


@workflow.defn
class Family:
    @workflow.run
    async def run(self, key: str) -> list[str]:
        out = [repr(await workflow.execute_child_workflow(Kid.run, False, id=f"{key}-quick"))]
        waits = await workflow.start_child_workflow(Kid.run, True, id=f"{key}-waits")
        try:  # the same workflow id again: the start fails
            await workflow.start_child_workflow(Kid.run, True, id=f"{key}-waits")
        except ChildWorkflowError:
            out.append("already started")
        await workflow.get_external_workflow_handle(f"{key}-waits").signal(Kid.post, "hi")
        out.append(repr(await waits))
        nowhere = workflow.get_external_workflow_handle(f"{key}-missing")
        for request in (nowhere.signal(Kid.post, "lost"), nowhere.cancel()):
            try:
                await request
            except ApplicationError as error:
                out.append(str(error.type))
        # left running: the parent's close terminates it (parent-close policy)
        await workflow.start_child_workflow(Kid.run, True, id=f"{key}-orphan")
        return out


async def test_child_workflows_and_external_requests(
    jar: Path, trace_dir: Path, client: Client, tmp_path: Path
) -> None:
    """Every run of a family is a behaviour of EngineCore: the parent's child starts
    (one failing: the id is taken), child closes reported back, a signal to another
    run and a signal and a cancel to a missing one, and the parent-close policy that
    terminates the child still running; the children's own traces too. A child's
    close recorded against the wrong initiated event is rejected."""
    async with Worker(client, task_queue="tla-family", workflows=[Family, Kid]):
        parent = await client.start_workflow(Family.run, "fam", id="fam", task_queue="tla-family")
        assert await parent.result() == [
            "[]",
            "already started",
            "['hi']",
            "ExternalWorkflowExecutionNotFound",
            "ExternalWorkflowExecutionNotFound",
        ]
        orphan = client.get_workflow_handle("fam-orphan")

        async def terminated() -> bool:
            status = (await orphan.describe()).status
            return bool(status == WorkflowExecutionStatus.TERMINATED)

        await eventually(terminated, "the orphan terminated by the parent-close policy")
        [trace] = traces_of(trace_dir, "fam")
        # ... whose close still reaches the (closed) parent, which records nothing
        await eventually(
            lambda: actions(trace)["RecordChildClosed"] == 3, "the orphan's close reported"
        )
    lines = read_lines(trace)
    seen = actions(trace)
    assert seen["RecordChildStarted"] == 4
    assert seen["RecordExternalOutcome"] == 3
    kids = [t for k in ("quick", "waits", "orphan") for t in traces_of(trace_dir, f"fam-{k}")]
    assert len(kids) == 3

    # Corrupted: the first child's close applied to an event that initiated no child
    # (a second report of a close, by contrast, is legal: the engine records nothing).
    misrouted = json.loads(json.dumps(lines))
    at = first_index(misrouted, lambda ln: ln["action"] == "RecordChildClosed")
    misrouted[at]["args"]["initiated"] = 999
    corrupted = write_lines(tmp_path / "child-closed-misrouted.ndjson", misrouted)
    verdicts = validate(jar, tmp_path, [(t, None) for t in [trace, *kids, corrupted]])
    for verdict, accepted in zip(verdicts, [trace, *kids], strict=False):
        assert_accepted(verdict, accepted)
    assert_rejected(verdicts[-1], at + 1)


@workflow.defn
class Waiter:
    def __init__(self) -> None:
        self.signals = 0

    @workflow.signal
    def poke(self) -> None:
        self.signals += 1

    @workflow.run
    async def run(self) -> None:
        # A durable timer that the first signal cancels, one that fires, a wait for a
        # second signal, then a wait that only terminate ends.
        await workflow.wait_condition(lambda: self.signals >= 1, timeout=timedelta(seconds=60))
        await workflow.sleep(timedelta(milliseconds=100))
        await workflow.wait_condition(lambda: self.signals >= 2)
        await workflow.wait_condition(lambda: False)


async def test_signals_timers_sticky_queues_and_terminate(
    jar: Path, trace_dir: Path, client: Client, tmp_path: Path
) -> None:
    queue = "tla-waiter"
    first = await client.start_workflow(Waiter.run, id="waiter-1", task_queue=queue)

    async def completed_tasks(handle: WorkflowHandle, count: int) -> bool:
        events = (await handle.fetch_history()).events
        done = [e for e in events if e.event_type == ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED]
        return len(done) >= count

    async with Worker(client, task_queue=queue, workflows=[Waiter]):
        # The first task completes with this worker's sticky queue.
        await eventually(lambda: completed_tasks(first, 1), "the first workflow task")
    # The worker gave its sticky queue back on shutdown: the task the signal schedules
    # there is moved to the normal queue (Unstick), where the next worker finds it.
    await first.signal(Waiter.poke)
    async with Worker(client, task_queue=queue, workflows=[Waiter], max_cached_workflows=1):
        await eventually(lambda: completed_tasks(first, 3), "the task after the timer")
        # A second run takes the worker's only cache slot: the next sticky task of the
        # first run reaches a worker that no longer has it, which fails it with
        # RESET_STICKY_TASK_QUEUE; the server reschedules it on the normal queue.
        second = await client.start_workflow(Waiter.run, id="waiter-2", task_queue=queue)
        await eventually(lambda: completed_tasks(second, 1), "the second run's first task")
        await first.signal(Waiter.poke)
        await eventually(lambda: completed_tasks(first, 4), "the task of the second signal")
        for handle in (first, second):
            await handle.terminate("end of test")
            assert (await handle.describe()).status == WorkflowExecutionStatus.TERMINATED
    traces = [trace_of(trace_dir, "waiter-1"), trace_of(trace_dir, "waiter-2")]
    lines = read_lines(traces[0])
    names = [ln["action"] for ln in lines]
    assert names[names.index("Signal") + 1] == "Unstick"
    seen = Counter(names)
    assert seen["Signal"] == 2 and seen["Unstick"] == 1
    assert seen["FireTimer:USER_TIMER"] == 1 and seen["Terminate"] == 1
    causes = [ln["args"]["cause"] for ln in lines if ln["action"] == "FailWorkflowTask"]
    assert causes == ["RESET_STICKY_TASK_QUEUE"]
    kinds = Counter(e["type"] for ln in lines for e in ln["events"])
    assert kinds["TIMER_STARTED"] == 2 and kinds["TIMER_CANCELED"] == 1

    # A commit whose caller was cancelled mid-commit is logged with outcome "unknown"
    # (server/_engine.py _update): the spec must accept it whether it happened or not.
    # Here a start of a workflow task that did not commit (the poller went away; the
    # task was given back and started by the next poll), and a completion that did.
    at = names.index("RecordWorkflowTaskStarted", names.index("Unstick"))
    unsure = json.loads(json.dumps(lines))
    unsure.insert(at, {**lines[at], "outcome": "unknown"})
    unsure[at + 2]["outcome"] = "unknown"
    assert unsure[at + 2]["action"] == "CompleteWorkflowTask"
    unknown = write_lines(tmp_path / "unknown-outcomes.ndjson", unsure)
    verdicts = validate(jar, tmp_path, [(t, None) for t in [*traces, unknown]])
    for verdict, trace in zip(verdicts, traces, strict=False):
        assert_accepted(verdict, trace)
    assert_accepted(verdicts[2], unknown, one_path=False)

    # What EngineCore does not model is refused with the line and the reason, never
    # skipped: an action it does not know, a signal without a request id (the model
    # keys signals by it), a command it does not know.
    last = len(lines) - 1
    signal = names.index("Signal")
    no_rid = {**lines[signal], "args": {**lines[signal]["args"], "request_id": ""}}
    for at, line, message in [
        (last, {**lines[last], "action": "Teleport"}, "unknown action 'Teleport'"),
        (signal, no_rid, "Signal without a request id is not modelled"),
    ]:
        refused = write_lines(tmp_path / "refused.ndjson", [*lines[:at], line, *lines[at + 1 :]])
        with pytest.raises(t2t.TraceError, match=f"line {at + 1}: {message}"):
            t2t.write_model(refused, tmp_path / "refused")
    completion = names.index("CompleteWorkflowTask")
    unknown_command = json.loads(json.dumps(lines))
    unknown_command[completion]["args"]["commands"].append({"type": "MODIFY_WORKFLOW_PROPERTIES"})
    refused = write_lines(tmp_path / "refused.ndjson", unknown_command)
    with pytest.raises(t2t.TraceError, match="MODIFY_WORKFLOW_PROPERTIES is not modelled"):
        t2t.write_model(refused, tmp_path / "refused")


async def test_cancel_of_a_timer_that_fired_during_the_task(
    jar: Path, trace_dir: Path, store_url: str, tmp_path: Path
) -> None:
    """The timer fires while the task that cancels it runs: the engine records the
    cancel and drops the buffered fire, and EngineCore (CancelTimer of FiredUnseen)
    accepts that trace. The same trace with the fire kept next to the cancel (what the
    mutant cancel_keeps_fired does) is rejected. The server's clock is the test's: the
    timer fires when the test advances it, once the task is started."""
    wid = "cancel-fired-1"

    def fire_buffered() -> bool:
        if not traces_of(trace_dir, wid):
            return False
        last = read_lines(trace_of(trace_dir, wid))[-1]
        return bool(last["action"] == "FireTimer:USER_TIMER" and last["state"]["buffered"] == 1)

    async def fire_the_timer(run_id: str) -> None:
        clock.advance(RACED_TIMER)
        await eventually(fire_buffered, "the timer's fire, buffered")

    clock = SteppedClock()
    async with (
        running_server(store_url, TIMER_RACE_CONFIG, clock=clock) as server,
        await Client.connect(server.address) as client,
    ):
        await RawWorkflows(client, "tla-raw").cancel_timer_that_fired_during_the_task(
            wid, fire_the_timer
        )
    trace = trace_of(trace_dir, wid)
    lines = read_lines(trace)
    at = first_index(
        lines,
        lambda ln: (
            ln["action"] == "CompleteWorkflowTask"
            and [c["type"] for c in ln["args"]["commands"]]
            == ["CANCEL_TIMER", "COMPLETE_WORKFLOW_EXECUTION"]
        ),
    )
    assert [e["type"] for e in lines[at]["events"]] == [
        "WORKFLOW_TASK_COMPLETED",
        "TIMER_CANCELED",
        "WORKFLOW_EXECUTION_COMPLETED",
    ]
    assert lines[at]["state"]["buffered"] == 0

    # Corrupted: the completion keeps the buffered fire and writes it after the cancel.
    kept = json.loads(json.dumps(lines))
    assert lines[at - 1]["action"] == "FireTimer:USER_TIMER"
    [fire] = lines[at - 1]["state"]["buffered_events"]
    close = kept[at]["events"].pop()
    kept[at]["events"] += [{**fire, "id": close["id"]}, {**close, "id": close["id"] + 1}]
    kept[at]["state"]["next_event_id"] += 1
    real_accepted_corrupted_rejected(jar, tmp_path, trace, kept, "cancel-keeps-fired", at + 1)
