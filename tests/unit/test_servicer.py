"""The ext_proc servicer: phase routing and the protobuf answers Envoy gets, without Envoy.

grpcio-testing drives the processors through its in-memory RPC machinery (it runs synchronous servicers, so a
three-line adapter feeds `ExternalProcessor.dispatch`); a second test runs the real `grpc.aio` server on a
loopback port and talks to it with a real channel.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator

import grpc
import grpc_testing
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as epg

from extproc import schemas
from extproc.health import ShimmyMonitor
from extproc.processors import OFF_LOOP_BYTES, Context
from extproc.server import ExternalProcessor, GrpcServer

SERVICE = ep.DESCRIPTOR.services_by_name["ExternalProcessor"]
CHAT = [("x-gateway-route", "chat")]


def context() -> Context:
    monitor = ShimmyMonitor("http://127.0.0.1:9", "phi3-lora", interval=60)
    monitor.healthy, monitor.models = True, frozenset({"phi3-lora"})
    return Context(templates={}, monitor=monitor, generation_timeout=60)


class SyncAdapter:
    """grpcio-testing calls synchronous servicers; this one forwards each message to the real dispatch."""

    def __init__(self, inner: ExternalProcessor) -> None:
        self.inner = inner

    def Process(
        self, requests: Iterator[ep.ProcessingRequest], ctx: grpc.ServicerContext
    ) -> Iterator[ep.ProcessingResponse]:
        processor = self.inner.processor_for(ctx.invocation_metadata())
        for msg in requests:
            response = self.inner.dispatch(processor, msg)
            if isinstance(response, list):
                yield from response
            elif response is not None:
                yield response


@pytest.fixture
def rpc_factory():
    server = grpc_testing.server_from_dictionary(
        {SERVICE: SyncAdapter(ExternalProcessor(context()))}, grpc_testing.strict_real_time()
    )

    def start(metadata: list[tuple[str, str]]):
        return server.invoke_stream_stream(SERVICE.methods_by_name["Process"], metadata, 5)

    return start


def headers(**pairs: str) -> ep.HttpHeaders:
    values = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    return ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=values))


def status_headers(status: int) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_headers=ep.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":status", raw_value=str(status).encode())])
    ))


def set_headers(mutation: ep.HeaderMutation) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


CHAT_BODY = b'{"model":"phi3-lora","messages":[{"role":"user","content":"Hi"}],"max_tokens":4}'


def test_non_stream_chat_takes_three_messages(rpc_factory) -> None:
    """A route that keeps the response BUFFERED (an Envoy of the user's own): the whole body in one message."""
    rpc = rpc_factory(CHAT)
    rpc.send_request(ep.ProcessingRequest(request_body=ep.HttpBody(body=CHAT_BODY, end_of_stream=True)))
    first = rpc.take_response().request_body.response
    sent = set_headers(first.header_mutation)
    assert sent[":path"] == "/api/generate"
    assert int(sent["content-length"]) == len(first.body_mutation.body)
    assert json.loads(first.body_mutation.body)["stream"] is True

    rpc.send_request(status_headers(200))
    second = rpc.take_response()
    assert set_headers(second.response_headers.response.header_mutation)["content-type"] == "application/json"
    assert not second.HasField("mode_override")  # non-stream stays BUFFERED

    rpc.send_request(ep.ProcessingRequest(response_body=ep.HttpBody(
        body=b"data: Hi\n\ndata:  there\n\ndata: [DONE]\n\n", end_of_stream=True)))
    third = rpc.take_response().response_body.response
    doc = json.loads(third.body_mutation.body)
    assert doc["choices"][0]["message"]["content"] == "Hi there"
    assert set_headers(third.header_mutation)["content-length"] == str(len(third.body_mutation.body))
    rpc.requests_closed()
    assert rpc.termination()[1] == grpc.StatusCode.OK


DUPLEX = ep.ProtocolConfiguration(response_body_mode=processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED)


def duplex_body(body: bytes) -> ep.ProcessingRequest:
    """The stream's first message on the chat route of envoy/gateway.yaml, which says its response is full duplex."""
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True), protocol_config=DUPLEX)


