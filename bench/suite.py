"""The measures: which contender gets which request, in which order, and what is read around each run.

Runs are interleaved (every contender at one concurrency, then the next concurrency) so that the numbers a ratio is
made of are measured close together in time on a noisy machine. Every run is preceded by an unmeasured warm-up run
of the same load, and every process's CPU time is read just before and just after it. After the comparison come the
checks that only concern the gateway: its memory with 256 live streams and across 10,000 requests, a py-spy profile
of the processor, the processor-workers experiment and the speed-up steps undone one by one (these replace the
processor and Envoy, so they come last).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

from bench import load, profile, wrk
from bench.load import RequestRun, StreamFormat, StreamRun
from bench.stack import (
    EMULATOR,
    EMULATOR_LITELLM,
    ENVOY_GATEWAY,
    ENVOY_PLAIN,
    EXTPROC,
    FLASK,
    LITELLM,
    LITELLM_KEY,
    MODEL,
    Stack,
    machine_busy_seconds,
)
from extproc import templates

__all__ = [
    "API_STREAMS",
    "CONTENDERS",
    "MAX_CONCURRENCY",
    "SECTIONS",
    "STEPS",
    "Contender",
    "Measured",
    "Options",
    "Results",
    "RssCheck",
    "WorkersRun",
    "measure",
]

QUESTION = "What is the capital of France?"
NONSTREAM_MAX_TOKENS = 16  # above the emulator's 15-token reply, so every reply is whole
STREAM_MAX_TOKENS = 64  # with the emulator's `repeat`, every stream is exactly this many tokens
REQUEST_CONCURRENCY = (1, 16)
STREAM_CONCURRENCY = (1, 16, 64)
LIVE_STREAMS = 256  # the memory target: Envoy + processor with this many streams open
LIVE_STREAM_TOKENS, LIVE_STREAM_DELAY_MS = 50, 100  # each of them 5 s long: 50 tokens 100 ms apart
LIVE_STREAM_SECONDS = 7
FLAT_REQUESTS = 10_000  # the memory target: flat across this many non-stream requests
FLAT_WARMUP = 1_000  # requests before the first reading
PROFILE_SECONDS = 10
WORKERS = 2  # processor processes on one port in the workers experiment
MAX_CONCURRENCY = LIVE_STREAMS  # Envoy's admission limits are raised to this
SECTIONS = ("nonstream", "stream", "memory", "profile", "workers", "steps")
# The steps section: the shipped configuration, each speed-up undone on its own, and what was tried and not kept.
STEPS = (
    ("shipped", "as shipped: one Envoy worker, grpc.aio on asyncio's loop, 4 ext_proc messages per request"),
    ("envoy-2-workers", "undone: Envoy with 2 workers (`ENVOY_WORKERS=2`, one per core)"),
    ("request-headers", "undone: the chat route's request headers sent to the processor too, 5 messages"),
    ("uvloop", "tried, not kept: the processor on uvloop"),
    ("sync-server", "tried, not kept: grpcio's synchronous server (a thread per stream) instead of grpc.aio"),
)
_MSGS = "http.gateway.ext_proc.shimmy.stream_msgs_sent"
_STARTED = "http.gateway.ext_proc.shimmy.streams_started"
_SHIMMY_ACTIVE = "cluster.shimmy.upstream_rq_active"

R = TypeVar("R", RequestRun, StreamRun)
Runner = Callable[[int, int], R]  # (concurrency, seconds) -> one run


@dataclass(frozen=True, slots=True)
class Contender:
    """One way to reach an emulator: the route it is asked on, the SSE dialect its streams speak, its processes."""

    name: str
    label: str
    path: str
    stream_format: StreamFormat
    processes: tuple[str, ...]  # the contender's own processes (its emulator aside)
    emulator: str = EMULATOR
    headers: tuple[tuple[str, str], ...] = ()

    def url(self, stack: Stack) -> str:
        p = stack.ports
        port = {"direct": p.emulator, "plain": p.plain, "gateway": p.gateway, FLASK: p.flask, LITELLM: p.litellm}
        return stack.url(port[self.name.partition("-")[0]], self.path)  # gateway-messages: the gateway's port

    def body(self, stream: bool, max_tokens: int | None = None) -> bytes:
        """The same question for everyone: as the phi3 prompt the gateway would render, or as OpenAI messages."""
        if max_tokens is None:
            max_tokens = STREAM_MAX_TOKENS if stream else NONSTREAM_MAX_TOKENS
        ask: dict[str, object]
        if self.name == "direct":
            ask = {"prompt": templates.render("phi3", [("user", QUESTION)])}
        elif self.stream_format == "responses":
            body = {"model": MODEL, "input": QUESTION, "max_output_tokens": max_tokens, "stream": stream}
            return json.dumps(body).encode()
        else:
            ask = {"messages": [{"role": "user", "content": QUESTION}]}
        return json.dumps({"model": MODEL, **ask, "max_tokens": max_tokens, "stream": stream}).encode()


CONTENDERS = (
    Contender("direct", "direct", "/api/generate", "native", (EMULATOR,)),
    Contender("plain", "plain Envoy", "/v1/chat/completions", "openai", (ENVOY_PLAIN,)),
    Contender("gateway", "gateway", "/v1/chat/completions", "openai", (ENVOY_GATEWAY, EXTPROC)),
    Contender(FLASK, "Flask proxy", "/v1/chat/completions", "openai", (FLASK,)),
    Contender(
        LITELLM,
        "LiteLLM",
        "/v1/chat/completions",
        "openai",
        (LITELLM,),
        EMULATOR_LITELLM,
        (("Authorization", f"Bearer {LITELLM_KEY}"),),
    ),
)
GATEWAY = CONTENDERS[2]
API_STREAMS = (
    Contender("gateway-messages", "gateway, Messages", "/v1/messages", "anthropic", GATEWAY.processes),
    Contender("gateway-responses", "gateway, Responses", "/v1/responses", "responses", GATEWAY.processes),
)
"""The gateway's other client APIs, streamed beside chat in the same rounds (the `stream` section): one generation
core, so their token relay rate should match chat's."""


