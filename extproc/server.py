"""The gRPC side: the ext_proc `Process` stream loop, which only routes phases to a processor, and the server.

No JSON, SSE or error policy lives here (practice 1 of shared/reference/style-anchors.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from pathlib import Path

import grpc
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from extproc import metrics, tracing
from extproc.processors import ROUTES, Context, Processor

__all__ = ["ExternalProcessor", "GrpcServer", "unix_socket_path"]

log = logging.getLogger("extproc")

ROUTE_METADATA = "x-gateway-route"
SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
MAX_MESSAGE_BYTES = 8 << 20  # above the largest body Envoy may buffer (MAX_REQUEST_BYTES)


class ExternalProcessor:
    """Per stream: pick the processor named by Envoy's route metadata, then hand it each phase."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.live_streams = 0  # tests and metrics read it: a stream that never ends is a leak

    def processor_for(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Processor:
        """The route's processor; with tracing on, it continues the trace of Envoy's span for this ext_proc call."""
        route, parent = "", ""
        for key, value in metadata or ():
            if key == ROUTE_METADATA:
                route = value if isinstance(value, str) else value.decode()
            elif key == tracing.TRACEPARENT:
                parent = value if isinstance(value, str) else value.decode()
        factory = ROUTES.get(route)
        processor = factory(self.ctx) if factory is not None else Processor(self.ctx)
        processor.traceparent = parent
        return processor

    @staticmethod
    def dispatch(
        processor: Processor, msg: ep.ProcessingRequest
    ) -> ep.ProcessingResponse | list[ep.ProcessingResponse] | Awaitable[ep.ProcessingResponse] | None:
        """The processor's answer to one message, or None to answer nothing yet (full duplex only); an awaitable
        when the answer must wait (a request queued for a generation slot); a list answers held messages too."""
        if msg.HasField("protocol_config"):  # on the stream's first message: the route's body modes
            processor.response_duplex = msg.protocol_config.response_body_mode == FULL_DUPLEX
        if msg.attributes:  # request.time, on a generation's first message: when the request arrived
            processor.attributes(msg.attributes)
        match msg.WhichOneof("request"):
            case "request_headers":
                return processor.request_headers(msg.request_headers)
            case "request_body":
                return processor.request_body(msg.request_body)
            case "response_headers":
                return processor.response_headers(msg.response_headers)
            case "response_body":
                return processor.response_body(msg.response_body)
            case "request_trailers":
                return ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
            case "response_trailers":
                return ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
            case other:
                log.warning("unexpected ext_proc message %s; is the Envoy processing mode right?", other)
                return None

    async def Process(  # the gRPC method's name
        self, requests: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """The stream loop, on gRPC's reader/writer API (`requests` goes unread): a processor that keeps time
        answers between Envoy's messages from its timer, which needs no task per message."""
        processor = self.processor_for(context.invocation_metadata())
        timer = _Timer(processor, context) if processor.timed else None
        self.live_streams += 1
        metrics.LIVE_STREAMS.inc()
        try:
            while True:
                if timer is not None:
                    timer.idle = True
                    msg = await context.read()
                    timer.idle = False
                else:
                    msg = await context.read()
                if timer is not None and timer.sending is not None:  # a timer's answers in flight go first
                    await timer.sending
                if msg is grpc.aio.EOF:
                    break
                response = self.dispatch(processor, msg)
                if inspect.isawaitable(response):
                    if (first := processor.waiting()) is not None:  # a longer timer for Envoy, before the wait
                        await context.write(first)
                    response = await response
                if isinstance(response, list):  # held headers released with the body they waited for
                    for each in response:
                        await context.write(each)
                elif response is not None:
                    await context.write(response)
                if timer is not None:
                    timer.arm()
        finally:
            if timer is not None:
                timer.close()
            self.live_streams -= 1
            metrics.LIVE_STREAMS.dec()
            processor.close()


class _Timer:
    """A timed processor's one timer (`wake_at`, `tick`): armed once for the earliest wake, and when it fires
    early because the wake moved later (each streamed chunk moves the keep-alive) it re-arms, so a stream costs a
    timer per keep-alive interval, not per message. It answers only while the stream loop awaits Envoy (`idle`):
    then a task sends `tick`'s answers (a full-duplex body takes a response at any time once Shimmy's body has
    begun: the deadline's error, a keep-alive), and the loop lets them go before its own.
    """

    def __init__(self, processor: Processor, context: grpc.aio.ServicerContext) -> None:
        self.processor = processor
        self.context = context
        self.loop = asyncio.get_running_loop()
        self.idle = False
        self.sending: asyncio.Task[None] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._at = math.inf

    def arm(self) -> None:
        """After each message: a wake earlier than the armed one re-arms; a later one waits for the firing."""
        wake = self.processor.wake_at()
        if wake is not None and wake < self._at:
            if self._handle is not None:
                self._handle.cancel()
            self._handle = self.loop.call_later(max(wake - time.monotonic(), 0.0), self._fire)  # any loop's clock
            self._at = wake

    def _fire(self) -> None:
        self._handle, self._at = None, math.inf
        if not self.idle or self.sending is not None:  # the loop is busy with a message: it arms after it
            return
        answers = self.processor.tick(time.monotonic())
        if answers:
            self.sending = self.loop.create_task(self._send(answers))
        else:
            self.arm()

    async def _send(self, answers: list[ep.ProcessingResponse]) -> None:
        try:
            for each in answers:
                await self.context.write(each)
        except Exception as exc:  # the stream ended meanwhile: the loop's read says so
            log.debug("a timer's answer was not sent: %r", exc)
        finally:
            self.sending = None
        self.arm()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self.sending is not None:
            self.sending.cancel()


def _handler(servicer: ExternalProcessor) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Process": grpc.stream_stream_rpc_method_handler(
                servicer.Process,
                request_deserializer=ep.ProcessingRequest.FromString,
                response_serializer=ep.ProcessingResponse.SerializeToString,
            )
        },
    )


