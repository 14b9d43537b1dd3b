"""The gRPC side: the ext_proc `Process` stream loop, which only routes phases to a processor, and the server.

No JSON, SSE or error policy lives here (practice 1 of shared/reference/style-anchors.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.processors import ROUTES, Context, Processor

__all__ = ["ExternalProcessor", "serve"]

log = logging.getLogger("extproc")

ROUTE_METADATA = "x-gateway-route"
SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
MAX_MESSAGE_BYTES = 8 << 20  # above the largest body Envoy may buffer (MAX_REQUEST_BYTES)


class ExternalProcessor:
    """Per stream: pick the processor named by Envoy's route metadata, then hand it each phase."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.live_streams = 0  # tests and metrics read it: a stream that never ends is a leak

    def processor_for(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Processor:
        for key, value in metadata or ():
            if key == ROUTE_METADATA:
                factory = ROUTES.get(value if isinstance(value, str) else value.decode())
                if factory is not None:
                    return factory(self.ctx)
        return Processor(self.ctx)

    @staticmethod
    def dispatch(processor: Processor, msg: ep.ProcessingRequest) -> ep.ProcessingResponse | None:
        """The processor's answer to one message, or None to answer nothing (full-duplex bodies only)."""
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
    ) -> AsyncIterator[ep.ProcessingResponse]:
        processor = self.processor_for(context.invocation_metadata())
        self.live_streams += 1
        try:
            async for msg in requests:
                response = self.dispatch(processor, msg)
                if response is not None:
                    yield response
        finally:
            self.live_streams -= 1
            processor.close()


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


async def serve(
    servicer: ExternalProcessor, address: str, started: asyncio.Event | None = None, grace: float = 5.0
) -> None:
    """Run until cancelled. `address` is `host:port` or `unix:/path`."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    server.add_generic_rpc_handlers((_handler(servicer),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(address) == 0 and not address.startswith("unix:"):
        raise OSError(f"cannot bind {address}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    log.info("ext_proc listening on %s", address)
    if started is not None:
        started.set()
    try:
        await server.wait_for_termination()
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace)
