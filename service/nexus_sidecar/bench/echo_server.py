"""A bare ``grpc.aio`` echo server: the transport floor the service benchmark compares against.

It returns the request bytes unchanged (no parsing), with the sidecar's channel options (its
default settings: message sizes, keepalive) and a grpc.health.v1 service so the benchmark waits
for it the same way.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nexus_sidecar.server.settings import ServerSettings

METHOD = "/nexus.bench.Echo/Echo"


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def serve(port: int) -> None:
    """Serve until killed."""
    server = grpc.aio.server(options=ServerSettings().grpc_options())
    handler = grpc.method_handlers_generic_handler(
        "nexus.bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
