"""Trace validation: TLC decides whether real runs are behaviours of tla/EngineCore.tla.

Each test runs a real end-to-end scenario against a real server (over SQLite and
over PostgreSQL: conftest's ``server`` / ``store_url``) with ``TIDEFLOW_TRACE_DIR``
set (server/_trace.py writes every transition of each run ahead of its commit, then
the commit's outcome), converts the run's trace with tla/trace_to_tla.py and runs
TLC on tla/TraceEngine.tla. A trace is accepted when TLC reports the invariant
``TraceConsumed`` violated (exit 12): every line was a step of the spec, with the
logged events, rows and state. Scenarios:

- activity retries: an activity failing twice then succeeding, one timing out
  (start-to-close) and retried, and a workflow task failing twice (transient attempts,
  then a backoff timer) before it succeeds; the first activity of a run retried;
- activity timeouts: schedule-to-start, schedule-to-close across retried attempts,
  heartbeat (with the timer re-arming itself);
- workflow and activity cancellation; continue-as-new (with a signal racing the
  continue-as-new task); signal-with-start and the run timeout; child workflows and
  requests to other runs, with the parent-close policy;
- crash recovery: the server process is SIGKILLed while an activity runs and a new
  one on the same database takes over (the trace file survives: it is appended per
  transition, ahead of the commit);
- a DAG a -> {b, c} -> d through the DAG API, checked for TaskDependencyCorrectness;
- signals, a cancelled and a fired timer, a sticky queue given back (the task moves
  to the normal queue), terminate;
- a timer that fires while the workflow task that cancels it runs (raw gRPC, so the
  race is deterministic): the cancel wins and the buffered fire is dropped.

Real traces corrupted on purpose must be rejected (TLC exit 0, the line and reason
printed): a dependency violated, a duplicated activity completion, a flipped retry
decision, a skipped event id, a line lost, a cancelled timer's fire kept, a retry that
drops the schedule-to-close timer, a duplicated cancellation report, a completion
after the close, a run timeout never armed, a child's close recorded against the
wrong event.

Without ``java`` these tests skip, except with ``CI=true``, where they fail. Waiting
polls conditions (no fixed sleeps synchronize anything).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import WAIT_S, ServerProcess, eventually
from raw_workflow import RawWorkflows, complete_workflow, continue_as_new

from tideflow.api.v1.common_pb2 import WorkflowExecutionStatus as WS
from tideflow.api.v1.history_pb2 import EventType
from tideflow.worker_sdk import (
    Client,
    RetryPolicy,
    Worker,
    WorkflowExecutionStatus,
    WorkflowHandle,
    activity,
    dag,
    workflow,
)
from tideflow.worker_sdk.dag import DagWorkflow, Task
from tideflow.worker_sdk.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    InvalidArgumentError,
    TimeoutError,
    TimeoutType,
    WorkflowFailureError,
)
from tideflow.worker_sdk.workflow import ActivityCancellationType

pytestmark = pytest.mark.tla

ROOT = Path(__file__).resolve().parent.parent
ET = EventType


def _load_converter() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trace_to_tla", ROOT / "tla" / "trace_to_tla.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


t2t = _load_converter()


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def jar() -> Path:
    """The TLC jar; needs java (CI=true: a missing java fails, elsewhere it skips)."""
    if shutil.which("java") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("java is not installed: TLC cannot validate traces (CI=true)")
        pytest.skip("java is not installed: TLC cannot validate traces (install a JRE 11+)")
    path: Path = t2t.tla2tools_jar()
    return path


@pytest.fixture(autouse=True)
def trace_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Trace mode on for servers started by this test (in this process or children);
    autouse, so it is on before conftest's ``server`` starts."""
    directory = tmp_path / "traces"
    monkeypatch.setenv("TIDEFLOW_TRACE_DIR", str(directory))
    return directory


# ------------------------------------------------------------------- helpers


def traces_of(directory: Path, workflow_id: str) -> list[Path]:
    """The traces of every run of ``workflow_id`` (one file per run)."""
    return sorted(directory.glob(f"{workflow_id}__*.ndjson"))


