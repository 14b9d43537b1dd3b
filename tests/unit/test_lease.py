"""The slot lease through every path of the generation processor: the slot is back the moment Shimmy is done
(or counted abandoned, with its reason, while Shimmy goes on); the deadline and keep-alive from the timer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as epg

from extproc.admission import Admission
from extproc.health import ShimmyMonitor
from extproc.lease import SlotLease
from extproc.processors import ROUTES, Context, GenerationProcessor
from extproc.server import ExternalProcessor, GrpcServer
from shimmy_spec.versions import profile_for

BODY = b'{"model":"phi3-lora","messages":[{"role":"user","content":"Hi"}],"max_tokens":8%s}'
DUPLEX = ep.ProtocolConfiguration(response_body_mode=processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED)


def context(version: str = "2.5.0", timeout: float = 60, keepalive: float = 1.0) -> Context:
    monitor = ShimmyMonitor("http://127.0.0.1:9", "phi3-lora", interval=60)
    monitor.healthy, monitor.models = True, frozenset({"phi3-lora"})
    admission = Admission(2, 4, 1.0, serialized=False)
    return Context(templates={}, monitor=monitor, generation_timeout=timeout, admission=admission,
                   profile=profile_for(version), keepalive=keepalive)


def headers(status: int, content_type: str = "") -> ep.ProcessingRequest:
    values = [base_pb2.HeaderValue(key=":status", raw_value=str(status).encode())]
    if content_type:
        values.append(base_pb2.HeaderValue(key="content-type", raw_value=content_type.encode()))
    return ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=values)))


def chunk(data: bytes, end: bool = False) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_body=ep.HttpBody(body=data, end_of_stream=end))


def start(ctx: Context, stream: bool, duplex: bool = True) -> GenerationProcessor:
    processor = ROUTES["chat"](ctx)
    assert isinstance(processor, GenerationProcessor)
    body = BODY % (b',"stream":true' if stream else b"")
    msg = ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))
    if duplex:
        msg.protocol_config.CopyFrom(DUPLEX)
    answer = ExternalProcessor.dispatch(processor, msg)
    assert isinstance(answer, ep.ProcessingResponse) and answer.HasField("request_body")
    assert processor.lease.state == "held"
    return processor


def send(processor: GenerationProcessor, *msgs: ep.ProcessingRequest) -> None:
    for msg in msgs:
        ExternalProcessor.dispatch(processor, msg)


def abandoned(ctx: Context) -> int:
    assert ctx.admission is not None
    return ctx.admission.abandoned


# Each path: what Envoy sends after the request went to Shimmy; the slot must be free before the stream closes.
FREED_AT_ONCE: dict[str, tuple[str, bool, Callable[[], list[ep.ProcessingRequest]]]] = {
    "1.x one-piece answer fails (empty 502)": ("1.8.1", False, lambda: [headers(502)]),
    "Shimmy has no such model (404)": ("2.5.0", True, lambda: [headers(404)]),
    "Envoy answered instead (503, Shimmy's connection)": ("2.5.0", True, lambda: [headers(503, "application/json")]),
    "stream: Shimmy's [ERROR]": ("2.5.0", True, lambda: [headers(200), chunk(b"data:a\n\ndata:[ERROR] boom\n\n")]),
    "stream: Shimmy's response ends before [DONE]": ("2.5.0", True, lambda: [headers(200), chunk(b"data:a\n\n", True)]),
    "non-stream: Shimmy's [ERROR]": ("2.5.0", False, lambda: [headers(200), chunk(b"data:a\n\ndata:[ERROR] x\n\n")]),
    "stream: [DONE]": ("2.5.0", True, lambda: [headers(200), chunk(b"data:a\n\ndata:[DONE]\n\n")]),
    "non-stream: [DONE]": ("2.5.0", False, lambda: [headers(200), chunk(b"data:a\n\ndata:[DONE]\n\n", True)]),
}


@pytest.mark.parametrize("path", FREED_AT_ONCE)
def test_the_slot_is_free_the_moment_shimmy_is_done(path: str) -> None:
    version, stream, messages = FREED_AT_ONCE[path]
    ctx = context(version)
    processor = start(ctx, stream)
    send(processor, *messages())
    assert processor.lease.state == "released", path
    processor.close()
    assert ctx.admission is not None and ctx.admission.busy == 0 and abandoned(ctx) == 0


def test_envoys_route_timeout_leaves_the_slot_abandoned_for_the_deadline() -> None:
    ctx = context()
    processor = start(ctx, stream=True)
    send(processor, headers(504, "application/json"))
    assert processor.lease.state == "abandoned" and abandoned(ctx) == 1


def test_a_client_that_leaves_mid_stream_leaves_its_slot_abandoned_until_the_estimate() -> None:
    ctx = context()
    processor = start(ctx, stream=True)
    send(processor, headers(200), chunk(b"data:a\n\n"))
    processor.close()
    assert processor.lease.state == "abandoned" and processor.lease.ticket is not None
    assert processor.lease.ticket.abandoned == "client_gone"


def test_a_refused_request_takes_no_slot() -> None:
    ctx = context()
    processor = ROUTES["chat"](ctx)
    assert isinstance(processor, GenerationProcessor)
    ExternalProcessor.dispatch(processor, ep.ProcessingRequest(request_body=ep.HttpBody(body=b"{", end_of_stream=True)))
    processor.close()
    assert processor.lease.state == "idle" and ctx.admission is not None and ctx.admission.busy == 0


def test_without_admission_the_lease_admits_everything_and_does_nothing() -> None:
    lease = SlotLease(None)
    assert lease.try_acquire("m", 8, 1) and lease.state == "idle"
    lease.upstream_status(502, False)
    lease.close("client_gone")


def test_the_deadline_timer_ends_a_silent_stream_in_band_and_shimmys_end_then_frees_the_slot() -> None:
    ctx = context(timeout=60)
    processor = start(ctx, stream=True)
    send(processor, headers(200))  # held until Shimmy's first byte
    first = ExternalProcessor.dispatch(processor, chunk(b"data:a\n\n"))
    assert isinstance(first, list) and first[0].HasField("response_headers")
    assert processor.exchange is not None
    deadline = processor.exchange.gen.deadline
    wake = processor.wake_at()
    assert wake is not None and wake < deadline  # the keep-alive comes first
    assert processor.tick(wake - 0.01) == []  # early: nothing
    (ping,) = processor.tick(wake)
    assert ping.response_body.response.body_mutation.streamed_response.body == b": keep-alive\n\n"
    (end,) = processor.tick(deadline)
    sent = end.response_body.response.body_mutation.streamed_response
    assert sent.end_of_stream and b'"code":"timeout"' in sent.body and sent.body.endswith(b"data: [DONE]\n\n")
    assert end.dynamic_metadata.fields["shimmy_gateway"].struct_value.fields["outcome"].string_value == "error"
    assert processor.wake_at() is None and processor.tick(deadline + 5) == []
    send(processor, chunk(b"data:b\n\ndata:[DONE]\n\n"))  # Shimmy goes on, then ends: its slot with it
    assert processor.lease.state == "released"


KEEPALIVE = b": keep-alive\n\n"


def streamed(answer: ep.ProcessingResponse) -> ep.StreamedBodyResponse:
    return answer.response_body.response.body_mutation.streamed_response


@pytest.mark.parametrize("version", ["1.8.1", "2.5.0"])  # the image's Shimmy, and the 2.x profile
async def test_the_stream_loop_sends_the_timers_answers_between_envoys_messages(
    unused_tcp_port: int, version: str
) -> None:
    """The timer over a real gRPC stream: tokens closer together than the keep-alive get none, Envoy's silence gets
    one per interval, the next token's answer follows them, and the deadline's error ends the stream by itself."""
    ctx = context(version, timeout=4, keepalive=0.8)
    server = GrpcServer(ExternalProcessor(ctx), f"127.0.0.1:{unused_tcp_port}")
    await server.start()
    loop = asyncio.get_running_loop()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{unused_tcp_port}") as channel:
            call = epg.ExternalProcessorStub(channel).Process(metadata=[("x-gateway-route", "chat")])
            request = ep.ProcessingRequest(request_body=ep.HttpBody(body=BODY % b',"stream":true', end_of_stream=True))
            request.protocol_config.CopyFrom(DUPLEX)
            await call.write(request)
            assert (await call.read()).HasField("request_body")
            await call.write(headers(200))
            await call.write(chunk(b"data:a\n\n"))  # Shimmy's first byte: the held headers go, then the token
            assert (await call.read()).HasField("response_headers")
            assert b'"content":"a"' in streamed(await call.read()).body
            for _ in range(8):  # 0.8 s of tokens 0.1 s apart
                await asyncio.sleep(0.1)
                await call.write(chunk(b"data:b\n\n"))
                assert b'"content":"b"' in streamed(await asyncio.wait_for(call.read(), 1)).body
            silent = loop.time()
            pings = []
            for _ in range(2):
                assert streamed(await asyncio.wait_for(call.read(), 2)).body == KEEPALIVE
                pings.append(loop.time() - silent)
            assert pings[0] > 0.4 and pings[1] - pings[0] > 0.4, pings  # one per 0.8 s, give or take the load
            await call.write(chunk(b"data:c\n\n"))
            while (answer := streamed(await asyncio.wait_for(call.read(), 1))).body == KEEPALIVE:
                pass  # one may have fallen due meanwhile
            assert b'"content":"c"' in answer.body and not answer.end_of_stream
            while (answer := streamed(await asyncio.wait_for(call.read(), 4))).body == KEEPALIVE:
                pass
            assert answer.end_of_stream and b'"code":"timeout"' in answer.body
            await call.done_writing()
            assert await asyncio.wait_for(call.read(), 1) == grpc.aio.EOF
    finally:
        await server.stop(grace=0.1)


def test_a_deadline_before_shimmys_first_byte_is_an_immediate_json_error() -> None:
    ctx = context()
    processor = start(ctx, stream=True)
    assert ExternalProcessor.dispatch(processor, headers(200)) is None  # the headers wait for Shimmy's first byte
    assert processor.exchange is not None
    (answer,) = processor.tick(processor.exchange.gen.deadline)
    assert answer.immediate_response.status.code == 504
    assert b'"code":"timeout"' in answer.immediate_response.body
    processor.close()
    assert processor.lease.ticket is not None and processor.lease.ticket.abandoned == "deadline"


def test_the_first_learned_pace_replaces_the_default() -> None:
    ctx = context()
    assert ctx.admission is not None
    pace = ctx.admission.pace
    pace.learn(0.02, 0.1)
    assert pace.tpot == 0.02 and pace.ttft == 0.1
    pace.learn(0.04, None)
    assert pace.tpot == pytest.approx(0.03)
