"""A DAG with a diamond, a failing branch and saga compensation.

    .venv/bin/python examples/saga/run.py [--address "1 Main St"] [--policy continue]

An embedded server on SQLite, a worker with the interpreter and the shop's executors
(executors.py), and order.yaml: reserve-stock, then charge-payment and book-shipment
in parallel, then confirm-order. With the default address book-shipment fails on all
three attempts, confirm-order is skipped, and the compensations undo the payment
(after one failed refund attempt, retried) and then the reservation. The shop's
database shows the stock restored and the payment refunded.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import sys
import tempfile
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from executors import EXECUTORS, init_shop  # noqa: E402

from tideflow.server import TideflowServer  # noqa: E402
from tideflow.worker_sdk import Client, Worker, dag  # noqa: E402

QUEUE = "orders-saga"


async def main(address: str, policy: str, workdir: Path) -> int:
    shop = workdir / "shop.db"
    init_shop(shop)
    definition = dag.load(HERE / "order.yaml").with_failure_policy(policy)
    print(dag.render_graph(definition))
    async with TideflowServer(f"sqlite:///{workdir / 'tideflow.db'}", port=0) as server:
        client = await Client.connect(server.address)
        async with Worker(
            client, task_queue=QUEUE, workflows=[dag.DagWorkflow], activities=EXECUTORS
        ):
            order_id = uuid.uuid4().hex[:8]
            handle = await client.start_dag(
                definition,
                {
                    "order_id": order_id,
                    "sku": "widget",
                    "quantity": 3,
                    "amount_cents": 4200,
                    "address": address,
                },
                task_queue=QUEUE,
            )
            printer = dag.ProgressPrinter()
            async for instance in handle.watch(interval=0.1):
                for line in printer.update(instance):
                    print(f"  {line}", flush=True)
            print(dag.render_table(await handle.status()))
            try:
                print(f"result: {await handle.result()}")
                code = 0
            except dag.DagFailureError as error:
                print(f"failed: {error.message}")
                print(f"  failed tasks: {error.failed_tasks}, skipped: {error.skipped_tasks}")
                print(f"  compensations: {error.compensations}")
                code = 1
        await client.close()
    with sqlite3.connect(shop) as conn:
        print(f"stock now: {conn.execute('SELECT units FROM stock').fetchone()[0]} (was 10)")
        print(f"payments: {conn.execute('SELECT payment_id, status FROM payments').fetchall()}")
        print("shop log: " + "; ".join(r[0] for r in conn.execute("SELECT entry FROM log")))
    return code


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="1 nowhere road", help="'nowhere' makes it fail")
    parser.add_argument("--policy", default="fail_workflow", choices=["fail_workflow", "continue"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="tideflow-saga-"))
    asyncio.run(main(args.address, args.policy, workdir))
