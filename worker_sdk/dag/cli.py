"""``tideflow dag ...``: validate, draw, run and inspect DAG definitions.

    tideflow dag validate FILE [--executors MODULE]
    tideflow dag graph FILE [--dot]
    tideflow dag run FILE [--input JSON|@FILE] [--wait] [--address HOST:PORT]
                          [--task-queue QUEUE] [--id ID] [--executors MODULE]
    tideflow dag status ID [--address HOST:PORT] [--json] [--from-history]
    tideflow dag list [--status STATUS] [--address HOST:PORT]
    tideflow dag pause|resume|cancel ID [--address HOST:PORT]

``--executors`` names a Python file or module whose activities (for example
functions decorated with ``dag.executor``) are the executors: ``validate`` then
also reports unknown executors, and ``run`` starts a worker for them (and the
interpreter) in this process for the duration of the run (so it implies ``--wait``).
Exit codes: 0 success, 1 the run failed or was cancelled (or the file is invalid),
2 bad usage or an error talking to the server.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import os
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

from .. import exceptions as exc
from ..client import Client
from ..task_queues import describe_task_queue
from ._errors import DagValidationError
from ._format import load
from ._handle import DagHandle, start_dag
from ._interpreter import DagWorkflow
from ._model import DAG_WORKFLOW_TYPE, DEFAULT_TASK_QUEUE, WorkflowStatus
from ._render import ProgressPrinter, render_dot, render_graph, render_table
from ._workflow import Workflow

DEFAULT_ADDRESS = "127.0.0.1:7233"
CONNECT_TIMEOUT_S = 5.0
#: How long ``dag status`` waits for a worker to answer before it replays the history.
QUERY_TIMEOUT_S = 10.0


def add_parser(groups: Any) -> None:
    """Register the ``dag`` command group on the ``tideflow`` parser's subparsers."""
    parser = groups.add_parser("dag", help="declarative DAG workflows")
    parser.set_defaults(log_level="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    def connected(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--address", default=DEFAULT_ADDRESS, help="server HOST:PORT")
        p.add_argument("--namespace", default="default")
        p.add_argument(
            "--api-key",
            default=os.environ.get("TIDEFLOW_API_KEY"),
            help="API key or JWT of a server with --auth on (default: $TIDEFLOW_API_KEY)",
        )
        return p

    validate = sub.add_parser("validate", help="check a definition file")
    validate.add_argument("file")
    validate.add_argument("--executors", help="module or .py file whose activities exist")

    graph = sub.add_parser("graph", help="print the graph of a definition")
    graph.add_argument("file")
    graph.add_argument("--dot", action="store_true", help="Graphviz DOT instead of text")

    run = connected(sub.add_parser("run", help="start a run of a definition"))
    run.add_argument("file")
    run.add_argument("--input", default="{}", help="JSON object, or @FILE holding one")
    run.add_argument("--wait", action="store_true", help="show progress until the run ends")
    run.add_argument("--task-queue", default=DEFAULT_TASK_QUEUE)
    run.add_argument("--id", default=None, help="run id (default: dag-<id>-<random>)")
    run.add_argument(
        "--executors", help="module or .py file: run a worker for its activities (implies --wait)"
    )

    status = connected(sub.add_parser("status", help="the task states of a run, as a table"))
    status.add_argument("id")
    status.add_argument("--json", action="store_true", help="the WorkflowInstance as JSON")
    status.add_argument(
        "--from-history",
        action="store_true",
        help="replay the run's history here instead of asking a worker",
    )

    listing = connected(sub.add_parser("list", help="DAG runs and their states"))
    listing.add_argument("--status", default=None, help="e.g. PAUSED, RUNNING, FAILED")

    for name, text in (
        ("pause", "stop scheduling new tasks"),
        ("resume", "continue a paused run"),
        ("cancel", "cancel a run (compensations run)"),
    ):
        connected(sub.add_parser(name, help=text)).add_argument("id")


def main(args: argparse.Namespace) -> int:
    """Run a parsed ``tideflow dag ...`` command; returns the exit code."""
    try:
        if args.command == "validate":
            return _validate(args)
        if args.command == "graph":
            wf = load(args.file)
            print(render_dot(wf) if args.dot else render_graph(wf.validate()))
            return 0
        return asyncio.run(_remote(args))
    except DagValidationError as error:
        print(f"{args.file if hasattr(args, 'file') else 'dag'}: {error}", file=sys.stderr)
        return 1
    except (exc.RPCError, OSError, ValueError, ImportError) as error:
        print(f"tideflow dag {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _validate(args: argparse.Namespace) -> int:
    wf = load(args.file)
    known = None
    if args.executors:
        known = _known_executors(wf, _activities(load_module(args.executors)), None)
    wf.validate(executors=known)
    edges = sum(len(t.dependencies) for t in wf.tasks)
    print(f"{args.file}: valid: DAG {wf.id!r} v{wf.version}, {len(wf.tasks)} tasks, {edges} edges")
    return 0


def load_module(target: str) -> ModuleType:
    """A module by dotted name, or a ``.py`` file by path."""
    path = Path(target)
    if target.endswith(".py") or path.exists():
        name = f"tideflow_dag_executors_{uuid.uuid4().hex[:8]}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {target}")
        module = importlib.util.module_from_spec(spec)
        # Let the file import its neighbours.
        sys.path.insert(0, str(path.resolve().parent))
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(target)


def _activities(module: ModuleType) -> list[Any]:
    found = [
        value
        for value in vars(module).values()
        if callable(value) and hasattr(value, "__tideflow_activity_definition__")
    ]
    if not found:
        raise ImportError(f"{module.__name__} defines no activities (executors)")
    return found


