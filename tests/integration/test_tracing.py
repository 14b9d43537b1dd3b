"""Issue 25: one request per API is one trace, Envoy's spans and the processor's, received over OTLP/gRPC here.

The receiver is a TraceService of this test process (opentelemetry-proto's stubs); the stack exports to it with
OTEL_EXPORTER_OTLP_ENDPOINT, as a collector would receive it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

from tests.integration.conftest import Stack, free_port, start_stack, stop_stack

CALLS = [
    ("chat", "chat", "/v1/chat/completions",
     {"model": "phi3-lora", "max_tokens": 3, "messages": [{"role": "user", "content": "secret prompt"}]}),
    ("completions", "text_completion", "/v1/completions", {"model": "phi3-lora", "prompt": "secret prompt",
                                                            "max_tokens": 3, "stream": True}),
    ("messages", "chat", "/v1/messages",
     {"model": "phi3-lora", "max_tokens": 3, "messages": [{"role": "user", "content": "secret prompt"}]}),
    ("responses", "chat", "/v1/responses", {"model": "phi3-lora", "input": "secret prompt", "max_output_tokens": 3}),
]


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it, with its service's name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:  # the gRPC method's name
        with self.lock:
            for resource_spans in request.resource_spans:
                service = _attributes(resource_spans.resource.attributes).get("service.name", "")
                for scope in resource_spans.scope_spans:
                    self.spans += [(service, span) for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: bytes) -> list[tuple[str, Any]]:
        with self.lock:
            return [(service, span) for service, span in self.spans if span.trace_id == trace_id]


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def _attributes(attributes: Any) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in attributes}


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, int]]:
    port = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    receiving = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiving, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield receiving, port
    server.stop(0)


@pytest.fixture(scope="module")
def traced(receiver: tuple[Receiver, int]) -> Iterator[Stack]:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver[1]}", "OTEL_BSP_SCHEDULE_DELAY": "200"}
    stack = start_stack(env)
    yield stack
    stop_stack(stack)


@pytest.mark.parametrize(("api", "operation", "path", "payload"), CALLS, ids=[c[0] for c in CALLS])
def test_one_request_is_one_trace_through_envoy_and_the_processor(
    receiver: tuple[Receiver, int], traced: Stack, api: str, operation: str, path: str, payload: dict[str, Any]
) -> None:
    trace_id = bytes.fromhex(f"{api.encode().hex():0<32}")[:16]  # a client's own trace, continued by the gateway
    parent = f"00-{trace_id.hex()}-00f067aa0ba902b7-01"
    resp = httpx.post(f"{traced.url}{path}", json=payload, headers={"traceparent": parent}, timeout=30)
    assert resp.status_code == 200, resp.text
    deadline = time.monotonic() + 20  # Envoy's tracer flushes every 5 s
    while True:
        spans = receiver[0].trace(trace_id)
        services = {service for service, _ in spans}
        if {"shimmy-gateway", "shimmy-extproc"} <= services or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {"shimmy-gateway", "shimmy-extproc"} <= services, spans
    [processor] = [span for service, span in spans if service == "shimmy-extproc"]
    envoy = {span.span_id: span for service, span in spans if service == "shimmy-gateway"}
    # The processor's span hangs off Envoy's span of the ext_proc call, itself inside Envoy's request span.
    assert processor.parent_span_id in envoy, (processor, envoy)
    [ingress] = [span for span in envoy.values() if span.parent_span_id == bytes.fromhex("00f067aa0ba902b7")]
    tags = _attributes(ingress.attributes)
    assert (tags["shimmy.api"], tags["gen_ai.request.model"], tags["shimmy.outcome"]) == (api, "phi3-lora", "ok")
    attributes = _attributes(processor.attributes)
    assert attributes["gen_ai.operation.name"] == operation
    assert processor.name == f"{operation} phi3-lora"
    assert attributes["gen_ai.request.model"] == attributes["gen_ai.response.model"] == "phi3-lora"
    assert attributes["gen_ai.usage.input_tokens"] > 0
    if payload.get("stream"):  # counted exactly, one event per token: max_tokens, as the reply is longer
        assert attributes["gen_ai.usage.output_tokens"] == 3
        assert attributes["gen_ai.response.finish_reasons"] == ["length"]
    else:  # what the client was told
        usage = resp.json()["usage"]
        assert attributes["gen_ai.usage.output_tokens"] == usage.get("completion_tokens", usage.get("output_tokens"))
        assert attributes["gen_ai.usage.input_tokens"] == usage.get("prompt_tokens", usage.get("input_tokens"))
        assert attributes["gen_ai.response.finish_reasons"][0] in {"end", "length"}
    assert attributes["shimmy.api"] == api
    assert ("gen_ai.server.time_to_first_token" in attributes) == payload.get("stream", False)
    assert "error.type" not in attributes
    assert tags["gen_ai.usage.output_tokens"] == str(attributes["gen_ai.usage.output_tokens"])
    assert processor.start_time_unix_nano < processor.end_time_unix_nano
    # Neither the prompt nor the answer is in any span.
    text = b"".join(span.SerializeToString() for _, span in spans)
    assert b"secret prompt" not in text


def test_a_refused_request_is_an_error_span(receiver: tuple[Receiver, int], traced: Stack) -> None:
    trace_id = bytes.fromhex("e" * 32)
    parent = f"00-{trace_id.hex()}-00f067aa0ba902b7-01"
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
    resp = httpx.post(f"{traced.url}/v1/chat/completions", json=body, headers={"traceparent": parent}, timeout=30)
    assert resp.status_code == 404, resp.text
    deadline = time.monotonic() + 20
    while not (processor := [s for service, s in receiver[0].trace(trace_id) if service == "shimmy-extproc"]):
        assert time.monotonic() < deadline, receiver[0].trace(trace_id)
        time.sleep(0.2)
    attributes = _attributes(processor[0].attributes)
    assert attributes["error.type"] == "model_not_found" and processor[0].status.code == 2  # STATUS_CODE_ERROR
    assert attributes["gen_ai.request.model"] == "no-such-model" and "gen_ai.usage.output_tokens" not in attributes
