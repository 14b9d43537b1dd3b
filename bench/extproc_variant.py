"""Bench only: `python -m bench.extproc_variant` is `python -m extproc.cli` with instruments the product lacks.

- `BENCH_CPU_TIMES=<path>`: the CPU time (`time.thread_time_ns`) the processor spends in our code (`dispatch`: every
  phase handler, with the protobuf field access and msgspec work it does) and in protobuf's wire (de)serialisation of
  each ext_proc message, written to <path> as JSON on SIGUSR1. What is left of the process's CPU time is gRPC's aio
  machinery, the event loop and the interpreter's glue around them.
- `BENCH_UVLOOP=1`: the processor on uvloop's event loop instead of asyncio's own (a step tried and not kept).
- `BENCH_SYNC_SERVER=1`: the same servicer behind grpcio's synchronous server (a pool thread per live stream)
  instead of grpc.aio, with the Shimmy monitor on an event loop in a thread of its own (a step tried and not kept).
  Plaintext TCP only, and SIGTERM stops it at once: enough for a benchmark, not for the product.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc import cli, server
from settings import load

SYNC_THREADS = 300  # above the benchmark's 256 live streams
NS: Counter[str] = Counter()  # CPU nanoseconds per part
CALLS: Counter[str] = Counter()


def _timed(fn: Callable[..., Any], part: str) -> Callable[..., Any]:
    def timed(*args: Any) -> Any:
        start = time.thread_time_ns()
        try:
            return fn(*args)
        finally:
            NS[part] += time.thread_time_ns() - start
            CALLS[part] += 1

    return timed


def _cpu_times(path: str) -> None:
    server.ExternalProcessor.dispatch = staticmethod(_timed(server.ExternalProcessor.dispatch, "dispatch"))

    def handler(servicer: server.ExternalProcessor) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            server.SERVICE,
            {
                "Process": grpc.stream_stream_rpc_method_handler(
                    servicer.Process,
                    request_deserializer=_timed(ep.ProcessingRequest.FromString, "deserialize"),
                    response_serializer=_timed(ep.ProcessingResponse.SerializeToString, "serialize"),
                )
            },
        )

    server._handler = handler

    def dump(signum: int, frame: object) -> None:
        with open(path + ".tmp", "w") as f:
            json.dump({"ns": dict(NS), "calls": dict(CALLS)}, f)
        os.replace(path + ".tmp", path)

    signal.signal(signal.SIGUSR1, dump)


def _serve_sync() -> int:
    """`python -m extproc.cli` with grpcio's synchronous server in place of grpc.aio's."""
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # before any thread starts: they all inherit it; sigwait below
    settings = load(cli.SETTINGS, [], prog="bench.extproc_variant")
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    ctx, aio_server = cli.build(settings)
    monitor = asyncio.new_event_loop()
    threading.Thread(target=monitor.run_until_complete, args=(ctx.monitor.run(),), daemon=True).start()
    servicer = aio_server.servicer

    def process(requests: Iterator[ep.ProcessingRequest], context: grpc.ServicerContext) -> Iterator[Any]:
        processor = servicer.processor_for(context.invocation_metadata())
        try:
            for msg in requests:
                response = servicer.dispatch(processor, msg)
                if inspect.isawaitable(response):  # a request queued for a generation slot: wait on the loop
                    response = asyncio.run_coroutine_threadsafe(response, monitor).result()
                if isinstance(response, list):  # a non-stream answer's held headers, released with its body
                    yield from response
                elif response is not None:
                    yield response
        finally:
            processor.close()

    handler = grpc.method_handlers_generic_handler(
        server.SERVICE,
        {
            "Process": grpc.stream_stream_rpc_method_handler(
                process,
                request_deserializer=ep.ProcessingRequest.FromString,
                response_serializer=ep.ProcessingResponse.SerializeToString,
            )
        },
    )
    # Every live ext_proc stream holds a pool thread: size the pool for the benchmark's largest concurrency.
    sync = grpc.server(futures.ThreadPoolExecutor(max_workers=SYNC_THREADS), options=[("grpc.so_reuseport", 0)])
    sync.add_generic_rpc_handlers((handler,))
    if not sync.add_insecure_port(aio_server.address):
        raise SystemExit(f"cannot bind {aio_server.address}")
    sync.start()
    signal.sigwait(stop)
    sync.stop(0)
    return 0


if __name__ == "__main__":
    if os.environ.get("BENCH_UVLOOP") == "1":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if os.environ.get("BENCH_SYNC_SERVER") == "1":
        sys.exit(_serve_sync())
    if path := os.environ.get("BENCH_CPU_TIMES"):
        _cpu_times(path)
    sys.exit(cli.main())
