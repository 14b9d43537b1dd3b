"""Readiness probes for the supervisor: "does it answer yet?", as a bool.

The supervisor polls them every 0.1 s while a child starts, so a refused or slow connection is a plain False,
each call is bounded by `timeout`, and each closes what it opens.
"""

from __future__ import annotations

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["envoy_ready", "grpc_serving", "http_ok"]

# A proxy from the environment must not intercept probes of our own loopback ports.
_GRPC_OPTIONS = (("grpc.enable_http_proxy", 0),)


async def _get(url: str, timeout: float) -> tuple[int, bytes] | None:  # noqa: ASYNC109 - see below
    """Status and body of a GET, or None when there is no answer in time."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url, allow_redirects=False) as response,
        ):
            return response.status, await response.read()
    except (aiohttp.ClientError, TimeoutError):
        return None


# The probes take `timeout` (ruff's ASYNC109 would have callers wrap them in `asyncio.timeout`) because each one is
# a single bounded request: the deadline belongs to the request itself, and for gRPC it also travels to the server.


async def http_ok(url: str, timeout: float = 1.0) -> bool:  # noqa: ASYNC109
    """The URL answers a GET with 2xx."""
    reply = await _get(url, timeout)
    return reply is not None and 200 <= reply[0] < 300


async def envoy_ready(admin_port: int, timeout: float = 1.0) -> bool:  # noqa: ASYNC109
    """Envoy's admin `/ready` says 200 `LIVE`, which it does only once its listeners and clusters are up."""
    reply = await _get(f"http://127.0.0.1:{admin_port}/ready", timeout)
    return reply is not None and reply[0] == 200 and reply[1].strip() == b"LIVE"


async def grpc_serving(target: str, timeout: float = 1.0) -> bool:  # noqa: ASYNC109
    """The gRPC health service at `target` (`host:port` or `unix:/path`) reports the whole server SERVING."""
    async with grpc.aio.insecure_channel(target, options=_GRPC_OPTIONS) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
