"""The protocol-faithful Shimmy emulator: `create_app(EmulatorConfig)` gives an aiohttp application.

Routing is done here rather than by aiohttp's router because it must behave like axum's, per version: the route
set depends on the configured version (which tests may change at runtime), unknown paths are 404 with an empty
body, a known path with the wrong method is 405 with an `allow` header, and from 1.3.5 a CORS layer answers every
OPTIONS with 200 (spec §1.1, §9.2). `/_emulator/*` are the emulator's own test controls, not Shimmy's.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from shimmy import compat, native
from shimmy.axum import BODY_LIMIT, Rejection, empty, json_response
from shimmy.profiles import Profile, Route
from shimmy.runtime import Die, Dropped, EmulatorConfig, Runtime
from shimmy_spec.protocol import GENERATE_PATH

__all__ = ["RUNTIME", "EmulatorConfig", "create_app"]

RUNTIME = web.AppKey("runtime", Runtime)

Handler = Callable[[web.Request, Runtime], Awaitable[web.StreamResponse]]

CORS_HEADERS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "GET, POST, OPTIONS",
    "access-control-allow-headers": "Content-Type, Authorization",
    "access-control-max-age": "86400",
}
_PARAM_ROUTES = (
    (re.compile(r"/api/models/[^/]+/(load|unload|status)"), "/api/models/:name/{}"),
    (re.compile(r"/api/tools/[^/]+/execute"), "/api/tools/:name/execute"),
)


# --- server.rs: health, metrics, diag ---------------------------------------------------------------------------


def _rfc3339_now() -> str:
    """chrono's `to_rfc3339()`: `+00:00` and 0, 3, 6 or 9 fractional digits."""
    ns = time.time_ns()
    seconds, nanos = divmod(ns, 1_000_000_000)
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if nanos:
        digits = 3 if nanos % 1_000_000 == 0 else 6 if nanos % 1000 == 0 else 9
        stamp += "." + f"{nanos:09d}"[:digits]
    return stamp + "+00:00"


def _model_counts(rt: Runtime) -> tuple[int, int, int]:
    """(discovered, manual, total) as the registry counts them."""
    found, manual = native.discovered(rt), native.registered(rt)
    return len(found), len(manual), len(set(found) | set(manual))


async def health(request: web.Request, rt: Runtime) -> web.Response:
    """GET /health: always 200. `uptime_seconds` is really the epoch time, as in Shimmy (§4.1)."""
    profile = rt.profile
    if profile.health == "ok":
        return json_response({"status": "ok"})
    found, manual, total = _model_counts(rt)
    body: dict[str, object] = {
        "models": {"discovered": found, "manual": manual, "total": total},
        "service": "shimmy",
        "status": "ok",
        "timestamp": _rfc3339_now(),
        "uptime_seconds": int(time.time()),
        "version": profile.version,
    }
    if profile.health == "full":
        body["compatibility"] = {"cors": True, "openai": True}
        body["endpoints"] = {
            "chat": "/v1/chat/completions",
            "generate": "/api/generate",
            "health": "/health",
            "models": "/v1/models",
        }
    return json_response(body, sort_keys=True)


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB (what `sys_info` and `sysinfo` read); empty where there is none."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)}
    except OSError:
        return {}


