"""`python -m bench.stall`: how long a storm of costly requests holds the processor's event loop, which every other
stream (and the readiness probe) runs on.

The real grpc.aio server and processors run in this process on a loopback port; a real gRPC channel sends, at once,
requests whose tools' JSON schemas the processor has never seen (four of ~28 KiB each, the most a request may
offer, refused with a 400 only after the costly meta-schema check), while a ticker on the server's own loop asks to
wake every millisecond and records how late it woke. Two cases in the same run: as shipped (bodies over
`OFF_LOOP_BYTES` prepared on the preparing thread) and the same server with every body prepared on the loop (the
code before issue 22's fix). In-process, no Envoy, no Shimmy: only the processor's part of the stall.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from unittest import mock

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as epg

from bench import processor_cost
from bench.stack import free_port
from extproc import processors
from extproc.server import ExternalProcessor, GrpcServer

__all__ = ["table"]

REQUESTS = 8


def _body(salt: str) -> bytes:
    tools = []
    for t in range(4):
        properties: dict[str, object] = {
            f"{salt}_{t}_{i}": {"type": "string", "pattern": f"^[a-z]{{1,{i % 9 + 1}}}$", "description": "d" * 24}
            for i in range(250)
        }
        if t == 3:
            properties["z"] = {"$ref": "http://127.0.0.1:9/x.json"}
        tools.append({"type": "function", "function": {"name": f"t{t}", "parameters": {
            "type": "object", "properties": properties}}})
    return json.dumps({"model": "phi3-lora", "messages": [{"role": "user", "content": "x"}], "tools": tools}).encode()


async def _storm(salt: str) -> tuple[float, float, float]:
    """(the loop's longest lateness, its p99, the storm's duration), in ms."""
    address = f"127.0.0.1:{free_port()}"
    server = GrpcServer(ExternalProcessor(processor_cost.context()), address)
    await server.start()
    late: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            late.append((time.perf_counter() - before - 0.001) * 1000)

    bodies = [_body(f"{salt}{i}") for i in range(REQUESTS)]
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = epg.ExternalProcessorStub(channel)

            async def one(body: bytes) -> None:
                call = stub.Process(metadata=[("x-gateway-route", "chat")])
                await call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True)))
                answer = await call.read()
                assert answer.immediate_response.status.code == 400, answer
                call.cancel()

            tick = asyncio.create_task(ticker())
            started = time.perf_counter()
            await asyncio.gather(*(one(b) for b in bodies))
            duration = (time.perf_counter() - started) * 1000
            done.set()
            await tick
    finally:
        await server.stop(0)
    late.sort()
    return late[-1], late[int(len(late) * 0.99)], duration


def table(rounds: int = 3) -> str:
    """A markdown table: the loop's lateness during the storm, as shipped and with every body on the loop."""
    cases = {"as shipped (large bodies on the preparing thread)": None,
             "every body prepared on the loop (before issue 22)": float("inf")}
    rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cases}
    for r in range(rounds):
        for name, limit in cases.items():
            salt = f"r{r}{len(rows[name])}{name[:2]}{time.monotonic_ns()}"
            if limit is None:
                rows[name].append(asyncio.run(_storm(salt)))
            else:
                with mock.patch.object(processors, "OFF_LOOP_BYTES", limit):
                    rows[name].append(asyncio.run(_storm(salt)))
    lines = [
        f"{REQUESTS} requests at once, each with ~112 KiB of JSON schemas the processor has never seen (a 400 after the"
        f" check); medians of {rounds} rounds. The ticker asks to wake every 1 ms on the server's loop.\n",
        "| case | loop's longest lateness ms | p99 lateness ms | storm took ms |",
        "|---|--:|--:|--:|",
    ]
    for name, runs in rows.items():
        worst, p99, took = (statistics.median(x[i] for x in runs) for i in range(3))
        lines.append(f"| {name} | {worst:.1f} | {p99:.1f} | {took:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stall", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    print(table(parser.parse_args().rounds))


if __name__ == "__main__":
    main()
