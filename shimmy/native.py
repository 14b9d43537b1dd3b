"""Shimmy's native API (`src/api.rs`): /api/generate, /ws/generate, model listing and the stub routes."""

from __future__ import annotations

import functools
import logging
from contextlib import aclosing
from urllib.parse import unquote

from aiohttp import WSMsgType, web

from shimmy.axum import (
    BOOL,
    F32,
    I32,
    STRING,
    USIZE,
    VALUE,
    Invalid,
    Opt,
    Rejection,
    Seq,
    Struct,
    empty,
    json_bytes,
    json_response,
    parse,
    read_json,
)
from shimmy.engine import GenerationError, GenParams, LoadError
from shimmy.profiles import Profile
from shimmy.runtime import Runtime, native_frames
from shimmy.templates import family, render
from shimmy_spec.protocol import DEFAULT_MAX_TOKENS

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DISCOVERED_SIZE",
    "GENERATE",
    "discover_models",
    "discovered",
    "execute_tool",
    "execute_workflow",
    "generate",
    "list_models",
    "list_tools",
    "load_model",
    "model_info",
    "model_status",
    "registered",
    "unload_model",
    "ws_generate",
]

log = logging.getLogger("shimmy.emulator")

DISCOVERED_SIZE = 2_393_231_072  # every emulated model "file" is a Phi-3 mini Q4 GGUF
_MODEL_TYPES = (("llama", "Llama"), ("phi", "Phi"), ("gemma", "Gemma"), ("mistral", "Mistral"), ("qwen", "Qwen"))
_PARAMETER_COUNTS = ("3b", "7b", "13b", "70b")  # in Shimmy's order, so a 13b file reports 3B

GENERATE = Struct(
    "GenerateRequest",
    {
        "model": STRING,
        "prompt": Opt(STRING),
        "messages": Opt(Seq(Struct("ChatMessage", {"role": STRING, "content": STRING}))),
        "system": Opt(STRING),
        "temperature": Opt(F32),
        "top_p": Opt(F32),
        "top_k": Opt(I32),
        "max_tokens": Opt(USIZE),
        "stream": Opt(BOOL),
    },
)

_frames = functools.cache(native_frames)