def unix_socket_path(address: str) -> Path | None:
    """The file of a `unix:/path` (or `unix:///path`, `unix:relative`) address; None for TCP."""
    if not address.startswith("unix:"):
        return None
    path = address.removeprefix("unix:")
    return Path("/" + path.lstrip("/") if path.startswith("//") else path)


def _claim_socket_file(path: Path) -> None:
    """Remove the socket file a dead processor left behind; refuse to take over a live one or a non-socket file."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"cannot bind unix:{path}: the file exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            log.info("removed the stale socket file %s (nothing listens on it)", path)
            return
        except OSError:
            pass  # a timeout: something owns it but is slow; still not ours to take
    raise OSError(f"cannot bind unix:{path}: another process is listening on it")


class GrpcServer:
    """The processor's gRPC server: ext_proc, health and (optionally) reflection, over TCP or a unix socket,
    plaintext or TLS. `stop()` is the graceful shutdown: NOT_SERVING, no new streams, live ones get `grace`."""

    def __init__(
        self,
        servicer: ExternalProcessor,
        address: str,
        *,
        credentials: grpc.ServerCredentials | None = None,
        reflection: bool = False,
    ) -> None:
        self.servicer = servicer
        self.address = address
        self.credentials = credentials
        self.reflection = reflection
        self.socket_path = unix_socket_path(address)
        self._socket_inode: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._stopped = False

    async def start(self) -> None:
        if self.socket_path is not None:
            _claim_socket_file(self.socket_path)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),  # a port another processor holds is an error, not a shared port
            ]
        )
        server.add_generic_rpc_handlers((_handler(self.servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if self.reflection:
            reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        try:
            if self.credentials is None:
                port = server.add_insecure_port(self.address)
            else:
                port = server.add_secure_port(self.address, self.credentials)
        except RuntimeError as exc:  # grpc's own message says only "Failed to bind"
            raise OSError(f"cannot bind {self.address} (in use, or no such address or directory)") from exc
        if port == 0 and self.socket_path is None:
            raise OSError(f"cannot bind {self.address}")
        await server.start()
        self._server = server
        if self.socket_path is not None:
            self._socket_inode = self.socket_path.stat().st_ino
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        transport = "plaintext" if self.credentials is None else "TLS"
        extra = ", reflection on" if self.reflection else ""
        log.info("ext_proc listening on %s (%s%s)", self.address, transport, extra)

    async def wait_for_termination(self) -> None:
        assert self._server is not None, "start() first"
        await self._server.wait_for_termination()

    async def stop(self, grace: float, hurry: asyncio.Event | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, no new RPCs, then live ext_proc streams get `grace` seconds to end
        before they are cut. Setting `hurry` (a second signal) cuts them at once. Safe to call twice."""
        if self._server is None or self._stopped:
            return
        self._stopped = True
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + grace
        log.info(
            "shutting down: not accepting new streams; %d live stream(s) get up to %gs to finish",
            self.servicer.live_streams,
            grace,
        )
        await self._health.enter_graceful_shutdown()  # NOT_SERVING for every service (Watch streams hear it)
        # gRPC stops accepting at once; its own deadline is a backstop: ours comes first, so the streams it would
        # cut can be counted (a cut stream looks like a normal end to its handler).
        stopping = asyncio.ensure_future(self._server.stop(grace + 1))
        while self.servicer.live_streams and not stopping.done() and loop.time() < deadline:
            if hurry is not None and hurry.is_set():
                log.warning("shutdown hurried: cutting %d live stream(s) now", self.servicer.live_streams)
                break
            await asyncio.sleep(min(0.05, deadline - loop.time()))
        cut = self.servicer.live_streams
        if not cut:  # the ext_proc streams are over: their final statuses get a moment to leave
            await asyncio.wait({stopping}, timeout=1.0)
        if not stopping.done():  # cut what is left: late ext_proc streams, health Watch streams
            await self._server.stop(0)
        await stopping
        self._remove_socket_file()
        log.info(
            "shutdown complete after %.1fs: %s",
            loop.time() - started,
            "every stream finished" if cut == 0 else f"{cut} live stream(s) cut short",
        )

    def _remove_socket_file(self) -> None:
        """gRPC unlinks its socket on stop; this covers the rest, and never removes a file that is not ours."""
        if self.socket_path is None or self._socket_inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(self.socket_path).st_ino == self._socket_inode:
                self.socket_path.unlink()

