"""``tideflow workflow ...``: start, inspect and control workflow runs from a terminal,
with Temporal CLI's verbs and flag names so habits carry over (issue 15)::

    tideflow workflow start -t QUEUE --type Greeter -w greet-1 -i '"world"'
    tideflow workflow execute -t QUEUE --type Greeter -i '"world"'
    tideflow workflow list -q "ExecutionStatus = 'Running'"
    tideflow workflow count -q "WorkflowType = 'Greeter'"
    tideflow workflow describe -w greet-1
    tideflow workflow show -w greet-1 [--follow]
    tideflow workflow result -w greet-1
    tideflow workflow signal -w greet-1 --name approve -i '{"by": "ann"}'
    tideflow workflow query -w greet-1 --name status
    tideflow workflow cancel|terminate -w greet-1 --reason "no longer needed"
    tideflow workflow handoff --workflow-id greet-1 --to cloud

Global flags, before or after the subcommand: ``--address`` ($TIDEFLOW_ADDRESS,
default 127.0.0.1:7233), ``--namespace`` ($TIDEFLOW_NAMESPACE, default ``default``),
``-o/--output table|json|jsonl``, ``--api-key`` ($TIDEFLOW_API_KEY), the TLS flags
and the codec flags (``cli._codec``). The group talks to the server only through the
SDK's ``Client``, like any other client.

Exit codes: 0 success; 1 ``result``/``execute`` of a run that did not complete (the
failure on stderr); 2 bad usage or an error talking to the server (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from tideflow.api.v1 import common_pb2, service_pb2
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.worker_sdk import TLSConfig
from tideflow.worker_sdk import exceptions as exc
from tideflow.worker_sdk.client import Client, WorkflowExecutionDescription
from tideflow.worker_sdk.codec import PayloadCodecError
from tideflow.worker_sdk.converter import DataConverter, default_converter

from . import _output as out
from ._codec import add_codec_arguments, codec_from_args
from ._progress import Progress, watch_run

DEFAULT_ADDRESS = "127.0.0.1:7233"
DEFAULT_NAMESPACE = "default"
DEFAULT_CONNECT_TIMEOUT_S = 5.0
EXIT_RUN_FAILED = 1
EXIT_ERROR = 2

# The events that close a run (the close-event filter of GetHistory returns one).
_COMPLETED = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
_CONTINUED = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW


class UsageError(Exception):
    """A mistake in the command line found before any call (bad ``-i`` JSON)."""


# ------------------------------------------------------------------- parser


def add_global_arguments(parser: argparse.ArgumentParser, default: object) -> None:
    """The flags every workflow command takes. On the group parser they carry their
    real default (None, resolved with the environment in ``_settings``); on each
    subcommand ``argparse.SUPPRESS``, so a flag given before the subcommand is kept."""
    parser.add_argument("--address", default=default, help="server HOST:PORT ($TIDEFLOW_ADDRESS)")
    parser.add_argument("--namespace", default=default, help="namespace ($TIDEFLOW_NAMESPACE)")
    parser.add_argument(
        "-o", "--output", choices=("table", "json", "jsonl"), default=default, help="output format"
    )
    add_credential_arguments(parser, default)
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=default,
        help=f"seconds to wait for the server (default {DEFAULT_CONNECT_TIMEOUT_S:g})",
    )
    add_codec_arguments(parser, default)


def add_credential_arguments(parser: argparse.ArgumentParser, default: object) -> None:
    """How a command proves itself to the server: API key or JWT, TLS and mTLS
    (``tls_of`` reads them); also taken by ``tideflow site status``."""
    parser.add_argument("--api-key", default=default, help="API key or JWT ($TIDEFLOW_API_KEY)")
    parser.add_argument("--tls", action="store_true", default=default, help="connect over TLS")
    parser.add_argument("--tls-ca", default=default, help="CA certificate (PEM) to trust")
    parser.add_argument("--tls-cert", default=default, help="client certificate (PEM), mTLS")
    parser.add_argument("--tls-key", default=default, help="client private key (PEM), mTLS")
    parser.add_argument(
        "--tls-server-name", default=default, help="name to check the server certificate against"
    )


def _execution_arguments(parser: argparse.ArgumentParser, *, run_id: bool = True) -> None:
    parser.add_argument("-w", "--workflow-id", required=True, help="workflow id")
    if run_id:
        parser.add_argument("-r", "--run-id", default="", help="run id (default: the newest)")


def input_argument(parser: argparse._ActionsContainer) -> None:
    parser.add_argument(
        "-i",
        "--input",
        action="append",
        default=[],
        metavar="JSON",
        help="an argument as JSON; repeat for several arguments",
    )


def _start_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-w", "--workflow-id", help="workflow id (default: a new uuid)")
    parser.add_argument("--type", required=True, help="workflow type name")
    parser.add_argument("-t", "--task-queue", required=True, help="task queue")
    input_argument(parser)


def command_group(groups: Any, name: str, help: str) -> Callable[[str, str], Any]:
    """Register a group that takes the global flags (before or after its subcommand);
    returns ``command(name, help)``, which adds a subcommand's parser."""
    parser = groups.add_parser(name, help=help)
    parser.set_defaults(log_level="WARNING")
    add_global_arguments(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    add_global_arguments(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])  # type: ignore[no-any-return]

    return command


