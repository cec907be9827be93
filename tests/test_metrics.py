"""Prometheus metrics, health checks and JSON logs (issue 15): a real server with
``metrics_port=0`` and a real worker, scraped over HTTP and parsed with
prometheus-client's own parser; the gRPC health service; ``tideflow server start-dev
--metrics-port --log-format json`` as a real process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import TIDEFLOW_CLI, Processes, bounded, eventually, free_port, new_id, running_server
from prometheus_client.parser import text_string_to_metric_families

from tideflow import cli
from tideflow.server import ServerConfig, TideflowServer
from tideflow.worker_sdk import Client, Worker, activity, workflow
from tideflow.worker_sdk.exceptions import RPCError
from tideflow.worker_sdk.task_queues import describe_task_queue


@activity.defn
async def double(n: int) -> int:
    return 2 * n


@workflow.defn
class Doubler:
    @workflow.run
    async def run(self, n: int) -> int:
        await workflow.sleep(0.01)
        return await workflow.execute_activity(
            double, n, start_to_close_timeout=timedelta(seconds=30)
        )


@workflow.defn
class WaitsForever:
    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: False)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def http_get(url: str) -> tuple[int, str]:
    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as error:
            return int(error.code), error.read().decode()

    return await asyncio.to_thread(get)


async def scrape(port: int) -> Samples:
    status, text = await http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def test_server_metrics_and_health(tmp_path: Path) -> None:
    # A short timer window: the workflow's 10 ms timer fires without waiting on it.
    config = ServerConfig(timer_window_s=1.0)
    (tmp_path / "node").mkdir()
    url = f"sqlite:///{tmp_path / 'node' / 'tideflow.db'}"
    async with (
        running_server(tmp_path, config) as other,
        TideflowServer(url, port=0, config=config, metrics_port=0) as node,
    ):
        assert node.metrics_port
        queue, idle_queue = new_id("q"), new_id("nobody-polls")
        client = await Client.connect(node.address)
        async with (
            client,
            Worker(
                client, task_queue=queue, workflows=[Doubler, WaitsForever], activities=[double]
            ),
        ):
            assert (
                await bounded(
                    client.execute_workflow(Doubler.run, 21, id=new_id("d"), task_queue=queue)
                )
                == 42
            )
            # A poll parked on the queue when the task comes: a sync match for sure.
            await eventually(lambda: _parked_poll(client, queue), "a parked poll")
            await client.start_workflow(WaitsForever.run, id=new_id("open"), task_queue=queue)
            await client.start_workflow(WaitsForever.run, id=new_id("stuck"), task_queue=idle_queue)
            with contextlib.suppress(RPCError):
                await client.get_workflow_handle(new_id("missing")).describe()
            samples = await eventually(
                lambda: _when_counted(node.metrics_port), "the metrics", timeout=30
            )
        rpc = "tideflow_rpc_requests_total"
        assert total(samples, rpc, method="StartWorkflow", code="OK") >= 3
        assert total(samples, rpc, method="DescribeWorkflow", code="NOT_FOUND") == 1
        assert total(samples, "tideflow_rpc_latency_seconds_count", method="StartWorkflow") >= 3
        for kind in ("workflow", "activity"):
            assert total(samples, "tideflow_task_schedule_to_start_seconds_count", kind=kind) >= 1
            assert total(samples, "tideflow_task_end_to_end_seconds_count", kind=kind) >= 1
        dispatch = "tideflow_task_dispatch_total"
        assert total(samples, dispatch, match="sync", kind="workflow") >= 1
        assert total(samples, dispatch, match="backlog", kind="workflow") >= 1  # idle queue
        assert total(samples, "tideflow_timer_lateness_seconds_count") >= 1
        assert total(samples, "tideflow_store_commit_seconds_count") >= 1
        assert total(samples, "tideflow_store_commit_batch_size_sum") >= total(
            samples, "tideflow_store_commit_batch_size_count"
        )
        assert total(samples, "tideflow_transitions_total") >= 8
        assert total(samples, "tideflow_task_queue_backlog", task_queue=idle_queue) == 1
        assert total(samples, "tideflow_open_runs", namespace="default") == 2

        assert await http_get(f"http://127.0.0.1:{node.metrics_port}/healthz") == (200, "ok\n")
        assert (await http_get(f"http://127.0.0.1:{node.metrics_port}/nope"))[0] == 404
        async with grpc.aio.insecure_channel(node.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
            for service in ("", "tideflow.api.v1.WorkflowService"):
                answer = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
        # Two servers in one process keep their own registries.
        assert node.metrics.registry is not other.metrics.registry


async def _parked_poll(client: Client, queue: str) -> bool:
    description = await describe_task_queue(client, queue)
    return any(poller.polling for poller in description.pollers)


async def _when_counted(port: int | None) -> Samples | None:
    assert port is not None
    samples = await scrape(port)
    # The Doubler's last workflow task is answered after its result is readable.
    done = total(samples, "tideflow_task_end_to_end_seconds_count", kind="workflow") >= 3
    return samples if done and total(samples, "tideflow_open_runs") else None


async def test_start_dev_metrics_port_and_json_logs(procs: Processes, tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    proc = procs.spawn(
        "server",
        [
            *TIDEFLOW_CLI,
            "server",
            "start-dev",
            "--db",
            str(tmp_path / "dev.db"),
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--log-format",
            "json",
        ],
    )
    await procs.wait_for_line(proc, "tideflow server listening on ")
    assert await http_get(f"http://127.0.0.1:{metrics_port}/healthz") == (200, "ok\n")
    status, text = await http_get(f"http://127.0.0.1:{metrics_port}/metrics")
    assert status == 200 and "tideflow_transitions_total" in text
    lines = [json.loads(line) for line in proc.err.read_text().splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(e) for e in lines)
    assert any("metrics on http://" in e["message"] for e in lines)


async def test_worker_metrics(tmp_path: Path) -> None:
    queue = new_id("q")
    async with running_server(tmp_path, ServerConfig(timer_window_s=1.0)) as server:
        client = await Client.connect(server.address)
        worker = Worker(
            client,
            task_queue=queue,
            workflows=[Doubler],
            activities=[double],
            metrics_port=0,
        )
        async with client, worker:
            assert worker.metrics is not None and worker.metrics_port
            for n in range(2):
                handle = await client.start_workflow(
                    Doubler.run, n, id=new_id("d"), task_queue=queue
                )
                assert await bounded(handle.result()) == 2 * n
            samples = await scrape(worker.metrics_port)
        mine = {"task_queue": queue}
        lookups = "tideflow_worker_workflow_cache_lookups_total"
        # Each run's first task replays (miss); its later tasks find it cached (hit).
        assert total(samples, lookups, result="miss", **mine) == 2
        assert total(samples, lookups, result="hit", **mine) >= 2
        assert total(samples, "tideflow_worker_workflow_cache_size", **mine) == 0  # completed
        for kind in ("workflow", "activity"):
            executed = "tideflow_worker_task_execution_seconds_count"
            assert total(samples, executed, kind=kind, **mine) >= 2
        polled = "tideflow_worker_poll_latency_seconds_count"
        assert total(samples, polled, kind="workflow", outcome="task", **mine) >= 1
        # The worker's own listener is gone with it.
        with contextlib.suppress(OSError):
            await http_get(f"http://127.0.0.1:{worker.metrics_port}/metrics")
            raise AssertionError("the worker's metrics listener outlived the worker")


def test_bad_metrics_port_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # Refused before anything starts, so in-process is the real path.
    assert cli.main(["server", "start-dev", "--port", "0", "--metrics-port", "70000"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--metrics-port 70000: not a port number" in err