def test_non_stream_chat_holds_its_headers_until_the_answer_is_whole(rpc_factory) -> None:
    rpc = rpc_factory(CHAT)
    rpc.send_request(duplex_body(CHAT_BODY))
    first = rpc.take_response().request_body.response
    sent = set_headers(first.header_mutation)
    assert sent[":path"] == "/api/generate"
    assert int(sent["content-length"]) == len(first.body_mutation.body)
    assert json.loads(first.body_mutation.body)["stream"] is True

    rpc.send_request(status_headers(200))  # no answer yet: the status depends on how the generation ends
    rpc.send_request(ep.ProcessingRequest(response_body=ep.HttpBody(body=b"data: Hi\n\n")))  # nor yet
    rpc.send_request(ep.ProcessingRequest(response_body=ep.HttpBody(
        body=b"data:  there\n\ndata: [DONE]\n\n", end_of_stream=True)))
    headers = set_headers(rpc.take_response().response_headers.response.header_mutation)
    body = rpc.take_response().response_body.response.body_mutation.streamed_response
    assert headers["content-type"] == "application/json"
    assert body.end_of_stream
    assert json.loads(body.body)["choices"][0]["message"]["content"] == "Hi there"
    rpc.requests_closed()
    assert rpc.termination()[1] == grpc.StatusCode.OK


def test_non_stream_chat_failing_midway_is_a_502_not_a_200(rpc_factory) -> None:
    rpc = rpc_factory(CHAT)
    rpc.send_request(duplex_body(CHAT_BODY))
    rpc.take_response()
    rpc.send_request(status_headers(200))
    rpc.send_request(ep.ProcessingRequest(response_body=ep.HttpBody(body=b"data: Hi\n\ndata: [ERROR] boom\n\n")))
    headers = set_headers(rpc.take_response().response_headers.response.header_mutation)
    assert (headers[":status"], headers["content-type"]) == ("502", "application/json")
    answer = rpc.take_response().response_body.response.body_mutation.streamed_response
    assert answer.end_of_stream
    assert json.loads(answer.body)["error"]["code"] == "generation_failed"
    rpc.requests_closed()
    rpc.termination()


def test_non_stream_chat_ends_at_a_stop_sequence_without_shimmys_rest(rpc_factory) -> None:
    rpc = rpc_factory(CHAT)
    body = CHAT_BODY.replace(b'"max_tokens":4', b'"max_tokens":40,"stop":[" there"]')
    rpc.send_request(duplex_body(body))
    rpc.take_response()
    rpc.send_request(status_headers(200))
    rpc.send_request(ep.ProcessingRequest(response_body=ep.HttpBody(body=b"data: Hi\n\ndata:  there\n\n")))
    assert rpc.take_response().HasField("response_headers")
    answer = json.loads(rpc.take_response().response_body.response.body_mutation.streamed_response.body)
    assert answer["choices"][0]["message"]["content"] == "Hi"
    assert answer["choices"][0]["finish_reason"] == "stop"
    rpc.requests_closed()
    rpc.termination()


def test_stream_chat_switches_this_response_to_full_duplex(rpc_factory) -> None:
    rpc = rpc_factory(CHAT)
    stream_body = CHAT_BODY.replace(b'"max_tokens":4', b'"stream":true')
    rpc.send_request(ep.ProcessingRequest(request_body=ep.HttpBody(body=stream_body, end_of_stream=True)))
    rpc.take_response()
    rpc.send_request(status_headers(200))
    answer = rpc.take_response()
    assert answer.mode_override.response_body_mode == processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
    common = answer.response_headers.response
    assert set_headers(common.header_mutation)["content-type"] == "text/event-stream"
    assert set_headers(common.header_mutation)["x-accel-buffering"] == "no"
    assert "content-length" in common.header_mutation.remove_headers
    rpc.send_request(ep.ProcessingRequest(response_body=ep.HttpBody(body=b"data: Hi\n\n")))
    first = rpc.take_response().response_body.response.body_mutation.streamed_response
    assert b'"role":"assistant"' in first.body and b'"content":"Hi"' in first.body
    assert not first.end_of_stream
    rpc.send_request(ep.ProcessingRequest(response_body=ep.HttpBody(body=b"data: [DONE]\n\n")))
    last = rpc.take_response().response_body.response.body_mutation.streamed_response
    assert last.body.endswith(b"data: [DONE]\n\n")
    assert last.end_of_stream  # the processor ends the client's response as soon as [DONE] is out
    rpc.requests_closed()
    rpc.termination()


def test_invalid_body_is_answered_immediately(rpc_factory) -> None:
    rpc = rpc_factory(CHAT)
    rpc.send_request(ep.ProcessingRequest(request_body=ep.HttpBody(body=b'{"model":1}', end_of_stream=True)))
    answer = rpc.take_response().immediate_response
    assert answer.status.code == 400
    assert json.loads(answer.body)["error"]["param"] == "model"
    assert set_headers(answer.headers)["content-type"] == "application/json"
    rpc.requests_closed()
    rpc.termination()


