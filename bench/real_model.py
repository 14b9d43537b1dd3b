"""`python -m bench.real_model`: generation speed of the real model, direct and through the gateway.

Starts `shimmy-gateway up` with the emulator's llama engine (the packaged Gemma 3 270M, the `llm` extra) on free
loopback ports, then times one fixed generation (64 tokens at temperature 0, streamed) alternately straight from
the emulator's `/api/generate` and through the gateway's `/v1/chat/completions`, with the same rendered prompt.
It prints tokens/s of each (tokens over the time from sending the request to the last token, so prompt evaluation
is included), the decode rate (first to last token), the time to the first token, and the gateway/direct ratio.
Nothing here asserts on a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.stack import die_with_parent, free_ports
from extproc import templates

MODEL = "phi3-lora"
MESSAGES = [("user", "Write a short story about a lighthouse keeper.")]
_START_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Run:
    tokens: int
    first: float  # seconds from sending the request to the first token
    last: float  # ... to the last token

    @property
    def rate(self) -> float:
        return self.tokens / self.last

    @property
    def decode_rate(self) -> float:
        return (self.tokens - 1) / (self.last - self.first) if self.tokens > 1 and self.last > self.first else 0.0


@contextmanager
def _stack() -> Iterator[tuple[str, str]]:
    """(gateway URL, emulator URL) of a running stack with the llama engine; stopped on the way out."""
    gateway, shimmy, admin, extproc = free_ports(4)
    env = {
        **os.environ,
        "GATEWAY_PORT": str(gateway),
        "SHIMMY_PORT": str(shimmy),
        "ENVOY_ADMIN_PORT": str(admin),
        "EXTPROC_PORT": str(extproc),
        "SHIMMY_BACKEND": "emulator",
        "EMULATOR_ENGINE": "llama",
        "WARMUP": "true",  # /health turns 200 once the model has loaded and answered
        "HEALTH_INTERVAL_S": "0.5",
        "LOG_LEVEL": "warning",
    }
    log = Path(tempfile.mkstemp(prefix="bench-real-", suffix=".log")[1])
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "up"], env=env, stdout=out, stderr=out,
                                preexec_fn=die_with_parent)
    url = f"http://127.0.0.1:{gateway}"
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the stack did not start:\n{log.read_text(errors='replace')}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url, f"http://127.0.0.1:{shimmy}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.unlink(missing_ok=True)


def _timed(client: httpx.Client, url: str, body: dict[str, object], is_token: object) -> Run:
    """Send one streamed request; count the SSE events `is_token` accepts, with their arrival times.

    An event ends at a blank line; a token with a newline is one event of several `data:` lines.
    """
    times: list[float] = []
    data: list[str] = []
    start = time.perf_counter()
    with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data:"):
                data.append(line[6:] if line.startswith("data: ") else line[5:])
            elif not line and data:
                if is_token("\n".join(data)):  # type: ignore[operator]
                    times.append(time.perf_counter() - start)
                data = []
    if not times:
        raise SystemExit(f"{url}: no tokens")
    return Run(len(times), times[0], times[-1])


def _native_token(data: str) -> bool:
    return data != "[DONE]"


def _chat_token(data: str) -> bool:
    if data == "[DONE]":
        return False
    choices = json.loads(data)["choices"]
    return bool(choices) and "role" not in choices[0]["delta"] and choices[0]["delta"].get("content") is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.real_model", description=__doc__)
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of the generation (default 64)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per path, alternating (default 5)")
    args = parser.parse_args(argv)
    prompt = templates.render("gemma", MESSAGES)  # what the gateway sends for the packaged Gemma
    native = {"model": MODEL, "prompt": prompt, "max_tokens": args.tokens, "temperature": 0, "stream": True}
    chat = {
        "model": MODEL,
        "messages": [{"role": role, "content": text} for role, text in MESSAGES],
        "max_tokens": args.tokens,
        "temperature": 0,
        "stream": True,
    }
    runs: dict[str, list[Run]] = {"direct": [], "gateway": []}
    with _stack() as (gateway, emulator), httpx.Client(timeout=120) as client:
        paths = {
            "direct": (f"{emulator}/api/generate", native, _native_token),
            "gateway": (f"{gateway}/v1/chat/completions", chat, _chat_token),
        }
        for url, body, is_token in paths.values():  # warm-up, untimed
            _timed(client, url, body, is_token)
        for _ in range(args.runs):
            for name, (url, body, is_token) in paths.items():
                runs[name].append(_timed(client, url, body, is_token))

    def median(name: str, attr: str) -> float:
        return statistics.median(getattr(run, attr) for run in runs[name])

    tokens = {name: sorted({run.tokens for run in runs[name]}) for name in runs}
    print(f"real model: Gemma 3 270M Q4_K_M (llama.cpp), {args.tokens} tokens max, temperature 0, stream, "
          f"median of {args.runs}; tokens per run: direct {tokens['direct']}, gateway {tokens['gateway']}")
    for label, attr, unit, scale in (
        ("tokens/s (request to last token)", "rate", "tok/s", 1.0),
        ("decode tokens/s (first to last)", "decode_rate", "tok/s", 1.0),
        ("time to first token", "first", "ms", 1000.0),
    ):
        direct, through = median("direct", attr) * scale, median("gateway", attr) * scale
        print(f"  {label:34} direct {direct:7.1f} {unit:5}  gateway {through:7.1f} {unit:5}  "
              f"ratio gateway/direct {through / direct:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
