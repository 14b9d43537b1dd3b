"""`python -m bench.processor_cost`: the processor's own CPU per request, in process, for each kind of chat request.

One non-stream request is the three ext_proc messages Envoy sends the chat route (request body, response headers,
response body), handed to the real processor the way the gRPC servicer hands them (`ExternalProcessor.dispatch`),
without Envoy, gRPC or Shimmy. Kinds: a plain chat, a chat offering one tool whose answer is a call, and a chat
asking for a JSON schema. The figure that matters is the ratio to the plain chat, measured in the same run
(targets are ratios, never absolute times: the machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.health import ShimmyMonitor
from extproc.processors import ROUTES, Context
from extproc.server import ExternalProcessor

__all__ = ["KINDS", "context", "measure", "table"]

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "celsius": {"type": "integer"}}}
# (request fields, the model's output as Shimmy streams it: one event per token)
KINDS: dict[str, tuple[dict[str, object], list[str]]] = {
    "plain": ({}, ["It", " is", " 18", "C", " and", " sunny", " in", " Paris", "."]),
    "tools": ({"tools": [WEATHER]}, ['{"name":', ' "get_weather",', ' "arguments":', ' {"city":', ' "Paris"}}']),
    "schema": (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}},
        ['{"city":', ' "Paris",', ' "celsius":', " 18}"],
    ),
}


def _messages(fields: dict[str, object], tokens: list[str]) -> list[ep.ProcessingRequest]:
    body = json.dumps({"model": "phi3-lora", "messages": QUESTION, **fields}).encode()
    wire = "".join(f"data: {t}\n\n" for t in tokens).encode() + b"data: [DONE]\n\n"
    status = base_pb2.HeaderValue(key=":status", raw_value=b"200")
    return [
        ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True)),
        ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[status]))),
        ep.ProcessingRequest(response_body=ep.HttpBody(body=wire, end_of_stream=True)),
    ]


def _request(servicer: ExternalProcessor, messages: list[ep.ProcessingRequest]) -> Callable[[], None]:
    def one() -> None:
        processor = ROUTES["chat"](servicer.ctx)
        for msg in messages:
            response = servicer.dispatch(processor, msg)
            assert response is not None and not response.HasField("immediate_response"), response
        processor.close()

    return one


def context() -> Context:
    """The processor's context as a stack gives it, with a Shimmy said healthy and serving phi3-lora (never asked:
    the in-process benches answer for it)."""
    monitor = ShimmyMonitor("http://127.0.0.1:9", "phi3-lora", interval=60)
    monitor.healthy, monitor.models = True, frozenset({"phi3-lora"})
    return Context(templates={}, monitor=monitor, generation_timeout=60)


def measure(requests: int = 2000, rounds: int = 5) -> dict[str, float]:
    """Median microseconds of processor CPU per request, per kind; the kinds interleave round by round."""
    servicer = ExternalProcessor(context())
    runs = {kind: _request(servicer, _messages(*spec)) for kind, spec in KINDS.items()}
    samples: dict[str, list[float]] = {kind: [] for kind in runs}
    for run in runs.values():  # warm-up: caches (schema validators, templates) as in a long-running processor
        run()
    for _ in range(rounds):
        for kind, run in runs.items():
            started = time.process_time()
            for _ in range(requests):
                run()
            samples[kind].append((time.process_time() - started) / requests * 1e6)
    return {kind: statistics.median(values) for kind, values in samples.items()}


def table(requests: int = 2000, rounds: int = 5) -> str:
    """`measure`'s figures as markdown, each kind against the plain chat."""
    figures = measure(requests, rounds)
    plain = figures["plain"]
    rows = ["| chat request, in process | processor CPU per request | vs plain chat |", "|---|---|---|"]
    rows += [f"| {kind} | {micros:.0f} µs | {micros / plain:.2f}x |" for kind, micros in figures.items()]
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.processor_cost", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="requests per kind per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    args = parser.parse_args()
    print(table(args.requests, args.rounds), end="")


if __name__ == "__main__":
    main()
