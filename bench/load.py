"""The asyncio load client: closed-loop workers on keep-alive aiohttp connections, for requests and for streams.

It drives every streaming measure (wrk cannot read an SSE stream event by event) and the non-stream ones when wrk
is absent. It runs in the harness process, so `time.process_time()` over a run is the client's own CPU: a client
near 100 % of one core is the bottleneck, and its results say more about it than about the server.

Every run is bounded by its duration: at the deadline the workers are cancelled mid-request or mid-stream, and only
what completed (requests) or arrived (tokens) before it is counted.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import aiohttp

__all__ = ["RequestRun", "StreamFormat", "StreamRun", "percentile", "requests", "run", "streams"]

StreamFormat = Literal["native", "openai", "anthropic", "responses"]
_HEADERS = {"Content-Type": "application/json"}
_TIMEOUT = aiohttp.ClientTimeout(total=30)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RequestRun:
    """A fixed-duration non-stream load at one concurrency, by wrk or by this client."""

    client: str
    concurrency: int
    seconds: float
    requests: int
    errors: dict[str, int]  # failed requests by reason ("HTTP 429", "ServerDisconnectedError", ...)
    p50_ms: float
    p99_ms: float
    client_cpu_s: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def client_cpu_share(self) -> float:
        """The client's CPU time over the run's wall time: 1.0 is one core saturated."""
        return self.client_cpu_s / self.seconds


@dataclass(frozen=True, slots=True)
class StreamRun:
    """A fixed-duration streaming load: N streams open at all times, each restarted when it ends."""

    concurrency: int
    seconds: float
    tokens: int
    streams_done: int
    streams_answered: int  # streams that got their first token within the run
    errors: dict[str, int]
    ttft_p50_ms: float
    ttft_p99_ms: float
    client_cpu_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def client_cpu_share(self) -> float:
        return self.client_cpu_s / self.seconds


def _reason(failure: int | BaseException) -> str:
    return f"HTTP {failure}" if isinstance(failure, int) else type(failure).__name__


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of an ascending list; NaN when it is empty."""
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


async def _for(seconds: float, concurrency: int, worker: Callable[[aiohttp.ClientSession], Awaitable[None]]) -> float:
    """Run `concurrency` copies of `worker` on one session for `seconds`; the run's exact wall time.

    The connector allows one connection per worker, so each worker keeps its own connection alive.
    """
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=_TIMEOUT) as session:
        start = time.perf_counter()
        tasks = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        try:
            done, _ = await asyncio.wait(tasks, timeout=seconds)
            elapsed = time.perf_counter() - start
        finally:  # also on Ctrl-C: no worker may outlive its session
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:  # a worker returns early only when its count is reached; an exception is a bug
            task.result()
    return elapsed


async def requests(
    url: str,
    body: bytes,
    concurrency: int,
    seconds: float,
    headers: dict[str, str] | None = None,
    total: int | None = None,
) -> RequestRun:
    """POST `body` to `url` in a closed loop; latency of each response read to its end. With `total`, the run
    also ends once that many requests were sent (`seconds` is then only the bound)."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    all_headers = {**_HEADERS, **(headers or {})}
    sent = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while total is None or sent < total:
            sent += 1
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=all_headers) as response:
                    await response.read()
                    failure: int | BaseException | None = None if response.status == 200 else response.status
            except (aiohttp.ClientError, TimeoutError) as e:
                failure = e
            if failure is None:
                latencies.append(time.perf_counter() - t0)
            else:
                errors[_reason(failure)] += 1

    cpu = time.process_time()
    elapsed = await _for(seconds, concurrency, worker)
    latencies.sort()
    return RequestRun(
        client="asyncio",
        concurrency=concurrency,
        seconds=elapsed,
        requests=len(latencies),
        errors=dict(errors),
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        client_cpu_s=time.process_time() - cpu,
    )


def _is_content(first_data_line: bytes, fmt: StreamFormat) -> bool:
    """Whether an SSE event carries generated text.

    Native `/api/generate` events are the raw token text, so every event but `[DONE]` and `[ERROR] ...` is one.
    OpenAI chunks carry text as `"content":"<non-empty>"`; the role chunk (`""` or `null`) and the final chunk do
    not. Anthropic Messages and OpenAI Responses streams carry it in typed delta events. A substring test rather
    than a JSON decode keeps the client's cost per event small.
    """
    if fmt == "native":
        payload = first_data_line[6:].rstrip(b"\n")
        return payload != b"[DONE]" and not payload.startswith(b"[ERROR]")
    if fmt == "anthropic":
        return first_data_line.startswith(b'data: {"type":"content_block_delta"')
    if fmt == "responses":
        return first_data_line.startswith(b'data: {"type":"response.output_text.delta"')
    return b'"content":"' in first_data_line and b'"content":""' not in first_data_line


async def streams(
    url: str,
    body: bytes,
    fmt: StreamFormat,
    concurrency: int,
    seconds: float,
    headers: dict[str, str] | None = None,
) -> StreamRun:
    """Keep `concurrency` streams open; count content events and each stream's time to its first one."""
    all_headers = {**_HEADERS, **(headers or {})}
    ttfts: list[float] = []
    tokens = streams_done = 0
    errors: Counter[str] = Counter()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal tokens, streams_done
        while True:
            t0 = time.perf_counter()
            first = True
            new_event = True  # the next data line starts an event (a multi-line token spans several)
            try:
                async with session.post(url, data=body, headers=all_headers) as response:
                    if response.status != 200:
                        await response.read()
                        errors[_reason(response.status)] += 1
                        continue
                    async for line in response.content:
                        if line == b"\n":
                            new_event = True
                        elif new_event and line.startswith(b"data:"):
                            new_event = False
                            if _is_content(line, fmt):
                                tokens += 1
                                if first:
                                    ttfts.append(time.perf_counter() - t0)
                                    first = False
                streams_done += 1
            except (aiohttp.ClientError, TimeoutError) as e:
                errors[_reason(e)] += 1

    cpu = time.process_time()
    elapsed = await _for(seconds, concurrency, worker)
    ttfts.sort()
    return StreamRun(
        concurrency=concurrency,
        seconds=elapsed,
        tokens=tokens,
        streams_done=streams_done,
        streams_answered=len(ttfts),
        errors=dict(errors),
        ttft_p50_ms=percentile(ttfts, 0.50) * 1000,
        ttft_p99_ms=percentile(ttfts, 0.99) * 1000,
        client_cpu_s=time.process_time() - cpu,
    )


def run(load: Coroutine[Any, Any, T]) -> T:
    """Run one load on a fresh event loop, uvloop's where installed (a cheaper loop is a faster client)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(load)
    return uvloop.run(load)
