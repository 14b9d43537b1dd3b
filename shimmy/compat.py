"""Shimmy's own compatibility routes: OpenAI (`src/openai_compat`) and Anthropic (`src/anthropic_compat.rs`).

The gateway does not forward to these, but benchmarks compare against them, so their quirks are kept:
chat streams by default, deltas carry both keys with nulls, `usage` is all zeros, `finish_reason` is always
`stop`, and stream failures look like a normal end (spec §5).
"""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from typing import Any

from aiohttp import web

from shimmy.axum import (
    BOOL,
    DONE,
    F32,
    I32,
    STRING,
    USIZE,
    Opt,
    Seq,
    Struct,
    Untagged,
    empty,
    json_response,
    read_json,
    rust_debug,
    sse_event,
)
from shimmy.engine import GenerationError, GenParams, LoadError, Token
from shimmy.native import DEFAULT_MAX_TOKENS, discovered
from shimmy.profiles import Profile
from shimmy.runtime import Frames, Runtime
from shimmy.templates import chat_prompt, family

__all__ = ["anthropic_messages", "api_tags", "chat_completions", "completions", "list_models"]

log = logging.getLogger("shimmy.emulator")

_MAX_TOKENS_LIMIT = 131072


def _is_parts(value: Any) -> bool:
    """2.x `MessageContent::Parts`: `[{type, text?}, ...]`."""
    return isinstance(value, list) and all(
        isinstance(p, dict) and isinstance(p.get("type"), str) and isinstance(p.get("text"), str | None) for p in value
    )


def _is_content(value: Any) -> bool:
    return isinstance(value, str) or _is_parts(value)


def _flatten(content: str | list[dict[str, Any]]) -> str:
    """Parts' `text` values joined with `\\n`; parts without text (images) are dropped."""
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p.get("text") is not None)


@functools.cache
def _chat_schema(profile: Profile) -> Struct:
    content = Untagged("MessageContent", _is_content) if profile.content_parts else STRING
    fields = {
        "model": STRING,
        "messages": Seq(Struct("ChatMessage", {"role": STRING, "content": content})),
        "stream": Opt(BOOL),
        "temperature": Opt(F32),
        "max_tokens": Opt(USIZE),
        "top_p": Opt(F32),
    }
    if profile.content_parts:
        fields |= {"frequency_penalty": Opt(F32), "presence_penalty": Opt(F32)}
    return Struct("ChatCompletionRequest", fields)


def _openai_error(status: int, code: str, message: str, param: str | None, kind: str) -> web.Response:
    error = {"code": code, "message": message, "type": kind} | ({"param": param} if param else {})
    return json_response({"error": error}, status=status, sort_keys=True)


def _invalid(status: int, code: str, message: str, param: str) -> web.Response:
    return _openai_error(status, code, message, param, "invalid_request_error")


def _max_tokens_error(max_tokens: int | None) -> web.Response | None:
    if max_tokens is not None and not 1 <= max_tokens <= _MAX_TOKENS_LIMIT:
        message = f"max_tokens must be between 1 and {_MAX_TOKENS_LIMIT}"
        return _invalid(400, "invalid_max_tokens", message, "max_tokens")
    return None


def _chat_frames(cid: str, created: int, model: str, profile: Profile) -> Frames:
    """Role chunk, one content chunk per token, final chunk, `[DONE]`; a failure is swallowed."""
    base = (
        f'{{"id":"{cid}","object":"chat.completion.chunk","created":{created},'
        f'"model":{json.dumps(model, ensure_ascii=False)},"choices":[{{"index":0,"delta":{{"content":'
    )
    role = base + 'null,"role":"assistant"},"finish_reason":null}]}'
    final = base + 'null,"role":null},"finish_reason":"stop"}]}'
    if profile.chat_double_framing:  # <1.4.2 wrapped pre-framed events in axum's framing again

        def event(data: str) -> bytes:
            return sse_event(f"data: {data}\n\n")

        tail = event(final) + event("[DONE]")
    else:

        def event(data: str) -> bytes:
            return f"data: {data}\n\n".encode()

        tail = event(final) + DONE

    def token(t: Token) -> bytes:
        return event(f'{base}{t.json},"role":null}},"finish_reason":null}}]}}')

    return Frames(event(role), token, tail, lambda e: tail)


