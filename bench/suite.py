"""The measures: which contender gets which request, in which order, and what is read around each run.

Runs are interleaved (direct, plain Envoy, gateway at one concurrency, then the next concurrency) so that the three
numbers a ratio is made of are measured close together in time on a noisy machine. Every run is preceded by an
unmeasured warm-up run of the same load, and every process's CPU time is read just before and just after it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Generic, Literal, TypeVar

from bench import load, wrk
from bench.load import RequestRun, StreamFormat, StreamRun
from bench.stack import MODEL, Stack, machine_busy_seconds
from extproc import templates

__all__ = ["CONTENDERS", "MAX_CONCURRENCY", "Contender", "Measured", "Options", "Results", "measure"]

QUESTION = "What is the capital of France?"
NONSTREAM_MAX_TOKENS = 16  # above the emulator's 15-token reply, so every reply is whole
STREAM_MAX_TOKENS = 64  # with the emulator's `repeat`, every stream is exactly this many tokens
REQUEST_CONCURRENCY = (1, 16)
STREAM_CONCURRENCY = (1, 16, 64)
MAX_CONCURRENCY = max(*REQUEST_CONCURRENCY, *STREAM_CONCURRENCY)
_MSGS = "http.gateway.ext_proc.shimmy.stream_msgs_sent"
_STARTED = "http.gateway.ext_proc.shimmy.streams_started"

R = TypeVar("R", RequestRun, StreamRun)
Runner = Callable[[int, int], R]  # (concurrency, seconds) -> one run


@dataclass(frozen=True, slots=True)
class Contender:
    """One way to reach the emulator: the route it is asked on, and the SSE dialect its streams speak."""

    name: str
    label: str
    path: str
    stream_format: StreamFormat

    def url(self, stack: Stack) -> str:
        ports = stack.ports
        port = {"direct": ports.emulator, "plain": ports.plain, "gateway": ports.gateway}[self.name]
        return stack.url(port, self.path)

    def body(self, stream: bool) -> bytes:
        """The same question for everyone: as the phi3 prompt the gateway would render, or as OpenAI messages."""
        max_tokens = STREAM_MAX_TOKENS if stream else NONSTREAM_MAX_TOKENS
        ask: dict[str, object]
        if self.name == "direct":
            ask = {"prompt": templates.render("phi3", [("user", QUESTION)])}
        else:
            ask = {"messages": [{"role": "user", "content": QUESTION}]}
        return json.dumps({"model": MODEL, **ask, "max_tokens": max_tokens, "stream": stream}).encode()


CONTENDERS = (
    Contender("direct", "direct", "/api/generate", "native"),
    Contender("plain", "plain Envoy", "/v1/chat/completions", "openai"),
    Contender("gateway", "gateway", "/v1/chat/completions", "openai"),
)


@dataclass(frozen=True, slots=True)
class Options:
    seconds: int
    warmup: int  # 0: no warm-up run
    only: Literal["nonstream", "stream"] | None
    wrk: str | None  # wrk's path; None: the asyncio client drives the non-stream loads too


@dataclass(frozen=True, slots=True)
class Measured(Generic[R]):
    """A run, the CPU seconds each of the stack's processes spent during it, and the gateway's ext_proc traffic."""

    run: R
    cpu_s: dict[str, float]
    ext_proc_msgs: int  # messages the gateway's Envoy sent the processor
    ext_proc_streams: int  # gRPC streams it opened: one per request that reached the processor


@dataclass(slots=True)
class Results:
    options: Options
    nonstream: dict[str, dict[int, Measured[RequestRun]]] = field(default_factory=dict)
    # The asyncio client against the direct emulator: what it can push at most. Empty when the asyncio client
    # drove the non-stream runs, whose direct column is then that ceiling.
    asyncio_ceiling: dict[int, RequestRun] = field(default_factory=dict)
    stream: dict[str, dict[int, Measured[StreamRun]]] = field(default_factory=dict)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    # The machine's CPU used by anything but the stack and the harness (with wrk), as a share of all its cores:
    # the noise the run had to share the machine with.
    others_cpu_share: float = 0.0


def _own_cpu_seconds(stack: Stack) -> float:
    """The stack's processes, the harness (the asyncio client) and its waited-for children (wrk)."""
    t = os.times()
    return sum(stack.cpu_seconds().values()) + t.user + t.system + t.children_user + t.children_system


