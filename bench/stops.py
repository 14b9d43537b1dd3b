"""`python -m bench.stops`: what stop sequences cost the processor per token, and that their length does not matter.

Each case relays the same Shimmy stream, one SSE event (one 4-character token) per `Exchange.relay` call, as the
processor does for each body chunk Envoy streams to it, with the phi3 template's end-of-turn markers always on.
The hostile case is the one issue 14 found: four stop sequences of the longest length the schema accepts, and an
output that keeps matching their common prefix, so the matcher is never back at its start state. The figure is
the median over rounds of the time per token; the ratio is to the case without client stop sequences, measured in
the same run; the two "repeats their prefix" rows differ only in the stops' length. In-process and CPU-bound
only: no server, no network.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from extproc.apis.chat import ChatCompletions
from extproc.generation import start
from extproc.stops import MAX_STOP_LENGTH, MAX_STOP_SEQUENCES

__all__ = ["CASES", "table"]

LONG = MAX_STOP_LENGTH
CASES: dict[str, list[str] | None] = {
    "no client stop": None,
    "4 short stops, never in the output": ["STOP", "Human:", "\n\nUser", "###"],
    f"4 stops of {LONG} chars, never in the output": [c * LONG for c in "WXYZ"],
    "4 stops of 8 chars, output repeats their prefix": ["a" * 7 + c for c in "wxyz"],
    f"4 stops of {LONG} chars, output repeats their prefix": ["a" * (LONG - 1) + c for c in "wxyz"],
}


def _per_token_ns(stop: list[str] | None, tokens: int) -> float:
    """Relay `tokens` events of "aaaa" through a fresh Exchange; nanoseconds per token."""
    request = {"model": "phi3-lora", "messages": [{"role": "user", "content": "x"}], "stream": True,
               "max_tokens": 131072, "stop": stop}
    _, state = start(*ChatCompletions.parse(json.dumps(request).encode()), {})
    event = b"data: aaaa\n\n"
    relay = state.relay
    started = time.perf_counter_ns()
    for _ in range(tokens):
        relay(event, False)
    elapsed = time.perf_counter_ns() - started
    assert not state.finished, "no stop sequence may match: every token must be relayed"
    return elapsed / tokens


def table(tokens: int = 20_000, rounds: int = 7) -> str:
    """The cases measured, interleaved round by round (a noisy moment touches every case alike), as markdown."""
    assert len(CASES) and all(s is None or len(s) <= MAX_STOP_SEQUENCES for s in CASES.values())
    samples: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(rounds):
        for name, stop in CASES.items():
            samples[name].append(_per_token_ns(stop, tokens))
    base = statistics.median(samples["no client stop"])
    rows = [f"| stop sequences ({tokens} tokens x {rounds} rounds) | µs per token (median) | ratio to no stop |",
            "|---|---|---|"]
    for name, values in samples.items():
        median = statistics.median(values)
        rows.append(f"| {name} | {median / 1000:.2f} (lowest {min(values) / 1000:.2f}) | {median / base:.2f} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stops", description=__doc__)
    parser.add_argument("--tokens", type=int, default=20_000, help="tokens per round (default 20000)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per case (default 7)")
    args = parser.parse_args(argv)
    print(table(args.tokens, args.rounds), end="")


if __name__ == "__main__":
    main()
