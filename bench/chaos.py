"""`python -m bench.chaos --seconds N`: the chaos run of issue 13 against a whole stack, on each emulator profile.

Clients of three kinds send one request after another for N seconds:

    short    a non-stream chat completion of 4 tokens       a chat.completion, or an OpenAI error
    long     a stream of 40 tokens, read to `data: [DONE]`   a whole stream (an in-band error may end it), or an error
    vanish   a stream the client drops after 0.05-0.5 s       nothing: the client is gone

while Shimmy (the supervisor's emulator child) is hung with SIGSTOP for a few seconds at a quarter of the run and
killed with SIGKILL at 60 % (the supervisor restarts it). Checked throughout and after:

- every client got a complete answer or an OpenAI error within GENERATION_TIMEOUT_S (the outer limit). The one
  exception the gateway documents: a stream in flight when Shimmy is killed is reset (Envoy cannot add an event);
- nothing leaked once the stack settles: Envoy's ext_proc streams all ended, no request active in Envoy or toward
  Shimmy, the emulator back to 0 generations;
- the processor's RSS flat (within RSS_SLACK_BYTES) and the same pid;
- separately, because it will not hold until admission counts Shimmy's own work (issue 13, item 1): the most
  generations ever seen inside Shimmy (`/_emulator/stats`, sampled every 0.1 s) against MAX_ACTIVE_REQUESTS.

tests/integration/test_chaos.py runs this for 15 s per profile; the command runs longer and prints the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from bench.soak import extproc_pid, rss_bytes

__all__ = ["KINDS", "RSS_SLACK_BYTES", "STACK_ENV", "ChaosReport", "Outcome", "run", "stack_env"]

KINDS = ("short", "long", "vanish")
RSS_SLACK_BYTES = 20 * 1024 * 1024
GENERATION_TIMEOUT_S = 10  # the outer limit: the processor's deadline is 8 s
HANG_S = 3.0
CHAT = "/v1/chat/completions"
EMULATOR_MARKER = b"-m\x00shimmy\x00"  # the supervisor's Shimmy child: `python -m shimmy`
STREAMS = "http.gateway.ext_proc.shimmy."
STACK_ENV = {
    "GENERATION_TIMEOUT_S": str(GENERATION_TIMEOUT_S),
    "HEALTH_INTERVAL_S": "0.5",
    "MAX_ACTIVE_REQUESTS": "2",
    "MAX_QUEUED_REQUESTS": "16",
    "EMULATOR_TOKEN_DELAY_MS": "20",  # in the environment, so the restarted emulator keeps it
    "EMULATOR_REPLY": " ".join(["chaos"] * 60),
}


def stack_env(version: str) -> dict[str, str]:
    return {**STACK_ENV, "EMULATOR_VERSION": version}


class Target(Protocol):
    """What the run needs of a stack (tests/integration/conftest.py's Stack has it)."""

    @property
    def url(self) -> str: ...

    @property
    def emulator(self) -> str: ...

    def envoy_stats(self, prefix: str) -> dict[str, int]: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    started: float  # time.monotonic()
    ended: float
    result: str  # complete, error, vanished, reset, late, bad
    detail: str = ""  # the error code, or what was wrong

    @property
    def seconds(self) -> float:
        return self.ended - self.started


# -- the clients ---------------------------------------------------------------------------------------------------


def _body(stream: bool, max_tokens: int) -> dict[str, Any]:
    return {"model": "phi3-lora", "messages": [{"role": "user", "content": "chaos"}], "stream": stream,
            "max_tokens": max_tokens}


def _error_code(raw: bytes) -> str | None:
    """The `error.code` of an OpenAI error body, or None when the body is no such thing."""
    try:
        error = json.loads(raw)["error"]
        return str(error["code"]) if isinstance(error, dict) and "message" in error else None
    except (ValueError, KeyError, TypeError):
        return None


async def _refused(resp: aiohttp.ClientResponse) -> tuple[str, str]:
    code = _error_code(await resp.read())
    return ("error", code) if code is not None else ("bad", f"{resp.status} without an OpenAI error body")


async def _short(session: aiohttp.ClientSession, url: str, rng: random.Random) -> tuple[str, str]:
    async with session.post(url + CHAT, json=_body(False, 4)) as resp:
        if resp.status != 200:
            return await _refused(resp)
        body = await resp.json()
        complete = body.get("object") == "chat.completion" and body["choices"][0]["finish_reason"]
        return ("complete", "") if complete else ("bad", "200 without a whole chat.completion")


async def _long(session: aiohttp.ClientSession, url: str, rng: random.Random) -> tuple[str, str]:
    async with session.post(url + CHAT, json=_body(True, 40)) as resp:
        if resp.status != 200:
            return await _refused(resp)
        finished, error = False, None
        async for raw in resp.content:
            line = raw.strip()
            if line == b"data: [DONE]":
                if error is not None:
                    return "error", error
                return ("complete", "") if finished else ("bad", "[DONE] without a finish_reason")
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                error = _error_code(line[6:]) or error
                finished = finished or any(c.get("finish_reason") for c in event.get("choices", []))
        return "reset", "the stream ended without [DONE]"


async def _vanish(session: aiohttp.ClientSession, url: str, rng: random.Random) -> tuple[str, str]:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(rng.uniform(0.05, 0.5)), session.post(url + CHAT, json=_body(True, 200)) as resp:
            async for _ in resp.content:
                pass
    return "vanished", ""


_CLIENTS = {"short": _short, "long": _long, "vanish": _vanish}


async def _client(kind: str, url: str, until: float, limit_s: float, seed: int, out: list[Outcome]) -> None:
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=limit_s + 5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < until:
            started = time.monotonic()
            try:
                result, detail = await _CLIENTS[kind](session, url, rng)
            except TimeoutError:
                result, detail = "late", f"no answer within {limit_s + 5:g} s"
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                result, detail = "reset", exc.__class__.__name__
            ended = time.monotonic()
            if result in ("complete", "error") and ended - started > limit_s:
                result, detail = "late", f"{result} {detail} after {ended - started:.1f} s"
            out.append(Outcome(kind, started, ended, result, detail))
            await asyncio.sleep(rng.uniform(0, 0.05))


# -- the faults and the sampler --------------------------------------------------------------------------------------


def emulator_pid(supervisor_pid: int) -> int | None:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != supervisor_pid:
                continue
            if EMULATOR_MARKER in (stat.parent / "cmdline").read_bytes():
                return int(stat.parent.name)
    return None


async def _faults(supervisor_pid: int, started: float, seconds: float, log: dict[str, float]) -> None:
    """SIGSTOP Shimmy for HANG_S at 25 % of the run, SIGKILL it at 60 %; note when each happened."""
    await asyncio.sleep(max(0.0, started + 0.25 * seconds - time.monotonic()))
    pid = emulator_pid(supervisor_pid)
    if pid is None:
        return
    os.kill(pid, signal.SIGSTOP)
    log["hung"] = time.monotonic()
    try:
        await asyncio.sleep(HANG_S)
    finally:
        os.kill(pid, signal.SIGCONT)
        log["resumed"] = time.monotonic()
    await asyncio.sleep(max(0.0, started + 0.6 * seconds - time.monotonic()))
    pid = emulator_pid(supervisor_pid)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
        log["killed"] = time.monotonic()


async def _sample_generations(emulator: str, until: float, seen: list[int]) -> None:
    """The generations inside the emulator every 0.1 s: running, and (2.x, one at a time) waiting for its model;
    a hung or dead emulator is simply not sampled."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as session:
        while time.monotonic() < until:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{emulator}/stats") as resp:
                    stats = await resp.json()
                    seen.append(int(stats["active_generations"]) + int(stats.get("queued_generations", 0)))
            await asyncio.sleep(0.1)


# -- settling and the report -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Settled:
    seconds: float
    streams_open: int  # ext_proc streams started and neither closed nor failed
    downstream_active: int
    upstream_active: int
    active_generations: int

    @property
    def quiet(self) -> bool:
        return not (self.streams_open or self.downstream_active or self.upstream_active or self.active_generations)


async def _settle(target: Target, limit_s: float) -> Settled:
    since = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            ext = await asyncio.to_thread(target.envoy_stats, STREAMS)
            active = await asyncio.to_thread(target.envoy_stats, "rq_active")
            generations = -1
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{target.emulator}/stats") as resp:
                    generations = int((await resp.json())["active_generations"])
            snap = Settled(
                time.monotonic() - since,
                ext.get(STREAMS + "streams_started", 0) - ext.get(STREAMS + "streams_closed", 0)
                - ext.get(STREAMS + "streams_failed", 0),
                active.get("http.gateway.downstream_rq_active", 0),
                active.get("cluster.shimmy.upstream_rq_active", 0),
                generations,
            )
            if snap.quiet or snap.seconds >= limit_s:
                return snap
            await asyncio.sleep(0.2)


@dataclass(slots=True)
class ChaosReport:
    version: str
    seconds: float
    cap: int  # MAX_ACTIVE_REQUESTS
    outcomes: list[Outcome]
    faults: dict[str, float]  # hung, resumed, killed: time.monotonic()
    generations_seen: list[int]
    settled: Settled
    rss_start: int | None
    rss_end: int | None
    same_processor: bool
    recovered_after_kill_s: float | None = None  # the first chat answered after the storm, counted from the kill
    problems: list[str] = field(default_factory=list)

    @property
    def max_generations(self) -> int:
        return max(self.generations_seen, default=0)

    def _in_flight_at_kill(self, o: Outcome) -> bool:
        killed = self.faults.get("killed")
        return killed is not None and o.started <= killed <= o.ended + 0.5

    def check(self) -> None:
        """Fill `problems` with every broken invariant except the cap (see `max_generations`)."""
        for o in self.outcomes:
            if o.result in ("late", "bad") or (o.result == "reset" and not self._in_flight_at_kill(o)):
                self.problems.append(f"{o.kind} {o.result}: {o.detail} ({o.seconds:.1f} s)")
        for fault in ("hung", "resumed", "killed"):
            if fault not in self.faults:
                self.problems.append(f"the fault '{fault}' never happened")
        if not self.settled.quiet:
            self.problems.append(f"not settled after {self.settled.seconds:.0f} s: {self.settled}")
        if self.rss_start is None or self.rss_end is None or not self.same_processor:
            self.problems.append("the processor was restarted, or its RSS could not be read")
        elif self.rss_end - self.rss_start > RSS_SLACK_BYTES:
            self.problems.append(f"processor RSS grew by {(self.rss_end - self.rss_start) / 2**20:.1f} MiB")

    def _first(self, after: str, result: str, detail: str = "") -> float | None:
        """Seconds from a fault to the end of the first answer of that kind that started after it."""
        at = self.faults.get(after)
        ends = [o.ended - at for o in self.outcomes
                if at is not None and o.started >= at and o.result == result and o.detail == detail]
        return min(ends, default=None)

    def figures(self) -> dict[str, Any]:
        by = Counter(f"{o.kind} {o.result}{' ' + o.detail if o.detail and o.result == 'error' else ''}"
                     for o in self.outcomes)
        answered = sorted(o.seconds for o in self.outcomes if o.result in ("complete", "error"))
        return {
            "version": self.version,
            "seconds": self.seconds,
            "requests": len(self.outcomes),
            "outcomes": dict(sorted(by.items())),
            "slowest_answer_s": round(answered[-1], 2) if answered else None,
            "first_503_after_hang_s": _round(self._first("hung", "error", "backend_unavailable")),
            "first_answer_after_resume_s": _round(self._first("resumed", "complete")),
            "first_503_after_kill_s": _round(self._first("killed", "error", "backend_unavailable")),
            "first_answer_after_kill_s": _round(self._first("killed", "complete")),
            "streams_reset_by_the_kill": sum(o.result == "reset" for o in self.outcomes),
            "max_generations_in_shimmy": self.max_generations,
            "cap": self.cap,
            "rss_mib": [_mib(self.rss_start), _mib(self.rss_end)],
            "settled_s": round(self.settled.seconds, 1),
            "recovered_after_kill_s": _round(self.recovered_after_kill_s),
            "problems": self.problems,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


async def _run(target: Target, supervisor_pid: int, seconds: float, seed: int) -> tuple[list[Outcome], dict, list]:
    started = time.monotonic()
    until = started + seconds
    outcomes: list[Outcome] = []
    faults: dict[str, float] = {}
    seen: list[int] = []
    mix = ["short"] * 6 + ["long"] * 2 + ["vanish"] * 2
    tasks = [_client(kind, target.url, until, GENERATION_TIMEOUT_S, seed + i, outcomes) for i, kind in enumerate(mix)]
    await asyncio.gather(*tasks, _faults(supervisor_pid, started, seconds, faults),
                         _sample_generations(target.emulator, until, seen))
    return outcomes, faults, seen


async def _recovered(target: Target, killed: float | None, limit_s: float) -> float | None:
    """Seconds from the kill until a chat is answered again, asking every 0.25 s for at most `limit_s` after the
    storm: slots Shimmy's killed generations held come back only when their estimate runs out (docs/admission.md),
    which may be after a short storm has ended."""
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.post(target.url + CHAT, json=_body(False, 2)) as resp:
                    if resp.status == 200 and killed is not None:
                        return time.monotonic() - killed
                    await resp.read()
            await asyncio.sleep(0.25)
    return None


async def _warm(target: Target) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for stream in (False, True) * 5:
            async with session.post(target.url + CHAT, json=_body(stream, 4)) as resp:
                await resp.read()


def run(target: Target, supervisor_pid: int, version: str, seconds: float, cap: int = 2, seed: int = 13) -> ChaosReport:
    """One chaos run against a running stack (started with `stack_env(version)`); the report is checked."""
    asyncio.run(_warm(target))
    processor = extproc_pid(supervisor_pid)
    rss_start = rss_bytes(processor) if processor else None
    outcomes, faults, seen = asyncio.run(_run(target, supervisor_pid, seconds, seed))
    recovered = asyncio.run(_recovered(target, faults.get("killed"), limit_s=30))
    settled = asyncio.run(_settle(target, limit_s=30))
    rss_end = rss_bytes(processor) if processor else None
    report = ChaosReport(version, seconds, cap, outcomes, faults, seen, settled, rss_start, rss_end,
                         processor is not None and extproc_pid(supervisor_pid) == processor, recovered)
    report.check()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--versions", default="1.7.2,2.5.0", help="emulator profiles, comma-separated")
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args(argv)
    from tests.integration.conftest import start_stack, stop_stack  # the tests' stack starter, as bench.soak does

    failed = False
    for version in args.versions.split(","):
        stack = start_stack(stack_env(version))
        try:
            report = run(stack, stack.proc.pid, version, args.seconds, seed=args.seed)
        finally:
            stop_stack(stack)
            stack.log.unlink(missing_ok=True)
        print(json.dumps(report.figures(), indent=2))
        failed = failed or bool(report.problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
