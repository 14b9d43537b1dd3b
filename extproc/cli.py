"""`shimmy-extproc`: the processor alone (inside the stack, or as a service behind your own Envoy)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from extproc import templates
from extproc.health import ShimmyMonitor
from extproc.processors import Context
from extproc.server import ExternalProcessor, serve
from gateway.settings import load, parse_templates

__all__ = ["main"]

SETTINGS = (
    "EXTPROC_PORT",
    "SHIMMY_PORT",
    "MODEL_NAME",
    "PROMPT_TEMPLATES",
    "GENERATION_TIMEOUT_S",
    "HEALTH_INTERVAL_S",
    "WARMUP",
    "LOG_LEVEL",
)


def grpc_address(extproc_port: str) -> str:
    """`EXTPROC_PORT` as a gRPC bind address: a port on 127.0.0.1, or `unix:/path` as given."""
    return extproc_port if extproc_port.startswith("unix:") else f"127.0.0.1:{int(extproc_port)}"


async def _run(ctx: Context, address: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    monitor = asyncio.create_task(ctx.monitor.run(), name="shimmy-monitor")
    server = asyncio.create_task(serve(ExternalProcessor(ctx), address), name="grpc-server")
    stopper = asyncio.create_task(stop.wait(), name="signals")
    try:
        await asyncio.wait({server, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (server, monitor, stopper):
            task.cancel()
        for task in (server, monitor, stopper):
            with contextlib.suppress(asyncio.CancelledError):
                await task


def main(argv: list[str] | None = None) -> int:
    settings = load(SETTINGS, argv, prog="shimmy-extproc", description=__doc__)
    logging.basicConfig(
        level=settings.log_level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    overrides = parse_templates(settings.prompt_templates)
    try:
        templates.check_overrides(overrides)
    except ValueError as exc:
        raise SystemExit(f"PROMPT_TEMPLATES: {exc}") from None
    monitor = ShimmyMonitor(
        f"http://127.0.0.1:{settings.shimmy_port}",
        settings.model_name,
        settings.health_interval_s,
        warmup=settings.flag("warmup"),
    )
    ctx = Context(templates=overrides, monitor=monitor, generation_timeout=settings.generation_timeout_s)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_run(ctx, grpc_address(settings.extproc_port)))
    else:
        uvloop.run(_run(ctx, grpc_address(settings.extproc_port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
