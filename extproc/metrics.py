"""The processor's own Prometheus metrics, named by the OpenTelemetry GenAI semantic conventions.

Envoy already counts requests, statuses and upstream latency; these add what only the translation knows: tokens
by model, time to first token, how long each generation request took and how it ended (`error_type`, the
convention's `error.type`: the error code, `cancelled` for a client that left, empty for success), and the streams
in flight. An OpenTelemetry name maps onto Prometheus as its exporter does: dots become `_`, the unit `s` becomes
`_seconds` (`gen_ai.server.request.duration` -> `gen_ai_server_request_duration_seconds`). `gen_ai_*` names are
the convention's; `shimmy_*` ones are this gateway's. `api` is the client API (`chat`, `messages`, `responses`,
`completions`: the adapter's route); `gen_ai_operation_name` is the convention's operation (`chat`,
`text_completion`). `/metrics` on the public port serves Envoy's `/stats/prometheus` with these appended (the
`metrics` processor). The names before the conventions, and what replaced them: docs/observability.md.
"""

from __future__ import annotations

from functools import cache
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = [
    "ABANDONED",
    "ADMISSION_REJECTED",
    "LIVE_STREAMS",
    "REGISTRY",
    "REQUEST_DURATION",
    "TIME_PER_OUTPUT_TOKEN",
    "TIME_TO_FIRST_TOKEN",
    "TOKENS",
    "Occupancy",
    "exposition",
    "request_ended",
    "watch_admission",
]

REGISTRY = CollectorRegistry(auto_describe=False)

# Buckets for LLM work on CPU: from a cached short answer to a long generation.
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# The convention's advice for gen_ai.client.token.usage: powers of 4 from 1 to 4^11.
_TOKENS = tuple(4**i for i in range(12))

TOKENS = Histogram(
    "gen_ai_client_token_usage",
    "Tokens per generation request by model and type (input = prompt: exact with TOKENIZER_GGUF, else estimated; "
    "output = completion, exact); the sum is all tokens.",
    ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_token_type", "api"],
    buckets=_TOKENS,
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "gen_ai_server_request_duration_seconds",
    "Every generation request, from its arrival at Envoy to the processor's last answer; error_type is the error "
    "code, cancelled (the client left), or empty (success); stream: the answer was an event stream.",
    ["gen_ai_operation_name", "gen_ai_request_model", "error_type", "stream", "api"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "gen_ai_server_time_to_first_token_seconds",
    "Streams only: from the request's arrival at Envoy to the first content token sent.",
    ["gen_ai_operation_name", "gen_ai_request_model", "api"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
LIVE_STREAMS = Gauge("shimmy_live_streams", "ext_proc streams (HTTP requests) in progress.", registry=REGISTRY)

# Admission (extproc.admission): Shimmy's occupancy as the processor models it. Gauges are this worker's.
TIME_PER_OUTPUT_TOKEN = Histogram(
    "gen_ai_server_time_per_output_token_seconds",
    "Time per output token after the first, measured on each generation Shimmy streamed with two tokens or more (a "
    "1.x one-piece answer has no pace); the pace the occupancy model uses.",
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


class Occupancy(Protocol):
    """What the gauges read of the generation slots (`extproc.admission.Admission`, which imports this module)."""

    @property
    def capacity(self) -> int: ...
    @property
    def busy(self) -> int: ...
    @property
    def abandoned(self) -> int: ...
    @property
    def queued(self) -> int: ...
    def backlog(self) -> float: ...


def watch_admission(admission: Occupancy) -> None:
    """Read the admission gauges from `admission` at every scrape."""
    SLOTS.set(admission.capacity)
    SLOTS_BUSY.set_function(lambda: admission.busy)
    ABANDONED_NOW.set_function(lambda: admission.abandoned)
    BACKLOG.set_function(admission.backlog)
    QUEUED.set_function(lambda: admission.queued)


@cache
def _duration(operation: str, model: str, error_type: str, stream: bool, api: str) -> Histogram:
    return REQUEST_DURATION.labels(operation, model, error_type, "true" if stream else "false", api)


@cache
def _generation(operation: str, model: str, api: str) -> tuple[Histogram, Histogram, Histogram]:
    return (
        TOKENS.labels(operation, model, "input", api),
        TOKENS.labels(operation, model, "output", api),
        TIME_TO_FIRST_TOKEN.labels(operation, model, api),
    )


# Once per request: the labelled children are looked up once per label set (prometheus_client's `labels` takes a
# lock and checks every value each time). The label sets are bounded: models Shimmy serves, the APIs, error codes.
def request_ended(
    operation: str,
    model: str,
    api: str,
    error_type: str,
    seconds: float,
    stream: bool = False,
    tokens: tuple[int, int] | None = None,
    ttft: float | None = None,
) -> None:
    """One request's end; `tokens` (input, output) when a generation started, `ttft` when it streamed text."""
    _duration(operation, model, error_type, stream, api).observe(seconds)
    if tokens is None:
        return
    tokens_in, tokens_out, first_token = _generation(operation, model, api)
    tokens_in.observe(tokens[0])
    tokens_out.observe(tokens[1])
    if ttft is not None:
        first_token.observe(ttft)


def exposition() -> bytes:
    """The text format of every metric above."""
    return generate_latest(REGISTRY)
