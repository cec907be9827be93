"""Trace validation of cloud/edge replication: TLC decides whether the merged
replication logs of a real cloud and edge are, run by run, behaviours of
tla/Replication.tla (tla/TraceReplication.tla says which parts are checked; the
converter tla/replication_trace_to_tla.py how the sites' lines are merged).

One scenario, a cloud on PostgreSQL and an edge on SQLite linked through a TCP proxy
(tests/helpers_sites.py), trace mode on for both:

- run A starts at the edge and takes a signal there (applied at its home); runs B,
  C and D start at the cloud; all replicate to the other site;
- the link is cut: the edge hands run A to the cloud (its HANDOFF is its last write),
  the cloud stores a signal for A in its inbox (its replica still names the edge),
  the edge a signal for B, two cancels for C and a terminate for D;
- the link is restored: the cloud pulls the HANDOFF, takes A over and applies its own
  inbox's signal, the edge forwards B's signal, C's cancels (one CANCEL_REQUESTED)
  and D's terminate; a last signal for A sent to the edge is forwarded to the cloud;
  every run closes and every inbox empties.

Every run's log must be accepted. Corrupted copies must be rejected for the right
reason: a replica batch that does not continue the replica, a signal applied twice
(SignalsAtMostOnce), a write by the old home after its HANDOFF, and a cancel retired
from the edge's inbox before its replica shows it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import Processes, eventually
from helpers_sites import SitePair, handed, same_history, site_status
from helpers_tla import load_tla_module
from test_sites import Collector, _signal

from tideflow.worker_sdk import Client, Worker, WorkflowExecutionStatus

pytestmark = [pytest.mark.tla, pytest.mark.postgres, pytest.mark.usefixtures("trace_dir")]


rt = load_tla_module("replication_trace_to_tla")


@pytest.fixture
async def sites(procs: Processes, pg_url: str, tmp_path: Path) -> AsyncIterator[SitePair]:
    pair = SitePair(procs, pg_url, tmp_path / "edge.db")
    await pair.start_edge()
    try:
        yield pair
    finally:
        await pair.close()


async def _inbox_empty(client: Client) -> bool:
    return (await site_status(client)).inbox_depth == 0


async def _scenario(sites: SitePair) -> tuple[str, str, str, str]:
    """The scenario of the module docstring; the run ids of A, B, C and D."""
    cloud, edge = await sites.start_linked()
    tq = f"rtrace-{uuid.uuid4()}"
    async with (
        Worker(edge, task_queue=tq, workflows=[Collector]),
        Worker(cloud, task_queue=tq, workflows=[Collector]),
    ):
        a = await edge.start_workflow(Collector.run, 3, id=f"a-{tq}", task_queue=tq)
        b = await cloud.start_workflow(Collector.run, 1, id=f"b-{tq}", task_queue=tq)
        c = await cloud.start_workflow(Collector.run, 9, id=f"c-{tq}", task_queue=tq)
        d = await cloud.start_workflow(Collector.run, 9, id=f"d-{tq}", task_queue=tq)
        a_id, a_run, b_id, b_run = a.id, a.run_id or "", b.id, b.run_id or ""
        assert await _signal(edge, a_id, a_run, "a1", "r-a1") is False  # applied at home
        await eventually(await same_history(edge, cloud, a_id, a_run), "A at the cloud")
        for other in (b, c, d):
            copied = await same_history(cloud, edge, other.id, other.run_id or "")
            await eventually(copied, f"{other.id} at the edge")

        sites.proxy.cut()
        at_edge = edge.get_workflow_handle(a_id, run_id=a_run)
        await eventually(handed(at_edge, "cloud"), "A handed to the cloud")
        assert await _signal(cloud, a_id, a_run, "a2", "r-a2") is True  # cloud's inbox
        assert await _signal(edge, b_id, b_run, "b1", "r-b1") is True  # edge's inbox
        at_edge_c = edge.get_workflow_handle(c.id, run_id=c.run_id)
        await at_edge_c.cancel()  # the edge's inbox, twice (two request ids)
        await at_edge_c.cancel()
        await edge.get_workflow_handle(d.id, run_id=d.run_id).terminate("from the edge")

        sites.proxy.restore()
        at_cloud = cloud.get_workflow_handle(a_id, run_id=a_run)
        assert await cloud.get_workflow_handle(b_id, run_id=b_run).result() == ["b1"]

        async def cloud_home() -> bool:
            return bool((await at_cloud.describe()).home_cluster == "cloud")

        await eventually(cloud_home, "the cloud took A over")
        await _signal(edge, a_id, a_run, "a3", "r-a3")  # forwarded to the new home
        assert sorted(await at_cloud.result()) == ["a1", "a2", "a3"]
        await eventually(await same_history(cloud, edge, a_id, a_run), "A converged")
        for other in (b, c, d):
            converged = await same_history(cloud, edge, other.id, other.run_id or "")
            await eventually(converged, f"{other.id} converged")
        assert (await c.describe()).status == WorkflowExecutionStatus.CANCELED
        assert (await d.describe()).status == WorkflowExecutionStatus.TERMINATED
        await eventually(lambda: _inbox_empty(edge), "the edge's inbox retired")
        await eventually(lambda: _inbox_empty(cloud), "the cloud's inbox retired")
    return a_run, b_run, c.run_id or "", d.run_id or ""


# ------------------------------------------------------------------ corruption

Corruption = tuple[str, list[dict[str, Any]], dict[str, Any], str]


def _corrupt(
    name: str,
    steps: Sequence[Mapping[str, Any]],
    old: Mapping[str, Any],
    new: dict[str, Any],
    reason: str,
) -> Corruption:
    """(name, the run's steps with ``old`` replaced by ``new``, ``new``, the reason
    TLC must give for rejecting it at ``new``)."""
    return name, [new if step is old else dict(step) for step in steps], new, reason


def _signal_step(steps: Sequence[Mapping[str, Any]], sid: str) -> Mapping[str, Any]:
    return next(
        s
        for s in steps
        if s["action"] == "HomeAppend" and any(e.get("sid") == sid for e in s["events"])
    )


def _corruptions(steps: list[dict[str, Any]]) -> list[Corruption]:
    """Corrupted copies of run A's merged steps."""
    batch = next(
        s for s in steps if s["action"] == "ApplyBatch" and s["site"] == "cloud" and s["events"]
    )
    gap = {**batch, "events": [{**e, "id": e["id"] + 1} for e in batch["events"]]}
    third = _signal_step(steps, "r-a3")
    twice = {
        **third,
        "events": [{**e, "sid": "r-a1"} if e.get("sid") else e for e in third["events"]],
    }
    # The cloud's write applying the signal of its own inbox, once it took A over,
    # logged as the edge's (the old home, whose HANDOFF is its last event).
    second = _signal_step(steps, "r-a2")
    assert second["site"] == "cloud"
    stale_home = {**second, "site": "edge1"}
    return [
        _corrupt("batch-gap", steps, batch, gap, "the batch does not continue the replica"),
        _corrupt("signal-twice", steps, third, twice, "SignalsAtMostOnce violated"),
        _corrupt("write-after-handoff", steps, second, stale_home,
                 "a write by\", \"edge1\", \"which is not the run's home"),
    ]  # fmt: skip