def add_parser(groups: Any) -> None:
    """Register the ``workflow`` command group on the ``tideflow`` parser's subparsers."""
    command = command_group(groups, "workflow", "start, inspect and control workflow runs")
    _start_arguments(command("start", "start a run; prints its ids"))
    _start_arguments(command("execute", "start a run and wait for its result"))
    listing = command("list", "runs matching a visibility query, newest first")
    listing.add_argument("-q", "--query", default="", help="visibility query")
    listing.add_argument("--limit", type=int, default=0, help="at most this many runs")
    command("count", "how many runs match").add_argument(
        "-q", "--query", default="", help="visibility query"
    )
    _execution_arguments(command("describe", "a run's summary, input and outcome"))
    show = command("show", "a run's history")
    _execution_arguments(show)
    show.add_argument("-f", "--follow", action="store_true", help="stream new events until close")
    _execution_arguments(command("result", "wait for a run's result"))
    for name, help in (("signal", "send a signal"), ("query", "ask a query")):
        parser_ = command(name, help)
        _execution_arguments(parser_)
        parser_.add_argument("--name", required=True, help=f"{name} name")
        input_argument(parser_)
    for name, help in (("cancel", "request cancellation"), ("terminate", "end a run now")):
        parser_ = command(name, help)
        _execution_arguments(parser_)
        parser_.add_argument("--reason", default="", help="why (recorded in the history)")
    handoff = command("handoff", "move a run's home to another site")
    _execution_arguments(handoff)
    handoff.add_argument("--to", required=True, help="the site (--cluster-name) to hand it to")


# ------------------------------------------------------------------ running


def main(args: argparse.Namespace) -> int:
    """Run a parsed ``tideflow workflow ...`` command; returns the exit code."""
    return run_group_command("workflow", args, _run)