async def metrics(request: web.Request, rt: Runtime) -> web.Response:
    """GET /metrics: JSON, not Prometheus (§4.2)."""
    profile = rt.profile
    found, manual, total = _model_counts(rt)
    mem = _meminfo()
    body: dict[str, object] = {
        "endpoints": ["/health", "/metrics", "/v1/chat/completions", "/v1/models", "/api/generate", "/api/models"],
        "features": {"huggingface": True} | ({"llama": True} if profile.metrics_llama_feature else {}),
        "models": {
            "by_type": {"discovered": found, "manual": manual},
            "total_count": total,
            "total_size_mb": found * (native.DISCOVERED_SIZE // (1024 * 1024)),
        },
        "service": "shimmy",
        "system": {
            "memory_available_mb": mem.get("MemAvailable", 0) // 1024,
            "memory_free_mb": mem.get("MemFree", 0) // 1024,
            "memory_total_mb": mem.get("MemTotal", 0) // 1024,
        },
        "timestamp": _rfc3339_now(),
        "version": profile.version,
    }
    if profile.metrics_gpu:
        body |= {"gpu_detected": False, "gpu_vendor": None}
    return json_response(body, sort_keys=True)


async def diag(request: web.Request, rt: Runtime) -> web.Response:
    """GET /diag; `mem_total_mb` is really KiB, as in Shimmy (§4.3)."""
    system = {"darwin": "macos", "win32": "windows"}.get(sys.platform, sys.platform)
    return json_response({"os": system, "cores": os.cpu_count() or 1, "mem_total_mb": _meminfo().get("MemTotal", 0)})


# --- routing ----------------------------------------------------------------------------------------------------

HANDLERS: dict[Route, Handler] = {
    ("GET", "/health"): health,
    ("GET", "/metrics"): metrics,
    ("GET", "/diag"): diag,
    ("POST", GENERATE_PATH): native.generate,
    ("GET", "/api/models"): native.list_models,
    ("POST", "/api/models/discover"): native.discover_models,
    ("POST", "/api/models/:name/load"): native.load_model,
    ("POST", "/api/models/:name/unload"): native.unload_model,
    ("GET", "/api/models/:name/status"): native.model_status,
    ("GET", "/api/tools"): native.list_tools,
    ("POST", "/api/tools/:name/execute"): native.execute_tool,
    ("POST", "/api/workflows/execute"): native.execute_workflow,
    ("GET", "/ws/generate"): native.ws_generate,
    ("POST", "/v1/chat/completions"): compat.chat_completions,
    ("GET", "/v1/models"): compat.list_models,
    ("POST", "/v1/completions"): compat.completions,
    ("GET", "/api/tags"): compat.api_tags,
    ("POST", "/v1/messages"): compat.anthropic_messages,
}


@functools.cache
def _routing_table(profile: Profile) -> dict[str, dict[str, Handler]]:
    """{path pattern: {method: handler}} for the routes this version has."""
    table: dict[str, dict[str, Handler]] = {}
    for method, pattern in profile.routes:
        table.setdefault(pattern, {})[method] = HANDLERS[(method, pattern)]
    return table


def _pattern(path: str, table: dict[str, dict[str, Handler]]) -> str:
    """The axum pattern a raw (still percent-encoded) path matches, or the path itself."""
    if path in table:
        return path
    for regex, pattern in _PARAM_ROUTES:
        if m := regex.fullmatch(path):
            return pattern.format(*m.groups())
    return path


async def _dispatch(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    profile = rt.profile
    if request.method == "OPTIONS" and profile.cors:
        return web.Response()
    table = _routing_table(profile)
    methods = table.get(_pattern(request.rel_url.raw_path, table))
    if methods is None:
        return empty(404)
    handler = methods.get("GET" if request.method == "HEAD" else request.method)
    if handler is None:
        allow = ",".join(m for m in ("GET", "HEAD", "POST") if m in methods or (m == "HEAD" and "GET" in methods))
        return empty(405, {"allow": allow})
    try:
        return await handler(request, rt)
    except Rejection as r:
        return r.response()
    except Dropped:
        return web.Response()  # the connection is closed; aiohttp's write fails quietly


async def _cors(request: web.Request, response: web.StreamResponse) -> None:
    """Shimmy's CORS middleware (1.3.5+) overwrites these headers on every response."""
    if request.app[RUNTIME].profile.cors:
        response.headers.update(CORS_HEADERS)


# --- the emulator's own controls -------------------------------------------------------------------------------


def _config_response(rt: Runtime) -> web.Response:
    return json_response(dataclasses.asdict(rt.config))


async def _get_config(request: web.Request) -> web.Response:
    return _config_response(request.app[RUNTIME])


async def _put_config(request: web.Request) -> web.Response:
    """Merge a JSON object into the config; unknown keys and wrong types are a 400 and change nothing."""
    rt = request.app[RUNTIME]
    try:
        rt.update(json.loads(await request.read()))
    except ValueError as e:  # includes JSON syntax errors
        return json_response({"error": str(e)}, status=400)
    return _config_response(rt)


async def _reset(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    rt.reset()
    return _config_response(rt)


async def _stats(request: web.Request) -> web.Response:
    return json_response(dataclasses.asdict(request.app[RUNTIME].stats))


def create_app(config: EmulatorConfig, die: Die | None = None) -> web.Application:
    """The emulator as an aiohttp application; `config` stays live (changes apply to the next request).

    `die`: how the process ends when the emulated Shimmy would die (abort, OOM kill); None: really end it.
    """
    app = web.Application(client_max_size=BODY_LIMIT)
    app[RUNTIME] = Runtime(config) if die is None else Runtime(config, die)
    app.router.add_get("/_emulator/config", _get_config)
    app.router.add_put("/_emulator/config", _put_config)
    app.router.add_post("/_emulator/reset", _reset)
    app.router.add_get("/_emulator/stats", _stats)
    app.router.add_route("*", "/{tail:.*}", _dispatch)
    app.on_response_prepare.append(_cors)
    return app
