"""Children homed at the other site (server/_remote_children.py), real processes: a
cloud ``start-dev`` on PostgreSQL and an edge on its own SQLite file, the link
through the TCP proxy of tests/helpers_sites.py.

The parent runs at the edge (its worker polls only there); ``home="cloud"`` starts
its child at the cloud (whose worker alone has the child's code). The start crosses
the link once per request id, the child's close comes back through the child's
outbox row, and the parent-close policy and a cancel from the parent reach the child
through the edge's inbox.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ET, Processes, bounded, eventually, of_type
from helpers_sites import (
    SitePair,
    edge_started,
    history_of,
    same_history,
    site_status,
    wait_linked,
)
from helpers_tla import load_tla_module

from tideflow.worker_sdk import Client, Worker, WorkflowExecutionStatus, workflow
from tideflow.worker_sdk.exceptions import ChildWorkflowError, InvalidArgumentError

rt = load_tla_module("replication_trace_to_tla")


@workflow.defn
class Child:
    def __init__(self) -> None:
        self.released = False

    @workflow.run
    async def run(self, value: str, wait: bool) -> str:
        if wait:
            await workflow.wait_condition(lambda: self.released)
        return f"child:{value}:{workflow.info().workflow_id}"

    @workflow.signal
    def release(self) -> None:
        self.released = True


@workflow.defn
class Parent:
    @workflow.run
    async def run(self, value: str) -> str:
        result: str = await workflow.execute_child_workflow(
            Child.run, args=[value, False], id=f"child-{workflow.info().workflow_id}", home="cloud"
        )
        return f"parent:{result}"


@workflow.defn
class StartsTakenId:
    """Starts a child homed at the cloud whose id a running cloud run holds (or
    homed at a site no one knows)."""

    @workflow.run
    async def run(self, child_id: str, home: str) -> str:
        try:
            await workflow.start_child_workflow(Child.run, args=["z", True], id=child_id, home=home)
        except ChildWorkflowError:
            return "taken"
        return "started"


@workflow.defn
class WaitsForChild:
    @workflow.run
    async def run(self) -> str:
        result: str = await workflow.execute_child_workflow(
            Child.run, args=["w", True], id=f"child-{workflow.info().workflow_id}", home="cloud"
        )
        return result


@workflow.defn
class Abandoning:
    """Starts a child it cancels and one it leaves running (policy TERMINATE)."""

    @workflow.run
    async def run(self) -> str:
        me = workflow.info().workflow_id
        cancelled = await workflow.start_child_workflow(
            Child.run, args=["c", True], id=f"cancelled-{me}", home="cloud"
        )
        await workflow.start_child_workflow(
            Child.run, args=["t", True], id=f"terminated-{me}", home="cloud"
        )
        await cancelled.cancel()
        try:
            await cancelled
        except ChildWorkflowError:
            return "cancelled"
        return "not cancelled"


@pytest.fixture
async def sites(procs: Processes, pg_url: str, tmp_path: Path) -> AsyncIterator[SitePair]:
    async with edge_started(procs, pg_url, tmp_path / "edge.db") as pair:
        yield pair


def _workers(cloud: Client, edge: Client, tq: str) -> tuple[Worker, Worker]:
    return (
        Worker(cloud, task_queue=tq, workflows=[Child]),
        # Child too: the edge runs one of its own while the link is down.
        Worker(
            edge, task_queue=tq, workflows=[Parent, StartsTakenId, WaitsForChild, Abandoning, Child]
        ),
    )


async def _status(client: Client, workflow_id: str) -> Any:
    try:
        return (await client.get_workflow_handle(workflow_id).describe()).status
    except Exception:
        return None


async def test_a_child_homed_at_the_cloud_answers_its_edge_parent(sites: SitePair) -> None:
    cloud, edge = await sites.start_linked()
    tq = f"children-{uuid.uuid4()}"
    cloud_worker, edge_worker = _workers(cloud, edge, tq)
    async with cloud_worker, edge_worker:
        parent = await edge.start_workflow(Parent.run, "x", id=f"p-{tq}", task_queue=tq)
        assert await bounded(parent.result()) == f"parent:child:x:child-p-{tq}"
        # A child id a running cloud run holds: START_CHILD_WORKFLOW_EXECUTION_FAILED.
        holder = await cloud.start_workflow(
            Child.run, args=["h", True], id=f"h-{tq}", task_queue=tq
        )
        taken = await edge.execute_workflow(
            StartsTakenId.run, args=[f"h-{tq}", "cloud"], id=f"t-{tq}", task_queue=tq
        )
        assert taken == "taken"
        failed = await history_of(edge, f"t-{tq}", "")
        assert len(of_type(failed, ET.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_FAILED)) == 1
        # A home no site knows (the edge knows the cloud, linked): refused at once,
        # a client's start with INVALID_ARGUMENT, a child's as a failed start.
        with pytest.raises(InvalidArgumentError, match="'nowhere': unknown site"):
            await edge.start_workflow(
                Child.run, args=["n", False], id=f"n-{tq}", task_queue=tq, home="nowhere"
            )
        nowhere = await edge.execute_workflow(
            StartsTakenId.run, args=[f"n-{tq}", "nowhere"], id=f"u-{tq}", task_queue=tq
        )
        assert nowhere == "taken"
        (refused,) = of_type(
            await history_of(edge, f"u-{tq}", ""),
            ET.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_FAILED,
        )
        cause = refused.start_child_workflow_execution_failed_event_attributes.cause
        assert "'nowhere': unknown site" in cause, cause
        await holder.signal(Child.release)
        assert await bounded(holder.result()) == f"child:h:h-{tq}"
    child = await cloud.get_workflow_handle(f"child-p-{tq}").describe()
    assert child.home_cluster == "cloud"
    assert child.status == WorkflowExecutionStatus.COMPLETED
    events = await history_of(edge, parent.id, parent.run_id or "")
    (initiated,) = of_type(events, ET.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED)
    assert initiated.start_child_workflow_execution_initiated_event_attributes.home_cluster == (
        "cloud"
    )
    (started,) = of_type(events, ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED)
    assert started.child_workflow_execution_started_event_attributes.workflow_execution.run_id == (
        child.run_id
    )
    assert len(of_type(events, ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED)) == 1
    child_events = await history_of(cloud, f"child-p-{tq}", child.run_id)
    attrs = child_events[0].workflow_execution_started_event_attributes
    assert attrs.parent_workflow_execution.run_id == parent.run_id


async def test_start_delivered_twice_and_close_while_the_link_is_down(sites: SitePair) -> None:
    """The cloud starts the child, but its answer is lost with the link (held in the
    proxy, then cut); the child completes at the cloud while the link is down and
    both sites are SIGKILLed meanwhile. When the link is back the edge delivers the
    start again (one run at the cloud: the same request id) and the close arrives:
    the parent records started and completed once each."""
    cloud, edge = await sites.start_linked()
    tq = f"children-{uuid.uuid4()}"
    child_id = f"child-p-{tq}"
    cloud_worker, edge_worker = _workers(cloud, edge, tq)
    async with cloud_worker, edge_worker:
        sites.proxy.hold_replies()
        parent = await edge.start_workflow(Parent.run, "y", id=f"p-{tq}", task_queue=tq)
        await eventually(lambda: _status(cloud, child_id), "the child started at the cloud")
        child = cloud.get_workflow_handle(child_id)
        assert await bounded(child.result()) == f"child:y:{child_id}"
        sites.proxy.cut()
        events = await history_of(edge, parent.id, parent.run_id or "")
        assert not of_type(events, ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED)
        # Both outbox rows (the edge's start, the cloud's close) survive a SIGKILL.
        await sites.cloud.kill()
        await sites.cloud.start()
        await sites.edge.kill()
        await sites.edge.start()
        assert await _status(edge, parent.id) == WorkflowExecutionStatus.RUNNING
        # The parent waits; the edge's other runs do not.
        alone = await edge.execute_workflow(
            Child.run, args=["e", False], id=f"e-{tq}", task_queue=tq
        )
        assert alone == f"child:e:e-{tq}"
        sites.proxy.restore()
        await wait_linked(cloud, edge)
        assert await bounded(parent.result()) == f"parent:child:y:{child_id}"
    events = await history_of(edge, parent.id, parent.run_id or "")
    assert len(of_type(events, ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED)) == 1
    assert len(of_type(events, ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED)) == 1
    runs = [r async for r in cloud.list_workflows(f"WorkflowId = '{child_id}'")]
    assert len(runs) == 1


@pytest.mark.tla
@pytest.mark.usefixtures("trace_dir")
async def test_cancel_and_parent_close_reach_a_child_homed_elsewhere(
    sites: SitePair, trace_dir: Path, jar: Path, tmp_path: Path
) -> None:
    """A cancel and the parent-close policy reach children homed at the cloud through
    the edge's inbox; in trace mode, every run's replication log is a behaviour of
    Replication.tla (AddressChild: a child's request stored before the edge holds its
    replica), and a copy whose request names no home, stored before the replica, is
    rejected."""
    cloud, edge = await sites.start_linked()
    tq = f"children-{uuid.uuid4()}"
    cloud_worker, edge_worker = _workers(cloud, edge, tq)
    async with cloud_worker, edge_worker:
        parent = await edge.start_workflow(Abandoning.run, id=f"a-{tq}", task_queue=tq)
        assert await bounded(parent.result()) == "cancelled"
        cancelled, terminated = f"cancelled-a-{tq}", f"terminated-a-{tq}"
        await eventually(
            lambda: _is(cloud, terminated, WorkflowExecutionStatus.TERMINATED),
            "the parent-close policy terminated the child at the cloud",
        )
        for child in (cancelled, terminated):
            run_id = (await cloud.get_workflow_handle(child).describe()).run_id
            await eventually(await same_history(cloud, edge, child, run_id), "the replica")
        await eventually(lambda: _inbox_empty(edge), "the edge's inbox retired")
    assert await _status(cloud, cancelled) == WorkflowExecutionStatus.CANCELED
    handle = cloud.get_workflow_handle(cancelled)
    events = (await handle.fetch_history()).events
    assert len(of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED)) == 1
    events = (await cloud.get_workflow_handle(terminated).fetch_history()).events
    assert len(of_type(events, ET.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED)) == 1
    await _validate_traces(trace_dir, jar, tmp_path, terminated)


async def _inbox_empty(client: Client) -> bool:
    return (await site_status(client)).inbox_depth == 0


async def _validate_traces(trace_dir: Path, jar: Path, tmp_path: Path, child_id: str) -> None:
    """Every run's replication log accepted; the child's terminate, stored by the
    edge naming the cloud, accepted also when moved before the edge held a replica,
    and rejected there without the home it names."""
    runs = rt.by_run(rt.load_lines(trace_dir))
    sites_seen = {"cloud", "edge1"}
    models = [
        rt.write_model(steps, run, tmp_path / f"run-{n}", sites_seen)
        for n, (run, steps) in enumerate(runs.items())
    ]
    [child] = [steps for run, steps in runs.items() if f"/{child_id}/" in run]
    stored = next(s for s in child if s["action"] == "InboxStored" and s.get("kind") == "terminate")
    assert stored["site"] == "edge1" and stored["home"] == "cloud"
    early = [child[0], stored, *(s for s in child[1:] if s is not stored)]
    nameless = {**stored, "home": ""}
    corrupted = [child[0], nameless, *(s for s in child[1:] if s is not stored)]
    for name, steps in (("early", early), ("nameless", corrupted)):
        models.append(rt.write_model(steps, f"{name}/{child_id}", tmp_path / name, sites_seen))
    verdicts = await asyncio.to_thread(rt.check_all, models, jar=jar)
    for model, verdict in zip(models[:-1], verdicts, strict=False):
        assert verdict.status == "accepted", (model.run, verdict.line, verdict.reason)
    assert verdicts[-1].status == "rejected", verdicts[-1].output[-2000:]
    assert verdicts[-1].line == 2, (verdicts[-1].line, verdicts[-1].reason)
    reason = " ".join(verdicts[-1].reason.split())
    assert "a request stored for a run the site has no replica of" in reason, reason


async def test_a_parent_closed_before_hearing_its_child_started_still_ends_it(
    sites: SitePair,
) -> None:
    """The cloud starts a child but its answer is lost with the link; the parent is
    terminated at the edge meanwhile. A second parent initiates its child while the
    link is down (its start never sent) and is terminated too. When the link is
    back, each parent's START_CHILD row sends the start again (no answer, not even
    "not started", is definite: a call still in flight may start the child later),
    records the run it hears of and applies the close policy: both children end
    terminated, one run each, none left running orphaned."""
    cloud, edge = await sites.start_linked()
    tq = f"children-{uuid.uuid4()}"
    child_id, unsent_id = f"child-w-{tq}", f"child-u-{tq}"
    cloud_worker, edge_worker = _workers(cloud, edge, tq)
    async with cloud_worker, edge_worker:
        sites.proxy.hold_replies()
        parent = await edge.start_workflow(WaitsForChild.run, id=f"w-{tq}", task_queue=tq)
        await eventually(lambda: _status(cloud, child_id), "the child started at the cloud")
        sites.proxy.cut()
        unsent = await edge.start_workflow(WaitsForChild.run, id=f"u-{tq}", task_queue=tq)
        await eventually(lambda: _initiated(edge, unsent.id), "the second child initiated")
        await parent.terminate("closed before its child's start was recorded")
        await unsent.terminate("closed before its child's start was sent")
        sites.proxy.restore()
        for child in (child_id, unsent_id):
            await eventually(
                functools.partial(_is, cloud, child, WorkflowExecutionStatus.TERMINATED),
                f"the parent-close policy terminated {child} at the cloud",
            )
    for child, closed in ((child_id, parent), (unsent_id, unsent)):
        runs = [r async for r in cloud.list_workflows(f"WorkflowId = '{child}'")]
        assert len(runs) == 1, child
        events = await history_of(edge, closed.id, closed.run_id or "")
        assert not of_type(events, ET.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED)


async def _initiated(client: Client, workflow_id: str) -> bool:
    events = await history_of(client, workflow_id, "")
    return bool(of_type(events, ET.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED))


async def _is(client: Client, workflow_id: str, status: WorkflowExecutionStatus) -> bool:
    return bool(await _status(client, workflow_id) == status)
