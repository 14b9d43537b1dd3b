"""The contenders' processes: one emulator, one processor, two Envoys, all on free loopback ports.

Plain Envoy and the gateway share the emulator so that the only difference between them is the ext_proc filter
(and the path rewrite that exists for it). Everything is started with `subprocess.Popen` from the harness's main
thread, and each child asks the kernel (PR_SET_PDEATHSIG) for SIGTERM when that thread ends, so even a harness
killed with SIGKILL leaves nothing running; Envoy does not ask for that itself. `running()` stops every process on
the way out, whether the benchmark finished, failed or was interrupted.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from gateway.cli import envoy_binary
from gateway.envoy_config import render
from gateway.settings import Settings, load

__all__ = [
    "EMULATOR",
    "ENVOY_GATEWAY",
    "ENVOY_PLAIN",
    "EXTPROC",
    "MODEL",
    "Ports",
    "Proc",
    "Stack",
    "machine_busy_seconds",
    "plain_config",
    "running",
]

EMULATOR, EXTPROC, ENVOY_GATEWAY, ENVOY_PLAIN = "emulator", "extproc", "envoy-gateway", "envoy-plain"
MODEL = "phi3-lora"
ENVOY_CONCURRENCY = "2"  # one worker per core of the 2-core machine the benchmark is written for
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 10.0
# A proxy from the environment must not see requests to our own loopback ports.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _die_with_parent() -> None:
    """Runs in the child between fork and exec (the harness has no other thread then, so this is safe)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_ports(count: int) -> list[int]:
    """Distinct ports the kernel just handed out; all sockets stay open until every port is chosen."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True, slots=True)
class Ports:
    emulator: int
    extproc: int
    gateway: int
    gateway_admin: int
    plain: int
    plain_admin: int


@dataclass(slots=True)
class Proc:
    """One child process, its log file, and the kernel's accounting of it."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (all threads), from /proc/<pid>/stat."""
        stat = Path(f"/proc/{self.popen.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may contain spaces
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def peak_rss_mib(self) -> float:
        """VmHWM: the largest resident set the process ever had."""
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"{self.name}: no VmHWM in /proc/{self.popen.pid}/status")

    def log_tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def plain_config(settings: Settings) -> dict[str, Any]:
    """The gateway's Envoy config without ext_proc: the chat route reaches the emulator's own OpenAI route.

    Only the ext_proc filter and the chat route's `prefix_rewrite` go; routes, buffer filter, access log, health
    checks and local replies stay, so the comparison prices exactly the processor.
    """
    config = render(settings)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        if route["name"] == "chat":
            del route["route"]["prefix_rewrite"]
    return config