@dataclass(frozen=True, slots=True)
class Options:
    seconds: int  # one round of the comparison
    warmup: int  # 0: no warm-up run
    sections: tuple[str, ...]
    wrk: str | None  # wrk's path; None: the asyncio client drives the non-stream loads too
    litellm: bool = True
    rounds: int = 3  # interleaved rounds of the comparison; the table shows each contender's median round
    long_seconds: int = 5  # one run of the gateway-only measures (workers experiment, CPU split)


@dataclass(frozen=True, slots=True)
class Measured(Generic[R]):
    """A run, the CPU seconds each of the stack's processes spent during it, and the gateway's ext_proc traffic."""

    run: R
    cpu_s: dict[str, float]
    ext_proc_msgs: int  # messages the gateway's Envoy sent the processor
    ext_proc_streams: int  # gRPC streams it opened: one per request that reached the processor


@dataclass(slots=True)
class RssCheck:
    """Envoy + processor memory: across FLAT_REQUESTS non-stream requests, and with LIVE_STREAMS streams open."""

    flat_run: RequestRun | None = None
    before_mib: dict[str, float] = field(default_factory=dict)  # VmRSS per process, before the requests
    after_mib: dict[str, float] = field(default_factory=dict)
    live_run: StreamRun | None = None
    live_peak_mib: float = 0.0  # the largest Envoy + processor VmRSS sum sampled while the streams were open
    live_peak_by_process: dict[str, float] = field(default_factory=dict)  # at that sample
    live_max_active: int = 0  # the most requests Envoy had open to the emulator at once (sampled)
    # The same paced streams through the other Python proxies, for what they do with LIVE_STREAMS of them.
    live_others: dict[str, StreamRun] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkersRun:
    processes: int
    run: RequestRun
    connections: dict[str, int]  # Envoy connections each processor process held during the run
    cpu_s: dict[str, float]  # CPU seconds of each processor process during the run


