"""Fuzz suite (issue 16): every RPC of ``tideflow.api.v1.WorkflowService``, enumerated
from the service descriptor (a new RPC is fuzzed the day it is added), over a real gRPC
channel against a real server, on every store under test, with:

(a) random bytes as the request body;
(b) hypothesis-built requests, structurally valid but hostile, drawn from the message
    descriptors: huge and empty strings, unicode (astral planes, RTL marks, combining
    marks; never surrogates, which protobuf strings cannot hold), NUL, extreme and
    negative durations and timestamps, unknown enum values, random repeated and map
    fields, deep failure chains, random commands in RespondWorkflowTaskCompleted, and
    real signed task tokens of other runs (of this namespace and of another one),
    fresh, stale or with a byte flipped, replayed against every RPC that takes one.

What must hold: the server answers only documented codes (never INTERNAL or UNKNOWN),
logs no traceback, still answers GetSystemInfo afterwards (same process), runs started
before the fuzzing keep their history unchanged, and a normal workflow (worker,
activity, signal) still runs to completion.

The default run is deterministic (``derandomize=True``, no example database) and
bounded to about half a minute per store (60 hostile requests per RPC);
``TIDEFLOW_FUZZ_EXAMPLES=N`` draws N hostile requests per RPC (and N // 2 random
bodies) for a longer run. The figures (inputs
tried, per RPC and status code) are printed at the end of each run (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, cast

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.timestamp_pb2 import Timestamp
from helpers import bounded, eventually, new_id, running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tideflow.api.v1 import command_pb2, common_pb2, service_pb2, service_pb2_grpc
from tideflow.server import ServerConfig
from tideflow.worker_sdk import Client, Worker, activity, workflow

NS = "default"
# A second namespace: its runs' tokens are replayed against the first.
OTHER_NS = "fuzz-other"
SERVICE = service_pb2.DESCRIPTOR.services_by_name["WorkflowService"]
METHODS: list[MethodDescriptor] = list(SERVICE.methods)
# Statuses the server documents. DEADLINE_EXCEEDED is the server's own answer to a
# query no worker took (the fuzzer's queues have no worker); the client's deadline
# below is far longer, so a hang would not pass as one.
ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
# RPCs that take a task token, and those of them that decide the task's outcome.
TOKEN_METHODS = [m for m in METHODS if "task_token" in m.input_type.fields_by_name]
_OUTCOMES = frozenset(
    m.name
    for m in TOKEN_METHODS
    if m.name.startswith("Respond") and m.name != "RespondQueryTaskCompleted"
)
_CALL_TIMEOUT_S = 60.0
_HOSTILE_EXAMPLES = int(os.environ.get("TIDEFLOW_FUZZ_EXAMPLES", "60"))
_BYTES_EXAMPLES = max(1, _HOSTILE_EXAMPLES // 2)
# Long polls (and history long polls, and queries) give up fast: the fuzzer polls its
# own queues over and over.
_CONFIG = ServerConfig(long_poll_timeout_s=0.05)
# Loggers whose errors and tracebacks count as a failure of the fuzzed server.
_WATCHED_LOGGERS = ("tideflow", "grpc", "asyncio")

# ------------------------------------------------------------ hostile values

_HUGE = 70_000  # over every string bound (ids 1000, text 32 KiB), under the message limit
_HOSTILE_TEXT = [
    "",
    "\x00",
    "a\x00b",
    "x" * 1001,
    "y" * _HUGE,
    "\U0001f600\U0001d54f\U00010348",  # astral planes
    "\u202eevil\u202c",  # RTL override
    "\u05e9\u05dc\u05d5\u05dd",  # Hebrew
    "e" + "\u0301" * 200,  # combining marks
    "\ufeff\u200b\u2028\u2029",
    " ",
    "../../etc/passwd",
    "' OR 1=1 --",
    "%s%n",
    "WorkflowId = 'x' ORDER BY",
]
# Any unicode but surrogates (Cs), which protobuf strings cannot carry.
_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
# Mild requests' values of fields whose valid values have a syntax of their own.
_MILD_TEXT = {
    "cron_schedule": [""],
    "cron_expressions": ["*/5 * * * *", "0 0 * * *", "@hourly"],
    "query": ["", "WorkflowType = 'Fuzzed'", "ExecutionStatus = 'Running' ORDER BY StartTime"],
    "timezone_name": ["", "Europe/Berlin", "UTC"],
    "request_id": [str(uuid.UUID(int=n)) for n in range(4)],
    "run_id": [""],
}
# Fields a mild request always sets (ids, names, tokens, the messages holding them):
# without them, a request stops at its first check.
_MILD_ALWAYS = frozenset(
    {
        "namespace",
        "workflow_id",
        "workflow_type",
        "task_queue",
        "name",
        "signal_name",
        "request_id",
        "task_token",
        "execution",
        "workflow_execution",
        "schedule_id",
        "schedule",
        "spec",
        "action",
        "start_workflow",
        "query",
        "query_type",
        "activity_id",
        "activity_type",
        "commands",
    }
)
_NAME = st.text("abcxyz-_.019", min_size=1, max_size=12)
_INT_EDGES = {
    "int32": [0, 1, -1, 2**31 - 1, -(2**31)],
    "int64": [0, 1, -1, 2**63 - 1, -(2**63), 2**53 + 1],
    "uint32": [0, 1, 2**32 - 1],
    "uint64": [0, 1, 2**64 - 1],
}
_INT_RANGES = {
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
}
_INT_KINDS = {
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_SINT32: "int32",
    FieldDescriptor.TYPE_SFIXED32: "int32",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_SINT64: "int64",
    FieldDescriptor.TYPE_SFIXED64: "int64",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_FIXED32: "uint32",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_FIXED64: "uint64",
}
_MAX_DEPTH = 4
_FAILURE = common_pb2.Failure.DESCRIPTOR.full_name
_COMMAND = command_pb2.Command.DESCRIPTOR.full_name
_TIMESTAMP = Timestamp.DESCRIPTOR.full_name


@dataclass
class Targets:
    """What the fuzzer aims at: its own runs (ids, run ids, queues) and real tokens."""

    workflow_ids: list[str] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    tokens: list[bytes] = field(default_factory=list)
    fresh_token: Callable[[bool], bytes] | None = None


def _tampered(token: bytes, index: int) -> bytes:
    if not token:
        return b"\x01"
    index %= len(token)
    return token[:index] + bytes([token[index] ^ 0x5A]) + token[index + 1 :]


class Builder:
    """Draws hostile values for one request, field by field, from its descriptor."""

    def __init__(self, data: st.DataObject, targets: Targets) -> None:
        self.data = data
        self.targets = targets
        # One request in three is mild (valid-looking values, most fields set): a
        # request hostile in every field stops at the first bound checked, and the
        # engine behind the bounds must be fuzzed too.
        self.mild = bool(data.draw(st.integers(0, 2)) == 0)

    def draw(self, strategy: st.SearchStrategy[Any]) -> Any:
        return self.data.draw(strategy)

    def string(self, name: str) -> str:
        if self.mild and name in _MILD_TEXT:
            return str(self.draw(st.sampled_from(_MILD_TEXT[name])))
        pool: list[str] = []
        if name in ("namespace", "workflow_namespace"):
            pool = [NS] * 6 + [OTHER_NS] if self.mild else [NS, NS, OTHER_NS, "no-such-ns"]
        elif name.endswith("workflow_id") or name in ("id", "schedule_id"):
            pool = self.targets.workflow_ids
        elif name == "run_id":
            pool = [*self.targets.run_ids, str(uuid.uuid4())]
        elif name in ("name", "task_queue", "sticky_task_queue"):
            pool = self.targets.queues
        choice = self.draw(st.integers(0, 3))
        if pool and (choice <= 1 or (self.mild and name == "namespace")):
            return str(self.draw(st.sampled_from(pool)))
        if self.mild:
            return str(self.draw(_NAME))
        if choice == 2:
            return str(self.draw(st.sampled_from(_HOSTILE_TEXT)))
        return str(self.draw(_TEXT))

    def bytes_(self, name: str) -> bytes:
        tokens = self.targets.tokens
        if "page_token" in name and self.draw(st.integers(0, 2)) == 0:
            if self.draw(st.booleans()):
                return self.visibility_cursor()
            return self.continuation()
        choice = self.draw(st.integers(2, 4) if self.mild else st.integers(0, 6))
        if self.mild and choice == 2:
            choice = 0  # an untampered token
        if "token" in name and tokens and choice <= 2:
            token = bytes(self.draw(st.sampled_from(tokens)))
            if choice == 2:
                return _tampered(token, self.draw(st.integers(0, 1000)))
            return token
        if "token" in name and choice == 3 and self.targets.fresh_token is not None:
            # A live token of a run that just got a task (workflow or activity).
            return self.targets.fresh_token(self.draw(st.booleans()))
        if choice == 4 and not self.mild:
            return bytes(
                self.draw(
                    st.sampled_from([b"", b"1", b"-1", b"0", b"9" * 30, b"\xff" * 8, b"x" * _HUGE])
                )
            )
        return bytes(self.draw(st.binary(max_size=64)))

    def continuation(self) -> bytes:
        """A task's history continuation token (``tfh1:`` + JSON head + events, which
        the client hands back as GetHistory's page token) with a hostile head."""
        value = st.one_of(
            st.sampled_from(["1", "0", "-1", "Infinity", "NaN", "1e400", "true", "null", "[]"]),
            st.integers(-(2**70), 2**70).map(str),
            st.sampled_from(self.targets.run_ids or ["r"]).map(lambda run: f'"{run}"'),
        )
        keys = self.draw(st.lists(st.sampled_from("rnlbx"), max_size=5, unique=True))
        head = ", ".join(f'"{key}": {self.draw(value)}' for key in keys)
        if self.draw(st.integers(0, 5)) == 0:
            head = "[" * self.draw(st.sampled_from([10, 5000, 60_000]))
        else:
            head = "{" + head + "}"
        return b"tfh1:" + head.encode() + b"\n" + bytes(self.draw(st.binary(max_size=16)))

    def visibility_cursor(self) -> bytes:
        """A list page token (base64 JSON: the query's fingerprint, which anyone can
        compute, and the keyset cursor) with a hostile cursor."""
        query = str(self.draw(st.sampled_from(_MILD_TEXT["query"])))
        fingerprint = hashlib.sha256(f"{NS}\0{query}".encode()).hexdigest()[:16]
        scalar = st.one_of(
            st.integers(-(2**70), 2**70), _TEXT, st.none(), st.booleans(), st.floats()
        )
        cursor = self.draw(st.lists(scalar, max_size=5))
        body = json.dumps({"q": fingerprint, "c": cursor})
        if self.draw(st.integers(0, 5)) == 0:
            body = "[" * self.draw(st.sampled_from([10, 3000]))
        return base64.urlsafe_b64encode(body.encode())

    def integer(self, kind: str) -> int:
        if self.mild:
            return int(self.draw(st.integers(0, 100)))
        if self.draw(st.booleans()):
            return int(self.draw(st.sampled_from(_INT_EDGES[kind])))
        low, high = _INT_RANGES[kind]
        return int(self.draw(st.integers(low, high)))

    def scalar(self, fd: FieldDescriptor) -> Any:
        if fd.type == FieldDescriptor.TYPE_STRING:
            return self.string(fd.name)
        if fd.type == FieldDescriptor.TYPE_BYTES:
            return self.bytes_(fd.name)
        if fd.type == FieldDescriptor.TYPE_BOOL:
            return self.draw(st.booleans())
        if fd.type == FieldDescriptor.TYPE_ENUM:
            assert fd.enum_type is not None
            defined = [v.number for v in fd.enum_type.values]
            if self.mild:
                return self.draw(st.sampled_from(defined))
            return self.draw(st.one_of(st.sampled_from(defined), st.integers(-3, 10_000)))
        if fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            width: Literal[32, 64] = 32 if fd.type == FieldDescriptor.TYPE_FLOAT else 64
            if self.mild:
                return self.draw(st.floats(0, 10, width=width))
            return self.draw(st.floats(width=width))
        return self.integer(_INT_KINDS[fd.type])

    def fill(self, message: Message, depth: int = 0) -> Message:
        # The upb runtime's descriptor classes stand in for the Python ones.
        descriptor = cast(Descriptor, message.DESCRIPTOR)
        if descriptor.full_name == _COMMAND:
            return self._command(message, depth)
        if descriptor.full_name == _TIMESTAMP and self.mild:
            message.seconds = self.draw(st.integers(1_700_000_000, 1_900_000_000))  # type: ignore[attr-defined]
            return message
        if descriptor.full_name == _FAILURE and not self.mild and self.draw(st.integers(0, 7)) == 0:
            return self._failure_chain(message)
        for fd in descriptor.fields_by_name.values():
            if self.mild and fd.name in _MILD_ALWAYS:
                pass
            elif not self.draw(st.booleans()):
                continue
            self._set(message, fd, depth)
        return message

    def _set(self, message: Message, fd: FieldDescriptor, depth: int) -> None:
        is_message = fd.type == FieldDescriptor.TYPE_MESSAGE
        if is_message and depth >= _MAX_DEPTH:
            return
        container = getattr(message, fd.name) if _is_repeated(fd) else None
        entry = fd.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_fd = entry.fields_by_name["value"]
            for _ in range(self.draw(st.integers(0, 3))):
                key = self.scalar(entry.fields_by_name["key"])
                if value_fd.type == FieldDescriptor.TYPE_MESSAGE:
                    self.fill(container[key], depth + 1)  # type: ignore[index]
                else:
                    container[key] = self.scalar(value_fd)  # type: ignore[index]
            return
        if container is not None:
            for _ in range(self.draw(st.integers(0, 3))):
                if is_message:
                    self.fill(container.add(), depth + 1)
                else:
                    container.append(self.scalar(fd))
            return
        if is_message:
            child = getattr(message, fd.name)
            child.SetInParent()
            self.fill(child, depth + 1)
            return
        setattr(message, fd.name, self.scalar(fd))

    def _command(self, message: Message, depth: int) -> Message:
        """A command whose type and attributes mostly agree (so the engine's command
        handling is reached), sometimes not, sometimes of an unknown type."""
        assert isinstance(message, command_pb2.Command)
        types = list(command_pb2.CommandType.DESCRIPTOR.values)
        value = self.draw(st.sampled_from(types))
        unknown = not self.mild and self.draw(st.integers(0, 5)) == 0
        number = self.draw(st.integers(-3, 999)) if unknown else value.number
        message.command_type = number
        attributes = value.name.removeprefix("COMMAND_TYPE_").lower() + "_command_attributes"
        fields = command_pb2.Command.DESCRIPTOR.fields_by_name
        mismatched = not self.mild and self.draw(st.integers(0, 4)) == 0
        if mismatched or attributes not in fields:
            attributes = self.draw(st.sampled_from(sorted(fields)))
        if attributes != "command_type":
            child = getattr(message, attributes)
            child.SetInParent()
            self.fill(child, depth + 1)
        return message

    def _failure_chain(self, message: Message) -> Message:
        """A failure whose cause chain is deep (the bound is 32)."""
        assert isinstance(message, common_pb2.Failure)
        node = message
        for level in range(self.draw(st.integers(1, 60))):
            node.message = f"level {level}"
            node = node.cause
        return message


