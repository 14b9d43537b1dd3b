"""`shimmy-extproc`: the processor alone (inside the stack, or as a service behind your own Envoy).

It serves Envoy's ext_proc API and the gRPC health service on `EXTPROC_HOST:EXTPROC_PORT` or a unix socket
(`EXTPROC_PORT=unix:/path`), optionally over TLS (`EXTPROC_TLS_CERT`, `EXTPROC_TLS_KEY`) and mTLS
(`EXTPROC_TLS_CLIENT_CA`), with gRPC reflection on request (`EXTPROC_REFLECTION`). SIGTERM or SIGINT: health
turns NOT_SERVING, no new stream is accepted, live streams get `EXTPROC_SHUTDOWN_GRACE_S` to finish, exit 0; a
second signal cuts the grace short. envoy/standalone.example.yaml plugs it into an Envoy of your own.

It reads exactly the settings in `SETTINGS` below. Two describe its surroundings: EXTPROC_WORKERS (more than one
processor shares the generation slots through lock files) and EXTPROC_MESSAGE_TIMEOUT_MS (Envoy's limit on one
answer: a request that waits for a slot, up to QUEUE_TIMEOUT_S, first asks Envoy for that much more with
`override_message_timeout`, which Envoy's `max_message_timeout` must allow). A bad setting, or an address it cannot
bind, is one line and exit code 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import ssl
import sys
import tempfile
from pathlib import Path

import grpc

from extproc import templates, tokens, tracing
from extproc.admission import Admission
from extproc.health import ShimmyMonitor
from extproc.limits import ContextLimits, parse_context_tokens
from extproc.processors import Context
from extproc.responses_ws import ResponsesSocket, WsLimits, serve
from extproc.server import ExternalProcessor, GrpcServer
from settings import PROCESSOR_MARGIN_S, Settings, fail, load, parse_pairs, waiting_message_timeout_s
from shimmy_spec.versions import BackendProfile, profile_for

__all__ = ["backend", "grpc_address", "main", "tls_credentials"]

PROG = "shimmy-extproc"

SETTINGS = (
    "EXTPROC_HOST",
    "EXTPROC_PORT",
    "EXTPROC_TLS_CERT",
    "EXTPROC_TLS_KEY",
    "EXTPROC_TLS_CLIENT_CA",
    "EXTPROC_REFLECTION",
    "EXTPROC_SHUTDOWN_GRACE_S",
    "SHIMMY_URL",
    "SHIMMY_PORT",
    "MODEL_NAME",
    "PROMPT_TEMPLATES",
    "TOKENIZER_GGUF",
    "SHIMMY_VERSION",
    "SHIMMY_MAX_CTX",
    "MODEL_CONTEXT_TOKENS",
    "MODEL_ALIASES",
    "GENERATION_TIMEOUT_S",
    "STREAM_IDLE_TIMEOUT_S",
    "HEALTH_INTERVAL_S",
    "WARMUP",
    "LOG_LEVEL",
    "MAX_ACTIVE_REQUESTS",
    "MAX_QUEUED_REQUESTS",
    "QUEUE_TIMEOUT_S",
    "EXTPROC_MESSAGE_TIMEOUT_MS",
    "EXTPROC_WORKERS",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "RESPONSES_WS_SOCKET",
    "RESPONSES_WS_MAX_CONNECTIONS",
    "RESPONSES_WS_MAX_TURNS",
    "RESPONSES_WS_IDLE_TIMEOUT_S",
    "GATEWAY_PORT",
    "MAX_REQUEST_BYTES",
    "GATEWAY_API_KEYS",
    "GATEWAY_API_KEY_HEADER",
)

log = logging.getLogger("extproc")


def grpc_address(extproc_port: str, host: str = "127.0.0.1") -> str:
    """`EXTPROC_PORT` as a gRPC bind address: `host:port` (IPv6 hosts bracketed), or `unix:/path` as given."""
    port = str(extproc_port).strip()
    if port.startswith("unix:"):
        return port
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"EXTPROC_PORT={port!r}: expected a port number or unix:/path") from None
    if not 0 < number < 65536:
        raise ValueError(f"EXTPROC_PORT={port!r}: expected a port number between 1 and 65535 or unix:/path")
    host = host.strip() or "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{number}"


def _no_password() -> bytes:
    raise ValueError("the key is encrypted; give an unencrypted PEM key")


def _read(setting: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"{setting}={path!r}: cannot read it ({exc.strerror or exc})") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{setting}={path!r}: not a PEM file")
    return data


def tls_credentials(cert: str, key: str, client_ca: str) -> grpc.ServerCredentials | None:
    """Server credentials for `EXTPROC_TLS_CERT`/`_KEY`/`_CLIENT_CA` (paths; all empty = plaintext).

    Checked here, at start, so a half-configured TLS or a key that does not match its certificate is a clear error
    now rather than a failed handshake at Envoy's first request.
    """
    if not (cert or key or client_ca):
        return None
    if not (cert and key):
        missing = "EXTPROC_TLS_KEY" if cert else "EXTPROC_TLS_CERT"
        given = "EXTPROC_TLS_CERT" if cert else ("EXTPROC_TLS_KEY" if key else "EXTPROC_TLS_CLIENT_CA")
        raise ValueError(f"{given} is set but {missing} is not: TLS needs both a certificate and its key")
    cert_pem, key_pem = _read("EXTPROC_TLS_CERT", cert), _read("EXTPROC_TLS_KEY", key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"EXTPROC_TLS_CERT={cert!r} with EXTPROC_TLS_KEY={key!r}: {exc}") from None
    ca_pem = None
    if client_ca:
        ca_pem = _read("EXTPROC_TLS_CLIENT_CA", client_ca)
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise ValueError(f"EXTPROC_TLS_CLIENT_CA={client_ca!r}: {exc}") from None
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=ca_pem is not None
    )


class WebSocketBindError(OSError):
    """WebSocket mode's socket cannot be bound: RESPONSES_WS_SOCKET's fault, not EXTPROC_PORT's."""


