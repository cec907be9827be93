"""``tideflow schedule ...``: create, inspect and control schedules from a terminal,
with Temporal CLI's verbs and flag names (issue 15)::

    tideflow schedule create -s nightly --cron "0 2 * * *" --time-zone Europe/Berlin \\
        -w report --type Report -t reports -i '"eu"' --overlap-policy BufferOne
    tideflow schedule create -s every-5m --interval 5m -w ping --type Ping -t q
    tideflow schedule list
    tideflow schedule describe -s nightly
    tideflow schedule pause -s nightly --reason "maintenance"
    tideflow schedule unpause -s nightly
    tideflow schedule trigger -s nightly [--overlap-policy AllowAll]
    tideflow schedule delete -s nightly

``--interval`` takes a duration (``90s``, ``1h30m``, ``1d``), optionally with an offset
after a slash (``1h/15m``: at a quarter past each hour), as Temporal CLI does; both
``--cron`` and ``--interval`` may be repeated. The global flags are the ``workflow``
group's (``--address``, ``--namespace``, ``-o table|json|jsonl``, TLS, API key, codec).
Exit codes: 0 success; 2 bad usage or an error talking to the server (one line).
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from tideflow.worker_sdk.client import Client
from tideflow.worker_sdk.dag._durations import format_duration, parse_duration
from tideflow.worker_sdk.schedules import (
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
)

from . import _output as out
from ._workflow import (
    UsageError,
    command_group,
    connect,
    input_argument,
    parse_inputs,
    run_group_command,
)

# Temporal CLI's spelling of the overlap policies (``--overlap-policy BufferOne``).
OVERLAP_POLICIES = {
    "Skip": ScheduleOverlapPolicy.SKIP,
    "BufferOne": ScheduleOverlapPolicy.BUFFER_ONE,
    "BufferAll": ScheduleOverlapPolicy.BUFFER_ALL,
    "CancelOther": ScheduleOverlapPolicy.CANCEL_OTHER,
    "TerminateOther": ScheduleOverlapPolicy.TERMINATE_OTHER,
    "AllowAll": ScheduleOverlapPolicy.ALLOW_ALL,
}
_POLICY_NAMES = {policy: name for name, policy in OVERLAP_POLICIES.items()}


# ------------------------------------------------------------------- parser


def _schedule_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-s", "--schedule-id", required=True, help="schedule id")


def _overlap(parser: argparse._ActionsContainer, help: str) -> None:
    parser.add_argument("--overlap-policy", choices=sorted(OVERLAP_POLICIES), help=help)


def _create_arguments(parser: argparse.ArgumentParser) -> None:
    _schedule_id(parser)
    spec = parser.add_argument_group("when it fires")
    spec.add_argument("--cron", action="append", default=[], help="cron expression (repeatable)")
    spec.add_argument(
        "--interval",
        action="append",
        default=[],
        metavar="EVERY[/OFFSET]",
        help="interval, e.g. 5m or 1h/15m (repeatable)",
    )
    spec.add_argument("--time-zone", help="IANA zone the cron expressions are read in")
    spec.add_argument("--start-time", help="fire no earlier than this (ISO 8601)")
    spec.add_argument("--end-time", help="fire no later than this (ISO 8601)")
    spec.add_argument("--catchup-window", help="how late a missed slot may still fire")
    _overlap(spec, "what to do when the previous run is still open (default Skip)")
    spec.add_argument("--paused", action="store_true", help="create it paused")
    spec.add_argument("--notes", default="", help="a note kept with the schedule's state")
    action = parser.add_argument_group("the workflow it starts")
    action.add_argument("-w", "--workflow-id", required=True, help="workflow id prefix")
    action.add_argument("--type", required=True, help="workflow type name")
    action.add_argument("-t", "--task-queue", required=True, help="task queue")
    input_argument(action)
    for name in ("execution", "run", "task"):
        action.add_argument(f"--{name}-timeout", help=f"workflow {name} timeout, e.g. 1h")


def add_parser(groups: Any) -> None:
    """Register the ``schedule`` command group on the ``tideflow`` parser's subparsers."""
    command = command_group(groups, "schedule", "create, inspect and control schedules")
    _create_arguments(command("create", "create a schedule"))
    command("list", "every schedule of the namespace")
    _schedule_id(command("describe", "a schedule's spec, action, state and recent actions"))
    for name, help in (("pause", "stop firing"), ("unpause", "fire again from the next slot")):
        toggle = command(name, help)
        _schedule_id(toggle)
        toggle.add_argument("--reason", default="", help="why (kept as the schedule's note)")
    trigger = command("trigger", "start the workflow now")
    _schedule_id(trigger)
    _overlap(trigger, "overlap policy for this once (default: the schedule's)")
    _schedule_id(command("delete", "delete a schedule (its runs keep running)"))