@dataclass(frozen=True, slots=True)
class CpuSplit:
    """The processor's CPU time over a 16-connection non-stream run, and the parts of it timed inside the process."""

    run: RequestRun
    process_cpu_s: float  # the whole process, from /proc
    part_ns: dict[str, int]  # dispatch (our code), deserialize, serialize (protobuf wire format)
    calls: dict[str, int]


@dataclass(slots=True)
class Results:
    options: Options
    missing: dict[str, str] = field(default_factory=dict)  # contender -> why it was not measured
    litellm_finding: dict[str, Any] | None = None
    nonstream: dict[str, dict[int, Measured[RequestRun]]] = field(default_factory=dict)
    # The asyncio client against the direct emulator: what it can push at most. Empty when the asyncio client
    # drove the non-stream runs, whose direct column is then that ceiling.
    asyncio_ceiling: dict[int, RequestRun] = field(default_factory=dict)
    stream: dict[str, dict[int, Measured[StreamRun]]] = field(default_factory=dict)
    # Every round's req/s (token events/s) per contender and concurrency, ascending; the table shows the median.
    nonstream_rounds: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    stream_rounds: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    api_streams: dict[str, dict[int, Measured[StreamRun]]] = field(default_factory=dict)  # API_STREAMS' runs
    peak_rss_mib: dict[str, float] = field(default_factory=dict)  # per process (tree), after the comparison
    rss: RssCheck | None = None
    profile: profile.Profile | None = None
    profile_note: str = ""
    workers: list[WorkersRun] = field(default_factory=list)
    cpu_split: CpuSplit | None = None
    steps: dict[str, dict[int, list[Measured[RequestRun]]]] = field(default_factory=dict)  # step -> conc. -> rounds
    # The machine's CPU used by anything but the stack and the harness (with wrk), as a share of all its cores:
    # the noise the run had to share the machine with.
    others_cpu_share: float = 0.0

    def contender_peak_rss(self, c: Contender) -> float | None:
        if c.name in self.missing or not all(p in self.peak_rss_mib for p in c.processes):
            return None
        return sum(self.peak_rss_mib[p] for p in c.processes)


def active(stack: Stack) -> list[Contender]:
    return [c for c in CONTENDERS if c.name not in stack.missing]


def _own_cpu_seconds(stack: Stack) -> float:
    """The stack's processes, the harness (the asyncio client) and its waited-for children (wrk, py-spy)."""
    t = os.times()
    return sum(stack.cpu_seconds().values()) + t.user + t.system + t.children_user + t.children_system


def _measured(stack: Stack, options: Options, run: Callable[[int], R], seconds: int | None = None) -> Measured[R]:
    """A warm-up run, then the measured one with the counters read right around it."""
    if options.warmup:
        run(options.warmup)
    return _once(stack, run, seconds or options.long_seconds)


def _once(stack: Stack, run: Callable[[int], R], seconds: int) -> Measured[R]:
    """One measured run, with the counters read right around it."""
    cpu, stats = stack.cpu_seconds(), stack.ext_proc_stats()
    result = run(seconds)
    cpu_after, stats_after = stack.cpu_seconds(), stack.ext_proc_stats()
    return Measured(
        result,
        {name: cpu_after[name] - cpu.get(name, 0.0) for name in cpu_after},
        stats_after.get(_MSGS, 0) - stats.get(_MSGS, 0),
        stats_after.get(_STARTED, 0) - stats.get(_STARTED, 0),
    )


