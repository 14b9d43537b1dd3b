"""`python -m bench.stream_loop`: what the stream's timer costs the processor per Envoy message of a stream.

A generation's stream loop keeps a timer (the deadline and the keep-alive fire while Shimmy is silent). Two real
processor servers run side by side, each in its own process so its CPU is its own: one as shipped, one whose
generation processor keeps no time (`timed` off, the loop of a processor without a timer). A real gRPC client
plays Envoy for a chat stream, message by message as Envoy sends them (the request body, Shimmy's headers, one
body message per token, the last with `[DONE]`), 16 streams at once; rounds alternate between the two servers. The
figure is the ratio of their CPU per message in the same run. No Envoy, no Shimmy: only the processor's part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as epg

from bench import processor_cost
from bench.stack import cpu_seconds, die_with_parent, free_port

__all__ = ["table"]

STREAMS = 16
TOKENS = 64
BATCHES = 12  # per round: each batch is STREAMS streams at once
ROUTE = [("x-gateway-route", "chat")]
READY = "ready"


def _serve(port: int, timed: bool) -> None:
    """The server process: the real grpc.aio server and processors, on asyncio's loop as the processor runs."""
    from extproc import processors
    from extproc.server import ExternalProcessor, GrpcServer

    processors.GenerationProcessor.timed = timed

    async def run() -> None:
        server = GrpcServer(ExternalProcessor(processor_cost.context()), f"127.0.0.1:{port}")
        await server.start()
        print(READY, flush=True)
        await server.wait_for_termination()

    asyncio.run(run())


def _messages() -> tuple[ep.ProcessingRequest, ep.ProcessingRequest, ep.ProcessingRequest, ep.ProcessingRequest]:
    body = json.dumps({"model": "phi3-lora", "messages": processor_cost.QUESTION, "stream": True}).encode()
    request = ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))
    request.protocol_config.response_body_mode = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
    status = base_pb2.HeaderValue(key=":status", raw_value=b"200")
    headers = ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[status])))
    token = ep.ProcessingRequest(response_body=ep.HttpBody(body=b"data: word\n\n"))
    done = ep.ProcessingRequest(response_body=ep.HttpBody(body=b"data: [DONE]\n\n", end_of_stream=True))
    return request, headers, token, done


async def _batches(port: int, batches: int) -> int:
    """`batches` times, STREAMS chat streams at once; the ext_proc messages sent."""
    request, headers, token, done = _messages()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = epg.ExternalProcessorStub(channel)

        async def stream() -> None:
            call = stub.Process(metadata=ROUTE)
            await call.write(request)
            await call.read()
            await call.write(headers)  # no answer yet: the headers wait for Shimmy's first byte
            await call.write(token)
            await call.read()  # the held headers
            await call.read()
            for _ in range(TOKENS - 1):
                await call.write(token)
                await call.read()
            await call.write(done)
            await call.read()
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF

        for _ in range(batches):
            await asyncio.gather(*(stream() for _ in range(STREAMS)))
    return batches * STREAMS * (TOKENS + 3)


def _start(timed: bool) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    args = [sys.executable, "-m", "bench.stream_loop", "--serve", str(port)] + ([] if timed else ["--untimed"])
    server = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
    assert server.stdout is not None and server.stdout.readline().strip() == READY, "the server did not start"
    return server, port


def measure(rounds: int = 5) -> dict[str, float]:
    """Median microseconds of processor CPU per ext_proc message, timed and not; rounds alternate."""
    servers = {"timed": _start(True), "untimed": _start(False)}
    samples: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for _, port in servers.values():  # warm-up: imports, templates, the channel
            asyncio.run(_batches(port, 1))
        for _ in range(rounds):
            for name, (server, port) in servers.items():
                before = cpu_seconds(server.pid)
                messages = asyncio.run(_batches(port, BATCHES))
                samples[name].append((cpu_seconds(server.pid) - before) / messages * 1e6)
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(10)
    return {name: statistics.median(values) for name, values in samples.items()}


def table(rounds: int = 5) -> str:
    """A markdown table: the processor's CPU per stream message with the timer and without, in the same run."""
    figures = measure(rounds)
    timed, untimed = figures["timed"], figures["untimed"]
    return (
        f"{STREAMS} chat streams at once of {TOKENS} tokens each, {BATCHES} batches per round, median of {rounds}"
        " rounds; the processor in its own process.\n\n"
        "| stream loop | processor CPU per ext_proc message | vs no timer |\n|---|--:|--:|\n"
        f"| as shipped (the generation's timer) | {timed:.0f} µs | {timed / untimed:.2f}x |\n"
        f"| no timer (`timed` off) | {untimed:.0f} µs | 1.00x |\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_loop", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--untimed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve, timed=not args.untimed)
    else:
        print(table(args.rounds), end="")


if __name__ == "__main__":
    main()