def test_shimmy_empty_502_becomes_openai_error(rpc_factory) -> None:
    rpc = rpc_factory(CHAT)
    rpc.send_request(ep.ProcessingRequest(request_body=ep.HttpBody(body=CHAT_BODY, end_of_stream=True)))
    rpc.take_response()
    rpc.send_request(status_headers(502))
    answer = rpc.take_response().immediate_response
    assert answer.status.code == 502
    assert json.loads(answer.body)["error"]["code"] == "upstream_error"
    rpc.requests_closed()
    rpc.termination()


def test_models_and_health_routes(rpc_factory) -> None:
    rpc = rpc_factory([("x-gateway-route", "models")])
    rpc.send_request(status_headers(200))
    rpc.take_response()
    rpc.send_request(ep.ProcessingRequest(response_body=ep.HttpBody(
        body=b'{"models":[{"name":"b"},{"name":"a"},{"name":"b"}]}', end_of_stream=True)))
    doc = json.loads(rpc.take_response().response_body.response.body_mutation.body)
    assert [m["id"] for m in doc["data"]] == ["a", "b"]
    assert {m["owned_by"] for m in doc["data"]} == {"shimmy"}
    rpc.requests_closed()
    rpc.termination()

    rpc = rpc_factory([("x-gateway-route", "health")])
    rpc.send_request(ep.ProcessingRequest(request_headers=headers(**{":path": "/health"})))
    answer = rpc.take_response().immediate_response
    assert answer.status.code == 200
    assert json.loads(answer.body) == {"status": "healthy", "shimmy_status": "healthy"}
    rpc.requests_closed()
    rpc.termination()


def test_unknown_route_passes_through(rpc_factory) -> None:
    rpc = rpc_factory([])
    rpc.send_request(ep.ProcessingRequest(request_headers=headers(**{":path": "/x"})))
    assert rpc.take_response().HasField("request_headers")
    rpc.requests_closed()
    rpc.termination()


async def test_real_aio_server_over_loopback(unused_tcp_port: int) -> None:
    servicer = ExternalProcessor(context())
    address = f"127.0.0.1:{unused_tcp_port}"
    server = GrpcServer(servicer, address)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            call = epg.ExternalProcessorStub(channel).Process(metadata=CHAT)
            await call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=CHAT_BODY, end_of_stream=True)))
            first = await call.read()
            assert first.request_body.response.body_mutation.body.startswith(b'{"model":"phi3-lora"')
            assert servicer.live_streams == 1
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
        for _ in range(50):
            if servicer.live_streams == 0:
                break
            await asyncio.sleep(0.02)
        assert servicer.live_streams == 0
    finally:
        await server.stop(grace=0.1)


def tools_body(salt: str, parameters: int, extra: dict[str, object] | None = None) -> bytes:
    """A chat request offering one tool whose schema (`parameters` properties, each with a pattern) is new."""
    properties = {f"p_{salt}_{i}": {"type": "string", "pattern": "^[a-z]{1,9}$"} for i in range(parameters)}
    schema = {"type": "object", "properties": properties, **(extra or {})}
    tool = {"type": "function", "function": {"name": "lookup", "parameters": schema}}
    messages = [{"role": "user", "content": "Hi"}]
    return json.dumps({"model": "phi3-lora", "messages": messages, "tools": [tool]}).encode()


async def test_a_large_body_is_prepared_off_the_event_loop(unused_tcp_port: int, monkeypatch) -> None:
    """Checking a large request's new schemas must not hold the loop every other stream runs on (issue 22: 90 KiB
    of tools never seen before held it for 334 ms); a small one is checked on the loop, where the hop costs more.
    The answers are the same either way: forwarded, or the 400 naming the param."""
    checked_on: list[threading.Thread] = []
    check = schemas._checks._build

    def recording(text: str) -> str | None:
        checked_on.append(threading.current_thread())
        return check(text)

    monkeypatch.setattr(schemas._checks, "_build", recording)
    salt = uuid.uuid4().hex
    large, small = tools_body(salt, 200), tools_body(salt + "s", 2)
    bad = tools_body(salt + "x", 200, {"$ref": "http://127.0.0.1:9/x.json"})
    assert len(large) > OFF_LOOP_BYTES > len(small) and len(bad) > OFF_LOOP_BYTES
    server = GrpcServer(ExternalProcessor(context()), f"127.0.0.1:{unused_tcp_port}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{unused_tcp_port}") as channel:
            answers = []
            for body in (large, small, bad):
                call = epg.ExternalProcessorStub(channel).Process(metadata=CHAT)
                await call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True)))
                answers.append(await call.read())
                call.cancel()
    finally:
        await server.stop(grace=0.1)
    loop_thread = threading.current_thread()
    assert len(checked_on) == 3
    assert checked_on[0] is not loop_thread and checked_on[1] is loop_thread and checked_on[2] is not loop_thread
    assert answers[0].request_body.response.body_mutation.body.startswith(b'{"model":"phi3-lora"')
    assert answers[1].request_body.response.body_mutation.body.startswith(b'{"model":"phi3-lora"')
    refused = answers[2].immediate_response
    assert refused.status.code == 400
    error = json.loads(refused.body)["error"]
    assert error["param"] == "tools[0].function.parameters" and "$ref" in error["message"], error


