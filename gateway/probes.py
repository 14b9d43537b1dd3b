"""Readiness probes for the supervisor: "does it answer yet?", as a bool; and "whose port is it?".

The supervisor polls them every 0.1 s while a child starts, so a refused or slow connection is a plain False,
each call is bounded by `timeout`, and each closes what it opens.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["envoy_ready", "grpc_serving", "http_ok", "listens", "port_free"]

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


def port_free(host: str, port: int) -> bool:
    """Whether a listener could bind `host:port` now. SO_REUSEADDR, as servers set it: TIME_WAIT is no obstacle."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: TCP_LISTEN
                inodes.add(fields[9])
    return inodes


def _group(pgid: int) -> list[int]:
    """The processes of process group `pgid` (each child leads its own; a wrapper script's program is in it too)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def _holds(pid: int, inodes: set[str]) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False  # gone, or not ours to look at
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False


def listens(pid: int, port: int) -> bool | None:
    """Whether process `pid`, or a process of the group it leads, listens on TCP `port`; None where /proc cannot
    tell (not Linux)."""
    if not Path("/proc/net/tcp").exists():
        return None
    inodes = _listening_inodes(port)
    if not inodes:
        return False
    return _holds(pid, inodes) or any(_holds(member, inodes) for member in _group(pid) if member != pid)