def _request_runner(wrk_path: str | None, stack: Stack, c: Contender, workdir: Path) -> Runner[RequestRun]:
    """(concurrency, seconds) -> a non-stream run, by wrk when it is installed, else by the asyncio client."""
    url, body, headers = c.url(stack), c.body(stream=False), dict(c.headers)
    if wrk_path is None:
        return lambda concurrency, seconds: load.run(load.requests(url, body, concurrency, seconds, headers))
    lua = wrk.script(body, workdir / f"{c.name}.lua", headers)
    return lambda concurrency, seconds: wrk.run(wrk_path, url, lua, concurrency, seconds)


def _stream_runner(stack: Stack, c: Contender, body: bytes | None = None) -> Runner[StreamRun]:
    url, headers = c.url(stack), dict(c.headers)
    body = c.body(stream=True) if body is None else body
    fmt = c.stream_format
    return lambda concurrency, seconds: load.run(load.streams(url, body, fmt, concurrency, seconds, headers))


def _litellm_finding(stack: Stack, results: Results) -> None:
    """LiteLLM against a faithful Shimmy: what an OpenAI client's non-stream call gets (once; it takes seconds)."""
    litellm = next(c for c in CONTENDERS if c.name == LITELLM)
    results.litellm_finding = stack.litellm_finding(litellm.body(stream=False))


