"""Bench only: `python -m bench.extproc_variant` is `python -m extproc.cli` with instruments the product lacks.

- `BENCH_CPU_TIMES=<path>`: the CPU time (`time.thread_time_ns`) the processor spends in our code (`dispatch`: every
  phase handler, with the protobuf field access and msgspec work it does) and in protobuf's wire (de)serialisation of
  each ext_proc message, written to <path> as JSON on SIGUSR1. What is left of the process's CPU time is gRPC's aio
  machinery, the event loop and the interpreter's glue around them.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc import cli, server

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


if __name__ == "__main__":
    if os.environ.get("BENCH_NO_UVLOOP") == "1":
        sys.modules["uvloop"] = None  # type: ignore[assignment]  # extproc.cli's `import uvloop` fails: asyncio.run
    if path := os.environ.get("BENCH_CPU_TIMES"):
        _cpu_times(path)
    sys.exit(cli.main())