def run_group_command(
    group: str,
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
) -> int:
    """Run ``run(args)``; an error becomes one line on stderr and exit code 2."""
    try:
        return asyncio.run(run(args))
    except (exc.RPCError, UsageError, PayloadCodecError, ValueError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"tideflow {group} {args.command}: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _setting(args: argparse.Namespace, name: str, env: str, default: Any) -> Any:
    value = getattr(args, name, None)
    if value is None:
        value = os.environ.get(env) or default
    return value


def tls_of(args: argparse.Namespace) -> TLSConfig | bool:
    """The client TLS the ``add_credential_arguments`` flags ask for."""
    custom = (args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    if not any(custom):
        return bool(args.tls)
    return TLSConfig(
        server_root_ca_cert=args.tls_ca,
        client_cert=args.tls_cert,
        client_private_key=args.tls_key,
        domain=args.tls_server_name,
    )


def parse_inputs(values: Sequence[str]) -> list[Any]:
    """The ``-i`` values as Python values; a bad one is named by its position."""
    parsed = []
    for index, text in enumerate(values, start=1):
        try:
            parsed.append(json.loads(text))
        except json.JSONDecodeError as error:
            raise UsageError(f"-i/--input #{index} is not valid JSON ({error}): {text!r}") from None
    return parsed


async def connect(args: argparse.Namespace) -> Client:
    """The client the global flags describe (``add_global_arguments``), with the
    environment's defaults; also settles ``args.namespace`` and ``args.output``."""
    args.namespace = _setting(args, "namespace", "TIDEFLOW_NAMESPACE", DEFAULT_NAMESPACE)
    args.output = args.output or "table"
    codec = codec_from_args(args)
    converter = default_converter if codec is None else DataConverter(payload_codec=codec)
    return await Client.connect(
        _setting(args, "address", "TIDEFLOW_ADDRESS", DEFAULT_ADDRESS),
        namespace=args.namespace,
        data_converter=converter,
        tls=tls_of(args),
        api_key=_setting(args, "api_key", "TIDEFLOW_API_KEY", None),
        connect_timeout=args.connect_timeout or DEFAULT_CONNECT_TIMEOUT_S,
    )


async def _run(args: argparse.Namespace) -> int:
    inputs = parse_inputs(getattr(args, "input", None) or [])
    client = await connect(args)
    try:
        return await COMMANDS[args.command](client, args, inputs)
    finally:
        await client.close()


Command = Callable[[Client, argparse.Namespace, list[Any]], Awaitable[int]]


def _print(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------- commands


async def _start(client: Client, args: argparse.Namespace, inputs: list[Any]) -> int:
    workflow_id = args.workflow_id or str(uuid.uuid4())
    handle = await client.start_workflow(
        args.type, args=inputs, id=workflow_id, task_queue=args.task_queue
    )
    record = {
        "workflowId": handle.id,
        "runId": handle.run_id,
        "type": args.type,
        "taskQueue": args.task_queue,
    }
    if args.command == "start":
        _print(out.emit(args.output, record, out.key_values(record)))
        return 0
    return await _report_outcome(client, args, handle.id, handle.run_id or "", record)


async def _result(client: Client, args: argparse.Namespace, inputs: list[Any]) -> int:
    record = {"workflowId": args.workflow_id, "runId": args.run_id}
    return await _report_outcome(client, args, args.workflow_id, args.run_id, record)


async def _report_outcome(
    client: Client, args: argparse.Namespace, workflow_id: str, run_id: str, record: dict[str, Any]
) -> int:
    """Wait for the run (following continue-as-new) to close and print its outcome:
    the result, or the failure on stderr with exit code 1. Meanwhile a terminal shows
    the run's progress on stderr."""
    progress = Progress()
    watcher = None
    if progress.enabled:
        watcher = asyncio.create_task(watch_run(client, workflow_id, progress))
    try:
        close, closed_run_id = await wait_for_close(client, workflow_id, run_id)
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        progress.clear()
    outcome = close_outcome(close)
    record = {**record, "runId": closed_run_id or record["runId"], **outcome}
    if close.event_type != _COMPLETED:
        why = f": {outcome['failure']}" if outcome.get("failure") else ""
        status = outcome["status"].lower().replace("_", " ")
        print(
            f"tideflow workflow {args.command}: workflow {workflow_id}"
            f"{' run ' + record['runId'] if record['runId'] else ''} {status}{why}",
            file=sys.stderr,
        )
        if args.output != "table":
            _print(out.emit(args.output, record, ""))
        return EXIT_RUN_FAILED
    table = json.dumps(outcome["result"], indent=2, ensure_ascii=False)
    _print(out.emit(args.output, record, table))
    return 0


async def wait_for_close(client: Client, workflow_id: str, run_id: str) -> tuple[HistoryEvent, str]:
    """The close event of the run and the run id it closed (empty: the newest run),
    waited for by long polls of GetHistory; a run that continued as new is followed
    to the run that closes for good."""
    execution = common_pb2.WorkflowExecution(workflow_id=workflow_id, run_id=run_id)
    while True:
        request = service_pb2.GetHistoryRequest(
            namespace=client.namespace,
            wait_new_event=True,
            history_event_filter_type=service_pb2.HISTORY_EVENT_FILTER_TYPE_CLOSE_EVENT,
        )
        request.execution.CopyFrom(execution)
        response = await client.call(client.service.GetHistory, request, timeout=70)
        if not response.history.events:
            continue
        close: HistoryEvent = response.history.events[-1]
        if close.event_type != _CONTINUED:
            return close, execution.run_id
        new_run = close.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
        execution = common_pb2.WorkflowExecution(workflow_id=workflow_id, run_id=new_run)


def close_outcome(close: HistoryEvent) -> dict[str, Any]:
    """What a close event says: status, and the result or the failure's message."""
    status = EventType.Name(close.event_type).removeprefix("EVENT_TYPE_WORKFLOW_EXECUTION_")
    outcome: dict[str, Any] = {"status": status}
    which = close.WhichOneof("attributes")
    attributes: Any = getattr(close, which) if which else None
    if close.event_type == _COMPLETED:
        values = out.payloads_value(close.workflow_execution_completed_event_attributes.result)
        outcome["result"] = values[0] if values else None
    elif attributes is not None:
        fields = attributes.DESCRIPTOR.fields_by_name
        if "failure" in fields:
            outcome["failure"] = attributes.failure.message
        elif "reason" in fields and attributes.reason:
            outcome["failure"] = attributes.reason
    return outcome


async def _describe(client: Client, args: argparse.Namespace, inputs: list[Any]) -> int:
    handle = client.get_workflow_handle(args.workflow_id, run_id=args.run_id or None)
    description = await handle.describe()
    # The input and outcome live in the history (decoded by the client's codec).
    history = await client.get_workflow_handle(
        args.workflow_id, run_id=description.run_id
    ).fetch_history()
    record = describe_record(description, history.events)
    table = out.key_values({k: v for k, v in record.items() if v not in (None, [], "")})
    _print(out.emit(args.output, record, table))
    return 0


def describe_record(
    description: WorkflowExecutionDescription, events: Sequence[HistoryEvent]
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "workflowId": description.id,
        "runId": description.run_id,
        "type": description.workflow_type,
        "taskQueue": description.task_queue,
        "status": description.status.name,
        "startTime": out.timestamp(description.start_time),
        "closeTime": out.timestamp(description.close_time),
        "historyLength": description.history_length,
        "input": None,
    }
    if events and events[0].HasField("workflow_execution_started_event_attributes"):
        started = events[0].workflow_execution_started_event_attributes
        record["input"] = out.payloads_value(started.input)
    if description.close_time is not None and events:
        outcome = close_outcome(events[-1])
        record.update({k: v for k, v in outcome.items() if k in ("result", "failure")})
    record["pendingActivities"] = [
        out.message_dict(activity) for activity in description.raw.pending_activities
    ]
    return record


async def _show(client: Client, args: argparse.Namespace, inputs: list[Any]) -> int:
    """The history: all of it at once (a table whose columns fit what it shows), or,
    with ``--follow``, each page as the long poll returns it until the run closes
    (a table with fixed columns, so rows printed apart still line up; ``-o json``
    streams JSON lines, since a document cannot be printed before the end)."""
    run_id = args.run_id
    if args.follow and not run_id:
        # Pin the run: a later page must not jump to a newer run of the same id.
        run_id = (await client.get_workflow_handle(args.workflow_id).describe()).run_id
    execution = common_pb2.WorkflowExecution(workflow_id=args.workflow_id, run_id=run_id)
    if not args.follow:
        history = await client.get_workflow_handle(
            args.workflow_id, run_id=run_id or None
        ).fetch_history()
        if args.output == "table":
            _print(out.history_table(history.events))
        else:
            _print(out.emit(args.output, [out.event_dict(e) for e in history.events], ""))
        return 0
    widths = out.history_widths()
    if args.output == "table":
        _print(out.history_header(widths))
    token = b""
    while True:
        request = service_pb2.GetHistoryRequest(
            namespace=client.namespace, next_page_token=token, wait_new_event=True
        )
        request.execution.CopyFrom(execution)
        response = await client.call(client.service.GetHistory, request, timeout=70)
        for event in response.history.events:
            if args.output == "table":
                _print(out.history_row(event, widths))
            else:
                _print(json.dumps(out.event_dict(event), default=str, ensure_ascii=False))
        token = response.next_page_token
        if not token:
            return 0


async def _list(client: Client, args: argparse.Namespace, inputs: list[Any]) -> int:
    records: list[dict[str, Any]] = []
    progress = Progress()  # a listing of many runs reads many pages
    try:
        async for run in client.list_workflows(args.query):
            progress.update(f"listing runs: {len(records) + 1} so far")
            records.append(
                {
                    "workflowId": run.id,
                    "runId": run.run_id,
                    "type": run.workflow_type,
                    "taskQueue": run.task_queue,
                    "status": run.status.name,
                    "startTime": out.timestamp(run.start_time),
                    "closeTime": out.timestamp(run.close_time),
                }
            )
            if args.limit and len(records) >= args.limit:
                break
    finally:
        progress.clear()
    headers = ["STATUS", "WORKFLOW ID", "TYPE", "START TIME", "CLOSE TIME", "RUN ID"]
    keys = ["status", "workflowId", "type", "startTime", "closeTime", "runId"]
    table = out.fit_table(headers, [[r[k] for k in keys] for r in records])
    _print(out.emit(args.output, records, table))
    return 0


async def _count(client: Client, args: argparse.Namespace, inputs: list[Any]) -> int:
    count = await client.count_workflows(args.query)
    _print(out.emit(args.output, {"count": count}, str(count)))
    return 0


async def _signal(client: Client, args: argparse.Namespace, inputs: list[Any]) -> int:
    handle = client.get_workflow_handle(args.workflow_id, run_id=args.run_id or None)
    await handle.signal(args.name, args=inputs)
    record = {"workflowId": args.workflow_id, "runId": args.run_id, "signal": args.name}
    _print(out.emit(args.output, record, f"signal {args.name!r} sent to {args.workflow_id}"))
    return 0


async def _query(client: Client, args: argparse.Namespace, inputs: list[Any]) -> int:
    # Not WorkflowHandle.query: it converts the result, which fails on a payload this
    # CLI cannot decrypt; the renderer shows that one as a placeholder instead.
    request = service_pb2.QueryWorkflowRequest(namespace=client.namespace)
    request.execution.CopyFrom(
        common_pb2.WorkflowExecution(workflow_id=args.workflow_id, run_id=args.run_id)
    )
    request.query.query_type = args.name
    request.query.query_args.CopyFrom(client.data_converter.to_payloads(inputs))
    response = await client.call(client.service.QueryWorkflow, request, timeout=70)
    values = out.payloads_value(response.query_result)
    result = values[0] if values else None
    record = {"workflowId": args.workflow_id, "query": args.name, "result": result}
    _print(out.emit(args.output, record, json.dumps(result, indent=2, ensure_ascii=False)))
    return 0


async def _close(client: Client, args: argparse.Namespace, inputs: list[Any]) -> int:
    handle = client.get_workflow_handle(args.workflow_id, run_id=args.run_id or None)
    if args.command == "cancel":
        await handle.cancel(args.reason or None)
        what = "cancellation requested for"
    else:
        await handle.terminate(args.reason or None)
        what = "terminated"
    record = {"workflowId": args.workflow_id, "runId": args.run_id, "action": args.command}
    _print(out.emit(args.output, record, f"{what} {args.workflow_id}"))
    return 0


async def _handoff(client: Client, args: argparse.Namespace, inputs: list[Any]) -> int:
    handle = client.get_workflow_handle(args.workflow_id, run_id=args.run_id or None)
    version = await handle.handoff(args.to)
    record = {"workflowId": args.workflow_id, "to": args.to, "version": version}
    _print(
        out.emit(args.output, record, f"handed {args.workflow_id} to {args.to} (epoch {version})")
    )
    return 0


COMMANDS: dict[str, Command] = {
    "start": _start,
    "execute": _start,
    "result": _result,
    "describe": _describe,
    "show": _show,
    "list": _list,
    "count": _count,
    "signal": _signal,
    "query": _query,
    "cancel": _close,
    "terminate": _close,
    "handoff": _handoff,
}
