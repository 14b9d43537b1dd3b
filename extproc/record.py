"""One generation request's record: when it arrived, which model it named, and its end, counted once.

`RequestRecord.end` is the one place a request's end is recorded: the metrics (`extproc.metrics`), the summary
Envoy's access log prints (dynamic metadata on the processor's last answer) and, with tracing on, the request's
span (`extproc.tracing`). Whatever ends a request (its answer, an error, the deadline's timer, the client leaving)
goes through it, and only the first call counts.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Mapping
from typing import TypeVar

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from extproc import metrics, mutations, tracing
from extproc.generation import Generation

__all__ = ["RequestRecord"]

_EXT_PROC = "envoy.filters.http.ext_proc"  # the key Envoy files the request attributes under

ResponseT = TypeVar("ResponseT", ep.ProcessingResponse, None)


class RequestRecord:
    """What the access log, the metrics and the request's span say about one request of the API `api` (its route
    name), whose GenAI operation is `operation`."""

    __slots__ = ("api", "model", "operation", "outcome", "queued", "served_model", "started", "traceparent")

    def __init__(self, api: str, operation: str) -> None:
        self.api = api
        self.operation = operation
        self.started = time.monotonic()  # the request's arrival, once Envoy said when (`arrived`)
        self.model = ""  # as the client named it, once the body is read
        self.served_model = False  # a generation started for it, on a model in Shimmy's list (or its alias)
        self.outcome: str | None = None  # set once the request's end is recorded
        self.queued: tuple[float, float] | None = None  # (since, until): the wait for a slot, when there was one
        self.traceparent = ""  # the span context of Envoy's ext_proc call (W3C), when Envoy traces

    @property
    def ended(self) -> bool:
        return self.outcome is not None

    def arrived(self, attributes: Mapping[str, struct_pb2.Struct]) -> None:
        """The request's arrival (Envoy's `request.time`): its deadline and duration count from there, not from the
        moment its body was whole, so a slow upload cannot push the answer past the outer proxy's limit."""
        sent = attributes.get(_EXT_PROC)
        arrival = sent.fields.get("request.time") if sent is not None else None
        if arrival is None or not arrival.string_value:
            return
        try:
            arrived = datetime.datetime.fromisoformat(arrival.string_value).timestamp()
        except ValueError:
            return
        self.started = time.monotonic() - max(0.0, time.time() - arrived)

    def end(self, response: ResponseT, outcome: str, error_type: str, gen: Generation | None) -> ResponseT:
        """Count the request's end once, and put its summary in Envoy's dynamic metadata for the access log.

        The metrics name the model only once it was checked against Shimmy's list and a generation started for it:
        a name a client made up is `unknown` there, so no client can grow the metrics without bound. The access log
        keeps it. `gen`: the generation, if one reached Shimmy (its tokens and timings are counted).
        """
        if self.outcome is not None:
            return response
        self.outcome = outcome
        duration = time.monotonic() - self.started
        model, api, operation = self.model or "unknown", self.api, self.operation
        label = model if self.served_model else "unknown"
        error = "cancelled" if outcome == "cancelled" else error_type
        fields: dict[str, str | float] = {
            "api": api,
            "model": model,
            "outcome": outcome,
            "duration_ms": round(duration * 1000, 1),
        }
        if gen is None:
            metrics.request_ended(operation, label, api, error, duration)
        else:
            ttft = gen.first_content_at - self.started if gen.stream and gen.first_content_at is not None else None
            tokens = (gen.prompt_tokens, gen.completion_tokens)
            metrics.request_ended(operation, label, api, error, duration, gen.stream, tokens, ttft)
            fields["prompt_tokens"], fields["completion_tokens"] = tokens
            if ttft is not None:  # a non-stream client sees no first token
                fields["ttft_ms"] = round(ttft * 1000, 1)
        if response is not None:
            mutations.set_metadata(response, fields)
        if tracing.enabled():
            self._trace(error, gen)
        return response

    def _trace(self, error: str, gen: Generation | None) -> None:
        """The request's span (extproc.tracing): where its time went, its tokens and how it ended; no text."""
        operation = self.operation
        attributes: dict[str, str | int | float | list[str]] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": "shimmy",
            "gen_ai.request.model": self.model or "unknown",
            "shimmy.api": self.api,
        }
        events: list[tuple[str, float]] = []
        if self.queued is not None:
            since, until = self.queued
            attributes["shimmy.queue.wait"] = until - since
            events += [("queued", since), ("admitted", until)]
        if gen is not None:
            attributes["gen_ai.response.model"] = gen.shimmy_model
            attributes["gen_ai.request.max_tokens"] = gen.max_tokens
            attributes["gen_ai.usage.input_tokens"] = gen.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = gen.completion_tokens
            attributes["shimmy.stream"] = gen.stream
            if not error:
                attributes["gen_ai.response.finish_reasons"] = [gen.stop_reason]
            if gen.first_content_at is not None:
                attributes["gen_ai.server.time_to_first_token"] = gen.first_content_at - self.started
                events.append(("first_token", gen.first_content_at))
        name = f"{operation} {self.model}" if self.model else operation
        tracing.record(name, self.traceparent, self.started, attributes, events, error)
