"""The SiteService behind auth: a cloud with API-key auth lets an edge link only with
an admin key (``--upstream-api-key``), and serves the site status to admins only.
Two in-process servers on SQLite, real gRPC between them."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from helpers import eventually
from helpers_sites import linked, site_status

from tideflow.api.v1 import replication_pb2, replication_pb2_grpc
from tideflow.server import AuthConfig, AuthMode, ServerConfig, TideflowServer
from tideflow.worker_sdk import Client
from tideflow.worker_sdk.exceptions import RPCError


async def test_an_edge_links_to_a_cloud_with_auth_on_with_an_admin_key(tmp_path: Path) -> None:
    cloud = TideflowServer(
        f"sqlite:///{tmp_path / 'cloud.db'}", port=0, auth=AuthConfig(mode=AuthMode.API_KEY)
    )
    async with cloud:
        _, root = await cloud.store.api_keys.create("root", ["*:admin"])
        _, reader = await cloud.store.api_keys.create("reader", ["default:reader"])
        async with grpc.aio.insecure_channel(cloud.address) as channel:
            stub = replication_pb2_grpc.SiteServiceStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.DescribeSite(replication_pb2.DescribeSiteRequest())
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(RPCError) as denied:
            await site_status(await Client.connect(cloud.address, api_key=reader))
        assert denied.value.status == "PERMISSION_DENIED"
        admin = await Client.connect(cloud.address, api_key=root)
        edge_config = ServerConfig(
            cluster_name="edge1", upstream=cloud.address, upstream_api_key=root
        )
        async with TideflowServer(
            f"sqlite:///{tmp_path / 'edge.db'}", port=0, config=edge_config
        ) as edge:
            await eventually(lambda: linked(admin, "edge1"), "the keyed edge linked")
            edge_client = await Client.connect(edge.address)
            assert (await site_status(edge_client)).site == "edge1"
