"""``workflow.patched`` / ``workflow.deprecate_patch``: three versions of one workflow
replay the histories of the versions before them.

Real server on an ephemeral port over SQLite and over PostgreSQL (conftest's
``client``), real workers, uuid task queues and ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from helpers import ET, events_of, eventually, has_event, new_id, of_type
from helpers_messages import TIMEOUT, index_of, is_idle, names

from tideflow.api.v1.history_pb2 import HistoryEvent
from tideflow.worker_sdk import (
    Client,
    Replayer,
    Worker,
    WorkflowHistory,
    activity,
    workflow,
)
from tideflow.worker_sdk.exceptions import (
    NonDeterminismError,
)


@activity.defn
async def old_step(x: str) -> str:
    return f"old:{x}"


@activity.defn
async def new_step(x: str) -> str:
    return f"new:{x}"


# Three versions of one workflow type: before a change, with the change behind
# ``patched``, and after the old path was retired with ``deprecate_patch``.
PATCH_ID = "use-new-step"


@workflow.defn(name="Pricing")
class PricingV1:
    def __init__(self) -> None:
        self.confirmed = False

    @workflow.run
    async def run(self, x: str) -> str:
        price: str = await workflow.execute_activity(old_step, x, start_to_close_timeout=TIMEOUT)
        await workflow.wait_condition(lambda: self.confirmed)
        return price

    @workflow.signal
    def confirm(self) -> None:
        self.confirmed = True


@workflow.defn(name="Pricing")
class PricingV2:
    def __init__(self) -> None:
        self.confirmed = False

    @workflow.run
    async def run(self, x: str) -> str:
        step = new_step if workflow.patched(PATCH_ID) else old_step
        price: str = await workflow.execute_activity(step, x, start_to_close_timeout=TIMEOUT)
        await workflow.wait_condition(lambda: self.confirmed)
        return price

    @workflow.signal
    def confirm(self) -> None:
        self.confirmed = True


@workflow.defn(name="Pricing")
class PricingV3:
    def __init__(self) -> None:
        self.confirmed = False

    @workflow.run
    async def run(self, x: str) -> str:
        workflow.deprecate_patch(PATCH_ID)
        price: str = await workflow.execute_activity(new_step, x, start_to_close_timeout=TIMEOUT)
        await workflow.wait_condition(lambda: self.confirmed)
        return price

    @workflow.signal
    def confirm(self) -> None:
        self.confirmed = True


def _patch_markers(client: Client, events: Sequence[HistoryEvent]) -> list[tuple[str, bool]]:
    markers = []
    for event in of_type(events, ET.EVENT_TYPE_MARKER_RECORDED):
        details = event.marker_recorded_event_attributes.details
        [patch_id] = client.data_converter.from_payloads(details["patch_id"])
        [deprecated] = client.data_converter.from_payloads(details["deprecated"])
        markers.append((patch_id, deprecated))
    return markers


async def _run_pricing(
    client: Client, tq: str, workflow_cls: type, x: str
) -> tuple[str, WorkflowHistory]:
    """A whole run of ``Pricing`` on a worker with ``workflow_cls``: result, history."""
    async with Worker(
        client, task_queue=tq, workflows=[workflow_cls], activities=[old_step, new_step]
    ):
        handle = await client.start_workflow("Pricing", x, id=new_id("pricing"), task_queue=tq)
        await handle.signal("confirm")
        result: str = await handle.result()
    return result, await handle.fetch_history()


async def test_patched_and_deprecate_patch(client: Client) -> None:
    tq = new_id("tq")

    # A run of the old code, still in flight when the patched code is deployed. (No
    # cache on the old worker: a cached run would stay bound to its sticky queue for
    # the sticky schedule-to-start timeout after the worker is gone.)
    async with Worker(
        client,
        task_queue=tq,
        workflows=[PricingV1],
        activities=[old_step],
        max_cached_workflows=0,
    ):
        in_flight = await client.start_workflow(
            PricingV1.run, "a", id=new_id("pricing"), task_queue=tq
        )
        await eventually(has_event(in_flight, ET.EVENT_TYPE_ACTIVITY_TASK_COMPLETED))
        await eventually(is_idle(in_flight), what="old run waiting for confirm")
    async with Worker(
        client, task_queue=tq, workflows=[PricingV2], activities=[old_step, new_step]
    ):
        # The new worker replays the old run: patched() is False there, the old path.
        await in_flight.signal(PricingV2.confirm)
        assert await in_flight.result() == "old:a"
    old_events = await events_of(in_flight)
    assert _patch_markers(client, old_events) == []
    assert not of_type(old_events, ET.EVENT_TYPE_WORKFLOW_TASK_FAILED), names(old_events)

    # A new run takes the new path and records the patch marker before it.
    result, new_history = await _run_pricing(client, tq, PricingV2, "b")
    assert result == "new:b"
    new_events = new_history.events
    assert _patch_markers(client, new_events) == [(PATCH_ID, False)]
    marker = index_of(new_events, ET.EVENT_TYPE_MARKER_RECORDED)
    assert new_events[marker - 1].event_type == ET.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    assert new_events[marker + 1].event_type == ET.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    scheduled = new_events[marker + 1].activity_task_scheduled_event_attributes
    assert scheduled.activity_type.name == "new_step"

    # Replay: the patched code replays both the old and the new history; the old code
    # cannot replay the new one.
    v1 = Replayer(workflows=[PricingV1])
    v2 = Replayer(workflows=[PricingV2])
    v3 = Replayer(workflows=[PricingV3])
    old_history = await in_flight.fetch_history()
    assert (await v1.replay(old_history)).events_replayed == len(old_events)
    assert (await v2.replay(old_history)).events_replayed == len(old_events)
    await v2.replay(new_history)
    await v2.replay(WorkflowHistory.from_json(new_history.to_json()))  # as stored in CI
    with pytest.raises(NonDeterminismError):
        await v1.replay(new_history)

    # deprecate_patch: the old path is gone. Histories with the marker replay, runs
    # from before the patch do not; new runs still record the marker.
    await v3.replay(new_history)
    with pytest.raises(NonDeterminismError):
        await v3.replay(old_history)
    result, v3_history = await _run_pricing(client, tq, PricingV3, "c")
    assert result == "new:c"
    assert _patch_markers(client, v3_history.events) == [(PATCH_ID, True)]
    await v3.replay(v3_history)
    await v2.replay(v3_history)  # the patched code agrees with a deprecated marker