def trace_of(directory: Path, workflow_id: str) -> Path:
    found = traces_of(directory, workflow_id)
    assert len(found) == 1, f"traces of {workflow_id!r}: {found}"
    return found[0]


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The transitions of a trace, one per line (written ahead of their commit, with
    the commit's outcome on a line of its own, folded here as the converter does)."""
    lines: list[dict[str, Any]] = t2t.load_trace(path)
    return lines


def write_lines(path: Path, lines: Sequence[Mapping[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def actions(path: Path) -> Counter[str]:
    return Counter(line["action"] for line in read_lines(path))


Job = tuple[Path, Mapping[str, set[str]] | None]


def validate(jar: Path, workdir: Path, jobs: Sequence[Job]) -> list[Any]:
    """Convert each trace and run TLC on it, two JVMs at a time; returns the verdicts."""

    def one(index: int) -> Any:
        trace, deps = jobs[index]
        model = t2t.write_model(trace, workdir / f"model-{index}-{trace.stem[:40]}", deps=deps)
        return t2t.check(model, jar=jar)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(one, range(len(jobs))))


def assert_accepted(verdict: Any, trace: Path, *, one_path: bool = True) -> None:
    lines = len(read_lines(trace))
    assert verdict.status == "accepted", (
        f"{trace.name}: {verdict.status} at line {verdict.line} ({verdict.action}):\n"
        f"{verdict.reason or verdict.output[-4000:]}"
    )
    assert verdict.exit_code == 12 and "TraceConsumed" in verdict.output
    if one_path:
        # One state per line plus the initial one: TLC walked the whole trace.
        assert verdict.states == lines + 1, (verdict.states, lines)


def assert_rejected(verdict: Any, line: int, *reason: str) -> None:
    assert verdict.status == "rejected", f"{verdict.status}: {verdict.output[-3000:]}"
    assert verdict.exit_code == 0 and "TraceConsumed" not in verdict.output
    assert verdict.line == line, (verdict.line, verdict.reason)
    for part in reason:
        assert part in verdict.reason, verdict.reason


def real_accepted_corrupted_rejected(
    jar: Path,
    workdir: Path,
    trace: Path,
    corrupted: Sequence[Mapping[str, Any]],
    name: str,
    line: int,
    *reason: str,
) -> None:
    """The real trace is accepted and the corrupted copy of it (written as ``name``)
    is rejected at ``line`` for ``reason``; both checked in one ``validate`` call."""
    copy = write_lines(workdir / f"{name}.ndjson", corrupted)
    accepted, rejected = validate(jar, workdir, [(trace, None), (copy, None)])
    assert_accepted(accepted, trace)
    assert_rejected(rejected, line, *reason)


def first_index(
    lines: Sequence[Mapping[str, Any]], test: Callable[[Mapping[str, Any]], bool]
) -> int:
    for index, line in enumerate(lines):
        if test(line):
            return index
    raise AssertionError("no such line in the trace")


# ------------------------------------------- (a) activity and workflow task retries

FAST_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=50), maximum_attempts=5)
_wft_failures: Counter[str] = Counter()


class _Gates:
    """Events the activities wait on, made anew by each test (an asyncio.Event must
    not outlive the event loop of the test that used it)."""

    stalled = asyncio.Event()
    running = asyncio.Event()
    release = asyncio.Event()

    @classmethod
    def reset(cls) -> None:
        cls.stalled, cls.running, cls.release = asyncio.Event(), asyncio.Event(), asyncio.Event()


@activity.defn
async def fails_twice(key: str) -> str:
    attempt = activity.info().attempt
    if attempt < 3:
        raise RuntimeError(f"transient failure {attempt}")
    return f"ok on attempt {attempt}"


@activity.defn
async def stalls_on_first_attempt(key: str) -> str:
    attempt = activity.info().attempt
    if attempt == 1:
        activity.heartbeat("alive")  # sent at once (later ones would be throttled)
        # Held past its start-to-close timeout; released (and reported late) at the end.
        await _Gates.stalled.wait()
    return f"ok on attempt {attempt}"


@workflow.defn
class Retries:
    @workflow.run
    async def run(self, key: str) -> list[str]:
        if _wft_failures[key] < 2:
            # A bug in the first two workflow task attempts: the task fails and the
            # server retries it (transient attempt 2 at once, attempt 3 after a backoff).
            _wft_failures[key] += 1
            raise RuntimeError("workflow task bug, fixed by attempt 3")
        results = await asyncio.gather(
            workflow.execute_activity(
                fails_twice, key, start_to_close_timeout=timedelta(seconds=10),
                retry_policy=FAST_RETRY,
            ),
            workflow.execute_activity(
                stalls_on_first_attempt, key, start_to_close_timeout=timedelta(seconds=1),
                retry_policy=FAST_RETRY,
            ),
        )  # fmt: skip
        return list(results)


async def test_activity_and_workflow_task_retries(
    jar: Path, trace_dir: Path, client: Client, tmp_path: Path
) -> None:
    _Gates.reset()
    _wft_failures.clear()
    worker = Worker(
        client,
        task_queue="tla-retries",
        workflows=[Retries],
        activities=[fails_twice, stalls_on_first_attempt],
        graceful_shutdown_timeout=timedelta(seconds=10),
    )
    async with worker:
        handle = await client.start_workflow(
            Retries.run, "retries-1", id="retries-1", task_queue="tla-retries"
        )
        assert await handle.result() == ["ok on attempt 3", "ok on attempt 2"]
        # The stalled attempt 1 now reports, long after it timed out: the engine must
        # refuse it (stale attempt), so it adds nothing to the trace. The graceful
        # shutdown waits for that report.
        _Gates.stalled.set()
    trace = trace_of(trace_dir, "retries-1")
    lines = read_lines(trace)
    seen = actions(trace)
    assert seen["FailWorkflowTask"] == 2 and seen["FireTimer:WORKFLOW_TASK_RETRY"] == 1
    assert seen["RecordHeartbeat"] == 1
    assert [ln["args"]["retry"] for ln in lines if ln["action"] == "FailActivity"] == [True] * 2
    assert seen["FireTimer:ACTIVITY_RETRY"] == 3
    [timeout] = [ln for ln in lines if ln["action"] == "FireTimer:ACTIVITY_START_TO_CLOSE"]
    assert timeout["args"]["retry"] is True and timeout["events"] == []

    # Corruptions of this real trace: the engine's retry decision flipped (it would
    # have recorded the failure), and an event id skipped.
    flipped = [dict(ln) for ln in lines]
    at = first_index(flipped, lambda ln: ln["action"] == "FailActivity")
    flipped[at] = {**flipped[at], "args": {**flipped[at]["args"], "retry": False}}
    skipped = json.loads(json.dumps(lines))
    gap = first_index(skipped, lambda ln: ln["action"] == "CompleteActivity")
    for line in skipped[gap:]:
        for event in line["events"]:
            event["id"] += 1
    verdicts = validate(
        jar,
        tmp_path,
        [
            (trace, None),
            (write_lines(tmp_path / "flipped-retry.ndjson", flipped), None),
            (write_lines(tmp_path / "skipped-id.ndjson", skipped), None),
        ],
    )
    assert_accepted(verdicts[0], trace)
    assert_rejected(verdicts[1], at + 1, "the appended events differ")
    assert_rejected(verdicts[2], gap + 1, "the appended events differ")


@activity.defn
async def fails_once(key: str) -> str:
    attempt = activity.info().attempt
    if attempt == 1:
        raise RuntimeError("transient failure")
    return f"ok on attempt {attempt}"


@workflow.defn
class FirstActivityRetried:
    @workflow.run
    async def run(self, key: str) -> str:
        result: str = await workflow.execute_activity(
            fails_once, key, start_to_close_timeout=timedelta(seconds=10), retry_policy=FAST_RETRY
        )
        return result


async def test_retry_of_the_first_activity_drops_the_failed_attempts_timer(
    jar: Path, trace_dir: Path, client: Client, tmp_path: Path
) -> None:
    async with Worker(
        client, task_queue="tla-first", workflows=[FirstActivityRetried], activities=[fails_once]
    ):
        handle = await client.start_workflow(
            FirstActivityRetried.run, "first", id="first-1", task_queue="tla-first"
        )
        assert await handle.result() == "ok on attempt 2"
    trace = trace_of(trace_dir, "first-1")
    lines = read_lines(trace)
    [failed] = [ln for ln in lines if ln["action"] == "FailActivity"]
    assert failed["args"]["token"]["scheduled"] == 5 and failed["args"]["retry"] is True
    [verdict] = validate(jar, tmp_path, [(trace, None)])
    assert_accepted(verdict, trace)


@activity.defn
async def hangs(key: str) -> str:
    """Every attempt outlives its timeouts; released when the test ends."""
    await _Gates.release.wait()
    return "too late"


@activity.defn
async def heartbeats_once_then_hangs(key: str) -> str:
    attempt = activity.info().attempt
    if attempt == 1:
        activity.heartbeat("alive")  # the first heartbeat is sent at once
        await _Gates.release.wait()
    return f"ok on attempt {attempt}"


def _timeout_of(error: ActivityError) -> str:
    cause = error.cause
    assert isinstance(cause, TimeoutError)
    return TimeoutType(cause.type or 0).name


@workflow.defn
class ActivityTimeouts:
    @workflow.run
    async def run(self, key: str) -> list[str]:
        outcomes: list[str] = []
        try:  # nobody polls this queue: the attempt never starts
            await workflow.execute_activity(
                hangs,
                key,
                task_queue="tla-nobody",
                schedule_to_start_timeout=timedelta(milliseconds=200),
                start_to_close_timeout=timedelta(seconds=10),
            )
        except ActivityError as error:
            outcomes.append(_timeout_of(error))
        try:  # attempts time out and are retried until the overall deadline
            await workflow.execute_activity(
                hangs,
                key,
                start_to_close_timeout=timedelta(milliseconds=150),
                schedule_to_close_timeout=timedelta(milliseconds=700),
                retry_policy=FAST_RETRY,
            )
        except ActivityError as error:
            outcomes.append(_timeout_of(error))
        # the heartbeat timer re-arms once, then the silent attempt 1 times out
        outcomes.append(
            await workflow.execute_activity(
                heartbeats_once_then_hangs,
                key,
                start_to_close_timeout=timedelta(seconds=30),
                heartbeat_timeout=timedelta(seconds=1),
                retry_policy=FAST_RETRY,
            )
        )
        return outcomes  # fmt: skip


async def test_activity_timeouts(
    jar: Path, trace_dir: Path, client: Client, tmp_path: Path
) -> None:
    """Schedule-to-start, schedule-to-close across retried attempts, and heartbeat
    timeouts (with the heartbeat timer re-arming itself) are steps of EngineCore."""
    _Gates.reset()
    async with Worker(
        client,
        task_queue="tla-timeouts",
        workflows=[ActivityTimeouts],
        activities=[hangs, heartbeats_once_then_hangs],
        graceful_shutdown_timeout=timedelta(seconds=10),
    ):
        handle = await client.start_workflow(
            ActivityTimeouts.run, "t", id="timeouts-1", task_queue="tla-timeouts"
        )
        first, second, third = await handle.result()
        _Gates.release.set()
    assert first == "SCHEDULE_TO_START"
    # The attempt in flight at the deadline ends by whichever of its timers fires
    # first (both are due then): the activity times out either way.
    assert second in ("SCHEDULE_TO_CLOSE", "START_TO_CLOSE")
    assert third == "ok on attempt 2"
    trace = trace_of(trace_dir, "timeouts-1")
    lines = read_lines(trace)
    seen = actions(trace)
    assert seen["FireTimer:ACTIVITY_SCHEDULE_TO_START"] == 1
    assert seen["FireTimer:ACTIVITY_START_TO_CLOSE"] >= 2  # retried at least once
    heartbeats = [ln for ln in lines if ln["action"] == "FireTimer:ACTIVITY_HEARTBEAT"]
    assert [bool(ln["args"].get("rearm")) for ln in heartbeats] == [True, False]

    # Corrupted: a retry drops the schedule-to-close timer as well (the deadline spans
    # all attempts, so the engine must keep it), as the '|5|' substring bug could.
    dropped = json.loads(json.dumps(lines))
    at = first_index(
        dropped,
        lambda ln: ln["action"] == "FireTimer:ACTIVITY_START_TO_CLOSE" and ln["args"]["retry"],
    )
    [s2c] = [
        row
        for ln in dropped[:at]
        for row in ln["rows"]["new_timers"]
        if row["kind"] == "ACTIVITY_SCHEDULE_TO_CLOSE"
    ]
    dropped[at]["rows"]["done_timers"].append(s2c)
    real_accepted_corrupted_rejected(
        jar, tmp_path, trace, dropped, "s2c-dropped", at + 1, "the timer rows differ"
    )


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


# ----------------------------------------------------------- (b) crash recovery


@activity.defn
async def held_across_crash(n: int) -> int:
    _Gates.running.set()
    await _Gates.release.wait()
    return n * 10


@activity.defn
async def after_crash(n: int) -> str:
    return f"done-{n}"


@workflow.defn
class SpansCrash:
    @workflow.run
    async def run(self, n: int) -> str:
        held: int = await workflow.execute_activity(
            held_across_crash, n, start_to_close_timeout=timedelta(seconds=60)
        )
        await workflow.sleep(timedelta(milliseconds=100))
        result: str = await workflow.execute_activity(
            after_crash, held + 1, start_to_close_timeout=timedelta(seconds=10)
        )
        return result


async def test_server_crash_mid_run(
    jar: Path, trace_dir: Path, server_process: ServerProcess, tmp_path: Path
) -> None:
    _Gates.reset()
    client = await Client.connect(server_process.address)
    worker = Worker(
        client,
        task_queue="tla-crash",
        workflows=[SpansCrash],
        activities=[held_across_crash, after_crash],
    )
    try:
        worker.start()
        handle = await client.start_workflow(
            SpansCrash.run, 4, id="crash-1", task_queue="tla-crash"
        )
        # The run is quiescent now (its activity is running, nothing else is due), so
        # no commit is in flight when the process dies.
        await asyncio.wait_for(_Gates.running.wait(), WAIT_S)
        trace = trace_of(trace_dir, "crash-1")
        before = len(read_lines(trace))
        await server_process.kill()
        await server_process.start()
        # The attempt started by the first server completes against the second.
        _Gates.release.set()
        async with asyncio.timeout(WAIT_S):
            assert await handle.result() == "done-41"
        await worker.shutdown()
    finally:
        _Gates.release.set()
        await client.close()
        await worker.shutdown()
    lines = read_lines(trace)
    assert [ln["action"] for ln in lines[:before]][-1] == "CompleteWorkflowTask"
    assert lines[before]["action"] == "CompleteActivity", lines[before]
    assert lines[-1]["state"]["status"] == WS.WORKFLOW_EXECUTION_STATUS_COMPLETED

    # A transition lost in the crash (the line of the second server's first commit
    # missing) must be noticed.
    lost = write_lines(tmp_path / "lost-line.ndjson", lines[:before] + lines[before + 1 :])
    verdicts = validate(jar, tmp_path, [(trace, None), (lost, None)])
    assert_accepted(verdicts[0], trace)
    assert_rejected(verdicts[1], before + 1)


# ------------------------------------------------------- (c) DAG a -> {b, c} -> d


@dag.executor("tla-step")
async def tla_step(params: dict[str, Any]) -> dict[str, Any]:
    return {"task": params["name"]}


def _diamond() -> dag.Workflow:
    wf = dag.new_workflow("tla-diamond", "1.0.0")
    a = Task("a", executor="tla-step", parameters={"name": "a"})
    b = Task("b", executor="tla-step", parameters={"name": "b"}, depends_on=[a])
    c = Task("c", executor="tla-step", parameters={"name": "c"}, depends_on=[a])
    d = Task("d", executor="tla-step", parameters={"name": "d"}, depends_on=[b, c])
    for task in (a, b, c, d):
        wf.add_task(task)
    return wf


def _swap_ids(lines: list[dict[str, Any]], one: str, other: str) -> list[dict[str, Any]]:
    """The trace with two activity ids exchanged everywhere (commands, events, state)."""
    text = json.dumps(lines)
    text = text.replace(f'"{one}"', '"<swap>"').replace(f'"{other}"', f'"{one}"')
    swapped: list[dict[str, Any]] = json.loads(text.replace('"<swap>"', f'"{other}"'))
    return swapped


async def test_dag_with_parallel_branches(
    jar: Path, trace_dir: Path, client: Client, tmp_path: Path
) -> None:
    wf = _diamond()
    async with Worker(client, task_queue="tla-dag", workflows=[DagWorkflow], activities=[tla_step]):
        handle = await client.start_dag(wf, {}, id="dag-1", task_queue="tla-dag")
        output = await handle.result()
    assert output == {"d": {"task": "d"}}
    deps = {task.id: set(task.dependencies) for task in wf.tasks}
    assert deps == {"a": set(), "b": {"a"}, "c": {"a"}, "d": {"b", "c"}}
    trace = trace_of(trace_dir, "dag-1")
    lines = read_lines(trace)
    scheduled = [
        sorted(c["id"] for c in ln["args"]["commands"] if c["type"] == "SCHEDULE_ACTIVITY_TASK")
        for ln in lines
        if ln["action"] == "CompleteWorkflowTask"
    ]
    # The branches ran in parallel: b and c were scheduled by one workflow task.
    assert [ids for ids in scheduled if ids] == [["a#1"], ["b#1", "c#1"], ["d#1"]]

    # Corruptions: d scheduled where c was (right after a completed: its dependencies
    # b and c had not), and an activity completion delivered twice.
    violated = _swap_ids(lines, "c#1", "d#1")
    at = first_index(
        violated,
        lambda ln: any(e.get("activity_id") == "d#1" for e in ln["events"]),
    )
    twice = first_index(lines, lambda ln: ln["action"] == "CompleteActivity")
    duplicated = [*lines[: twice + 1], lines[twice], *lines[twice + 1 :]]
    verdicts = validate(
        jar,
        tmp_path,
        [
            (trace, deps),
            (write_lines(tmp_path / "dependency-violated.ndjson", violated), deps),
            (write_lines(tmp_path / "duplicated-completion.ndjson", duplicated), deps),
        ],
    )
    assert_accepted(verdicts[0], trace)
    assert_rejected(verdicts[1], at + 1, "TaskDependencyCorrectness violated", '"d#1"')
    assert_rejected(verdicts[2], twice + 2, "guard for this action does not hold")


# ------------------------------------------- signals, timers, sticky, terminate


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
    jar: Path, trace_dir: Path, client: Client, tmp_path: Path
) -> None:
    """The timer fires while the task that cancels it runs: the engine records the
    cancel and drops the buffered fire, and EngineCore (CancelTimer of FiredUnseen)
    accepts that trace. The same trace with the fire kept next to the cancel (what the
    mutant cancel_keeps_fired does) is rejected."""
    raw = RawWorkflows(client, "tla-raw")
    wid = "cancel-fired-1"

    def fire_buffered() -> bool:
        if not traces_of(trace_dir, wid):
            return False
        last = read_lines(trace_of(trace_dir, wid))[-1]
        return bool(last["action"] == "FireTimer:USER_TIMER" and last["state"]["buffered"] == 1)

    async def fired(run_id: str) -> None:
        await eventually(fire_buffered, "the timer's fire, buffered")

    await raw.cancel_timer_that_fired_during_the_task(wid, fired)
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