async def chat_completions(request: web.Request, rt: Runtime) -> web.StreamResponse:
    """POST /v1/chat/completions; `stream` absent means the config's default (real Shimmy: SSE)."""
    rt.stats.chat_requests += 1
    profile = rt.profile
    body = await read_json(request, _chat_schema(profile))
    messages = [(m["role"], _flatten(m["content"])) for m in body["messages"]]
    max_tokens = body.get("max_tokens")
    if profile.chat_validation:
        if not messages:
            return _invalid(400, "invalid_messages", "messages must not be empty", "messages")
        if (error := _max_tokens_error(max_tokens)) is not None:
            return error
    model = body["model"]
    if model not in rt.config.models:
        log.warning("Model '%s' not found in registry", model)
        if not profile.chat_404_json:
            return empty(404)
        available = "[" + ", ".join(rust_debug(n) for n in sorted(discovered(rt))) + "]"
        return _invalid(404, "model_not_found", f"Model '{model}' not found. Available models: {available}", "model")
    try:
        await rt.engine.load()
    except LoadError:
        return empty(502)
    prompt = chat_prompt(family(model, profile), messages, profile)
    rt.record_prompt(prompt)
    params = GenParams.from_body(prompt, body)
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    stream = body.get("stream")
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if rt.config.openai_stream_default if stream is None else stream:
        return await rt.stream(request, max_tokens, _chat_frames(cid, created, model, profile), params)
    try:
        text = await rt.collect(request, max_tokens, params)
    except GenerationError:
        return empty(502)
    return json_response(
        {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
    )


async def list_models(request: web.Request, rt: Runtime) -> web.Response:
    """GET /v1/models: sorted unique ids; `created` 0 before 1.8.0; `root` in 1.7.4 only."""
    profile = rt.profile
    created = int(time.time()) if profile.models_created_now else 0
    data = []
    for name in sorted(discovered(rt)):
        entry: dict[str, Any] = {"id": name, "object": "model", "created": created, "owned_by": "shimmy"}
        if profile.models_root:
            entry["root"] = name
        data.append(entry)
    return json_response({"object": "list", "data": data})


async def api_tags(request: web.Request, rt: Runtime) -> web.Response:
    """GET /api/tags (2.x): Ollama's shape, every field but the name a constant."""
    details = {"format": "gguf", "family": "", "parameter_size": "", "quantization_level": ""}
    models = [
        {"name": n, "model": n, "modified_at": "2025-01-01T00:00:00Z", "size": 0, "digest": "", "details": details}
        for n in sorted(discovered(rt))
    ]
    return json_response({"models": models})


_COMPLETION = Struct(
    "CompletionRequest",
    {
        "model": STRING,
        "prompt": STRING,
        "temperature": Opt(F32),
        "max_tokens": Opt(USIZE),
        "top_p": Opt(F32),
        "stream": Opt(BOOL),
    },
)


async def completions(request: web.Request, rt: Runtime) -> web.Response:
    """POST /v1/completions (2.x): raw prompt, never streams, `usage` counts whitespace-separated words."""
    body = await read_json(request, _COMPLETION)
    prompt, model, max_tokens = body["prompt"], body["model"], body.get("max_tokens")
    if not prompt.strip():
        return _invalid(400, "invalid_prompt", "prompt must not be empty", "prompt")
    if (error := _max_tokens_error(max_tokens)) is not None:
        return error
    if model not in rt.config.models:
        return _invalid(404, "model_not_found", f"Model '{model}' not found", "model")
    try:
        await rt.engine.load()
    except LoadError:
        return empty(502)
    rt.record_prompt(prompt)
    params = GenParams.from_body(prompt, body)
    try:
        text = await rt.collect(request, DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens, params)
    except GenerationError:
        return _openai_error(500, "generation_failed", "Generation failed", None, "server_error")
    prompt_words, completion_words = len(prompt.split()), len(text.split())
    body = {
        "choices": [{"finish_reason": "stop", "index": 0, "logprobs": None, "text": text}],
        "created": int(time.time()),
        "id": f"cmpl-{uuid.uuid4().hex}",
        "model": model,
        "object": "text_completion",
        "usage": {
            "completion_tokens": completion_words,
            "prompt_tokens": prompt_words,
            "total_tokens": prompt_words + completion_words,
        },
    }
    return json_response(body)


def _is_blocks(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(b, dict) and isinstance(b.get("type"), str) for b in value)


_ANTHROPIC = Struct(
    "MessagesRequest",
    {
        "model": STRING,
        "max_tokens": USIZE,
        "messages": Seq(
            Struct(
                "Message",
                {"role": STRING, "content": Untagged("MessageContent", lambda v: isinstance(v, str) or _is_blocks(v))},
            )
        ),
        "system": Opt(STRING),
        "temperature": Opt(F32),
        "top_p": Opt(F32),
        "top_k": Opt(I32),
        "stream": Opt(BOOL),
    },
)


def _anthropic_text(content: str | list[dict[str, Any]]) -> str:
    """Text blocks as is, other blocks as `[<type> content]`."""
    if isinstance(content, str):
        return content
    return "\n".join(b["text"] if b["type"] == "text" else f"[{b['type']} content]" for b in content)


async def anthropic_messages(request: web.Request, rt: Runtime) -> web.Response:
    """POST /v1/messages (1.7.4+): never streams; token counts are ⌈bytes/4⌉ of prompt and reply.

    The prompt's `System:`/`Human:`/`Assistant:` layout follows the spec's summary (§5.7), not the exact source.
    """
    body = await read_json(request, _ANTHROPIC)
    model = body["model"]
    if model not in rt.config.models:
        return empty(404)
    try:
        await rt.engine.load()
    except LoadError:
        return empty(500)
    system = body.get("system")
    lines = [f"System: {system}\n\n"] if system else []
    for m in body["messages"]:
        speaker = "Human" if m["role"] == "user" else "Assistant"
        lines.append(f"{speaker}: {_anthropic_text(m['content'])}\n")
    prompt = "".join(lines) + "Assistant: "
    rt.record_prompt(prompt)
    try:
        text = await rt.collect(request, body["max_tokens"], GenParams.from_body(prompt, body))
    except GenerationError:
        return empty(500)
    return json_response(
        {
            "id": f"msg_{uuid.uuid4()}",
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": text}],
            "model": model,
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": -(-len(prompt.encode()) // 4), "output_tokens": -(-len(text.encode()) // 4)},
        }
    )