def _is_repeated(fd: FieldDescriptor) -> bool:
    return bool(fd.is_repeated)


# ------------------------------------------------------------------ the fuzzer


@dataclass
class Figures:
    tried: collections.Counter[str] = field(default_factory=collections.Counter)
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    accepted: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)

    def summary(self, label: str) -> str:
        total = sum(self.tried.values())
        lines = [
            f"fuzz {label}: {total} inputs over {len(self.tried)} RPCs, "
            f"{len(self.failures)} failures; codes {dict(sorted(self.codes.items()))}"
        ]
        lines += [
            f"  {name}: {count} tried, {self.accepted[name]} OK"
            for name, count in sorted(self.tried.items())
        ]
        lines += [f"  FAILURE {failure}" for failure in self.failures[:30]]
        return "\n".join(lines)


class Fuzzer:
    """Runs in a thread of its own with a blocking channel, while the server (and the
    worker of the protected runs) run on the test's event loop."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 128 * 1024 * 1024)]
        )
        self.figures = Figures()
        self.targets = Targets()
        self._lock = threading.Lock()

    def close(self) -> None:
        self.channel.close()

    def raw(self, method: str, body: bytes) -> tuple[grpc.StatusCode, str, bytes]:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(
            f"/{SERVICE.full_name}/{method}"
        )
        try:
            answer = call(body, timeout=_CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", b""
        return grpc.StatusCode.OK, "", bytes(answer)

    def call(self, method: str, request: Message) -> Message:
        """A call that must succeed (set-up of the fuzzer's own runs)."""
        code, details, answer = self.raw(method, request.SerializeToString())
        assert code == grpc.StatusCode.OK, (method, code, details)
        output = GetMessageClass(SERVICE.methods_by_name[method].output_type)
        return output.FromString(answer)

    def check(self, method: str, body: bytes, shown: str) -> grpc.StatusCode:
        code, details, _ = self.raw(method, body)
        with self._lock:  # the replay round calls from several threads
            self.figures.tried[method] += 1
            self.figures.codes[code.name] += 1
            if code == grpc.StatusCode.OK:
                self.figures.accepted[method] += 1
            if code not in ALLOWED:
                failure = f"{method} -> {code.name} {details!r}: {shown[:300]}"
                self.figures.failures.append(failure)
        return code

    # ------------------------------------------------------------- targets

    def start_run(self, namespace: str, queue: str) -> tuple[str, str]:
        workflow_id = new_id("fz")
        request = service_pb2.StartWorkflowRequest(
            namespace=namespace, workflow_id=workflow_id, request_id=str(uuid.uuid4())
        )
        request.workflow_type.name = "Fuzzed"
        request.task_queue.name = queue
        started = self.call("StartWorkflow", request)
        assert isinstance(started, service_pb2.StartWorkflowResponse)
        return workflow_id, started.run_id

    def poll(self, namespace: str, queue: str, *, activity: bool) -> bytes:
        method = "PollActivityTask" if activity else "PollWorkflowTask"
        request_class = service_pb2.PollActivityTaskRequest if activity else None
        request = (request_class or service_pb2.PollWorkflowTaskRequest)(
            namespace=namespace, identity="fuzzer"
        )
        request.task_queue.name = queue
        for _ in range(200):
            answer = self.call(method, request)
            token = bytes(answer.task_token)  # type: ignore[attr-defined]
            if token:
                return token
        raise AssertionError(f"no task on {queue}")

    def token_of_new_run(self, namespace: str, *, activity: bool) -> bytes:
        """A live token: a new run's first workflow task, or the activity it schedules."""
        queue = new_id("fzq")
        self.targets.queues.append(queue)
        workflow_id, run_id = self.start_run(namespace, queue)
        if namespace == NS:
            self.targets.workflow_ids.append(workflow_id)
            self.targets.run_ids.append(run_id)
        token = self.poll(namespace, queue, activity=False)
        if not activity:
            return token
        schedule = command_pb2.Command(command_type=command_pb2.COMMAND_TYPE_SCHEDULE_ACTIVITY_TASK)
        attributes = schedule.schedule_activity_task_command_attributes
        attributes.activity_id = "a1"
        attributes.activity_type.name = "FuzzedActivity"
        attributes.task_queue.name = queue
        attributes.start_to_close_timeout.FromSeconds(3600)
        respond = service_pb2.RespondWorkflowTaskCompletedRequest(
            task_token=token, commands=[schedule], identity="fuzzer"
        )
        self.call("RespondWorkflowTaskCompleted", respond)
        return self.poll(namespace, queue, activity=True)

    def fresh_token(self, activity: bool) -> bytes:
        token = self.token_of_new_run(NS, activity=activity)
        self.targets.tokens.append(token)
        return token

    def prepare(self) -> None:
        register = service_pb2.RegisterNamespaceRequest(namespace=OTHER_NS)
        self.call("RegisterNamespace", register)
        for namespace in (NS, OTHER_NS):
            for of_activity in (False, True):
                self.targets.tokens.append(self.token_of_new_run(namespace, activity=of_activity))
        self.targets.fresh_token = self.fresh_token

    # --------------------------------------------------------------- rounds

    def random_bodies(self, method: MethodDescriptor) -> None:
        @_fuzz_settings(_BYTES_EXAMPLES)
        @given(st.binary(max_size=512))
        def body(raw: bytes) -> None:
            self.check(method.name, raw, f"bytes {raw[:100]!r}")

        body()

    def hostile_requests(self, method: MethodDescriptor) -> None:
        request_class = GetMessageClass(method.input_type)
        # Hypothesis replays draws: the pools must not change during its run (fresh
        # tokens made while it runs join them for the next RPC).
        frozen = Targets(
            workflow_ids=list(self.targets.workflow_ids),
            run_ids=list(self.targets.run_ids),
            queues=list(self.targets.queues),
            tokens=list(self.targets.tokens),
            fresh_token=self.targets.fresh_token,
        )

        @_fuzz_settings(_HOSTILE_EXAMPLES)
        @given(st.data())
        def hostile(data: st.DataObject) -> None:
            request = Builder(data, frozen).fill(request_class())
            self.check(method.name, request.SerializeToString(), _shown(request))

        hostile()

    def _check_call(self, call: tuple[str, Message]) -> grpc.StatusCode:
        method, request = call
        return self.check(method, request.SerializeToString(), _shown(request))

    def replay_round(self) -> None:
        """Each live token (workflow and activity task, of both namespaces) sent at
        once, twice, to every RPC that takes a task token, and as the page token of
        another run's history: every answer documented, and the task's outcome
        applied at most once."""
        other_run = self.targets.workflow_ids[0]
        with ThreadPoolExecutor(max_workers=8) as pool:
            for namespace in (NS, OTHER_NS):
                for of_activity in (False, True):
                    token = self.token_of_new_run(namespace, activity=of_activity)
                    calls: list[tuple[str, Message]] = []
                    for method in TOKEN_METHODS:
                        request: Any = GetMessageClass(method.input_type)()
                        request.task_token = token
                        if "namespace" in method.input_type.fields_by_name:
                            request.namespace = NS
                        calls += [(method.name, request)] * 2
                    history = service_pb2.GetHistoryRequest(namespace=NS, next_page_token=token)
                    history.execution.workflow_id = other_run
                    calls.append(("GetHistory", history))
                    codes = list(pool.map(self._check_call, calls))
                    outcomes = [
                        name
                        for (name, _), code in zip(calls, codes, strict=True)
                        if code == grpc.StatusCode.OK and name in _OUTCOMES
                    ]
                    if len(outcomes) > 1:
                        with self._lock:
                            self.figures.failures.append(
                                f"one {namespace} task's token applied {len(outcomes)} "
                                f"times: {outcomes}"
                            )

    def run(self) -> Figures:
        self.prepare()
        for method in METHODS:
            self.random_bodies(method)
            self.hostile_requests(method)
        self.replay_round()
        return self.figures


def _fuzz_settings(examples: int) -> settings:
    # Deterministic (CI sees the same inputs every run), no example database written,
    # no deadline (a call to a loaded server may take long: that is no failure).
    return settings(
        derandomize=True,
        database=None,
        deadline=None,
        max_examples=examples,
        suppress_health_check=list(HealthCheck),
    )


def _shown(request: Message) -> str:
    text = str(request)
    return text if len(text) < 300 else text[:300] + "..."


# ------------------------------------------------------- tracebacks in the log


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        watched = record.name.split(".")[0] in _WATCHED_LOGGERS
        if watched and (record.exc_info or record.levelno >= logging.ERROR):
            self.records.append(record)


@contextmanager
def tracebacks_logged() -> Iterator[list[logging.LogRecord]]:
    collector = _Collector()
    root = logging.getLogger()
    root.addHandler(collector)
    try:
        yield collector.records
    finally:
        root.removeHandler(collector)


# -------------------------------------------------- the normal workflows around it


@activity.defn
async def shout(word: str) -> str:
    return word.upper()


@workflow.defn
class Normal:
    """An activity, then a signal: what must still work after the fuzzing."""

    def __init__(self) -> None:
        self.heard: list[str] = []

    @workflow.run
    async def run(self, word: str) -> str:
        loud: str = await workflow.execute_activity(
            shout, word, start_to_close_timeout=timedelta(seconds=60)
        )
        await workflow.wait_condition(lambda: bool(self.heard))
        return f"{loud} {self.heard[0]}"

    @workflow.signal
    def hear(self, word: str) -> None:
        self.heard.append(word)


async def _history(client: Client, workflow_id: str) -> list[bytes]:
    handle = client.get_workflow_handle(workflow_id)
    history = await handle.fetch_history()
    return [event.SerializeToString() for event in history.events]


# About half a minute per store by default on a quiet machine; the long run scales.
@pytest.mark.timeout(max(600, _HOSTILE_EXAMPLES * 3))
async def test_fuzz_every_rpc(store_url: str) -> None:
    async with (
        running_server(store_url, _CONFIG) as server,
        await Client.connect(server.address) as client,
    ):
        if True:
            queue = new_id("normal")
            async with Worker(client, task_queue=queue, workflows=[Normal], activities=[shout]):
                # Runs that exist before the fuzzing: one completed, one waiting for a
                # signal. The fuzzer never names them; nothing it does may touch them.
                done = await client.start_workflow(
                    Normal.run, "before", id=new_id("done"), task_queue=queue
                )
                await done.signal(Normal.hear, "ok")
                assert await bounded(done.result()) == "BEFORE ok"
                waiting = await client.start_workflow(
                    Normal.run, "waiting", id=new_id("wait"), task_queue=queue
                )
                await waiting.signal(Normal.hear, "first")
                parked = await client.start_workflow(
                    Normal.run, "parked", id=new_id("park"), task_queue=queue
                )
                assert await bounded(waiting.result()) == "WAITING first"
                protected = [done.id, waiting.id, parked.id]
                before = {wid: await _history(client, wid) for wid in protected}
                await _until_parked(server.address, parked.id)
                before[parked.id] = await _history(client, parked.id)

                fuzzer = Fuzzer(server.address)
                with tracebacks_logged() as logged:
                    try:
                        figures = await asyncio.to_thread(fuzzer.run)
                    finally:
                        fuzzer.close()
                label = store_url.split(":", 1)[0]
                print("\n" + figures.summary(label))

                assert not figures.failures, figures.summary(label)
                assert {m.name for m in METHODS} <= set(figures.tried)
                tracebacks = [f"{r.name}: {r.getMessage()}" for r in logged]
                assert not tracebacks, tracebacks[:10]

                # The same server process still answers, and serves a normal workflow.
                async with grpc.aio.insecure_channel(server.address) as channel:
                    stub = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
                    info = await stub.GetSystemInfo(service_pb2.GetSystemInfoRequest())
                assert info.server_version
                after = await client.start_workflow(
                    Normal.run, "after", id=new_id("after"), task_queue=queue
                )
                await after.signal(Normal.hear, "fuzz")
                assert await bounded(after.result()) == "AFTER fuzz"
                for wid in protected:
                    assert await _history(client, wid) == before[wid], wid
                await parked.signal(Normal.hear, "still")
                assert await bounded(parked.result()) == "PARKED still"


async def _until_parked(address: str, workflow_id: str) -> None:
    """Wait until the run sits on its signal with nothing pending, so its history is
    final until someone signals it."""
    request = service_pb2.DescribeWorkflowRequest(namespace=NS)
    request.execution.workflow_id = workflow_id
    async with grpc.aio.insecure_channel(address) as channel:
        stub = service_pb2_grpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]

        async def parked() -> bool:
            described = await stub.DescribeWorkflow(request)
            return not described.pending_activities and not (
                described.pending_workflow_task_attempt
            )

        await eventually(parked, "the run to wait for its signal")
