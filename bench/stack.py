"""The contenders' processes, all on free loopback ports: the emulator, the processor, two Envoys (with and without
ext_proc), the seed guide's Flask proxy under gunicorn, and LiteLLM's proxy with an emulator of its own.

Plain Envoy, the gateway and the Flask proxy share one emulator, so that the only difference between them is the
proxy. LiteLLM gets its own emulator instance: it starts faithful (Shimmy streams when `stream` is absent) for the
LiteLLM finding, and is then switched to OpenAI's default for the throughput runs, leaving the shared one as it is.

Everything is started with `subprocess.Popen` from the harness's main thread, and each child asks the kernel
(PR_SET_PDEATHSIG) for SIGTERM when that thread ends, so even a harness killed with SIGKILL leaves nothing running;
Envoy does not ask for that itself. A contender may be a tree of processes (gunicorn's master and workers,
LiteLLM's uvicorn); CPU and RSS are summed over the whole tree, and `stop()` ends the tree's stragglers too.
`running()` stops every process on the way out, whether the benchmark finished, failed or was interrupted.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from gateway.cli import envoy_binary
from gateway.envoy_config import render
from settings import Settings, load

__all__ = [
    "EMULATOR",
    "EMULATOR_LITELLM",
    "ENVOY_GATEWAY",
    "ENVOY_PLAIN",
    "EXTPROC",
    "FLASK",
    "FLASK_WORKERS",
    "LITELLM",
    "LITELLM_KEY",
    "MODEL",
    "PLAIN_ENVOY_WORKERS",
    "Ports",
    "Proc",
    "Stack",
    "cpu_seconds",
    "die_with_parent",
    "free_port",
    "free_ports",
    "is_processor",
    "machine_busy_seconds",
    "plain_config",
    "running",
]

EMULATOR, EXTPROC, ENVOY_GATEWAY, ENVOY_PLAIN = "emulator", "extproc", "envoy-gateway", "envoy-plain"
FLASK, LITELLM, EMULATOR_LITELLM = "flask", "litellm", "emulator-litellm"
MODEL = "phi3-lora"
_PROBE = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "ready?"}], "stream": False}).encode()
# Plain Envoy's best on the 2-core machine: a worker per core. The gateway's Envoy runs its shipped ENVOY_WORKERS.
PLAIN_ENVOY_WORKERS = 2
FLASK_WORKERS = 2  # gunicorn sync workers: one per core of the 2-core machine
LITELLM_WORKERS = 1  # LiteLLM's own default (`--num_workers`); the processor is one process too
LITELLM_KEY = "sk-bench"  # LiteLLM's proxy refuses to start its key checks without a master key
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
_START_TIMEOUT_S = 60.0
_LITELLM_START_TIMEOUT_S = 180.0  # imports of several hundred modules, on a machine the rest of the stack shares
_STOP_TIMEOUT_S = 10.0
# A proxy from the environment must not see requests to our own loopback ports.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
ROOT = Path(__file__).resolve().parents[1]  # the checkout: `python -m bench.…` children import from here


def die_with_parent() -> None:
    """`preexec_fn` of every process a harness or a test starts: the kernel sends it SIGTERM when the thread that
    started it ends, so a harness that crashes or is killed (SIGKILL, a segfault) leaves nothing running.

    Runs in the child between fork and exec. Linux only (PR_SET_PDEATHSIG), like the rest of the bench.
    """
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_EPHEMERAL_LOW = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
_GIVEN: set[int] = set()  # every port handed out by this process


def free_port(span: int = 1) -> int:
    """A port free now (with its `span - 1` neighbours: EXTPROC_WORKERS=2 puts a second processor on the next port),
    below the kernel's ephemeral range and never handed out before by this process. The kernel's own choice (bind to
    port 0) gave two settings of one stack the same port, and a port in the ephemeral range can be taken by an
    outgoing connection before its server binds it."""
    for first in random.sample(range(10_000, _EPHEMERAL_LOW - span), 500):
        wanted = range(first, first + span)
        if _GIVEN.intersection(wanted):
            continue
        probes = [socket.socket() for _ in wanted]
        try:
            for probe, port in zip(probes, wanted, strict=True):
                probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        _GIVEN.update(wanted)
        return first
    raise RuntimeError("found no free port below the ephemeral range")


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (`free_port`'s)."""
    return [free_port() for _ in range(count)]


