"""`shimmy-emulator`: serve the emulator on 127.0.0.1:SHIMMY_PORT until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable

from aiohttp import web

import settings
from shimmy.emulator import EmulatorConfig, create_app
from shimmy.llama_engine import choose_engine

__all__ = ["main"]

log = logging.getLogger("shimmy.emulator")

_NAMES = [
    "SHIMMY_PORT",
    "MODEL_NAME",
    "LOG_LEVEL",
    "EMULATOR_VERSION",
    "EMULATOR_REPLY",
    "EMULATOR_TOKEN_DELAY_MS",
    "EMULATOR_OPENAI_STREAM_DEFAULT",
    "EMULATOR_ENGINE",
    "EMULATOR_GGUF",
]
_PROG = "shimmy-emulator"
# Real Shimmy has no graceful shutdown; in-flight generations get this long before they are cancelled.
_SHUTDOWN_TIMEOUT_S = 0.5
_HEADERS_BYTES = 400 * 1024


async def _serve(config: EmulatorConfig, host: str, port: int, access_log: bool) -> int:
    runner = web.AppRunner(
        create_app(config),
        access_log=log if access_log else None,
        shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
        handle_signals=False,
        # Shimmy's HTTP server (hyper) takes up to ~400 KB of headers and 100 of them, not aiohttp's 8 KB a field.
        max_field_size=_HEADERS_BYTES,
        max_line_size=_HEADERS_BYTES,
        max_headers=100,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", host, port, e)
        await runner.cleanup()
        return 1
    log.info("Shimmy emulator %s listening on http://%s:%d (model %s)", config.version, host, port, config.models[0])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("Shimmy emulator stopping")
    await runner.cleanup()
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = settings.Parser(prog=_PROG, description="Protocol-faithful Shimmy emulator.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind. Default: '127.0.0.1'.")
    s = settings.load(names=_NAMES, argv=argv, parser=parser)  # one line and exit 2 for a bad setting
    host = parser.parse_known_args(argv)[0].host
    level = s.log_level.upper()
    logging.basicConfig(stream=sys.stderr, level=level, format="%(levelname)s %(message)s")
    try:
        choice = choose_engine(s.emulator_engine, s.emulator_gguf)
        log.info("%s", choice.reason)
        config = EmulatorConfig(
            version=s.emulator_version,
            models=[s.model_name],
            reply=s.emulator_reply,
            token_delay_ms=s.emulator_token_delay_ms,
            openai_stream_default=s.flag("emulator_openai_stream_default"),
            engine=choice.engine,
            gguf=choice.gguf,
        )
    except ValueError as e:
        settings.fail(_PROG, str(e))
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_serve(config, host, s.shimmy_port, access_log=level == "DEBUG"))
    return 130
