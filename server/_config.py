"""Server settings and the clock the engine reads time from."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from ._tls import UpstreamTLSConfig


class Clock(Protocol):
    def now_micros(self) -> int: ...


class SystemClock:
    def now_micros(self) -> int:
        return time.time_ns() // 1000


# 100 years (365-day years): far beyond any real timeout, far below the int64 microsecond
# timestamps the store keeps (about 292,000 years past 1970), so `now + timeout` never
# overflows. Temporal has no documented maximum; this one is ours.
_HUNDRED_YEARS_S = 100 * 365 * 24 * 3600


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """Tunables of one server node. Defaults match what users of Temporal expect.

    Every client-supplied field is bounded (server/_validation.py): the limits below are
    the configurable ones; lengths the database schema fixes (run id 64, request id 255,
    namespace 100 characters) are not.
    """

    # Largest payload-bearing field accepted, in bytes: each input, result, details,
    # memo, header, search attributes, failure and query argument separately.
    max_payload_bytes: int = 2 * 1024 * 1024
    # Longest id or name, in characters: workflow and activity ids, type names, task
    # queues, signal/query/timer/marker names, schedule ids, worker identities.
    max_id_length: int = 1000
    # Longest free text, in characters: reasons, notes, descriptions, visibility
    # queries, cron expressions, control strings, query error messages.
    max_text_length: int = 32 * 1024
    # Longest duration accepted (timeouts, timers, retry intervals, schedule intervals).
    max_duration_s: int = _HUNDRED_YEARS_S
    # Deepest nesting of a failure's cause chain and of a search attribute's JSON value.
    max_nesting_depth: int = 32
    # Largest gRPC message the server sends or receives. History is served in pages of
    # at most `history_page_bytes`, so a run's history may grow far beyond it.
    grpc_max_message_bytes: int = 64 * 1024 * 1024
    # Target size of one history page (GetHistory, and the first page of a workflow
    # task); a page always holds at least one event, and one event always fits the
    # message limit because every field it is built from is bounded.
    history_page_bytes: int = 4 * 1024 * 1024
    # Long polls (workflow and activity tasks) parked at once on this node; one more is
    # answered RESOURCE_EXHAUSTED, which clients retry with backoff.
    max_concurrent_polls: int = 50_000
    # How long a poll waits for a task before returning an empty response.
    long_poll_timeout_s: float = 60.0
    # Cluster nodes: a poll reaching a node that does not serve its queue waits this
    # long in the node's local partition (a task the node commits for the queue is
    # started here, with no hop) before it is forwarded to the queue's owner for as
    # long again, to drain its backlog; skipped while the owner reported a backlog.
    # 0 (the default): no local partitions, every such poll is forwarded at once. Off
    # by default: it cuts a two-node cluster's server CPU per activity on PostgreSQL
    # by a quarter, not on SQLite, and a task queued on the owner may wait up to a
    # turn while the pollers are on local turns (bench/README.md, docs/cluster.md).
    local_poll_s: float = 0.0
    default_workflow_task_timeout_s: float = 10.0
    max_workflow_task_timeout_s: float = 120.0
    # Runs whose mutable state stays cached on this node.
    state_cache_size: int = 10_000
    # Timers due within this window are held in memory; later ones stay in the store.
    timer_window_s: float = 30.0
    # Most timer rows the timer queue holds in memory at once (due ones and those being
    # fired); the window is read from the store in pages of the room there is, so any
    # number of timers due at one instant fire without being loaded together.
    max_timers_in_memory: int = 4096
    # Backoff of workflow task retries after the second failed attempt.
    workflow_task_retry_initial_s: float = 0.1
    workflow_task_retry_max_s: float = 10.0
    # How often a node re-reads the task token keys from the store: a key rotated
    # elsewhere (`tideflow server rotate-token-key`) signs on this node within this time.
    token_key_refresh_s: float = 60.0
    # SQLite PRAGMA synchronous: NORMAL survives process crashes, FULL power loss too.
    sqlite_synchronous: str = "NORMAL"
    # How long a starting server keeps trying to reach an unavailable database (opening
    # the store, the first reads), one log line per attempt, before start() fails: a
    # server started with (or just before) its database waits for it. 0: one attempt.
    store_start_timeout_s: float = 60.0
    # The site this server is (server/_sites.py, `--cluster-name`): the home of the runs
    # started here, and where a task ran when its worker polled here (README
    # "Placement"). A lone server is a cloud with no edges.
    cluster_name: str = "cloud"
    # An edge's upstream site (HOST:PORT) it dials and replicates with; "": none. A site
    # of several nodes: their addresses separated by commas (``upstream_nodes``).
    upstream: str = ""
    # The credential an edge presents to an upstream whose auth is on.
    upstream_api_key: str = ""
    # TLS of the edge's dial to its upstream (server/_tls.py); None: plaintext.
    upstream_tls: UpstreamTLSConfig | None = None
    # Shards of a database this node initialises (None: 16); a database initialised
    # already keeps its own count and refuses another (history/_cluster.py).
    shard_count: int | None = None
    # Shard lease (server/_shards.py): renewed every third of it; a dead node's shards
    # are taken over once it lapses. Safety never depends on it (the range-id fence).
    lease_s: float = 5.0
    # The tier of workers attached here that do not state theirs: "cloud" or "edge"
    # (an edge, one with an upstream, unless set).
    site_tier: str = "cloud"

    @property
    def upstream_nodes(self) -> list[str]:
        """The addresses of the upstream site's nodes (``h1:p1,h2:p2``; "" for none)."""
        return [part.strip() for part in self.upstream.split(",")] if self.upstream else []

    def __post_init__(self) -> None:
        if not 0 < self.history_page_bytes < self.grpc_max_message_bytes:
            raise ValueError("history_page_bytes must be positive and below the message limit")
        # One event holds a few bounded fields (a start: input, memo, header, search
        # attributes, signal input); it must fit one message on its own.
        if 8 * self.max_payload_bytes > self.grpc_max_message_bytes:
            raise ValueError("max_payload_bytes must be at most 1/8 of grpc_max_message_bytes")
        if not self.local_poll_s >= 0:  # also refuses NaN
            raise ValueError("local_poll_s must be 0 (off) or positive")
        if self.max_concurrent_polls < 1:
            raise ValueError("max_concurrent_polls must be at least 1")
        if not self.store_start_timeout_s >= 0:  # also refuses NaN
            raise ValueError("store_start_timeout_s must not be negative")
        if self.max_timers_in_memory < 1:
            raise ValueError("max_timers_in_memory must be at least 1")
        if not self.lease_s > 0:
            raise ValueError("lease_s must be positive")
        if not self.cluster_name:
            raise ValueError("cluster_name must not be empty")
        if self.upstream_tls is not None and not self.upstream:
            raise ValueError("upstream_tls needs upstream")
        if self.upstream and not all(self.upstream_nodes):
            raise ValueError(
                f"upstream {self.upstream!r}: expected HOST:PORT, or several separated by commas"
            )
        if self.site_tier not in ("cloud", "edge"):
            raise ValueError("site_tier must be 'cloud' or 'edge'")