def _activity_names(activities: list[Any]) -> set[str]:
    from .. import activity

    return {activity.definition_of(a).name for a in activities}


def _known_executors(wf: Workflow, activities: list[Any], queue: str | None) -> set[str]:
    """Executor names of ``wf`` that the activities provide (executors mapped to
    another task queue are assumed to be served elsewhere)."""
    names = _activity_names(activities)
    used = {t.executor for t in wf.tasks}
    used |= {t.compensation.executor for t in wf.tasks if t.compensation is not None}
    known = set()
    for name in used:
        mapping = wf.executor_for(name)
        elsewhere = mapping.task_queue is not None and mapping.task_queue != queue
        if elsewhere or (mapping.activity or name) in names:
            known.add(name)
    return known


def _parse_input(text: str) -> Any:
    if text.startswith("@"):
        text = Path(text[1:]).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--input is not valid JSON: {error}") from None


async def _remote(args: argparse.Namespace) -> int:
    if args.command == "run":
        # Everything local first: a bad file or input needs no server.
        args.definition = load(args.file)
        args.payload = _parse_input(args.input)
    try:
        client = await asyncio.wait_for(
            Client.connect(args.address, namespace=args.namespace, api_key=args.api_key),
            CONNECT_TIMEOUT_S,
        )
    except TimeoutError:
        raise OSError(f"cannot reach a tideflow server at {args.address}") from None
    try:
        if args.command == "run":
            return await _run(client, args)
        if args.command == "status":
            return await _status(client, args)
        if args.command == "list":
            return await _list(client, args)
        handle = DagHandle(client, args.id)
        if args.command == "pause":
            await handle.pause("tideflow dag pause")
        elif args.command == "resume":
            await handle.resume()
        else:
            await handle.cancel("tideflow dag cancel")
        print(f"{args.command}: sent to {args.id}")
        return 0
    finally:
        await client.close()


async def _status(client: Client, args: argparse.Namespace) -> int:
    handle = DagHandle(client, args.id)
    instance = None
    if not args.from_history:
        queue = (await handle.describe()).task_queue
        # The status query needs a worker; without one it would wait for a minute.
        if await _has_workers(client, queue):
            try:
                async with asyncio.timeout(QUERY_TIMEOUT_S):
                    instance = await handle.status()
            except TimeoutError:
                _note(f"no worker answered within {QUERY_TIMEOUT_S:g} s")
        else:
            _note(f"no worker polls task queue {queue!r}")
    if instance is None:
        instance = await handle.status(from_history=True)
    if args.json:
        print(json.dumps(instance.to_dict(), indent=2))
    else:
        print(render_table(instance))
    return 0


def _note(why: str) -> None:
    print(f"note: {why}: the state is replayed from the run's history", file=sys.stderr)


async def _has_workers(client: Client, task_queue: str) -> bool:
    """Whether a worker polls ``task_queue`` now. A worker caught between two polls
    counts as none: the history then gives the same answer."""
    pollers = (await describe_task_queue(client, task_queue)).pollers
    return any(p.polling for p in pollers)


async def _run(client: Client, args: argparse.Namespace) -> int:
    from ..worker import Worker

    wf: Workflow = args.definition
    payload = args.payload
    worker = None
    known = None
    if args.executors:
        activities = _activities(load_module(args.executors))
        known = _known_executors(wf, activities, args.task_queue)
        worker = Worker(
            client,
            task_queue=args.task_queue,
            workflows=[DagWorkflow],
            activities=activities,
        )
    try:
        handle = await start_dag(
            client, wf, payload, id=args.id, task_queue=args.task_queue, known_executors=known
        )
    except exc.InvalidArgumentError as error:
        print(f"tideflow dag run: {error.message} ({error.status})", file=sys.stderr)
        return 1
    print(f"started DAG {wf.id!r} v{wf.version} as run {handle.id}", flush=True)
    if worker is None and not args.wait:
        return 0
    from_history = False
    if worker is not None:
        worker.start()
    elif not await _has_workers(client, args.task_queue):
        print(
            f"note: no worker polls task queue {args.task_queue!r}, so the run waits until "
            "one runs the DAG interpreter (dag.DagWorkflow) there (or pass --executors "
            "MODULE to run one here); progress is read from the run's history meanwhile",
            file=sys.stderr,
            flush=True,
        )
        from_history = True
    try:
        printer = ProgressPrinter()
        last = None
        async for instance in handle.watch(from_history=from_history):
            last = instance
            for line in printer.update(instance):
                print(line, flush=True)
        assert last is not None
        print(render_table(last), flush=True)
        return 0 if last.status is WorkflowStatus.COMPLETED else 1
    finally:
        if worker is not None:
            await worker.shutdown()


async def _list(client: Any, args: argparse.Namespace) -> int:
    query = f"WorkflowType = '{DAG_WORKFLOW_TYPE}'"
    if args.status:
        query += f" AND DagStatus = '{args.status.upper()}'"
    rows = [("RUN ID", "DAG", "VERSION", "STATUS", "STARTED")]
    async for run in client.list_workflows(query):
        attrs = run.search_attributes
        status = attrs.get("DagStatus")
        if run.status.name != "RUNNING" and status in (None, "RUNNING", "PAUSED", "CREATED"):
            status = run.status.name  # closed by the engine (terminated, timed out)
        rows.append(
            (
                run.id,
                str(attrs.get("DagId", "?")),
                str(attrs.get("DagVersion", "?")),
                str(status),
                run.start_time.strftime("%Y-%m-%d %H:%M:%S"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0