async def _run(
    ctx: Context, server: GrpcServer, grace: float, websocket: tuple[str, ResponsesSocket] | None = None
) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully; a second signal cuts the grace short.

    `websocket`: the unix socket and handler of Responses WebSocket mode, served beside the gRPC server."""
    loop = asyncio.get_running_loop()
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            hurry.set()
        else:
            log.info("%s received", sig.name)
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    monitor = asyncio.create_task(ctx.monitor.run(), name="shimmy-monitor")
    ws_runner = None
    try:
        await server.start()
        if websocket is not None:
            try:
                ws_runner = await serve(*websocket)
            except OSError as exc:  # not EXTPROC_PORT's fault
                raise WebSocketBindError(f"RESPONSES_WS_SOCKET={websocket[0]!r}: {exc}") from None
        waiter = asyncio.create_task(stop.wait(), name="signals")
        try:
            await asyncio.wait({waiter, monitor}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
        if monitor.done():  # it never returns; an exception here is a bug worth the traceback
            monitor.result()
        await server.stop(grace, hurry)
    finally:
        if ws_runner is not None:
            await ws_runner.cleanup()  # open sockets are closed with 1001 going away
        await server.stop(0)  # no-op after a graceful stop; cancels live streams on any other way out
        monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await monitor
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def backend(settings: Settings) -> tuple[BackendProfile, ContextLimits]:
    """The profile of the Shimmy behind us (SHIMMY_VERSION, which `shimmy-gateway up` sets from the Shimmy it runs)
    and each model's context limits: the release's, SHIMMY_MAX_CTX on 2.x, MODEL_CONTEXT_TOKENS per model."""
    try:
        profile = profile_for(settings.shimmy_version)
    except ValueError as exc:
        raise ValueError(f"SHIMMY_VERSION: {exc}") from None
    limits = ContextLimits(  # SHIMMY_MAX_CTX is within 512 to 131072, the range Shimmy 2.x accepts (settings)
        context_tokens=profile.context_tokens or settings.shimmy_max_ctx,
        prompt_batch_tokens=profile.prompt_batch_tokens,
        per_model=parse_context_tokens(parse_pairs(settings.model_context_tokens, "MODEL_CONTEXT_TOKENS")),
    )
    return profile, limits


def build(settings: Settings) -> tuple[Context, GrpcServer]:
    """The processor's context and server from its settings; a bad setting is a ValueError naming it."""
    overrides = parse_pairs(settings.prompt_templates, "PROMPT_TEMPLATES")
    try:
        templates.check_overrides(overrides)
    except ValueError as exc:
        raise ValueError(f"PROMPT_TEMPLATES: {exc}") from None
    shimmy_url = settings.shimmy_url.strip() or f"http://127.0.0.1:{settings.shimmy_port}"  # load() checked it
    profile, limits = backend(settings)
    admission = build_admission(settings, shimmy_url, profile)
    monitor = ShimmyMonitor(
        shimmy_url, settings.model_name, settings.health_interval_s, warmup=settings.flag("warmup"), admission=admission
    )
    ctx = Context(
        templates=overrides,
        monitor=monitor,
        generation_timeout=settings.generation_timeout_s - PROCESSOR_MARGIN_S,
        keepalive=keepalive_interval(settings.stream_idle_timeout_s),
        aliases=parse_pairs(settings.model_aliases, "MODEL_ALIASES"),
        prompt_counter=tokens.counter(settings.tokenizer_gguf, models={settings.model_name}),
        admission=admission,
        profile=profile,
        limits=limits,
        waiting_timeout=waiting_message_timeout_s(settings.extproc_message_timeout_ms, settings.queue_timeout_s),
    )
    credentials = tls_credentials(
        settings.extproc_tls_cert.strip(), settings.extproc_tls_key.strip(), settings.extproc_tls_client_ca.strip()
    )
    server = GrpcServer(
        ExternalProcessor(ctx),
        grpc_address(settings.extproc_port, settings.extproc_host),
        credentials=credentials,
        reflection=settings.flag("extproc_reflection"),
    )
    return ctx, server