def _early_retirement(steps: list[dict[str, Any]]) -> Corruption:
    """Run C's steps with the edge's forward of a cancel logged as its retirement:
    the edge's replica does not show the cancel yet."""
    forward = next(
        s for s in steps if s["action"] == "InboxForwarded" and s.get("kind") == "cancel"
    )
    retired = {k: v for k, v in forward.items() if k not in ("to", "basis")}
    retired["action"] = "InboxRetired"
    return _corrupt("cancel-retired-early", steps, forward, retired,
                    "before the replica shows it applied")  # fmt: skip


def _numbered(steps: Sequence[Mapping[str, Any]], step: Mapping[str, Any]) -> int:
    for number, raw in enumerate(steps, start=1):
        if raw is step:
            return number
    raise AssertionError(f"{step} is not in the run's steps")


# ------------------------------------------------------------------------ test


@pytest.mark.timeout(240)
async def test_cloud_edge_runs_are_replication_behaviours(
    sites: SitePair, trace_dir: Path, jar: Path, tmp_path: Path
) -> None:
    a_run, b_run, c_run, d_run = await _scenario(sites)
    lines = rt.load_lines(trace_dir)
    acts = Counter((s["site"], s["action"]) for s in lines if rt.happened(s))
    for site, action in [
        ("edge1", "HomeAppend"),
        ("cloud", "HomeAppend"),
        ("cloud", "ApplyBatch"),
        ("edge1", "ApplyBatch"),
        ("cloud", "TakeOver"),
        ("cloud", "InboxStored"),
        ("edge1", "InboxStored"),
        ("edge1", "InboxForwarded"),
        ("cloud", "InboxRetired"),
        ("edge1", "InboxRetired"),
    ]:
        assert acts[site, action] >= 1, (site, action, acts)
    runs = rt.by_run(lines)
    [a_name] = [r for r in runs if r.endswith(f"/{a_run}")]
    [c_name] = [r for r in runs if r.endswith(f"/{c_run}")]
    [d_name] = [r for r in runs if r.endswith(f"/{d_run}")]
    assert any(r.endswith(f"/{b_run}") for r in runs)
    # The cancels and the terminate went through the edge's inbox, traced.
    kinds = Counter((s["site"], s["action"], s.get("kind")) for s in lines if rt.happened(s))
    for action in ("InboxStored", "InboxForwarded", "InboxRetired"):
        assert kinds["edge1", action, "cancel"] >= 2, (action, kinds)
        assert kinds["edge1", action, "terminate"] >= 1, (action, kinds)
    events = [e["type"] for s in runs[d_name] for e in s.get("events", ())]
    assert "WORKFLOW_EXECUTION_TERMINATED" in events

    sites_seen = {"cloud", "edge1"}
    models = [
        rt.write_model(steps, run, tmp_path / f"run-{n}", sites_seen)
        for n, (run, steps) in enumerate(runs.items())
    ]
    corruptions = [(a_name, c) for c in _corruptions(runs[a_name])]
    corruptions.append((c_name, _early_retirement(runs[c_name])))
    for run_name, (name, corrupted, _, _) in corruptions:
        models.append(rt.write_model(corrupted, run_name, tmp_path / name, sites_seen))
    verdicts = await asyncio.to_thread(rt.check_all, models, jar=jar)
    real = len(runs)
    for model, verdict in zip(models[:real], verdicts, strict=False):
        assert verdict.status == "accepted", (model.run, verdict.line, verdict.reason)
        # One path: a state per entry, plus the initial one.
        assert verdict.states == len(model.entries) + 1, (verdict.states, len(model.entries))
    for (_, (name, corrupted, step, reason)), verdict in zip(
        corruptions, verdicts[real:], strict=True
    ):
        assert verdict.status == "rejected", (name, verdict.status, verdict.output[-2000:])
        assert verdict.line == _numbered(corrupted, step), (name, verdict.line, verdict.reason)
        # TLC breaks its printed tuple over lines: compare with single spaces.
        assert reason in " ".join(verdict.reason.split()), (name, verdict.reason)
