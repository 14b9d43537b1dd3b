"""The whole stack, started the way users start it: `shimmy-gateway up` (supervisor, emulator, processor, Envoy).

One stack per test session on free loopback ports; tests that change the emulator's behaviour go through its
`/_emulator/` control routes, and a fixture resets it after each test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bench.stack import die_with_parent, free_port  # the tests' ports too: one allocator, never the same port twice
from shimmy_spec.versions import PINNED
from tests.open_responses import recording

# Shimmy lines that differ where clients feel it (docs/shimmy-versions.md): the image's 1.x and 2.x HEAD.
SHIMMY_VERSIONS = (PINNED, "2.5.0")


@dataclass
class Stack:
    proc: subprocess.Popen[bytes]
    log: Path
    gateway_port: int
    shimmy_port: int
    admin_port: int
    extproc_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def emulator(self) -> str:
        return f"http://127.0.0.1:{self.shimmy_port}/_emulator"

    def configure(self, **changes: object) -> None:
        httpx.put(f"{self.emulator}/config", json=changes).raise_for_status()

    def shimmy_version(self) -> str:
        """The version the emulator mimics (and, for a `versioned_stack`, the one the processor was told)."""
        return str(httpx.get(f"{self.emulator}/config").json()["version"])

    def emulator_stats(self) -> dict:
        return httpx.get(f"{self.emulator}/stats").json()

    def envoy_stats(self, prefix: str) -> dict[str, int]:
        text = httpx.get(f"http://127.0.0.1:{self.admin_port}/stats", params={"filter": prefix}).text
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.isdigit():
                out[name] = int(value)
        return out

    def output(self) -> str:
        return self.log.read_text(errors="replace")


_INTEGRATION = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A client socket the garbage collector finalizes is not an error *here*: these tests drive the stack through
    many clients (the SDKs, httpx, aiohttp, raw sockets in threads), and one such socket, collected in the middle of
    a later test, failed that test once (`test_raw_http_garbage`), while a whole run that collected after
    every test found no test leaving one. The gateway's own processes run as subprocesses, whose warnings never
    reach this filter; the unit tests, which run the processor in this process, keep every ResourceWarning an error.
    Each is marked `stack` too: `make test-fast` leaves them out.
    """
    for item in items:
        if _INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"))
            item.add_marker(pytest.mark.stack)  # every integration test drives real processes


def start_stack(extra_env: dict[str, str] | None = None, timeout: float = 60.0, wait: bool = True) -> Stack:
    """Start `shimmy-gateway up`; return once it says ready and (with `wait`) /health answers 200."""
    ports = {name: free_port() for name in ("gateway", "shimmy", "admin")}
    ports["extproc"] = free_port(span=2)  # EXTPROC_WORKERS=2 binds the next port too
    env = {
        **os.environ,
        "GATEWAY_PORT": str(ports["gateway"]),
        "SHIMMY_PORT": str(ports["shimmy"]),
        "ENVOY_ADMIN_PORT": str(ports["admin"]),
        "EXTPROC_PORT": str(ports["extproc"]),
        "SHIMMY_BACKEND": "emulator",
        "EMULATOR_ENGINE": "fixed",  # deterministic replies; tests of the real model ask for "llama"
        "HEALTH_INTERVAL_S": "0.5",
        **(extra_env or {}),
    }
    log = Path(tempfile.mkstemp(prefix="stack-", suffix=".log")[1])
    with log.open("wb") as out:
        argv = [sys.executable, "-m", "gateway.cli", "up"]
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    stack = Stack(proc, log, ports["gateway"], ports["shimmy"], ports["admin"], ports["extproc"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "[supervisor] ready" in stack.output():
            if wait:
                wait_healthy(stack)
            return stack
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    stop_stack(stack)
    raise RuntimeError(f"stack did not start:\n{stack.output()}")


def wait_healthy(stack: Stack, timeout: float = 20.0) -> None:
    """Envoy's first active health check of Shimmy and the processor's first probe may lag the ready line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{stack.url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gateway never healthy:\n{stack.output()}")


def terminate(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def stop_stack(stack: Stack) -> int:
    return terminate(stack.proc)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    # Generations a test abandons (a stop sequence, a client that leaves) keep their slot for as long as Shimmy
    # would go on with them (docs/admission.md); room for several keeps the next tests of the session unqueued.
    started = start_stack({"MAX_ACTIVE_REQUESTS": "8"})
    yield started
    stop_stack(started)
    started.log.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def streamed() -> Iterator[Stack]:
    """A 2.x Shimmy, which streams every answer to the gateway: exact per-token counts and in-band failures to
    check. (The pinned 1.x answers a non-stream request in one piece, and swallows a stream's failure:
    tests/integration/test_shimmy_versions_gateway.py.)"""
    started = start_stack({"EMULATOR_VERSION": "2.5.0", "MAX_ACTIVE_REQUESTS": "8"})
    yield started
    stop_stack(started)
    started.log.unlink(missing_ok=True)


@pytest.fixture(scope="session", params=SHIMMY_VERSIONS, ids=lambda v: f"shimmy-{v}")
def versioned_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A stack per Shimmy version (the emulator mimics it, the processor is told it), for version-dependent tests;
    room for several generations, as the session's `stack` has."""
    started = start_stack({"EMULATOR_VERSION": request.param, "MAX_ACTIVE_REQUESTS": "8"})
    yield started
    stop_stack(started)
    started.log.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _reset_emulator(request: pytest.FixtureRequest) -> Iterator[None]:
    """Whatever a test changed in a shared stack's emulator (`/_emulator/config`) does not reach the next test."""
    yield
    for stack in request.node.funcargs.values():
        if isinstance(stack, Stack) and stack.proc.poll() is None:
            with contextlib.suppress(httpx.TransportError):  # an external Shimmy a test stopped has no emulator
                httpx.post(f"{stack.emulator}/reset").raise_for_status()


@pytest.fixture(autouse=True)
def _open_responses() -> Iterator[None]:
    """Every Responses answer a test reads (SDKs, agent frameworks, raw httpx) meets the Open Responses
    specification: each body and each streamed event (tests/open_responses.py)."""
    with recording() as recorder:
        yield
    recorder.check()


def sse_events(lines: list[str]) -> list[dict | str]:
    """`data:` payloads of an OpenAI SSE response, JSON-decoded except `[DONE]`."""
    out: list[dict | str] = []
    for line in lines:
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