@pytest.mark.parametrize(("status", "code", "expected"), [
    (404, "model_not_found", 404), (422, "upstream_rejected", 400), (415, "upstream_rejected", 400),
    (413, "upstream_rejected", 400), (500, "upstream_error", 502),
])
def test_shimmy_error_statuses_are_mapped(rpc_factory, status: int, code: str, expected: int) -> None:
    rpc = rpc_factory(CHAT)
    rpc.send_request(ep.ProcessingRequest(request_body=ep.HttpBody(body=CHAT_BODY, end_of_stream=True)))
    rpc.take_response()
    rpc.send_request(status_headers(status))
    answer = rpc.take_response().immediate_response
    assert answer.status.code == expected
    assert json.loads(answer.body)["error"]["code"] == code
    rpc.requests_closed()
    rpc.termination()


def test_an_envoy_local_reply_passes_through_and_is_counted(rpc_factory) -> None:
    from extproc import metrics

    name = "gen_ai_server_request_duration_seconds_count"
    labels = {"gen_ai_operation_name": "chat", "gen_ai_request_model": "phi3-lora", "error_type": "http_429",
              "stream": "false", "api": "chat"}
    before = metrics.REGISTRY.get_sample_value(name, labels) or 0
    rpc = rpc_factory(CHAT)
    rpc.send_request(duplex_body(CHAT_BODY))
    rpc.take_response()
    local = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":status", raw_value=b"429"),
                                        base_pb2.HeaderValue(key="content-type", raw_value=b"application/json")])
    rpc.send_request(ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=local)))
    answer = rpc.take_response()
    assert answer.HasField("response_headers") and not answer.HasField("immediate_response")  # untouched
    rpc.send_request(ep.ProcessingRequest(response_body=ep.HttpBody(body=b'{"error":{}}', end_of_stream=True)))
    echoed = rpc.take_response().response_body.response.body_mutation.streamed_response  # full duplex: echoed
    assert (echoed.body, echoed.end_of_stream) == (b'{"error":{}}', True)
    rpc.requests_closed()
    rpc.termination()
    assert metrics.REGISTRY.get_sample_value(name, labels) == before + 1


def test_a_made_up_model_name_never_becomes_a_metrics_label() -> None:
    """Each name a client sends for a model Shimmy does not serve was a new labelled series, kept for the life of
    the process: a client could grow the processor's memory and /metrics without bound. Such names count as
    `unknown`; a served model keeps its name."""
    from extproc import metrics
    from extproc.processors import ROUTES

    servicer = ExternalProcessor(context())
    for model in [f"made-up-{i}" for i in range(20)] + ["phi3-lora"]:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}]}).encode()
        processor = ROUTES["chat"](servicer.ctx)
        servicer.dispatch(processor, ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True)))
        processor.close()
    exposition = metrics.exposition().decode()
    assert "made-up" not in exposition
    assert ('gen_ai_server_request_duration_seconds_count{api="chat",error_type="model_not_found",'
            'gen_ai_operation_name="chat",gen_ai_request_model="unknown"') in exposition
    assert 'gen_ai_request_model="phi3-lora"' in exposition


def test_tracing_off_loads_no_opentelemetry() -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT unset (the default): a generation request imports none of OpenTelemetry, so
    tracing costs nothing when it is off."""
    import subprocess
    import sys

    script = f"""
import sys
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from tests.unit.test_servicer import context
from extproc.processors import ROUTES
from extproc.server import ExternalProcessor
servicer = ExternalProcessor(context())
processor = servicer.processor_for([("x-gateway-route", "chat"), ("traceparent", "00-{"1" * 32}-{"2" * 16}-01")])
servicer.dispatch(processor, ep.ProcessingRequest(request_body=ep.HttpBody(body={CHAT_BODY!r}, end_of_stream=True)))
processor.close()
assert processor.record.outcome == "cancelled", processor.record.outcome
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