def _get(url: str, data: bytes | None = None, method: str | None = None) -> tuple[int, bytes]:
    """Status and body of one request; a refused connection is status 0."""
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with _HTTP.open(request, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def machine_busy_seconds() -> float:
    """CPU seconds all cores together spent not idle since boot (including time stolen by a hypervisor)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


class Stack:
    """The four processes and their addresses. Build it with `running()`."""

    def __init__(self, workdir: Path, max_concurrency: int) -> None:
        self.workdir = workdir
        self.ports = Ports(*_free_ports(len(fields(Ports))))
        self.procs: dict[str, Proc] = {}
        # Settings that differ from the shipped defaults (besides ports). Envoy's admission limits (circuit breakers
        # on the Shimmy cluster, sized for a real Shimmy that runs two generations at a time) are lifted to the
        # benchmark's highest concurrency: otherwise both Envoys would queue at 2 and answer 429 beyond 18 requests,
        # and the runs would time the queue instead of the proxies.
        self.overrides = {"MAX_ACTIVE_REQUESTS": str(max_concurrency), "MAX_QUEUED_REQUESTS": str(max_concurrency)}

    @staticmethod
    def url(port: int, path: str) -> str:
        return f"http://127.0.0.1:{port}{path}"

    def _settings(self, gateway_port: int, admin_port: int) -> Settings:
        """The stack's settings from the defaults, not from the caller's environment, so runs compare."""
        return load(
            argv=[],
            environ={
                "GATEWAY_PORT": str(gateway_port),
                "ENVOY_ADMIN_PORT": str(admin_port),
                "SHIMMY_PORT": str(self.ports.emulator),
                "EXTPROC_PORT": str(self.ports.extproc),
                "MODEL_NAME": MODEL,
                **self.overrides,
            },
        )

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], quiet_stdout: bool = False) -> None:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            stdout = subprocess.DEVNULL if quiet_stdout else out
            popen = subprocess.Popen(
                argv, env=env, stdout=stdout, stderr=out, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
            )
        self.procs[name] = Proc(name, popen, log)

    def _envoy(self, name: str, config: dict[str, Any]) -> None:
        """Envoy's stdout is its access log: discarded, it would otherwise be one file write per request."""
        path = self.workdir / f"{name}.json"
        path.write_text(json.dumps(config))
        argv = [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--log-level", "warn"]
        argv += ["--concurrency", ENVOY_CONCURRENCY]
        self._spawn(name, argv, dict(os.environ), quiet_stdout=True)

    def _wait(self, what: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if ready():
                return
            for proc in self.procs.values():
                if proc.popen.poll() is not None:
                    raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}")

    def start(self) -> None:
        """Start everything, then wait until both Envoys answer a chat completion through their own route."""
        ports = self.ports
        gateway = self._settings(ports.gateway, ports.gateway_admin)
        env = {**os.environ, **gateway.env(), "PYTHONUNBUFFERED": "1"}
        self._spawn(EMULATOR, [sys.executable, "-m", "shimmy"], env)
        self._spawn(EXTPROC, [sys.executable, "-m", "extproc.cli"], env)
        self._envoy(ENVOY_GATEWAY, render(gateway))
        self._envoy(ENVOY_PLAIN, plain_config(self._settings(ports.plain, ports.plain_admin)))
        self._wait("the emulator", lambda: _get(self.url(ports.emulator, "/health"))[0] == 200)
        for admin in (ports.gateway_admin, ports.plain_admin):
            self._wait("Envoy", lambda admin=admin: _get(self.url(admin, "/ready")) == (200, b"LIVE\n"))
        self._wait("the processor's first probe", lambda: _get(self.url(ports.gateway, "/health"))[0] == 200)
        probe = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "ready?"}], "stream": False})
        for port in (ports.gateway, ports.plain):
            chat = self.url(port, "/v1/chat/completions")
            self._wait("Envoy's first health check", lambda chat=chat: _get(chat, probe.encode())[0] == 200)

    def stop(self) -> None:
        """Envoys first, so nothing is in flight when the processor and the emulator go."""
        for proc in reversed(list(self.procs.values())):
            proc.stop()

    def configure_emulator(self, **changes: object) -> None:
        status, body = _get(self.url(self.ports.emulator, "/_emulator/config"), json.dumps(changes).encode(), "PUT")
        if status != 200:
            raise RuntimeError(f"emulator config {changes}: {status} {body!r}")

    def ext_proc_stats(self) -> dict[str, int]:
        """The gateway Envoy's ext_proc counters, e.g. `http.gateway.ext_proc.shimmy.stream_msgs_sent`."""
        status, body = _get(self.url(self.ports.gateway_admin, "/stats?filter=ext_proc"))
        if status != 200:
            raise RuntimeError(f"Envoy admin /stats: {status}")
        out: dict[str, int] = {}
        for line in body.decode().splitlines():
            name, _, value = line.partition(": ")
            if value.isdigit():
                out[name] = int(value)
        return out

    def cpu_seconds(self) -> dict[str, float]:
        return {name: proc.cpu_seconds() for name, proc in self.procs.items()}

    def peak_rss_mib(self) -> dict[str, float]:
        return {name: proc.peak_rss_mib() for name, proc in self.procs.items()}


@contextmanager
def running(workdir: Path, max_concurrency: int) -> Iterator[Stack]:
    """A started stack; every process is stopped on exit, including on Ctrl-C or a failed start."""
    stack = Stack(workdir, max_concurrency)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