def _compare(
    stack: Stack,
    options: Options,
    runners: dict[str, Runner[R]],
    concurrencies: tuple[int, ...],
    key: Callable[[R], float],
    table: dict[str, dict[int, Measured[R]]],
    rounds: dict[str, dict[int, list[float]]],
) -> None:
    """At each concurrency: every contender warmed up, then `options.rounds` rounds through all contenders in turn;
    the table keeps each contender's median round (by `key`), `rounds` every round's `key`."""
    for concurrency in concurrencies:
        if options.warmup:
            for runner in runners.values():
                runner(concurrency, options.warmup)
        measured: dict[str, list[Measured[R]]] = {name: [] for name in runners}
        for _ in range(options.rounds):
            for name, runner in runners.items():
                measured[name].append(_once(stack, partial(runner, concurrency), options.seconds))
        for name, runs in measured.items():
            runs.sort(key=lambda m: key(m.run))
            table.setdefault(name, {})[concurrency] = runs[(len(runs) - 1) // 2]
            rounds.setdefault(name, {})[concurrency] = [key(m.run) for m in runs]


def _nonstream(stack: Stack, options: Options, results: Results, workdir: Path) -> None:
    runners = {c.name: _request_runner(options.wrk, stack, c, workdir) for c in active(stack)}
    rps: Callable[[RequestRun], float] = lambda run: run.rps  # noqa: E731
    _compare(stack, options, runners, REQUEST_CONCURRENCY, rps, results.nonstream, results.nonstream_rounds)
    if options.wrk is not None:
        runner = _request_runner(None, stack, CONTENDERS[0], workdir)
        for concurrency in REQUEST_CONCURRENCY:
            m = _measured(stack, options, partial(runner, concurrency), options.seconds)
            results.asyncio_ceiling[concurrency] = m.run


def _stream(stack: Stack, options: Options, results: Results) -> None:
    """With the emulators' `repeat` on, every stream runs to STREAM_MAX_TOKENS."""
    stack.configure_emulators(repeat=True)
    runners: dict[str, Runner[StreamRun]] = {}
    for c in active(stack):
        runners[c.name] = _stream_runner(stack, c)
        if c is GATEWAY:  # the other APIs right after chat, each round: LiteLLM's CPU lingers after its own runs
            runners.update({api.name: _stream_runner(stack, api) for api in API_STREAMS})
    tokens: Callable[[StreamRun], float] = lambda run: run.tokens_per_s  # noqa: E731
    _compare(stack, options, runners, STREAM_CONCURRENCY, tokens, results.stream, results.stream_rounds)
    for c in API_STREAMS:  # kept apart: the contenders' table has a column per contender, these are the gateway
        if c.name in results.stream:
            results.api_streams[c.name] = results.stream.pop(c.name)
            results.stream_rounds.pop(c.name)


class _Sampler:
    """Polls, in a thread, the Envoy + processor VmRSS sum and Envoy's open requests to the emulator."""

    def __init__(self, stack: Stack) -> None:
        self.stack, self.peak, self.at_peak, self.max_active = stack, 0.0, {}, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            by_process = {p: self.stack.procs[p].rss_mib() for p in GATEWAY.processes}
            if sum(by_process.values()) > self.peak:
                self.peak, self.at_peak = sum(by_process.values()), by_process
            active = self.stack.envoy_stats(prefix=_SHIMMY_ACTIVE).get(_SHIMMY_ACTIVE, 0)
            self.max_active = max(self.max_active, active)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _memory(stack: Stack, results: Results) -> None:
    """The memory target: VmRSS before and after FLAT_REQUESTS requests, then the peak with LIVE_STREAMS streams."""
    check = RssCheck()
    url, body = GATEWAY.url(stack), GATEWAY.body(stream=False)
    load.run(load.requests(url, body, 16, 60, total=FLAT_WARMUP))  # a warm processor, also with --only memory
    check.before_mib = {p: stack.procs[p].rss_mib() for p in GATEWAY.processes}
    check.flat_run = load.run(load.requests(url, body, 16, 120, total=FLAT_REQUESTS))
    check.after_mib = {p: stack.procs[p].rss_mib() for p in GATEWAY.processes}
    stack.configure_emulators(token_delay_ms=LIVE_STREAM_DELAY_MS, repeat=True)
    try:
        body = GATEWAY.body(stream=True, max_tokens=LIVE_STREAM_TOKENS)
        with _Sampler(stack) as sampler:
            check.live_run = _stream_runner(stack, GATEWAY, body)(LIVE_STREAMS, LIVE_STREAM_SECONDS)
        check.live_peak_mib, check.live_peak_by_process = sampler.peak, sampler.at_peak
        check.live_max_active = sampler.max_active
        for c in active(stack):
            if c.name in (FLASK, LITELLM):
                runner = _stream_runner(stack, c, c.body(stream=True, max_tokens=LIVE_STREAM_TOKENS))
                check.live_others[c.name] = runner(LIVE_STREAMS, LIVE_STREAM_SECONDS)
    finally:
        stack.configure_emulators(token_delay_ms=0)
    results.rss = check


def _profile(stack: Stack, options: Options, results: Results, workdir: Path) -> None:
    """py-spy on the processor while the 16-connection non-stream load runs through the gateway."""
    py_spy = profile.available()
    if py_spy is None:
        results.profile_note = "py-spy is not installed (make bench installs it): no profile"
        return
    runner = _request_runner(options.wrk, stack, GATEWAY, workdir)
    raw = workdir / "profile.txt"
    cpu = stack.procs[EXTPROC].cpu_seconds()
    spy = profile.start(py_spy, stack.procs[EXTPROC].pid, PROFILE_SECONDS, raw)
    time.sleep(0.5)  # py-spy attaches
    run = runner(16, PROFILE_SECONDS)
    output = spy.communicate(timeout=60)[0].decode(errors="replace")
    cpu = stack.procs[EXTPROC].cpu_seconds() - cpu
    if spy.returncode != 0 or not raw.exists():
        results.profile_note = f"py-spy failed ({spy.returncode}): {output.strip()[-300:]}"
        return
    results.profile = profile.summarize(raw, PROFILE_SECONDS)
    results.profile.cpu_s, results.profile.rps = cpu, run.rps
    results.profile_note = str(raw)


def _workers(stack: Stack, options: Options, results: Results, workdir: Path) -> None:
    """Non-stream req/s at 16 with the processor as shipped, then alternately WORKERS processes and one, as
    EXTPROC_WORKERS ships them (consecutive ports, one Envoy endpoint each; bench.extproc_variant), so that a drift
    of the machine's load shows."""
    runner = _request_runner(options.wrk, stack, GATEWAY, workdir)

    def one(processes: int) -> WorkersRun:
        m = _measured(stack, options, partial(runner, 16))
        procs = [p.name for p in stack.processors()]
        return WorkersRun(processes, m.run, stack.processor_connections(), {p: m.cpu_s[p] for p in procs})

    results.workers.append(one(1))
    for count in (WORKERS, 1, WORKERS):
        stack.reconfigure_gateway(count)
        results.workers.append(one(count))


def _cpu_split(stack: Stack, options: Options, results: Results, workdir: Path) -> None:
    """One processor that times its own parts (bench.extproc_variant), under the 16-connection non-stream load."""
    path = workdir / "cpu_times.json"
    stack.reconfigure_gateway(cpu_times=path)
    (proc,) = stack.processors()
    runner = _request_runner(options.wrk, stack, GATEWAY, workdir)
    if options.warmup:
        runner(16, options.warmup)

    def parts() -> dict[str, Any]:
        path.unlink(missing_ok=True)
        os.kill(proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return json.loads(path.read_text())

    before, cpu = parts(), proc.cpu_seconds()
    run = runner(16, options.long_seconds)
    after, cpu = parts(), proc.cpu_seconds() - cpu
    results.cpu_split = CpuSplit(
        run,
        cpu,
        {k: v - before["ns"].get(k, 0) for k, v in after["ns"].items()},
        {k: v - before["calls"].get(k, 0) for k, v in after["calls"].items()},
    )


def _steps(stack: Stack, options: Options, results: Results, workdir: Path) -> None:
    """Non-stream runs at 1 and 16 connections in each configuration of STEPS, in interleaved rounds that each
    start one configuration further on (a run late in a round tended to be a little faster). Envoy and the processor
    are started afresh for every run, the shipped configuration included, so none runs on a warmer process."""
    runner = _request_runner(options.wrk, stack, GATEWAY, workdir)
    for r in range(options.rounds):
        for step, _label in STEPS[r % len(STEPS) :] + STEPS[: r % len(STEPS)]:  # each round starts one further on
            stack.reconfigure_gateway(
                envoy_workers=2 if step == "envoy-2-workers" else None,
                request_headers=step == "request-headers",
                uvloop=step == "uvloop",
                sync_server=step == "sync-server",
            )
            for concurrency in REQUEST_CONCURRENCY:
                m = _measured(stack, options, partial(runner, concurrency), options.seconds)
                results.steps.setdefault(step, {}).setdefault(concurrency, []).append(m)


def measure(stack: Stack, options: Options, workdir: Path) -> Results:
    """Every measure the options ask for, in order; the peak RSS of the contenders right after the comparison."""
    results = Results(options, missing=dict(stack.missing))
    busy, own, start = machine_busy_seconds(), _own_cpu_seconds(stack), time.monotonic()
    if LITELLM not in stack.missing:
        _litellm_finding(stack, results)
    if "nonstream" in options.sections:
        _nonstream(stack, options, results, workdir)
    if "stream" in options.sections:
        _stream(stack, options, results)
    results.peak_rss_mib = stack.peak_rss_mib()
    if "memory" in options.sections:
        _memory(stack, results)
    if "profile" in options.sections:
        _profile(stack, options, results, workdir)
    others = (machine_busy_seconds() - busy) - (_own_cpu_seconds(stack) - own)
    results.others_cpu_share = max(0.0, others) / ((time.monotonic() - start) * (os.cpu_count() or 1))
    # Last: these replace the processor with bench-only variants of it.
    if "workers" in options.sections:
        _workers(stack, options, results, workdir)
    if "profile" in options.sections:
        _cpu_split(stack, options, results, workdir)
    if "steps" in options.sections:
        _steps(stack, options, results, workdir)
    return results