def _measured(stack: Stack, options: Options, run: Callable[[int], R]) -> Measured[R]:
    """A warm-up run, then the measured one with the counters read right around it."""
    if options.warmup:
        run(options.warmup)
    cpu, stats = stack.cpu_seconds(), stack.ext_proc_stats()
    result = run(options.seconds)
    cpu_after, stats_after = stack.cpu_seconds(), stack.ext_proc_stats()
    return Measured(
        result,
        {name: cpu_after[name] - cpu[name] for name in cpu},
        stats_after.get(_MSGS, 0) - stats.get(_MSGS, 0),
        stats_after.get(_STARTED, 0) - stats.get(_STARTED, 0),
    )


def _request_runner(wrk_path: str | None, stack: Stack, c: Contender, workdir: Path) -> Runner[RequestRun]:
    """(concurrency, seconds) -> a non-stream run, by wrk when it is installed, else by the asyncio client."""
    url, body = c.url(stack), c.body(stream=False)
    if wrk_path is None:
        return lambda concurrency, seconds: load.run(load.requests(url, body, concurrency, seconds))
    lua = wrk.script(body, workdir / f"{c.name}.lua")
    return lambda concurrency, seconds: wrk.run(wrk_path, url, lua, concurrency, seconds)


def _stream_runner(url: str, body: bytes, fmt: StreamFormat) -> Runner[StreamRun]:
    return lambda concurrency, seconds: load.run(load.streams(url, body, fmt, concurrency, seconds))


def _nonstream(stack: Stack, options: Options, results: Results, workdir: Path) -> None:
    runners = {c.name: _request_runner(options.wrk, stack, c, workdir) for c in CONTENDERS}
    for concurrency in REQUEST_CONCURRENCY:
        for name, runner in runners.items():
            measured = _measured(stack, options, partial(runner, concurrency))
            results.nonstream.setdefault(name, {})[concurrency] = measured
    if options.wrk is not None:
        runner = _request_runner(None, stack, CONTENDERS[0], workdir)
        for concurrency in REQUEST_CONCURRENCY:
            results.asyncio_ceiling[concurrency] = _measured(stack, options, partial(runner, concurrency)).run


def _stream(stack: Stack, options: Options, results: Results) -> None:
    """With the emulator's `repeat` on, every stream runs to STREAM_MAX_TOKENS."""
    stack.configure_emulator(repeat=True)
    runners = {c.name: _stream_runner(c.url(stack), c.body(stream=True), c.stream_format) for c in CONTENDERS}
    for concurrency in STREAM_CONCURRENCY:
        for name, runner in runners.items():
            measured = _measured(stack, options, partial(runner, concurrency))
            results.stream.setdefault(name, {})[concurrency] = measured


def measure(stack: Stack, options: Options, workdir: Path) -> Results:
    """Every measure the options ask for, then the processes' peak RSS."""
    results = Results(options)
    busy, own, start = machine_busy_seconds(), _own_cpu_seconds(stack), time.monotonic()
    if options.only in (None, "nonstream"):
        _nonstream(stack, options, results, workdir)
    if options.only in (None, "stream"):
        _stream(stack, options, results)
    others = (machine_busy_seconds() - busy) - (_own_cpu_seconds(stack) - own)
    results.others_cpu_share = max(0.0, others) / ((time.monotonic() - start) * (os.cpu_count() or 1))
    results.peak_rss_mib = stack.peak_rss_mib()
    return results
