"""`python -m bench.soak --seconds N --clients C`: the soak of issue 4 (item 6) against a whole stack.

C asyncio clients, for a fixed time, each send one request after another, drawn from four kinds:

    valid     a non-stream chat completion                                   expects 200 and a chat.completion
    invalid   a body the gateway must refuse (bad JSON, bad field, unknown   expects its 400 or 404, in OpenAI shape
              model, unsupported parameter, invalid UTF-8)
    stream    a streamed completion, read to `data: [DONE]`                  expects 200 and a whole stream
    abandon   a stream the client closes after its first 1-3 events          expects 200 up to the disconnect

After a warm-up with the same mix, the stack is let go idle and the processor's RSS is read; then the soak runs,
the stack settles again and everything is checked: no unexpected status (no 5xx; 429 only when the client count
exceeds Envoy's active + queued limits), no hung request (each one is bounded by a per-request timeout), the
processor's RSS flat (and the same pid: not restarted), and nothing leaked: Envoy's ext_proc streams all closed,
no request active in Envoy, and the emulator back to 0 active generations (it goes on generating after a client
disconnects, as real Shimmy does, so settling waits for it).

Without `--url` this starts its own stack the way the integration tests do (`shimmy-gateway up` with the emulator
on free loopback ports, via tests/integration/conftest.py) and stops it afterwards. tests/integration/test_soak.py
calls `run` on a stack of its own, so the test and this command are one implementation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

__all__ = [
    "KINDS",
    "SPURIOUS_429",
    "Outcome",
    "SoakReport",
    "Target",
    "extproc_pid",
    "main",
    "queue_for",
    "rss_bytes",
    "run",
]

MODEL = "phi3-lora"
KINDS = ("valid", "invalid", "stream", "abandon")
WEIGHTS = (35, 25, 25, 15)
MAX_ACTIVE_REQUESTS = 2  # the gateway's default: Shimmy serves one generation at a time, Envoy lets two in
RSS_SLACK_BYTES = 20 * 1024 * 1024
RETRY_AFTER_S = 2.0  # the gateway's Retry-After on 429
STREAMS = "http.gateway.ext_proc.shimmy."
SPURIOUS_429 = "spurious 429"  # how a problem line about 429s with room in the queue starts
_JSON = {"content-type": "application/json"}

# (body, status the gateway must answer): one of each refusal class the processor makes.
INVALID: tuple[tuple[bytes, int], ...] = (
    (b"{", 400),
    (b"\xff\xfe{}", 400),
    (b'{"model": "phi3-lora"}', 400),
    (b'{"model": "phi3-lora", "messages": []}', 400),
    (b'{"model": "phi3-lora", "messages": [{"role": "wizard", "content": "x"}]}', 400),
    (b'{"model": "phi3-lora", "messages": [{"role": "user", "content": "x"}], "temperature": 2.5}', 400),
    (b'{"model": "phi3-lora", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', 400),
    (b'{"model": "phi3-lora", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}', 400),
    (b'{"model": "phi3-lora", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400),
    (b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}', 404),
)


class Target(Protocol):
    """What the soak needs of a running stack (tests/integration/conftest.py's `Stack` has it)."""

    @property
    def url(self) -> str: ...

    def configure(self, **changes: object) -> None: ...

    def emulator_stats(self) -> dict: ...

    def envoy_stats(self, prefix: str) -> dict[str, int]: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    status: int | str  # the HTTP status, or "hung" / an exception name when there was none
    seconds: float
    problem: str | None = None  # what was wrong with this answer, if anything


# -- the processor's memory ------------------------------------------------------------------------------------------


def _ppid(pid: str) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and parentheses


def extproc_pid(supervisor_pid: int) -> int | None:
    """The processor: the supervisor's child whose command line contains `extproc.cli`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if _ppid(pid) != supervisor_pid:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"extproc.cli" in cmdline:
            return int(pid)
    return None


def rss_bytes(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


# -- the clients -----------------------------------------------------------------------------------------------------


def _chat(rng: random.Random, stream: bool, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"soak {rng.random()}"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.2:
        body["stop"] = ["\n\n", "zzz"]
    return body


async def _valid(session: aiohttp.ClientSession, url: str, rng: random.Random) -> tuple[int, str | None]:
    async with session.post(url, json=_chat(rng, False, rng.randint(4, 32))) as resp:
        document = await resp.read()
        if resp.status != 200:
            return resp.status, f"valid request answered {resp.status}: {document[:200]!r}"
        completion = json.loads(document)
        if completion.get("object") != "chat.completion" or not completion["choices"][0]["message"]["content"]:
            return resp.status, f"not a chat.completion: {document[:200]!r}"
        return resp.status, None


async def _invalid(session: aiohttp.ClientSession, url: str, rng: random.Random) -> tuple[int, str | None]:
    body, expected = rng.choice(INVALID)
    async with session.post(url, data=body, headers=_JSON) as resp:
        document = await resp.read()
        if resp.status != expected:
            return resp.status, f"{body[:60]!r} answered {resp.status}, not {expected}: {document[:200]!r}"
        if resp.headers.get("content-type") != "application/json":
            return resp.status, f"error without content-type application/json: {resp.headers.get('content-type')}"
        error = json.loads(document).get("error", {})
        if set(error) != {"message", "type", "param", "code"}:
            return resp.status, f"not an OpenAI error object: {document[:200]!r}"
        return resp.status, None


async def _stream(session: aiohttp.ClientSession, url: str, rng: random.Random) -> tuple[int, str | None]:
    async with session.post(url, json=_chat(rng, True, rng.randint(4, 32))) as resp:
        if resp.status != 200:
            return resp.status, f"stream answered {resp.status}: {(await resp.read())[:200]!r}"
        events = [line async for line in resp.content if line.startswith(b"data: ")]
        if not events or events[-1].rstrip() != b"data: [DONE]" or events.count(events[-1]) != 1:
            return resp.status, f"stream did not end with one [DONE]: {events[-2:]!r}"
        if any(e.startswith(b'data: {"error"') for e in events):
            return resp.status, f"in-band error: {[e for e in events if b'error' in e][:1]!r}"
        return resp.status, None


async def _abandon(session: aiohttp.ClientSession, url: str, rng: random.Random) -> tuple[int, str | None]:
    """A stream of 64 tokens that the client drops after 1-3 events: the connection closes under Envoy."""
    resp = await session.post(url, json=_chat(rng, True, 64))
    try:
        if resp.status != 200:
            return resp.status, f"stream answered {resp.status}: {(await resp.read())[:200]!r}"
        wanted = rng.randint(1, 3)
        async for line in resp.content:
            if line.startswith(b"data: "):
                wanted -= 1
                if wanted == 0:
                    break
        return resp.status, None
    finally:
        resp.close()  # closes the connection itself, not back to the pool: a real client disconnect


_REQUESTS: dict[str, Callable[[aiohttp.ClientSession, str, random.Random], Any]] = {
    "valid": _valid,
    "invalid": _invalid,
    "stream": _stream,
    "abandon": _abandon,
}


async def _client(
    session: aiohttp.ClientSession, url: str, rng: random.Random, until: float, limit_s: float, out: list[Outcome]
) -> None:
    while time.monotonic() < until:
        kind = rng.choices(KINDS, WEIGHTS)[0]
        started = time.monotonic()
        try:
            async with asyncio.timeout(limit_s):
                status, problem = await _REQUESTS[kind](session, url, rng)
        except TimeoutError:
            status, problem = "hung", f"no answer within {limit_s} s"
        except Exception as exc:  # a transport error, or an answer of the wrong shape: recorded, never fatal
            status, problem = type(exc).__name__, f"{type(exc).__name__}: {exc}"
        out.append(Outcome(kind, status, time.monotonic() - started, problem))
        if status == 429:  # back off as the SDKs do (the gateway says Retry-After: 2), not in a tight loop
            await asyncio.sleep(max(0.0, min(RETRY_AFTER_S, until - time.monotonic())))


async def _load(url: str, clients: int, seconds: float, limit_s: float, seed: int) -> list[Outcome]:
    """`clients` closed-loop clients for `seconds`; each finishes its last request (bounded by `limit_s`)."""
    out: list[Outcome] = []
    until = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        await asyncio.gather(
            *(_client(session, url, random.Random(seed * 100_003 + i), until, limit_s, out) for i in range(clients))
        )
    return out


# -- settling and the report -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Settled:
    seconds: float  # how long it took, or the whole timeout when it never did
    streams_started: int
    streams_closed: int
    downstream_active: int
    upstream_active: int
    active_generations: int

    @property
    def quiet(self) -> bool:
        return (
            self.streams_started == self.streams_closed
            and self.downstream_active == 0
            and self.upstream_active == 0
            and self.active_generations == 0
        )


def _snapshot(target: Target, since: float) -> Settled:
    ext = target.envoy_stats(STREAMS)
    active = target.envoy_stats("rq_active")
    return Settled(
        seconds=time.monotonic() - since,
        streams_started=ext.get(STREAMS + "streams_started", 0),
        streams_closed=ext.get(STREAMS + "streams_closed", 0),
        downstream_active=active.get("http.gateway.downstream_rq_active", 0),
        upstream_active=active.get("cluster.shimmy.upstream_rq_active", 0),
        active_generations=target.emulator_stats()["active_generations"],
    )


async def _settle(target: Target, limit_s: float) -> Settled:
    """Poll until no stream, request or generation is left anywhere, or `limit_s` passes."""
    since = time.monotonic()
    while True:
        snap = await asyncio.to_thread(_snapshot, target, since)
        if snap.quiet or snap.seconds >= limit_s:
            return snap
        await asyncio.sleep(0.2)


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass(slots=True)
class SoakReport:
    seconds: float
    warmup: float
    clients: int
    token_delay_ms: float
    max_queued: int | None
    request_timeout: float
    outcomes: list[Outcome]
    warmup_requests: int
    rss_start: int | None
    rss_end: int | None
    rss_peak: int | None
    pid_start: int | None
    pid_end: int | None
    settled: Settled
    settle_timeout: float
    after: tuple[int, str | None]  # a valid request once everything settled: (status, problem)
    processor_errors: int | None = None  # tracebacks in the stack's log, when the target has one
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.problems = self._check()

    @property
    def queue_can_overflow(self) -> bool:
        return self.max_queued is None or self.clients > MAX_ACTIVE_REQUESTS + self.max_queued

    def _check(self) -> list[str]:
        problems: list[str] = []
        rejected = [o for o in self.outcomes if o.status == 429]
        if rejected and not self.queue_can_overflow:
            problems.append(
                f"{SPURIOUS_429}: {len(rejected)} requests answered 429 queue_full, though Envoy's active "
                f"{MAX_ACTIVE_REQUESTS} + queued {self.max_queued} hold all {self.clients} clients"
            )
        same = Counter(f"{o.kind}: {o.problem}" for o in self.outcomes if o.problem is not None and o.status != 429)
        problems += [f"{n} x {text}" if n > 1 else text for text, n in same.most_common()]
        if self.rss_start is None or self.rss_end is None:
            problems.append("processor RSS could not be read")
        elif self.rss_end - self.rss_start > RSS_SLACK_BYTES:
            grown = _mb(self.rss_end - self.rss_start)
            problems.append(f"processor RSS grew by {grown} (slack {_mb(RSS_SLACK_BYTES)})")
        if self.pid_start != self.pid_end:
            problems.append(f"processor pid changed from {self.pid_start} to {self.pid_end}: it was restarted")
        if not self.settled.quiet:
            problems.append(f"not settled after {self.settle_timeout:.0f} s: {self.settled}")
        if self.after[1] is not None:
            problems.append(f"after the soak: {self.after[1]}")
        if self.processor_errors:
            problems.append(f"{self.processor_errors} tracebacks in the stack's log")
        return problems

    def format(self) -> str:
        queue = "unbounded?" if self.max_queued is None else str(self.max_queued)
        lines = [
            f"soak: {self.seconds:.0f} s after a {self.warmup:.0f} s warm-up ({self.warmup_requests} requests), "
            f"{self.clients} clients, emulator token delay {self.token_delay_ms:g} ms, "
            f"Envoy active {MAX_ACTIVE_REQUESTS} + queued {queue}, per-request timeout {self.request_timeout:.0f} s",
            "",
            f"{'kind':<10}{'requests':>9}  {'statuses':<34}{'p50 ms':>8}{'p99 ms':>9}{'max ms':>9}",
        ]
        for kind in (*KINDS, "all"):
            mine = [o for o in self.outcomes if kind in ("all", o.kind)]
            statuses = Counter(str(o.status) for o in mine)
            text = " ".join(f"{s}:{n}" for s, n in sorted(statuses.items()))
            ms = [o.seconds * 1000 for o in mine]
            lines.append(
                f"{kind:<10}{len(mine):>9}  {text:<34}{_percentile(ms, 50):>8.1f}{_percentile(ms, 99):>9.1f}"
                f"{max(ms, default=math.nan):>9.1f}"
            )
        statuses = Counter(o.status for o in self.outcomes)
        fivexx = sum(n for s, n in statuses.items() if isinstance(s, int) and s >= 500)
        settled = self.settled
        lines += [
            "",
            f"throughput: {len(self.outcomes) / self.seconds:.1f} requests/s; 5xx: {fivexx}; 429: {statuses[429]}; "
            f"hung: {statuses['hung']}; transport errors: "
            f"{sum(n for s, n in statuses.items() if isinstance(s, str) and s != 'hung')}",
            f"processor RSS: start {_mb(self.rss_start)}, end {_mb(self.rss_end)} "
            f"({_signed_mb(self.rss_start, self.rss_end)}), peak during the soak {_mb(self.rss_peak)}; "
            f"pid {self.pid_start} -> {self.pid_end}",
            f"settled in {settled.seconds:.1f} s: ext_proc streams started {settled.streams_started}, "
            f"closed {settled.streams_closed} (open {settled.streams_started - settled.streams_closed}); "
            f"Envoy downstream_rq_active {settled.downstream_active}, shimmy upstream_rq_active "
            f"{settled.upstream_active}; emulator active_generations {settled.active_generations}",
            f"a valid request afterwards: {self.after[0]}",
        ]
        if self.processor_errors is not None:
            lines.append(f"tracebacks in the stack's log: {self.processor_errors}")
        if self.problems:
            shown = self.problems[:20]
            lines += ["", f"PROBLEMS ({len(self.problems)}):", *(f"  - {p}" for p in shown)]
            if len(self.problems) > len(shown):
                lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        else:
            lines += ["", "verdict: OK (no unexpected status, no hung request, RSS flat, no leaked stream)"]
        return "\n".join(lines)


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MB"


def _signed_mb(a: int | None, b: int | None) -> str:
    return "?" if a is None or b is None else f"{(b - a) / 2**20:+.1f} MB"


async def _watch_rss(pid: int | None, peak: list[int], stop: asyncio.Event) -> None:
    while pid is not None and not stop.is_set():
        rss = rss_bytes(pid)
        if rss is not None:
            peak[0] = max(peak[0], rss)
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass


async def _run(
    target: Target,
    supervisor_pid: int,
    seconds: float,
    clients: int,
    warmup: float,
    token_delay_ms: float,
    max_queued: int | None,
    request_timeout: float,
    settle_timeout: float,
    seed: int,
    log: Callable[[], str] | None,
) -> SoakReport:
    url = f"{target.url}/v1/chat/completions"
    await asyncio.to_thread(target.configure, token_delay_ms=token_delay_ms, repeat=True)
    warm = await _load(url, clients, warmup, request_timeout, seed + 1)
    await _settle(target, settle_timeout)
    pid_start = extproc_pid(supervisor_pid)
    rss_start = rss_bytes(pid_start) if pid_start else None
    peak, stop = [rss_start or 0], asyncio.Event()
    watcher = asyncio.create_task(_watch_rss(pid_start, peak, stop))
    outcomes = await _load(url, clients, seconds, request_timeout, seed)
    stop.set()
    await watcher
    settled = await _settle(target, settle_timeout)
    pid_end = extproc_pid(supervisor_pid)
    rss_end = rss_bytes(pid_end) if pid_end else None
    async with aiohttp.ClientSession() as session:
        try:
            after = await asyncio.wait_for(_valid(session, url, random.Random(seed)), request_timeout)
        except (TimeoutError, aiohttp.ClientError) as exc:
            after = (0, f"{type(exc).__name__}: {exc}")
    return SoakReport(
        seconds=seconds,
        warmup=warmup,
        clients=clients,
        token_delay_ms=token_delay_ms,
        max_queued=max_queued,
        request_timeout=request_timeout,
        outcomes=outcomes,
        warmup_requests=len(warm),
        rss_start=rss_start,
        rss_end=rss_end,
        rss_peak=peak[0] or None,
        pid_start=pid_start,
        pid_end=pid_end,
        settled=settled,
        settle_timeout=settle_timeout,
        after=after,
        processor_errors=log().count("Traceback") if log else None,
    )


def run(
    target: Target,
    supervisor_pid: int,
    *,
    seconds: float,
    clients: int,
    warmup: float | None = None,
    token_delay_ms: float = 5.0,
    max_queued: int | None = None,
    request_timeout: float = 30.0,
    settle_timeout: float = 30.0,
    seed: int = 0,
    log: Callable[[], str] | None = None,
) -> SoakReport:
    """Soak a running stack; `supervisor_pid` is the `shimmy-gateway up` process whose child is the processor.

    `max_queued` is the stack's MAX_QUEUED_REQUESTS (for telling an expected 429 from an unexpected one); `log`,
    when given, returns the stack's output so far, in which the report counts tracebacks.
    """
    if warmup is None:
        warmup = min(5.0, max(2.0, seconds / 6))
    return asyncio.run(
        _run(
            target, supervisor_pid, seconds, clients, warmup, token_delay_ms, max_queued, request_timeout,
            settle_timeout, seed, log,
        )
    )


def queue_for(clients: int) -> int:
    """A MAX_QUEUED_REQUESTS that holds every client at once (so a 429 is never expected)."""
    return max(16, 2 * clients)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="soak duration after the warm-up (default 60)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds before the first RSS reading (default: auto)")
    parser.add_argument("--token-delay-ms", type=float, default=5.0, help="emulator pause between tokens (default 5)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout: longer is a hang")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.clients < 1:
        parser.error("--seconds must be positive and --clients at least 1")

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from tests.integration.conftest import start_stack, stop_stack  # the one way a whole stack is started

    queued = queue_for(args.clients)
    print(f"starting the stack (emulator, MAX_QUEUED_REQUESTS={queued}) ...", file=sys.stderr, flush=True)
    stack = start_stack({"MAX_QUEUED_REQUESTS": str(queued), "LOG_LEVEL": "warning"})
    try:
        report = run(
            stack,
            stack.proc.pid,
            seconds=args.seconds,
            clients=args.clients,
            warmup=args.warmup,
            token_delay_ms=args.token_delay_ms,
            max_queued=queued,
            request_timeout=args.timeout,
            seed=args.seed,
            log=stack.output,
        )
    finally:
        stop_stack(stack)
        stack.log.unlink(missing_ok=True)
    print(report.format())
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
