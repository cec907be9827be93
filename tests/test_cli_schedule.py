"""``tideflow schedule ...`` (issue 15): the real command in a subprocess against a real
server on SQLite, with a real worker in this process. Create (interval with offset,
cron with a time zone, input, overlap policy, notes), list, describe, trigger (the run
it starts completes), pause/unpause with a reason, delete; one-line errors, exit 2.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import pytest_asyncio
from helpers import eventually, new_id, running_server
from test_cli_workflow import ok, tideflow

from tideflow.server import TideflowServer
from tideflow.worker_sdk import Client, Worker, workflow
from tideflow.worker_sdk.schedules import ScheduleOverlapPolicy


@workflow.defn
class Greet:
    @workflow.run
    async def run(self, name: str) -> str:
        return f"hello {name}"


# One server for the module (the tests use their own schedule ids and task queues),
# so its tests share the module's event loop.
in_module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TideflowServer]:
    async with running_server(tmp_path_factory.mktemp("schedule-cli")) as server:
        yield server


@in_module_loop
async def test_schedule_lifecycle(sqlite_server: TideflowServer) -> None:
    address = sqlite_server.address
    queue, sid = new_id("q"), new_id("hourly")
    sch = ["schedule", "--address", address]
    # An interval far from firing by itself, so only the trigger starts a run.
    created = await ok(
        *sch,
        "create",
        "-s",
        sid,
        "--interval",
        "1h/15m",
        "-w",
        "greet",
        "--type",
        "Greet",
        "-t",
        queue,
        "-i",
        '"ann"',
        "--overlap-policy",
        "BufferOne",
        "--notes",
        "made by the cli",
        "-o",
        "json",
    )
    assert json.loads(created) == {"scheduleId": sid, "spec": "every 1h/15m"}
    client = await Client.connect(address)
    async with client, Worker(client, task_queue=queue, workflows=[Greet]):
        described = json.loads(await ok(*sch, "describe", "-s", sid, "-o", "json"))
        assert described["spec"]["intervals"] == [{"every": "1h", "offset": "15m"}]
        assert described["type"] == "Greet" and described["taskQueue"] == queue
        assert described["input"] == ["ann"] and described["overlapPolicy"] == "BufferOne"
        assert described["notes"] == "made by the cli" and described["paused"] is False
        assert described["actionCount"] == 0 and described["nextActionTimes"]
        next_time = described["nextActionTimes"][0]
        assert next_time.endswith(":15:00.000Z"), next_time

        assert "triggered schedule" in await ok(*sch, "trigger", "-s", sid)
        handle = client.get_schedule_handle(sid)
        info = await eventually(lambda: _with_actions(handle), "the triggered action", timeout=30)
        started = info.recent_actions[0]
        assert started.triggered and started.action.workflow_id.startswith("greet-")
        run = client.get_workflow_handle(started.action.workflow_id)
        assert await run.result() == "hello ann"

        await ok(*sch, "pause", "-s", sid, "--reason", "maintenance")
        table = await ok(*sch, "describe", "-s", sid)
        assert "maintenance" in table and "paused" in table
        assert (await handle.describe()).paused
        listed = [json.loads(line) for line in (await ok(*sch, "list", "-o", "jsonl")).splitlines()]
        mine = [r for r in listed if r["scheduleId"] == sid]
        assert len(mine) == 1 and mine[0]["paused"] and mine[0]["notes"] == "maintenance"
        listing = await ok(*sch, "list")
        assert sid in listing and "every 1h/15m" in listing

        await ok(*sch, "unpause", "-s", sid)
        assert not (await handle.describe()).paused
        await ok(*sch, "delete", "-s", sid)
        code, out, err = await tideflow(*sch, "describe", "-s", sid)
        assert code == 2 and out == "" and len(err.splitlines()) == 1
        assert err.startswith("tideflow schedule describe: ") and sid in err


async def _with_actions(handle: object) -> object:
    description = await handle.describe()  # type: ignore[attr-defined]
    return description.info if description.info.recent_actions else None


@in_module_loop
async def test_cron_schedule_with_time_zone(sqlite_server: TideflowServer) -> None:
    sid = new_id("nightly")
    await ok(
        "schedule",
        "create",
        "--address",
        sqlite_server.address,
        "-s",
        sid,
        "--cron",
        "0 2 * * *",
        "--time-zone",
        "Europe/Berlin",
        "--catchup-window",
        "10m",
        "--paused",
        "-w",
        "report",
        "--type",
        "Report",
        "-t",
        "reports",
        "--run-timeout",
        "1h",
    )
    client = await Client.connect(sqlite_server.address)
    async with client:
        description = await client.get_schedule_handle(sid).describe()
    spec = description.schedule.spec
    assert spec.cron == "0 2 * * *" and spec.time_zone == "Europe/Berlin"
    assert description.paused
    assert description.schedule.policy.catchup_window == timedelta(minutes=10)
    assert description.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
    assert description.schedule.action.run_timeout == timedelta(hours=1)


@in_module_loop
async def test_errors_are_one_line_exit_2(sqlite_server: TideflowServer) -> None:
    base = ["schedule", "--address", sqlite_server.address]
    action = ["-w", "x", "--type", "X", "-t", "q"]
    # Usage mistakes found before any call are checked in-process (test_usage_errors).
    cases = [
        (["create", "-s", new_id("s"), "--cron", "61 * * * *", *action], "cron"),
        (["pause", "-s", new_id("missing")], "missing"),
    ]
    for argv, expected in cases:
        code, out, err = await tideflow(*base, *argv)
        assert code == 2 and out == "" and len(err.splitlines()) == 1, (argv, out, err)
        assert err.startswith(f"tideflow schedule {argv[0]}: ") and expected in err, err
    # The same id twice: the second create is refused by the server.
    sid = new_id("twice")
    await ok(*base, "create", "-s", sid, "--interval", "1d", "--paused", *action)
    code, _, err = await tideflow(*base, "create", "-s", sid, "--interval", "1d", *action)
    assert code == 2 and len(err.splitlines()) == 1 and sid in err, err


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from tideflow import cli

    action = ["-w", "x", "--type", "X", "-t", "q", "--connect-timeout", "0.1"]
    for flags, expected in (
        ([], "give at least one --cron or --interval"),
        (["--interval", "5 parsecs"], "--interval: invalid duration '5 parsecs'"),
        (["--interval", "0s"], "--interval: must be positive"),
        (["--cron", "* * * * *", "--start-time", "soon"], "--start-time: not an ISO 8601 time"),
    ):
        assert cli.main(["schedule", "create", "-s", "s1", *flags, *action]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1, err
        assert err.startswith("tideflow schedule create: ") and expected in err, err


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    from tideflow.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["schedule", "--help"])
    shown = capsys.readouterr().out
    for verb in ("create", "list", "describe", "pause", "unpause", "trigger", "delete"):
        assert verb in shown
