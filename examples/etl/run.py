"""The design document's ETL workflow as a durable DAG (part of the main job).

    make demo        (or: .venv/bin/python examples/etl/run.py [--db FILE])

It starts an embedded tideflow server on SQLite (like examples/hello/run.py), a
worker with the DAG interpreter and the three executors of executors.py, seeds a
source SQLite database with messy events, runs etl.yaml (extract-data ->
transform-data -> load-data; the extract fails once on purpose and is retried with
backoff), prints every task's progress as it happens and the final task table, and
reads the loaded rows back from the target table.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from executors import EXECUTORS, seed_source  # noqa: E402

from tideflow.server import TideflowServer  # noqa: E402
from tideflow.worker_sdk import Client, Worker, dag  # noqa: E402

QUEUE = "etl"


async def main(db: Path, workdir: Path) -> int:
    source, target = workdir / "source.db", workdir / "warehouse.db"
    seeded = seed_source(source)
    target.unlink(missing_ok=True)
    definition = dag.load(HERE / "etl.yaml")
    print(f"ETL demo: history in {db}; {seeded} source rows in {source}")
    print(dag.render_graph(definition))
    async with TideflowServer(f"sqlite:///{db}", port=0) as server:
        client = await Client.connect(server.address)
        async with Worker(
            client, task_queue=QUEUE, workflows=[dag.DagWorkflow], activities=EXECUTORS
        ):
            handle = await client.start_dag(
                definition,
                {
                    "source_db": str(source),
                    "target_db": str(target),
                    "target_table": "events_processed",
                    "simulate_failures": 1,
                },
                task_queue=QUEUE,
                known_executors=["data-connector", "data-transformer", "data-writer"],
            )
            print(f"started run {handle.id}")
            printer = dag.ProgressPrinter()
            async for instance in handle.watch(interval=0.1):
                for line in printer.update(instance):
                    print(f"  {line}", flush=True)
            final = await handle.status()
            print(dag.render_table(final))
            output = await handle.result()
        await client.close()
    with sqlite3.connect(target) as conn:
        loaded = conn.execute("SELECT COUNT(*) FROM events_processed").fetchone()[0]
        sample = conn.execute(
            "SELECT id, user_id, event_type, occurred_at, country FROM events_processed ORDER BY id"
        ).fetchall()
    print("loaded rows (id, user_id, event_type, occurred_at, country):")
    for row in sample:
        print(f"  {row}")
    print(f"loaded rows: {loaded} of {seeded} into {target}:events_processed")
    return 0 if loaded == output["rows_loaded"] else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="ETL DAG on an embedded SQLite server")
    parser.add_argument("--db", type=Path, default=None, help="history SQLite file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="tideflow-etl-"))
    raise SystemExit(asyncio.run(main(args.db or workdir / "tideflow.db", workdir)))
