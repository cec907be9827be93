"""Cron over the wire, on a real server (port 0) on every store under test: a
schedule's time zone is stored and described and moves its fire times; bad specs and
zones are refused with INVALID_ARGUMENT; so is a start with ``cron_schedule`` (cron
workflows are not built: schedules replace them)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from tideflow.api.v1 import service_pb2
from tideflow.worker_sdk import Client
from tideflow.worker_sdk.exceptions import InvalidArgumentError, NotFoundError
from tideflow.worker_sdk.schedules import (
    ScheduleActionStartWorkflow,
    ScheduleHandle,
    ScheduleSpec,
    ScheduleState,
)

BERLIN = ZoneInfo("Europe/Berlin")


async def _create(client: Client, spec: ScheduleSpec) -> ScheduleHandle:
    return await client.create_schedule(
        f"cron-{uuid.uuid4()}",
        action=ScheduleActionStartWorkflow("Report", id="report", task_queue="reports"),
        spec=spec,
        state=ScheduleState(paused=True, note="never fires in this test"),
    )


async def test_time_zone_is_stored_described_and_moves_fire_times(client: Client) -> None:
    # 2027-03-28: Berlin's clocks jump from 02:00 to 03:00, so 02:30 does not exist.
    start = datetime(2027, 3, 26, tzinfo=UTC)
    handle = await _create(
        client, ScheduleSpec(cron="30 2 * * *", time_zone="Europe/Berlin", start_at=start)
    )
    description = await handle.describe()
    assert description.schedule.spec.time_zone == "Europe/Berlin"
    assert description.schedule.spec.cron == "30 2 * * *"
    local = [t.astimezone(BERLIN) for t in description.info.next_action_times[:4]]
    assert [(t.day, t.hour, t.minute) for t in local] == [
        (26, 2, 30),
        (27, 2, 30),
        (28, 3, 0),  # the skipped 02:30 fires once, right after the gap
        (29, 2, 30),
    ]
    assert [t.utcoffset() for t in local] == [timedelta(hours=h) for h in (1, 1, 2, 2)]
    listed = {s.id: s async for s in client.list_schedules()}
    assert listed[handle.id].schedule.spec.time_zone == "Europe/Berlin"
    assert listed[handle.id].info.next_action_times == description.info.next_action_times

    # Without a zone the same expression is read in UTC.
    utc = await (await _create(client, ScheduleSpec(cron="30 2 * * *", start_at=start))).describe()
    assert utc.schedule.spec.time_zone is None
    assert utc.info.next_action_times[0] == datetime(2027, 3, 26, 2, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ScheduleSpec(cron="0 0 * * *", time_zone="Mars/Olympus"), "unknown time zone"),
        (ScheduleSpec(cron="0 0 * * *", time_zone="../../etc/passwd"), "unknown time zone"),
        (ScheduleSpec(cron="0 0 */2 * MON-FRI/0"), "bad day-of-week field 'MON-FRI/0'"),
        (ScheduleSpec(cron="0 0 31 4,6 *"), "never fires: day-of-month '31'"),
        (ScheduleSpec(cron="0 0 * * * *"), "has 6 fields; expected 5"),
    ],
)
async def test_bad_specs_are_invalid_argument(
    client: Client, spec: ScheduleSpec, message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        await _create(client, spec)


@pytest.mark.parametrize("cron_schedule", ["bogus", "*/5 * * * *", "@daily"])
async def test_start_with_cron_schedule_is_refused(client: Client, cron_schedule: str) -> None:
    workflow_id = f"cron-start-{uuid.uuid4()}"
    request = service_pb2.StartWorkflowRequest(
        namespace=client.namespace,
        workflow_id=workflow_id,
        request_id=str(uuid.uuid4()),
        cron_schedule=cron_schedule,
    )
    request.workflow_type.name = "Report"
    request.task_queue.name = "reports"
    with pytest.raises(InvalidArgumentError, match="cron_schedule is not supported: create a"):
        await client.call(client.service.StartWorkflow, request)
    # Nothing was started under that id.
    with pytest.raises(NotFoundError):
        await client.get_workflow_handle(workflow_id).describe()
    # The same start without the field goes through.
    request.ClearField("cron_schedule")
    response = await client.call(client.service.StartWorkflow, request)
    assert response.run_id