def websocket(settings: Settings) -> tuple[str, ResponsesSocket] | None:
    """Responses WebSocket mode when RESPONSES_WS_SOCKET names its socket: its turns go to Envoy's own port, with
    one of the configured keys (Envoy checked the client's on the upgrade, docs/apis.md)."""
    path = settings.responses_ws_socket.strip()
    if not path:
        return None
    keys = [k.strip() for k in settings.gateway_api_keys.split(",") if k.strip()]
    header = settings.gateway_api_key_header.strip().lower() or "authorization"
    credential = None
    if keys:
        credential = (header, f"Bearer {keys[0]}" if header == "authorization" else keys[0])
    limits = WsLimits(
        max_connections=settings.responses_ws_max_connections,
        max_turns=settings.responses_ws_max_turns,
        idle_timeout_s=settings.responses_ws_idle_timeout_s,
        max_bytes=settings.max_request_bytes,
    )
    return path, ResponsesSocket(f"http://127.0.0.1:{settings.gateway_port}", limits, credential)


def keepalive_interval(stream_idle_timeout_s: float) -> float:
    """Seconds of silence on a stream before its keep-alive: a third of Envoy's idle timeout (so a slow prefill
    never trips it, nor a proxy in front with the usual 60 s), and at most 15 s."""
    return min(15.0, stream_idle_timeout_s / 3)


def build_admission(settings: Settings, shimmy_url: str, profile: BackendProfile) -> Admission:
    """Generation slots for the Shimmy at `shimmy_url`, following its version's profile (docs/admission.md).

    A queued request waits at most QUEUE_TIMEOUT_S; Envoy's timer on that message is stretched to match first
    (`Context.waiting_timeout`). Several workers share one set of slots (lock files named after the Shimmy they
    serve).
    """
    shared = None
    if settings.extproc_workers > 1:
        key = hashlib.sha256(shimmy_url.encode()).hexdigest()[:16]
        shared = Path(tempfile.gettempdir()) / f"shimmy-gateway-slots-{key}"
    return Admission(
        settings.max_active_requests,
        settings.max_queued_requests,
        settings.queue_timeout_s,
        serialized=profile.serialized,
        context_tokens=profile.context_tokens,
        shared_dir=shared,
    )


def main(argv: list[str] | None = None) -> int:
    settings = load(SETTINGS, argv, prog=PROG, description=__doc__)
    logging.basicConfig(
        level=settings.log_level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        ctx, server = build(settings)
    except ValueError as exc:
        fail(PROG, str(exc))
    grace = settings.extproc_shutdown_grace_s
    tracing.configure(settings.otel_exporter_otlp_endpoint.strip())
    try:
        # asyncio's own loop: gRPC does its I/O in its C core, and uvloop measured no faster here (bench steps).
        asyncio.run(_run(ctx, server, grace, websocket(settings)))
    except WebSocketBindError as exc:
        fail(PROG, str(exc))
    except OSError as exc:  # the address cannot be bound: a setting to change (EXTPROC_PORT, EXTPROC_HOST)
        fail(PROG, f"{exc}; change EXTPROC_PORT (or EXTPROC_HOST)")
    finally:
        tracing.shutdown()  # the spans still buffered go out before the exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
