"""The audit log: one structured line per mutating RPC, on logger ``tideflow.audit``.

The frontend's ``_rpc`` boundary (server/_frontend.py) calls ``begin`` before each
handler and ``AuditEntry.done`` after it, whatever the outcome, so no mutating RPC can
skip its line. Which RPCs mutate is the table ``MUTATING`` below; reads (describe,
history, list, count, query) write nothing and log nothing. The SiteService writes the
line of each ``Link`` an edge opens itself (server/_sites.py), accepted or refused.

A line is logfmt (``key=value``, values with spaces or quotes JSON-quoted), e.g.::

    rpc=SignalWorkflow outcome=OK namespace=default identity=ops@host1
    workflow_id=order-7 run_id=... peer=ipv4:10.0.0.5:50112 client_cert=ops

and the same fields travel as a dict in the record's ``audit`` attribute for handlers
that ship JSON. ``identity`` is what the client says it is; ``principal`` (with auth
on, server/_auth.py) is who its API key or JWT proves it is; ``peer`` and, over mTLS,
``client_cert`` (the certificate's common name) are what the connection proves.
Workflow and activity task RPCs name their run through the task token, once its
signature is checked (``note_token``). Payloads, reasons and details are never logged.
"""

from __future__ import annotations

import contextvars
import json
import logging
from typing import Any

from tideflow.api.v1 import state_pb2

from ._peers import FORWARDED_HEADER

log = logging.getLogger("tideflow.audit")

# RPCs that change durable state. A poll changes it only when it hands out a task (the
# task's started event is written), so polls log a line only then.
MUTATING = frozenset(
    {
        "RegisterNamespace",
        "StartWorkflow",
        "SignalWorkflow",
        "RequestCancelWorkflow",
        "TerminateWorkflow",
        "RespondWorkflowTaskCompleted",
        "RespondWorkflowTaskFailed",
        "RespondActivityTaskCompleted",
        "RespondActivityTaskFailed",
        "RespondActivityTaskCanceled",
        "RecordActivityHeartbeat",
        "ShutdownWorker",
        "CreateSchedule",
        "PatchSchedule",
        "DeleteSchedule",
        "PollWorkflowTask",
        "PollActivityTask",
    }
)
_POLLS = frozenset({"PollWorkflowTask", "PollActivityTask"})

# The verified task token of the RPC being served (each gRPC call runs in its own task,
# hence its own context).
_token: contextvars.ContextVar[state_pb2.TaskToken | None] = contextvars.ContextVar(
    "tideflow_audit_token", default=None
)


# The authenticated caller of the RPC being served (auth on), as server/_auth.py named it.
_principal: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tideflow_audit_principal", default=None
)


# The node that served this call when this node forwarded it (server/_routing.py): that
# node wrote the call's line, so this one writes none.
_forwarded_to: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tideflow_audit_forwarded_to", default=None
)


def note_forwarded(node_id: str) -> None:
    """Record that node ``node_id`` served the RPC (and wrote its audit line)."""
    _forwarded_to.set(node_id)


def note_principal(name: str) -> None:
    """Record who the RPC's credentials proved the caller is."""
    _principal.set(name)


def note_token(token: state_pb2.TaskToken) -> None:
    """Record the run a task RPC acts on (called once its token is verified)."""
    _token.set(token)


class AuditEntry:
    """The line of one mutating RPC, written by ``done``."""

    def __init__(self, rpc: str, request: Any, context: Any) -> None:
        self._rpc = rpc
        self._request = request
        # Read now, while the call is surely live: the line is written when the RPC
        # ends, which may be after the caller cancelled it, and gRPC's peer() of a
        # cancelled call reads freed memory (a server died of it with SIGSEGV).
        self._peer = _peer_fields(context)
        _token.set(None)
        _principal.set(None)
        _forwarded_to.set(None)

    def done(self, outcome: str, response: Any) -> None:
        if not log.isEnabledFor(logging.INFO):
            return  # nobody reads it: skip gathering the fields (~4% of a busy server)
        if self._rpc in _POLLS and not (response is not None and response.task_token):
            return  # an empty poll wrote nothing
        if _forwarded_to.get() is not None:
            return  # the node that served it wrote the line (forwarded_by=this node)
        fields = {"rpc": self._rpc, "outcome": outcome}
        principal = _principal.get()
        if principal is not None:
            fields["principal"] = principal
        fields.update(_request_fields(self._request, _token.get()))
        if response is not None:
            fields.update(_response_fields(response))
        fields.update(self._peer)
        log.info(_logfmt(fields), extra={"audit": fields})


def begin(rpc: str, request: Any, context: Any) -> AuditEntry | None:
    """The audit entry of an RPC about to be served; None for reads, and while nobody
    reads the audit log (its level above INFO: no line would be written)."""
    if rpc not in MUTATING or not log.isEnabledFor(logging.INFO):
        return None
    return AuditEntry(rpc, request, context)


def _request_fields(request: Any, token: state_pb2.TaskToken | None) -> dict[str, str]:
    out: dict[str, str] = {}
    namespace = getattr(request, "namespace", "") or (token.namespace if token else "")
    if namespace:
        out["namespace"] = namespace
    identity = getattr(request, "identity", "")
    if identity:
        out["identity"] = identity
    execution = None
    for field in ("workflow_execution", "execution"):
        if _has(request, field):
            execution = getattr(request, field)
    workflow_id = getattr(request, "workflow_id", "") or (
        execution.workflow_id if execution else ""
    )
    run_id = execution.run_id if execution else ""
    if token is not None:
        workflow_id, run_id = token.workflow_id, token.run_id
    if workflow_id:
        out["workflow_id"] = workflow_id
    if run_id:
        out["run_id"] = run_id
    schedule_id = getattr(request, "schedule_id", "")
    if schedule_id:
        out["schedule_id"] = schedule_id
    if token is not None and token.is_activity:
        out["scheduled_event_id"] = str(token.scheduled_event_id)
        out["attempt"] = str(token.attempt)
    return out


def _response_fields(response: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    run_id = getattr(response, "run_id", "")  # StartWorkflow: the run it started
    if run_id:
        out["run_id"] = run_id
    if _has(response, "workflow_execution"):  # a poll: the task it handed out
        out["workflow_id"] = response.workflow_execution.workflow_id
        out["run_id"] = response.workflow_execution.run_id
    return out


def _peer_fields(context: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        forwarded_by = [v for k, v in context.invocation_metadata() or () if k == FORWARDED_HEADER]
        if forwarded_by:
            # The peer is that node; the caller's credentials travelled with the call.
            out["forwarded_by"] = str(forwarded_by[0])
        out["peer"] = context.peer()
        names = context.auth_context().get("x509_common_name")
    except Exception:  # a context without a transport (in-process tests)
        return out
    if names:
        out["client_cert"] = b",".join(names).decode(errors="replace")
    return out


def _has(message: Any, field: str) -> bool:
    try:
        return bool(message.HasField(field))
    except ValueError:
        return False  # the message has no such field


def _logfmt(fields: dict[str, str]) -> str:
    return " ".join(f"{key}={_quoted(value)}" for key, value in fields.items())


def _quoted(value: str) -> str:
    if value and all(c.isprintable() and c not in ' "=' for c in value):
        return value
    return json.dumps(value, ensure_ascii=False)
