"""Server settings and the clock the engine reads time from."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    def now_micros(self) -> int: ...


class SystemClock:
    def now_micros(self) -> int:
        return time.time_ns() // 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """Tunables of one server node. Defaults match what users of Temporal expect."""

    # Largest single payload set (input, result, details) accepted, in bytes.
    max_payload_bytes: int = 2 * 1024 * 1024
    # How long a poll waits for a task before returning an empty response.
    long_poll_timeout_s: float = 60.0
    default_workflow_task_timeout_s: float = 10.0
    max_workflow_task_timeout_s: float = 120.0
    # Runs whose mutable state stays cached on this node.
    state_cache_size: int = 10_000
    # Timers due within this window are held in memory; later ones stay in the store.
    timer_window_s: float = 30.0
    # Backoff of workflow task retries after the second failed attempt.
    workflow_task_retry_initial_s: float = 0.1
    workflow_task_retry_max_s: float = 10.0
    # SQLite PRAGMA synchronous: NORMAL survives process crashes, FULL power loss too.
    sqlite_synchronous: str = "NORMAL"
