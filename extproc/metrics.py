"""The processor's own Prometheus metrics, in OpenTelemetry `gen_ai` naming.

Envoy already counts requests, statuses and upstream latency; these add what only the translation knows: tokens
by model, time to first token, how each generation request ended, and the streams in flight. `api` is the client
API (`chat`, `messages`, `responses`, `completions`: the adapter's route). `/metrics` on the public
port serves Envoy's `/stats/prometheus` with these appended (the `metrics` processor).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["LIVE_STREAMS", "REGISTRY", "REQUESTS", "REQUEST_DURATION", "TIME_TO_FIRST_TOKEN", "TOKENS", "exposition"]

REGISTRY = CollectorRegistry(auto_describe=False)

# Buckets for LLM work on CPU: from a cached short answer to a long generation.
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

TOKENS = Counter(
    "gen_ai_usage_tokens",
    "Tokens by model and type (input = prompt: exact with TOKENIZER_GGUF, else estimated; "
    "output = completion, exact).",
    ["gen_ai_request_model", "gen_ai_token_type", "api"],
    registry=REGISTRY,
)
REQUESTS = Counter(
    "gen_ai_requests",
    "Generation requests by model, outcome and API; error_type is the OpenAI error code, or empty.",
    ["gen_ai_request_model", "outcome", "error_type", "api"],
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "gen_ai_server_request_duration_seconds",
    "From the request body reaching the processor to the last byte of the answer.",
    ["gen_ai_request_model", "stream", "api"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "gen_ai_server_time_to_first_token_seconds",
    "Streams only: from the request body reaching the processor to the first content token sent.",
    ["gen_ai_request_model", "api"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
LIVE_STREAMS = Gauge("gen_ai_live_streams", "ext_proc streams (HTTP requests) in progress.", registry=REGISTRY)


def exposition() -> bytes:
    return generate_latest(REGISTRY)
