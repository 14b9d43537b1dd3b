"""Shimmy's native API as the gateway speaks it (see shared/reference/shimmy-api.md §2, §3, §6, §11): its bodies,
built and read; its errors, mapped. The facts the emulator shares (path, default, sentinels) are `shimmy_spec`'s.

- We call `POST /api/generate` with a pre-rendered `prompt` and an explicit `"stream"`. Streaming is preferred,
  even for a non-stream client: one event per engine token is the only exact completion count Shimmy offers. But
  where the release swallows a stream's failure (1.x sends `[DONE]` after it) a non-stream client's request goes
  as `"stream": false`, whose failure is an honest 502; its body `{"response": text}` is all there is.
- Stream events are raw token text; `[DONE]` ends the stream; `[ERROR] <text>` (2.x) reports a failure.
- Error answers are empty (404 unknown model, 502 load/generation failure) or axum plain text (400/413/415/422).
"""

from __future__ import annotations

import msgspec

from extproc.errors import GatewayError, InvalidRequest, ModelNotFound, UpstreamError
from shimmy_spec.protocol import DEFAULT_MAX_TOKENS, DONE, ERROR_PREFIX, GENERATE_PATH

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DONE",
    "ERROR_PREFIX",
    "GENERATE_PATH",
    "generate_body",
    "model_names",
    "response_text",
    "upstream_error",
]

# DEFAULT_MAX_TOKENS is always sent explicitly, so `finish_reason: length` is truthful.


class _Generate(msgspec.Struct, omit_defaults=True):
    model: str
    prompt: str
    max_tokens: int
    stream: bool
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None


class _Response(msgspec.Struct):
    response: str


class _ModelInfo(msgspec.Struct):
    name: str


class _ModelList(msgspec.Struct):
    models: list[_ModelInfo]


_encode = msgspec.json.Encoder().encode
_decode_models = msgspec.json.Decoder(_ModelList).decode
_decode_response = msgspec.json.Decoder(_Response).decode


def generate_body(
    model: str,
    prompt: str,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    stream: bool = True,
) -> bytes:
    """The `/api/generate` body. Unset sampling fields are left out, so Shimmy's defaults apply."""
    return _encode(_Generate(model, prompt, max_tokens, stream, temperature, top_p, top_k))


def response_text(body: bytes) -> str:
    """The text of a non-stream `/api/generate` answer, `{"response": "..."}`."""
    try:
        return _decode_response(body).response
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise UpstreamError(f"Shimmy sent an unreadable answer: {exc}", code="upstream_unreadable") from None


def model_names(body: bytes) -> list[str]:
    """Sorted, de-duplicated names from `/api/models` (1.x lists discovered models twice, in random order)."""
    try:
        return sorted({m.name for m in _decode_models(body).models})
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise UpstreamError(f"Shimmy sent an unreadable model list: {exc}") from None


def upstream_error(status: int, body: bytes, model: str | None = None) -> GatewayError:
    """Map a non-2xx Shimmy answer to the error the client sees."""
    detail = body.decode("utf-8", "replace").strip()[:500]
    if status == 404:
        if model is not None:
            return ModelNotFound(model)
        return UpstreamError("Shimmy does not serve this path", code="upstream_not_found")
    if status in (400, 413, 415, 422):
        return InvalidRequest(f"Shimmy rejected the request: {detail or status}", code="upstream_rejected")
    message = f"Shimmy failed ({status})" + (f": {detail}" if detail else ", with an empty body")
    return UpstreamError(message)