def _prompt(body: dict[str, object], model: str, profile: Profile) -> str:
    """Chat mode (`messages`, rendered without an assistant opener) wins over raw `prompt` (§2.1, §8.2)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        system = body.get("system")
        turns = [(m["role"], m["content"]) for m in messages]
        return render(family(model, profile), system if isinstance(system, str) else None, turns, None)
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else ""


async def generate(request: web.Request, rt: Runtime) -> web.StreamResponse:
    """POST /api/generate: `{"response": ...}` or raw-text SSE; `stream` absent means SSE."""
    stats = rt.stats
    stats.generate_requests += 1
    stats.last_generate_body = None
    stats.last_generate_headers = dict(request.headers)
    try:
        body = await read_json(request, GENERATE)
    except Rejection as r:
        stats.last_generate_body = r.document
        raise
    stats.last_generate_body = body
    model = body["model"]
    if model not in rt.config.models:
        log.warning("Model '%s' not found in registry", model)
        return empty(404)
    try:
        await rt.engine.load()
    except LoadError:
        return empty(502)
    prompt = _prompt(body, model, rt.profile)
    rt.record_prompt(prompt)
    params = GenParams.from_body(prompt, body)
    max_tokens = body.get("max_tokens")
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if body.get("stream") is not False:
        return await rt.stream(request, max_tokens, _frames(rt.profile), params)
    try:
        text = await rt.collect(request, max_tokens, params)
    except GenerationError:
        return empty(502)
    return json_response({"response": text})


def model_info(name: str, source: str) -> dict[str, object]:
    """One /api/models entry (struct order). Discovered entries get their type and size from the file name."""
    if source == "registered":
        return {"name": name, "size_bytes": None, "model_type": None, "parameter_count": None, "source": source}
    lower = name.lower()
    model_type = next((label for key, label in _MODEL_TYPES if key in lower), "Unknown")
    parameters = next((p.upper() for p in _PARAMETER_COUNTS if p in lower), None)
    return {
        "name": name,
        "size_bytes": DISCOVERED_SIZE,
        "model_type": model_type,
        "parameter_count": parameters,
        "source": source,
    }


def discovered(rt: Runtime) -> list[str]:
    """The configured models, each standing for one GGUF file found on disk."""
    return list(dict.fromkeys(rt.config.models))


def registered(rt: Runtime) -> list[str]:
    """The manual registry: in 1.x `serve` copies every discovered model into it (§3.1)."""
    return discovered(rt) if rt.profile.duplicate_discovered else []


async def list_models(request: web.Request, rt: Runtime) -> web.Response:
    """GET /api/models: registered entries first, then discovered ones; duplicates in 1.x."""
    models = [model_info(n, "registered") for n in registered(rt)]
    models += [model_info(n, "discovered") for n in discovered(rt)]
    return json_response({"models": models})


async def discover_models(request: web.Request, rt: Runtime) -> web.Response:
    """POST /api/models/discover: a fresh scan, reported but not registered."""
    models = [model_info(n, "discovered") for n in discovered(rt)]
    return json_response({"discovered": len(models), "models": models})


def _name(request: web.Request) -> str:
    """The `:name` segment of /api/models/:name/... and /api/tools/:name/execute, percent-decoded."""
    return unquote(request.rel_url.raw_parts[3])


async def load_model(request: web.Request, rt: Runtime) -> web.Response:
    body = {"message": f"Model {_name(request)} load requested", "status": "pending"}
    return json_response(body, sort_keys=True)


async def unload_model(request: web.Request, rt: Runtime) -> web.Response:
    body = {"message": f"Model {_name(request)} unload requested", "status": "pending"}
    return json_response(body, sort_keys=True)


async def model_status(request: web.Request, rt: Runtime) -> web.Response:
    return json_response({"loaded": False, "model": _name(request), "status": "unknown"}, sort_keys=True)


async def list_tools(request: web.Request, rt: Runtime) -> web.Response:
    return json_response({"tools": []})


async def execute_tool(request: web.Request, rt: Runtime) -> web.Response:
    """A stub that still insists on a JSON body, and answers 200 with an error."""
    await read_json(request, VALUE)
    return json_response({"error": f"Tool {_name(request)} not available"})


async def execute_workflow(request: web.Request, rt: Runtime) -> web.Response:
    await read_json(request, VALUE)
    body = {"message": "Workflow execution not yet implemented", "status": "pending"}
    return json_response(body, sort_keys=True)


def _upgrade_rejection(request: web.Request) -> web.Response | None:
    """axum's `WebSocketUpgrade` rejections, checked in its order."""

    def has(name: str, token: str) -> bool:
        return any(p.strip().lower() == token for p in request.headers.get(name, "").split(","))

    headers = request.headers
    checks = (
        (request.method == "GET", 405, "Request method must be `GET`"),
        (has("Connection", "upgrade"), 400, "Connection header did not include 'upgrade'"),
        (headers.get("Upgrade", "").lower() == "websocket", 400, "`Upgrade` header did not include 'websocket'"),
        (headers.get("Sec-WebSocket-Version") == "13", 400, "`Sec-WebSocket-Version` header did not include '13'"),
        ("Sec-WebSocket-Key" in headers, 400, "`Sec-WebSocket-Key` header missing"),
    )
    for ok, status, text in checks:
        if not ok:
            return web.Response(status=status, text=text, content_type="text/plain")
    return None


async def ws_generate(request: web.Request, rt: Runtime) -> web.StreamResponse:
    """GET /ws/generate: one request frame in; raw token text frames, then `{"done":true}`, out (§9.1).

    The engine's faults apply (`fail_load`, `error_after`, delays); the connection faults do not.
    """
    rejection = _upgrade_rejection(request)
    if rejection is not None:
        return rejection
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    msg = await ws.receive()
    if msg.type is WSMsgType.TEXT:
        text = msg.data
    elif msg.type is WSMsgType.BINARY:
        text = msg.data.decode("utf-8", "replace")
    else:
        return ws
    try:
        body = parse(text, GENERATE)
    except Invalid as e:
        await ws.send_str(json_bytes({"error": f"bad request: {e.serde_message(text)}"}).decode())
        return ws
    model = body["model"]
    if model not in rt.config.models:
        await ws.send_str('{"error":"model not found"}')
        return ws
    engine = rt.engine
    try:
        await engine.load()
    except LoadError:
        await ws.send_str('{"error":"load failed"}')
        return ws
    max_tokens = body.get("max_tokens")
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    params = GenParams.from_body(_prompt(body, model, rt.profile), body)
    try:
        async with aclosing(engine.generate(max_tokens, params)) as tokens:
            async for token in tokens:
                await ws.send_str(token.text)
    except GenerationError as e:
        if rt.profile.stream_error_event:
            await ws.send_str(f'{{"error":"{e}"}}')  # Shimmy formats it without JSON escaping
    except ConnectionError:
        return ws
    await ws.send_str('{"done":true}')
    return ws
