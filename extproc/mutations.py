"""The only module that builds Envoy ext_proc responses (besides the server's framing).

Header values always go in `raw_value`: Envoy reads mutations from it, and `value` alone empties the header.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2

__all__ = [
    "DUPLEX_RESPONSE",
    "METADATA_NAMESPACE",
    "Header",
    "continue_request_body",
    "continue_response_body",
    "continue_response_headers",
    "immediate",
    "message_timeout",
    "request_body",
    "response_body",
    "response_headers",
    "set_metadata",
    "streamed_body",
]

Header = tuple[str, str]

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# Full duplex lets the processor answer a chunk with nothing (held-back text) and end the client's response
# itself (a stop sequence or the deadline), instead of waiting for Shimmy to finish.
DUPLEX_RESPONSE = processing_mode_pb2.ProcessingMode(
    response_body_mode=processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED,
)


def _mutation(set_headers: Iterable[Header], remove: Iterable[str] = ()) -> ep.HeaderMutation:
    """Built once per distinct set of headers (few: the values are constants, token-count kinds and lengths);
    a response copies it, which costs a fraction of building it."""
    return _built(tuple(set_headers), tuple(remove))


@lru_cache(maxsize=1024)
def _built(set_headers: tuple[Header, ...], remove: tuple[str, ...]) -> ep.HeaderMutation:
    return ep.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE
            )
            for k, v in set_headers
        ],
        remove_headers=list(remove),
    )


def request_body(body: bytes, set_headers: Iterable[Header]) -> ep.ProcessingResponse:
    """Replace the buffered request body; headers are still held, so `:path` and content-length can change."""
    return ep.ProcessingResponse(
        request_body=ep.BodyResponse(
            response=ep.CommonResponse(header_mutation=_mutation(set_headers), body_mutation=ep.BodyMutation(body=body))
        )
    )


def response_headers(
    set_headers: Iterable[Header] = (),
    remove: Iterable[str] = (),
    mode: processing_mode_pb2.ProcessingMode | None = None,
) -> ep.ProcessingResponse:
    return ep.ProcessingResponse(
        response_headers=ep.HeadersResponse(response=ep.CommonResponse(header_mutation=_mutation(set_headers, remove))),
        mode_override=mode,
    )


def response_body(body: bytes, set_headers: Iterable[Header] = ()) -> ep.ProcessingResponse:
    """Replace a response body (a whole buffered body, or one streamed chunk; b"" emits nothing for this chunk)."""
    mutation = _mutation(set_headers) if set_headers else None
    return ep.ProcessingResponse(
        response_body=ep.BodyResponse(
            response=ep.CommonResponse(header_mutation=mutation, body_mutation=ep.BodyMutation(body=body))
        )
    )


def streamed_body(body: bytes, end: bool) -> ep.ProcessingResponse:
    """One chunk of a FULL_DUPLEX_STREAMED response; `end` finishes the client's response."""
    return ep.ProcessingResponse(
        response_body=ep.BodyResponse(
            response=ep.CommonResponse(
                body_mutation=ep.BodyMutation(streamed_response=ep.StreamedBodyResponse(body=body, end_of_stream=end))
            )
        )
    )


METADATA_NAMESPACE = "shimmy_gateway"  # listed in the ext_proc filter's metadata_options.receiving_namespaces


def set_metadata(response: ep.ProcessingResponse, fields: dict[str, str | float]) -> None:
    """Hand Envoy per-request facts (model, tokens, timings) as dynamic metadata; the access log prints them.

    Field by field rather than `Struct.update`, whose pure-Python type dispatch cost more than the rest of it.
    """
    out = response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
    for key, value in fields.items():
        if isinstance(value, str):
            out[key].string_value = value
        else:
            out[key].number_value = value


def immediate(status: int, body: bytes, headers: Iterable[Header] = ()) -> ep.ProcessingResponse:
    """Answer the client now, without (or instead of) Shimmy's answer."""
    return ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=_mutation([("content-type", "application/json"), *headers]),
            body=body,
        )
    )


def message_timeout(seconds: float) -> ep.ProcessingResponse:
    """Envoy's timer on the message being answered, restarted at `seconds` (once per message; at most the filter's
    `max_message_timeout`, else Envoy ignores it)."""
    response = ep.ProcessingResponse()
    response.override_message_timeout.FromNanoseconds(round(seconds * 1e9))
    return response


def continue_response_headers() -> ep.ProcessingResponse:
    return ep.ProcessingResponse(response_headers=ep.HeadersResponse())


def continue_response_body() -> ep.ProcessingResponse:
    return ep.ProcessingResponse(response_body=ep.BodyResponse())


def continue_request_body() -> ep.ProcessingResponse:
    return ep.ProcessingResponse(request_body=ep.BodyResponse())
