"""The processor's own Prometheus metrics, in OpenTelemetry `gen_ai` naming.

Envoy already counts requests, statuses and upstream latency; these add what only the translation knows: tokens
by model, time to first token, how each generation request ended, and the streams in flight. `api` is the client
API (`chat`, `messages`, `responses`, `completions`: the adapter's route). `/metrics` on the public
port serves Envoy's `/stats/prometheus` with these appended (the `metrics` processor).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from extproc.admission import Admission

__all__ = [
    "ABANDONED",
    "ADMISSION_REJECTED",
    "LIVE_STREAMS",
    "REGISTRY",
    "REQUESTS",
    "REQUEST_DURATION",
    "TIME_PER_OUTPUT_TOKEN",
    "TIME_TO_FIRST_TOKEN",
    "TOKENS",
    "exposition",
    "generation_ended",
    "request_ended",
    "watch_admission",
]

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

# Admission (extproc.admission): Shimmy's occupancy as the processor models it. Gauges are this worker's.
TIME_PER_OUTPUT_TOKEN = Histogram(
    "gen_ai_server_time_per_output_token_seconds",
    "Time per output token after the first, measured on each generation; the pace the occupancy model uses.",
    ["gen_ai_request_model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5),
    registry=REGISTRY,
)
ABANDONED = Counter(
    "shimmy_abandoned_generations",
    "Generations Shimmy kept running after nobody read them any more, by why: "
    "client_gone, stop_sequence, deadline, error.",
    ["reason"],
    registry=REGISTRY,
)
ADMISSION_REJECTED = Counter(
    "shimmy_admission_rejected",
    "Requests answered 429 by the processor's admission: queue_full, or queue_timeout (no slot in time).",
    ["reason"],
    registry=REGISTRY,
)
SLOTS = Gauge("shimmy_slots", "Generation slots (MAX_ACTIVE_REQUESTS).", registry=REGISTRY)
SLOTS_BUSY = Gauge(
    "shimmy_slots_busy", "Slots held by generations still inside Shimmy, read or abandoned.", registry=REGISTRY
)
ABANDONED_NOW = Gauge(
    "shimmy_abandoned_generations_running",
    "Abandoned generations still counted as running inside Shimmy.",
    registry=REGISTRY,
)
BACKLOG = Gauge(
    "shimmy_backlog_seconds",
    "Estimated seconds until Shimmy is through with the abandoned generations.",
    registry=REGISTRY,
)
QUEUED = Gauge("shimmy_admission_queued", "Requests waiting for a generation slot.", registry=REGISTRY)


def watch_admission(admission: Admission) -> None:
    """Read the admission gauges from `admission` at every scrape."""
    SLOTS.set(admission.capacity)
    SLOTS_BUSY.set_function(lambda: admission.busy)
    ABANDONED_NOW.set_function(lambda: admission.abandoned)
    BACKLOG.set_function(admission.backlog)
    QUEUED.set_function(lambda: admission.queued)


@cache
def _requests(model: str, outcome: str, error_type: str, api: str) -> Counter:
    return REQUESTS.labels(model, outcome, error_type, api)


@cache
def _generation(model: str, api: str, stream: bool) -> tuple[Histogram, Counter, Counter, Histogram]:
    return (
        REQUEST_DURATION.labels(model, "true" if stream else "false", api),
        TOKENS.labels(model, "input", api),
        TOKENS.labels(model, "output", api),
        TIME_TO_FIRST_TOKEN.labels(model, api),
    )


# Once per request: the labelled children are looked up once per label set (prometheus_client's `labels` takes a
# lock and checks every value each time). The label sets are bounded: models Shimmy serves, the APIs, outcomes.
def request_ended(model: str, outcome: str, error_type: str, api: str) -> None:
    _requests(model, outcome, error_type, api).inc()


def generation_ended(
    model: str, api: str, stream: bool, seconds: float, prompt_tokens: int, completion_tokens: int, ttft: float | None
) -> None:
    duration, tokens_in, tokens_out, first_token = _generation(model, api, stream)
    duration.observe(seconds)
    tokens_in.inc(prompt_tokens)
    tokens_out.inc(completion_tokens)
    if ttft is not None:
        first_token.observe(ttft)


def exposition() -> bytes:
    return generate_latest(REGISTRY)
