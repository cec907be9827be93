"""The SQL schema shared by SQLite, PostgreSQL and CockroachDB.

Times are integer microseconds since the epoch so that every dialect compares them
the same way. Keys are natural keys computed by the engine, which lets a transition
delete exactly the task and timer rows it consumed without reading them first.

Designed for CockroachDB too, which splits every table and index into ranges by key:
keys that grow with time, written by many transactions at once, all land on the last
range of their table or index, one node's hot spot. So

- no primary key is a sequence or a clock: each starts with the namespace and the
  workflow id (or a key of the same make, ``task_key``/``timer_key``), chosen by
  users and spread by them; event ids grow only within one run, whose writes are
  serial anyway; the cluster tables are keyed by shard number, node id or setting
  name; ``task_token_keys`` grows by one per rotation, a manual, rare command;
- the secondary indexes whose key grows with time (start times, creation and due
  times) are created hash-sharded on CockroachDB (``USING HASH``: CockroachDB
  prefixes the key with a hidden bucket column, and its planner scans the buckets of
  an ordered or ranged query and merges them); PostgreSQL and SQLite create them as
  they are. They carry ``info={HASH_SHARDED: True}`` below;
- no sequences, no advisory locks, no ``FOR UPDATE``/``FOR SHARE`` at SERIALIZABLE
  (the fence is a plain read there: ``_cluster.check_fence_txn``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import CreateIndex

metadata = MetaData()

#: ``Index.info`` flag: created ``USING HASH`` on CockroachDB (the key grows with time).
HASH_SHARDED = "cockroachdb_hash_sharded"
_TIME_ORDERED = {HASH_SHARDED: True}


@compiles(CreateIndex, "cockroachdb")
def _create_index_on_cockroachdb(create: CreateIndex, compiler: Any, **kw: Any) -> str:
    """``CREATE INDEX ... USING HASH`` for the indexes flagged ``HASH_SHARDED``."""
    sql = str(compiler.visit_create_index(create, **kw))
    return f"{sql} USING HASH" if create.element.info.get(HASH_SHARDED) else sql


namespaces = Table(
    "namespaces",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("description", Text, nullable=False, default=""),
    Column("retention_seconds", BigInteger, nullable=False, default=0),
    Column("created_at", BigInteger, nullable=False),
)

# One row per run. `db_version` is the optimistic-concurrency guard: a transition
# updates the row only WHERE db_version = the version it read.
executions = Table(
    "executions",
    metadata,
    Column("namespace", String(255), primary_key=True),
    Column("workflow_id", String(1000), primary_key=True),
    Column("run_id", String(64), primary_key=True),
    Column("workflow_type", String(1000), nullable=False),
    Column("task_queue", String(1000), nullable=False),
    Column("status", Integer, nullable=False),
    Column("start_time", BigInteger, nullable=False),
    Column("close_time", BigInteger, nullable=True),
    Column("history_length", BigInteger, nullable=False),
    Column("db_version", BigInteger, nullable=False),
    Column("state", LargeBinary, nullable=False),
)
Index(
    "executions_by_status",
    executions.c.namespace,
    executions.c.status,
    executions.c.start_time,
    info=_TIME_ORDERED,
)

# workflow id -> its newest run. At most one run per workflow id is open: a new run
# replaces the row only if the run it names is closed (conditional UPDATE).
current_executions = Table(
    "current_executions",
    metadata,
    Column("namespace", String(255), primary_key=True),
    Column("workflow_id", String(1000), primary_key=True),
    Column("run_id", String(64), nullable=False),
    Column("status", Integer, nullable=False),
    Column("start_request_id", String(255), nullable=False),
)

# Append-only. A duplicate (namespace, workflow_id, run_id, event_id) means another
# writer already appended that event: the insert fails and the transaction aborts.
history_events = Table(
    "history_events",
    metadata,
    Column("namespace", String(255), primary_key=True),
    Column("workflow_id", String(1000), primary_key=True),
    Column("run_id", String(64), primary_key=True),
    Column("event_id", BigInteger, primary_key=True, autoincrement=False),
    Column("event_type", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
)

# Outbox and backlog of matching: one row per dispatchable workflow or activity task.
tasks = Table(
    "tasks",
    metadata,
    Column("task_key", String(1200), primary_key=True),
    # The run's shard (history/_cluster.py shard_of): a node recovers the rows of the
    # shards it acquires, and only those.
    Column("shard_id", Integer, nullable=False),
    # The task queue's shard (history/_cluster.py queue_shard_of): the node holding it
    # serves the queue, and loads these rows when it acquires the shard.
    Column("queue_shard", Integer, nullable=False),
    Column("namespace", String(255), nullable=False),
    Column("task_queue", String(1000), nullable=False),
    Column("kind", Integer, nullable=False),
    Column("workflow_id", String(1000), nullable=False),
    Column("run_id", String(64), nullable=False),
    Column("ref_id", BigInteger, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    # An activity task's placement (TaskRow.placement); NULL: any worker. Added to older
    # databases in place (history/_cluster.py add_placement_column_txn).
    Column("placement", LargeBinary, nullable=True),
)
Index(
    "tasks_by_queue", tasks.c.namespace, tasks.c.task_queue, tasks.c.created_at, info=_TIME_ORDERED
)
Index("tasks_by_shard", tasks.c.shard_id, tasks.c.task_key)
Index("tasks_by_queue_shard", tasks.c.queue_shard, tasks.c.task_key)

# Durable timers: user timers, timeouts and retry backoffs, by due time.
timers = Table(
    "timers",
    metadata,
    Column("timer_key", String(1200), primary_key=True),
    Column("fire_at", BigInteger, nullable=False),
    Column("shard_id", Integer, nullable=False),
    Column("namespace", String(255), nullable=False),
    Column("workflow_id", String(1000), nullable=False),
    Column("run_id", String(64), nullable=False),
    Column("kind", Integer, nullable=False),
    Column("ref_id", BigInteger, nullable=False),
    Column("attempt", Integer, nullable=False),
)
# The key completes the order the timer queue pages through (keyset pagination on
# (fire_at, timer_key)), so a page of timers due at one instant reads the index alone.
Index("timers_by_due_time", timers.c.fire_at, timers.c.timer_key, info=_TIME_ORDERED)
Index("timers_by_shard", timers.c.shard_id, timers.c.fire_at, timers.c.timer_key)

# ------------------------------------------------------------------- cluster
# (history/_cluster.py; specified by tla/ShardLease.tla) Every key below is chosen by
# the nodes (a shard number, a node id, a setting name), never a sequence.

# Settings fixed when the database is first initialised ("shard_count").
cluster_metadata = Table(
    "cluster_metadata",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("value", String(255), nullable=False),
)

# Shard ownership with a fencing token. `range_id` grows by one on every change of
# owner (compare-and-set); every write of the shard's data checks it in its own
# transaction. `owner` is "" once released; a row is created by its first acquisition.
shards = Table(
    "shards",
    metadata,
    Column("shard_id", Integer, primary_key=True, autoincrement=False),
    Column("owner", String(255), nullable=False),
    Column("range_id", BigInteger, nullable=False),
    Column("lease_expires_at", BigInteger, nullable=False),
)

# The nodes of the cluster: a node is live while its heartbeat is recent. The acquire
# loop balances shards over the live nodes; the advertised address tells a client
# that reached the wrong node where a shard is served.
cluster_members = Table(
    "cluster_members",
    metadata,
    Column("node_id", String(255), primary_key=True),
    Column("address", String(300), nullable=False),
    Column("heartbeat_at", BigInteger, nullable=False),
    Column("started_at", BigInteger, nullable=False),
)

# ------------------------------------------------------------------ visibility
# (history/_visibility_store.py) Custom search attributes, one row per run and name,
# typed: keywords in str_value; ints, bools (0/1) and datetimes (epoch microseconds)
# in int_value; doubles in float_value. Written in the transition that sets them.
search_attributes = Table(
    "search_attributes",
    metadata,
    Column("namespace", String(255), primary_key=True),
    Column("workflow_id", String(1000), primary_key=True),
    Column("run_id", String(64), primary_key=True),
    Column("name", String(255), primary_key=True),
    Column("value_type", Integer, nullable=False),
    Column("str_value", Text, nullable=True),
    Column("int_value", BigInteger, nullable=True),
    Column("float_value", Double, nullable=True),
)
Index(
    "search_attributes_by_keyword",
    search_attributes.c.namespace,
    search_attributes.c.name,
    search_attributes.c.str_value,
)
Index(
    "search_attributes_by_int",
    search_attributes.c.namespace,
    search_attributes.c.name,
    search_attributes.c.int_value,
)
Index(
    "search_attributes_by_float",
    search_attributes.c.namespace,
    search_attributes.c.name,
    search_attributes.c.float_value,
)
Index("search_attributes_by_run", search_attributes.c.namespace, search_attributes.c.run_id)

# The memo a run was started with (a serialized Memo), returned by list.
run_memos = Table(
    "run_memos",
    metadata,
    Column("namespace", String(255), primary_key=True),
    Column("workflow_id", String(1000), primary_key=True),
    Column("run_id", String(64), primary_key=True),
    Column("data", LargeBinary, nullable=False),
)
Index("run_memos_by_run", run_memos.c.namespace, run_memos.c.run_id)
Index(
    "executions_by_start_time", executions.c.namespace, executions.c.start_time, info=_TIME_ORDERED
)

# ------------------------------------------------------------------- schedules
# (history/_schedule_store.py) One row per schedule. `last_slot` is the latest slot
# whose fate was decided (fired, buffered or skipped); the next slot is computed from
# it, so each slot is decided exactly once. `version` guards every update.
# `shard_id` (namespace + schedule id hashed like a run's workflow id): the node that
# owns the shard fires the schedule.
schedules = Table(
    "schedules",
    metadata,
    Column("namespace", String(255), primary_key=True),
    Column("schedule_id", String(1000), primary_key=True),
    Column("shard_id", Integer, nullable=False),
    Column("definition", LargeBinary, nullable=False),
    Column("paused", Boolean, nullable=False),
    Column("notes", Text, nullable=False),
    Column("last_slot", BigInteger, nullable=False),
    Column("next_fire_at", BigInteger, nullable=True),
    Column("version", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("create_request_id", String(255), nullable=False),
    Column("action_count", BigInteger, nullable=False),
    Column("missed_catchup_count", BigInteger, nullable=False),
    Column("overlap_skipped_count", BigInteger, nullable=False),
)
Index("schedules_by_next_fire", schedules.c.next_fire_at)
Index("schedules_by_shard", schedules.c.shard_id, schedules.c.next_fire_at)

# The ledger of a schedule: one row per decided slot or trigger, keyed so that a slot
# (`s:<micros>`) or a trigger request (`t:<request id>`) can be recorded only once.
schedule_actions = Table(
    "schedule_actions",
    metadata,
    Column("namespace", String(255), primary_key=True),
    Column("schedule_id", String(1000), primary_key=True),
    Column("action_key", String(300), primary_key=True),
    Column("kind", Integer, nullable=False),
    Column("slot_time", BigInteger, nullable=False),
    Column("state", Integer, nullable=False),
    Column("overlap", Integer, nullable=False),
    Column("workflow_id", String(1000), nullable=False),
    Column("run_id", String(64), nullable=False),
    Column("running", Boolean, nullable=False),
    Column("decided_at", BigInteger, nullable=False),
    Column("started_at", BigInteger, nullable=True),
    Column("error", Text, nullable=False),
)
Index("schedule_actions_by_state", schedule_actions.c.state)
Index(
    "schedule_actions_by_slot",
    schedule_actions.c.namespace,
    schedule_actions.c.schedule_id,
    schedule_actions.c.slot_time,
)

# ----------------------------------------------------------------------- sites
# (history/_replication_store.py; specified by tla/Replication.tla) A site's replicas
# of runs homed elsewhere live in executions/history_events like any run; these
# tables hold what only sites need. New tables: create_all adds them to a database
# created before sites (no column of an existing table changed).

# Requests (signal, cancel, terminate) for runs homed at another site, kept until the
# replica shows them applied: a grow-only set keyed by the client's request id.
site_inbox = Table(
    "site_inbox",
    metadata,
    Column("namespace", String(255), primary_key=True),
    Column("request_id", String(255), primary_key=True),
    Column("kind", Integer, primary_key=True, autoincrement=False),
    Column("workflow_id", String(1000), nullable=False),
    Column("run_id", String(64), nullable=False),
    Column("request", LargeBinary, nullable=False),
    Column("received_at", BigInteger, nullable=False),
    Column("forwarded_at", BigInteger, nullable=True),
    Column("attempts", Integer, nullable=False),
)

# What this site knows of each replica's home: the home's last event id at the last
# listing and when the replica last caught up with it (lag in describe and status).
replica_runs = Table(
    "replica_runs",
    metadata,
    Column("namespace", String(255), primary_key=True),
    Column("workflow_id", String(1000), primary_key=True),
    Column("run_id", String(64), primary_key=True),
    Column("peer", String(255), nullable=False),
    Column("home_last_event_id", BigInteger, nullable=False),
    Column("synced_at", BigInteger, nullable=False),
)

# Batches that did not continue a replica (an event differs from the one stored):
# never applied, kept for operators.
replication_alarms = Table(
    "replication_alarms",
    metadata,
    Column("namespace", String(255), primary_key=True),
    Column("workflow_id", String(1000), primary_key=True),
    Column("run_id", String(64), primary_key=True),
    Column("event_id", BigInteger, primary_key=True, autoincrement=False),
    Column("peer", String(255), nullable=False),
    Column("detected_at", BigInteger, nullable=False),
    Column("detail", Text, nullable=False),
)