# Seconds a received call may wait for the application to accept it (see below).
_UNREQUESTED_LIMIT_S = 600


def grpc_server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel arguments of the gRPC server.

    gRPC core cancels calls that arrive faster than the application accepts them once
    more than ``grpc.server.max_pending_requests`` (default 1,000; hard limit 3,000) are
    waiting: a burst of 10,000 long polls had about 60% answered CANCELLED within a
    second, before any handler ran. Long polls are cheap while parked, so the limit that
    counts is ours (``max_concurrent_polls``, answered RESOURCE_EXHAUSTED); the pending
    queue only has to absorb a burst of that size.
    """
    pending = max(config.max_concurrent_polls * 2, 10_000)
    return [
        ("grpc.max_receive_message_length", config.grpc_max_message_bytes),
        ("grpc.max_send_message_length", config.grpc_max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.server.max_pending_requests", pending),
        ("grpc.server.max_pending_requests_hard_limit", pending),
        # A call the application has not accepted within this many seconds is cancelled
        # by gRPC core (default 30 s). A burst of thousands of long polls on a busy
        # process can wait that long to be accepted (1,733 of 4,000 polls CANCELLED at
        # load 7 on two cores); they are cheap once accepted, so let them wait.
        ("grpc.server_max_unrequested_time_in_server", _UNREQUESTED_LIMIT_S),
    ]