# ------------------------------------------------------------------ running


def main(args: argparse.Namespace) -> int:
    """Run a parsed ``tideflow schedule ...`` command; returns the exit code."""
    return run_group_command("schedule", args, _run)


async def _run(args: argparse.Namespace) -> int:
    schedule = _schedule_from_args(args) if args.command == "create" else None
    client = await connect(args)
    try:
        if schedule is not None:
            return await _create(client, args, schedule)
        return await COMMANDS[args.command](client, args)
    finally:
        await client.close()


def _duration(flag: str, text: str) -> timedelta:
    try:
        value = parse_duration(text)
    except ValueError as error:
        raise UsageError(f"{flag}: {error}") from None
    if value <= timedelta(0) and flag != "--interval offset":
        raise UsageError(f"{flag}: must be positive, got {text!r}")
    return value


def _interval(text: str) -> ScheduleIntervalSpec:
    every, _, offset = text.partition("/")
    return ScheduleIntervalSpec(
        every=_duration("--interval", every),
        offset=_duration("--interval offset", offset) if offset else timedelta(0),
    )


def _time(flag: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{flag}: not an ISO 8601 time: {text!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _schedule_from_args(args: argparse.Namespace) -> Schedule:
    """The schedule the ``create`` flags describe; mistakes found before any call."""
    if not args.cron and not args.interval:
        raise UsageError("give at least one --cron or --interval")
    timeouts = {
        name: _duration(f"--{name}-timeout", getattr(args, f"{name}_timeout"))
        if getattr(args, f"{name}_timeout")
        else None
        for name in ("execution", "run", "task")
    }
    action = ScheduleActionStartWorkflow(
        args.type,
        args=parse_inputs(args.input),
        id=args.workflow_id,
        task_queue=args.task_queue,
        execution_timeout=timeouts["execution"],
        run_timeout=timeouts["run"],
        task_timeout=timeouts["task"],
    )
    spec = ScheduleSpec(
        cron_expressions=tuple(args.cron),
        intervals=tuple(_interval(text) for text in args.interval),
        start_at=_time("--start-time", args.start_time),
        end_at=_time("--end-time", args.end_time),
        time_zone=args.time_zone,
    )
    overlap = OVERLAP_POLICIES[args.overlap_policy or "Skip"]
    policy = SchedulePolicy(overlap=overlap)
    if args.catchup_window:
        window = _duration("--catchup-window", args.catchup_window)
        policy = SchedulePolicy(overlap=overlap, catchup_window=window)
    state = ScheduleState(note=args.notes, paused=args.paused)
    return Schedule(action=action, spec=spec, policy=policy, state=state)


# ---------------------------------------------------------------- records


def spec_text(spec: ScheduleSpec) -> str:
    """A schedule's spec on one line: ``cron 0 2 * * * (Europe/Berlin); every 5m``."""
    parts = [f"cron {c}" for c in ([spec.cron] if spec.cron else []) + list(spec.cron_expressions)]
    intervals = list(spec.intervals)
    if spec.interval is not None:
        intervals.insert(0, ScheduleIntervalSpec(every=spec.interval, offset=spec.offset))
    for item in intervals:
        offset = f"/{format_duration(item.offset)}" if item.offset else ""
        parts.append(f"every {format_duration(item.every)}{offset}")
    zone = f" ({spec.time_zone})" if spec.time_zone else ""
    return "; ".join(parts) + zone


def _spec_record(spec: ScheduleSpec) -> dict[str, Any]:
    intervals = list(spec.intervals)
    if spec.interval is not None:
        intervals.insert(0, ScheduleIntervalSpec(every=spec.interval, offset=spec.offset))
    return {
        "cron": ([spec.cron] if spec.cron else []) + list(spec.cron_expressions),
        "intervals": [
            {"every": format_duration(i.every), "offset": format_duration(i.offset)}
            for i in intervals
        ],
        "timeZone": spec.time_zone or "",
        "startTime": out.timestamp(spec.start_at),
        "endTime": out.timestamp(spec.end_at),
    }


def schedule_record(schedule_id: str, schedule: Schedule) -> dict[str, Any]:
    action = schedule.action
    return {
        "scheduleId": schedule_id,
        "spec": _spec_record(schedule.spec),
        "workflowId": action.id,
        "type": action.workflow,
        "taskQueue": action.task_queue,
        "input": action.args,
        "overlapPolicy": _POLICY_NAMES[schedule.policy.overlap],
        "catchupWindow": format_duration(schedule.policy.catchup_window),
        "paused": schedule.state.paused,
        "notes": schedule.state.note,
    }


# ---------------------------------------------------------------- commands


async def _create(client: Client, args: argparse.Namespace, schedule: Schedule) -> int:
    handle = await client.create_schedule(args.schedule_id, schedule)
    record = {"scheduleId": handle.id, "spec": spec_text(schedule.spec)}
    _print(out.emit(args.output, record, f"created schedule {handle.id}"))
    return 0


async def _list(client: Client, args: argparse.Namespace) -> int:
    records = []
    async for entry in client.list_schedules():
        record = schedule_record(entry.id, entry.schedule)
        record["nextActionTimes"] = [out.timestamp(t) for t in entry.info.next_action_times]
        record["specText"] = spec_text(entry.schedule.spec)
        records.append(record)
    headers = ["SCHEDULE ID", "SPEC", "TYPE", "PAUSED", "NEXT RUN", "NOTES"]
    rows = [
        [
            r["scheduleId"],
            r["specText"],
            r["type"],
            "yes" if r["paused"] else "no",
            (r["nextActionTimes"] or [""])[0],
            r["notes"],
        ]
        for r in records
    ]
    _print(out.emit(args.output, records, out.fit_table(headers, rows)))
    return 0


async def _describe(client: Client, args: argparse.Namespace) -> int:
    description = await client.get_schedule_handle(args.schedule_id).describe()
    info = description.info
    record = schedule_record(description.id, description.schedule)
    record |= {
        "actionCount": info.num_actions,
        "missedCatchupWindow": info.num_actions_missed_catchup_window,
        "overlapSkipped": info.num_actions_skipped_overlap,
        "bufferedActions": info.num_actions_buffered,
        "runningWorkflows": [a.workflow_id for a in info.running_actions],
        "recentActions": [
            {
                "scheduledAt": out.timestamp(a.scheduled_at),
                "startedAt": out.timestamp(a.started_at),
                "workflowId": a.action.workflow_id,
                "runId": a.action.first_execution_run_id,
                "triggered": a.triggered,
            }
            for a in info.recent_actions
        ],
        "nextActionTimes": [out.timestamp(t) for t in info.next_action_times],
        "createTime": out.timestamp(info.created_at),
        "updateTime": out.timestamp(info.last_updated_at),
    }
    shown = {**record, "spec": spec_text(description.schedule.spec)}
    shown["recentActions"] = [a["workflowId"] for a in record["recentActions"]]
    table = out.key_values({k: v for k, v in shown.items() if v not in (None, [], "")})
    _print(out.emit(args.output, record, table))
    return 0


async def _toggle(client: Client, args: argparse.Namespace) -> int:
    handle = client.get_schedule_handle(args.schedule_id)
    if args.command == "pause":
        await handle.pause(args.reason or None)
    else:
        await handle.unpause(args.reason or None)
    record = {"scheduleId": args.schedule_id, "action": args.command}
    _print(out.emit(args.output, record, f"{args.command}d schedule {args.schedule_id}"))
    return 0


async def _trigger(client: Client, args: argparse.Namespace) -> int:
    policy = OVERLAP_POLICIES[args.overlap_policy] if args.overlap_policy else None
    await client.get_schedule_handle(args.schedule_id).trigger(policy)
    record = {"scheduleId": args.schedule_id, "action": "trigger"}
    _print(out.emit(args.output, record, f"triggered schedule {args.schedule_id}"))
    return 0


async def _delete(client: Client, args: argparse.Namespace) -> int:
    await client.get_schedule_handle(args.schedule_id).delete()
    record = {"scheduleId": args.schedule_id, "action": "delete"}
    _print(out.emit(args.output, record, f"deleted schedule {args.schedule_id}"))
    return 0


def _print(text: str) -> None:
    print(text, flush=True)


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], Awaitable[int]]] = {
    "list": _list,
    "describe": _describe,
    "pause": _toggle,
    "unpause": _toggle,
    "trigger": _trigger,
    "delete": _delete,
}