def _ports() -> Ports:
    """Free ports, the processor's with a free neighbour (the workers experiment uses the one after it)."""
    return replace(Ports(*free_ports(len(fields(Ports)))), extproc=free_port(span=2))


@dataclass(frozen=True, slots=True)
class Ports:
    emulator: int
    extproc: int
    gateway: int
    gateway_admin: int
    plain: int
    plain_admin: int
    flask: int
    litellm: int
    litellm_emulator: int


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid`, from the kernel's per-thread child lists."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.append(child)
                    todo.append(child)
    return found


def _status_kib(pid: int, key: str) -> int:
    """A `/proc/<pid>/status` line in KiB (VmHWM, VmRSS); 0 for a process that is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all threads), from /proc/<pid>/stat; 0 for a process that is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may contain spaces
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@dataclass(slots=True)
class Proc:
    """One started process and the tree below it, its log file, and the kernel's accounting of them."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        return [self.pid, *_descendants(self.pid)]

    def cpu_seconds(self) -> float:
        """CPU time of the process and its live descendants."""
        return sum(cpu_seconds(pid) for pid in self.pids())

    def peak_rss_mib(self) -> float:
        """VmHWM (the largest resident set each process ever had), summed over the tree: an upper bound of the
        tree's peak, exact for a single process."""
        return sum(_status_kib(pid, "VmHWM:") for pid in self.pids()) / 1024

    def rss_mib(self) -> float:
        """VmRSS now, summed over the tree."""
        return sum(_status_kib(pid, "VmRSS:") for pid in self.pids()) / 1024

    def log_tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited in time; then SIGKILL for any descendant left behind."""
        below = _descendants(self.pid) if self.popen.poll() is None else []
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def is_processor(name: str) -> bool:
    """A processor's process name: the shipped one, or a bench variant that replaced it (`extproc-0`, ...)."""
    return name == EXTPROC or name.startswith(f"{EXTPROC}-")


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def plain_config(settings: Settings) -> dict[str, Any]:
    """The gateway's Envoy config without ext_proc: the chat route reaches the emulator's own OpenAI route.

    Only the ext_proc filter and the chat route's `prefix_rewrite` go; routes, buffer filter, access log, health
    checks and local replies stay, so the comparison prices exactly the processor.
    """
    config = render(settings)
    hcm = _hcm(config)
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        if route["name"] == "chat":
            del route["route"]["prefix_rewrite"]
    return config


def with_request_headers(config: dict[str, Any]) -> dict[str, Any]:
    """The gateway's config with the chat route's request headers sent to the processor too (4 messages instead
    of 3): what the processor would cost without the `SKIP` the route ships with (the steps section)."""
    for route in _hcm(config)["route_config"]["virtual_hosts"][0]["routes"]:
        if route["name"] == "chat":
            override = route["typed_per_filter_config"]["envoy.filters.http.ext_proc"]["overrides"]
            override["processing_mode"]["request_header_mode"] = "SEND"
    return config


def request(
    url: str, data: bytes | None = None, method: str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """Status and body of one request; a refused connection is status 0."""
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, method=method, headers=all_headers)
    try:
        with _HTTP.open(req, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def machine_busy_seconds() -> float:
    """CPU seconds all cores together spent not idle since boot (including time stolen by a hypervisor)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def _litellm_config(emulator_port: int) -> str:
    """LiteLLM's proxy config: the model as `openai/...` at the emulator's own OpenAI routes."""
    return json.dumps(
        {
            "model_list": [
                {
                    "model_name": MODEL,
                    "litellm_params": {
                        "model": f"openai/{MODEL}",
                        "api_base": f"http://127.0.0.1:{emulator_port}/v1",
                        "api_key": "unused",
                    },
                }
            ],
            "general_settings": {"master_key": LITELLM_KEY},
        }
    )


def missing_contenders() -> dict[str, str]:
    """Contenders whose software is not installed here (the `bench` extra), and why."""
    missing: dict[str, str] = {}
    if any(importlib.util.find_spec(m) is None for m in ("flask", "gunicorn", "requests")):
        missing[FLASK] = "Flask, gunicorn or requests is not installed (make bench installs it)"
    if importlib.util.find_spec("litellm") is None or not (Path(sys.executable).parent / "litellm").exists():
        missing[LITELLM] = "LiteLLM is not installed (make bench installs it)"
    return missing


class Stack:
    """The processes and their addresses. Build it with `running()`."""

    def __init__(self, workdir: Path, max_concurrency: int, litellm: bool = True) -> None:
        self.workdir = workdir
        self.ports = _ports()
        self.procs: dict[str, Proc] = {}
        self.missing = missing_contenders()
        if not litellm:
            self.missing.setdefault(LITELLM, "left out (--no-litellm)")
        # Settings that differ from the shipped defaults (besides ports). Envoy's admission limits (circuit breakers
        # on the Shimmy cluster, sized for a real Shimmy that runs two generations at a time) are lifted to the
        # benchmark's highest concurrency: otherwise both Envoys would queue at 2 and answer 429 beyond 18 requests,
        # and the runs would time the queue instead of the proxies. The emulator replays its fixed reply (`auto`
        # would run a real model where llama.cpp is installed).
        self.overrides = {
            "MAX_ACTIVE_REQUESTS": str(max_concurrency),
            "MAX_QUEUED_REQUESTS": str(max_concurrency),
            "EMULATOR_ENGINE": "fixed",
        }

    @staticmethod
    def url(port: int, path: str) -> str:
        return f"http://127.0.0.1:{port}{path}"

    def _settings(self, gateway_port: int, admin_port: int, shimmy_port: int | None = None, **variant: str) -> Settings:
        """The stack's settings from the defaults, not from the caller's environment, so runs compare; `variant`
        changes more of them (bench-only configurations of the gateway)."""
        return load(
            argv=[],
            environ={
                "GATEWAY_PORT": str(gateway_port),
                "ENVOY_ADMIN_PORT": str(admin_port),
                "SHIMMY_PORT": str(shimmy_port or self.ports.emulator),
                "EXTPROC_PORT": str(self.ports.extproc),
                "MODEL_NAME": MODEL,
                **self.overrides,
                **variant,
            },
        )

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str], quiet_stdout: bool = False, cwd: Path = ROOT
    ) -> Proc:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            stdout = subprocess.DEVNULL if quiet_stdout else out
            popen = subprocess.Popen(
                argv,
                env=env,
                stdout=stdout,
                stderr=out,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
                cwd=cwd,
            )
        self.procs[name] = Proc(name, popen, log)
        return self.procs[name]

    def _envoy(self, name: str, config: dict[str, Any], workers: int) -> None:
        """Envoy's stdout is its access log: discarded, it would otherwise be one file write per request."""
        path = self.workdir / f"{name}.json"
        path.write_text(json.dumps(config))
        argv = [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--log-level", "warn"]
        argv += ["--concurrency", str(workers)]
        self._spawn(name, argv, dict(os.environ), quiet_stdout=True)

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float = _START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            for proc in self.procs.values():
                if proc.popen.poll() is not None:
                    raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}")

    def _python_env(self, settings: Settings) -> dict[str, str]:
        return {**os.environ, **settings.env(), "PYTHONUNBUFFERED": "1"}

    def start(self) -> None:
        """Start everything, then wait until every proxy answers a chat completion through its own route.

        LiteLLM is only waited for until it is live: its emulator still streams by default, so a chat completion
        through it fails until `litellm_finding()` has run and switched that emulator to OpenAI's default.
        """
        ports = self.ports
        gateway = self._settings(ports.gateway, ports.gateway_admin)
        env = self._python_env(gateway)
        self._spawn(EMULATOR, [sys.executable, "-m", "shimmy"], env)
        self._spawn(EXTPROC, [sys.executable, "-m", "extproc.cli"], env)
        self._envoy(ENVOY_GATEWAY, render(gateway), gateway.envoy_workers)
        self._envoy(ENVOY_PLAIN, plain_config(self._settings(ports.plain, ports.plain_admin)), PLAIN_ENVOY_WORKERS)
        if FLASK not in self.missing:
            self._spawn(FLASK, self._gunicorn_argv(), {**env, "SHIMMY_URL": self.url(ports.emulator, "")})
        if LITELLM not in self.missing:
            own = self._python_env(self._settings(ports.gateway, ports.gateway_admin, ports.litellm_emulator))
            self._spawn(EMULATOR_LITELLM, [sys.executable, "-m", "shimmy"], own)
            config = self.workdir / "litellm.yaml"  # JSON is YAML
            config.write_text(_litellm_config(ports.litellm_emulator))
            litellm_env = {**own, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": LITELLM_KEY}
            argv = [str(Path(sys.executable).parent / "litellm"), "--config", str(config), "--host", "127.0.0.1"]
            argv += ["--port", str(ports.litellm), "--num_workers", str(LITELLM_WORKERS)]
            self._spawn(LITELLM, argv, litellm_env, cwd=self.workdir)
        self._wait("the emulator", lambda: request(self.url(ports.emulator, "/health"))[0] == 200)
        for admin in (ports.gateway_admin, ports.plain_admin):
            self._wait("Envoy", lambda admin=admin: request(self.url(admin, "/ready")) == (200, b"LIVE\n"))
        self._wait("the processor's first probe", lambda: request(self.url(ports.gateway, "/health"))[0] == 200)
        chats = [ports.gateway, ports.plain] + ([ports.flask] if FLASK in self.procs else [])
        for port in chats:
            chat = self.url(port, "/v1/chat/completions")
            self._wait("a first chat completion", lambda chat=chat: request(chat, _PROBE)[0] == 200)
        if LITELLM in self.procs:
            live = self.url(ports.litellm, "/health/liveliness")
            self._wait("LiteLLM", lambda: request(live)[0] == 200, _LITELLM_START_TIMEOUT_S)

    def _gunicorn_argv(self) -> list[str]:
        """Sync workers, everything else gunicorn's defaults (30 s worker timeout, no keep-alive)."""
        argv = [sys.executable, "-m", "gunicorn", "--workers", str(FLASK_WORKERS), "--worker-class", "sync"]
        argv += ["--chdir", str(ROOT), "--bind", f"127.0.0.1:{self.ports.flask}"]
        return [*argv, "bench.baselines.flask_proxy:app"]

    def litellm_finding(self, body: bytes) -> dict[str, Any]:
        """LiteLLM against a faithful Shimmy (stream absent = SSE): a non-stream call, timed, with what reached the
        emulator; then its emulator is switched to OpenAI's default and a call must succeed."""
        ports = self.ports
        chat = self.url(ports.litellm, "/v1/chat/completions")
        auth = {"Authorization": f"Bearer {LITELLM_KEY}"}
        stats = self.url(ports.litellm_emulator, "/_emulator/stats")
        before = json.loads(request(stats)[1])["chat_requests"]
        started = time.monotonic()
        status, answer = request(chat, body, headers=auth)
        seconds = time.monotonic() - started
        attempts = json.loads(request(stats)[1])["chat_requests"] - before
        self.configure_emulator(port=ports.litellm_emulator, openai_stream_default=False)
        self._wait("LiteLLM's first chat completion", lambda: request(chat, body, headers=auth)[0] == 200)
        return {
            "status": status,
            "seconds": seconds,
            "upstream_attempts": attempts,
            "body": answer.decode(errors="replace"),
        }

    def stop(self) -> None:
        """Proxies first, so nothing is in flight when the processor and the emulators go."""
        for proc in reversed(list(self.procs.values())):
            proc.stop()

    def configure_emulator(self, port: int | None = None, **changes: object) -> None:
        url = self.url(port or self.ports.emulator, "/_emulator/config")
        status, body = request(url, json.dumps(changes).encode(), "PUT")
        if status != 200:
            raise RuntimeError(f"emulator config {changes}: {status} {body!r}")

    def configure_emulators(self, **changes: object) -> None:
        """The same change on every emulator (the shared one and LiteLLM's)."""
        self.configure_emulator(**changes)
        if EMULATOR_LITELLM in self.procs:
            self.configure_emulator(port=self.ports.litellm_emulator, **changes)

    def envoy_stats(self, admin_port: int | None = None, prefix: str = "ext_proc") -> dict[str, int]:
        """Counters and gauges of an Envoy (the gateway's by default) whose names contain `prefix`."""
        url = self.url(admin_port or self.ports.gateway_admin, f"/stats?filter={prefix}")
        status, body = request(url)
        if status != 200:
            raise RuntimeError(f"Envoy admin /stats: {status}")
        out: dict[str, int] = {}
        for line in body.decode().splitlines():
            name, _, value = line.partition(": ")
            if value.isdigit():
                out[name] = int(value)
        return out

    def ext_proc_stats(self) -> dict[str, int]:
        """The gateway Envoy's ext_proc counters, e.g. `http.gateway.ext_proc.shimmy.stream_msgs_sent`."""
        return self.envoy_stats()

    def cpu_seconds(self) -> dict[str, float]:
        return {name: proc.cpu_seconds() for name, proc in self.procs.items()}

    def peak_rss_mib(self) -> dict[str, float]:
        return {name: proc.peak_rss_mib() for name, proc in self.procs.items()}

    # --- the processor-workers experiment -------------------------------------------------------------------

    def processors(self) -> list[Proc]:
        return [p for name, p in self.procs.items() if is_processor(name)]

    @property
    def gateway_settings(self) -> Settings:
        return self._settings(self.ports.gateway, self.ports.gateway_admin)

    def reconfigure_gateway(
        self,
        processors: int = 1,
        *,
        envoy_workers: int | None = None,
        request_headers: bool = False,
        uvloop: bool = False,
        sync_server: bool = False,
        cpu_times: Path | None = None,
    ) -> None:
        """The gateway's processor(s) and Envoy started afresh in a bench-only configuration; back once a chat
        completion goes through.

        `processors` processes of `bench.extproc_variant` on EXTPROC_PORT and the ports after it, with Envoy
        rendered for them as EXTPROC_WORKERS ships it (one endpoint each). `envoy_workers`: Envoy's worker count
        (default: the shipped ENVOY_WORKERS). `request_headers`: the chat route sends its request headers too.
        `uvloop`: the processors on uvloop's loop; `sync_server`: behind grpcio's synchronous server. `cpu_times`:
        they time their own parts. See bench/extproc_variant.py.
        """
        for proc in [self.procs.pop(ENVOY_GATEWAY), *self.processors()]:
            proc.stop()
            self.procs.pop(proc.name, None)
        settings = self._settings(self.ports.gateway, self.ports.gateway_admin, EXTPROC_WORKERS=str(processors))
        env = self._python_env(settings)
        if uvloop:
            env["BENCH_UVLOOP"] = "1"
        if sync_server:
            env["BENCH_SYNC_SERVER"] = "1"
        if cpu_times is not None:
            env["BENCH_CPU_TIMES"] = str(cpu_times)
        for i in range(processors):
            port = {"EXTPROC_PORT": str(self.ports.extproc + i)}
            self._spawn(f"{EXTPROC}-{i}", [sys.executable, "-m", "bench.extproc_variant"], {**env, **port})
        self._wait("every processor to listen", lambda: all(self.processor_sockets(listening=True).values()))
        config = render(settings)
        self._envoy(
            ENVOY_GATEWAY,
            with_request_headers(config) if request_headers else config,
            envoy_workers or settings.envoy_workers,
        )
        admin = self.url(self.ports.gateway_admin, "/ready")
        self._wait("Envoy", lambda: request(admin) == (200, b"LIVE\n"))
        chat = self.url(self.ports.gateway, "/v1/chat/completions")
        self._wait("a chat completion through the new gateway", lambda: request(chat, _PROBE)[0] == 200)

    def processor_connections(self) -> dict[str, int]:
        """Established TCP connections each processor process holds on its port (Envoy's, one per Envoy worker)."""
        return self.processor_sockets(listening=False)

    def processor_sockets(self, listening: bool) -> dict[str, int]:
        """Sockets each processor process holds on the processors' ports: listening ones, or connections."""
        ports = {f"{self.ports.extproc + i:04X}" for i in range(len(self.processors()))}
        state = "0A" if listening else "01"  # TCP_LISTEN, TCP_ESTABLISHED
        inodes: set[str] = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(table).read_text().splitlines()[1:]:
                    cols = line.split()
                    if cols[1].rpartition(":")[2] in ports and cols[3] == state:  # local address, state
                        inodes.add(cols[9])
        out: dict[str, int] = {}
        for proc in self.processors():
            count = 0
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{proc.pid}/fd"):
                    with contextlib.suppress(OSError):
                        target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                        if target.startswith("socket:[") and target[8:-1] in inodes:
                            count += 1
            out[proc.name] = count
        return out


@contextmanager
def running(workdir: Path, max_concurrency: int, litellm: bool = True) -> Iterator[Stack]:
    """A started stack; every process is stopped on exit, including on Ctrl-C or a failed start."""
    stack = Stack(workdir, max_concurrency, litellm)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
