"""Envoy's routes, virtual clusters and local-reply mappers for the client APIs, rendered from `extproc.apis.APIS`.

Each adapter class declares what Envoy needs to know of it (`route`, `path`, `error_shape`, `endpoints`,
`subpath_error`), and its own `error_body` writes every error Envoy answers on its paths, so adding an API is its
module and its `APIS` entry. Per API: a refused upgrade, a missing body, the generation route (framed by
Content-Length, or not: then the Lua filter answers a body that never comes), the endpoints answered from the body
alone, 415 for a non-JSON body, 405 for another method, 404 below its path, and a virtual cluster. Per error shape:
Envoy's own replies (queue full, Shimmy down, timeouts, limits, malformed HTTP) rewritten in that shape; replies made
before a route is chosen (heap overload, oversized headers, an upgrade Envoy refuses) are told apart by path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from extproc.errors import GatewayError
from extproc.generation import Api

__all__ = [
    "DEFAULT_SHAPE", "HEADERS_COUNT", "HEADERS_KB", "api_routes", "local_reply_mappers", "lua_sources", "shapes",
    "upgrade_routes", "virtual_clusters",
]

DEFAULT_SHAPE = "openai"  # paths of no API (health, models, unknown ones) answer in OpenAI's shape
JSON_BODY = {
    "name": "content-type",
    "string_match": {"safe_regex": {"regex": r"(?i)^application/([a-z0-9.-]+\+)?json\s*(;.*)?$"}},
}
NO_FILTERS = {
    "envoy.filters.http.ext_proc": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
        "disabled": True,
    },
    "envoy.filters.http.buffer": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute",
        "disabled": True,
    },
}
# Shimmy's body reaches the processor chunk by chunk, stream or not: a non-stream answer ends at a stop sequence or
# the deadline too, its headers held until it is whole (docs/admission.md). Full duplex needs the trailer mode SEND.
GENERATION_MODE = {
    "request_header_mode": "SKIP",
    "response_header_mode": "SEND",
    "request_body_mode": "BUFFERED",
    "response_body_mode": "FULL_DUPLEX_STREAMED",
    "response_trailer_mode": "SEND",
}
BODY_ONLY_MODE = {  # an endpoint the processor answers from the request body alone; Shimmy is never asked
    "request_header_mode": "SKIP",
    "response_header_mode": "SKIP",
    "request_body_mode": "BUFFERED",
    "response_body_mode": "NONE",
}
POST = {"name": ":method", "string_match": {"exact": "POST"}}
# Request headers Envoy takes (its defaults are 60 KiB and 100): below what Shimmy's HTTP server takes with the
# headers Envoy adds, so an oversized request is the gateway's 431 in the API's shape, never Shimmy's refusal.
HEADERS_KB = 32
HEADERS_COUNT = 64


@dataclass(frozen=True)
class Reply:
    """One kind of Envoy's own reply, as an error in each API's shape. `status` is what the client gets (None:
    Envoy's own status is kept, and `nominal` is the status the shape's error type is chosen by)."""

    match: dict[str, Any]
    code: str
    type: str
    message: str
    status: int | None
    nominal: int = 0
    retry_after: str | None = None

    def error(self) -> GatewayError:
        return _error(self.status or self.nominal, self.type, self.code, self.message)


def _cel(expression: str) -> dict[str, Any]:
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": expression,
            },
        }
    }


def _status_is(status: int) -> dict[str, Any]:
    return {"status_code_filter": {"comparison": {"op": "EQ", "value": {
        "default_value": status, "runtime_key": f"lr_{status}"}}}}


def _flags(*flags: str) -> dict[str, Any]:
    return {"response_flag_filter": {"flags": list(flags)}}


# Before a route is chosen, only the path tells the API.
PRE_ROUTE = (
    # The heap limit (overload manager): every new request is refused until Envoy's heap falls back.
    Reply(_cel("response.code_details == 'overload'"), "overloaded", "server_error",
          "The gateway is short of memory; retry later", 503, retry_after="1"),
    # An upgrade of a type Envoy does not proxy (h2c, ...): refused before routing.
    Reply(_cel("response.code_details == 'upgrade_failed'"), "upgrade_not_supported", "invalid_request_error",
          "This path does not accept a protocol upgrade", 400),
)
# Request headers past max_request_headers_kb or max_headers_count: Envoy's HTTP/1 codec answers 431 before it has
# a path (HTTP/2 resets the stream), so this one is in the default shape only.
HEADERS_TOO_LARGE = Reply(
    _status_is(431), "headers_too_large", "invalid_request_error",
    f"The request's headers are larger than the gateway accepts ({HEADERS_KB} KiB, {HEADERS_COUNT} headers)", 431)
ROUTED = (
    Reply(_flags("UO"), "queue_full", "rate_limit_error",
          "Shimmy is busy and the gateway's queue is full; retry later", 429, retry_after="2"),
    Reply(_status_is(401), "invalid_api_key", "authentication_error", "Missing or invalid API key", 401),
    Reply(_flags("UH", "UF", "URX", "UC", "NC"), "backend_unavailable", "server_error",
          "Shimmy is not available; retry later", 503, retry_after="5"),
    Reply(_flags("UPE", "UR"), "upstream_error", "server_error", "Shimmy's connection failed mid-response", 502),
    Reply(_flags("UT", "SI"), "timeout", "server_error", "The request took longer than the gateway allows", 504),
    Reply(_status_is(413), "request_too_large", "invalid_request_error",
          "The request body is larger than the gateway accepts", 413),
    # Envoy's HTTP/1 codec answers 501 to a Transfer-Encoding it cannot frame (`gzip`, `chunked, chunked`): that is
    # the client's malformed request, a 400.
    Reply(_status_is(501), "bad_request", "invalid_request_error", "The request's Transfer-Encoding is invalid", 400),
    # The processor's cluster is sized never to overflow (docs/security.md); if it ever does, that is load, not a
    # failure: 503 with Retry-After rather than 500.
    Reply(_cel("response.code == 500 && response.code_details.startsWith('ext_proc_error')"
               " && response.code_details.contains('overflow')"),
          "overloaded", "server_error", "The gateway is at capacity; retry later", 503, retry_after="1"),
    # Envoy's own client-side refusals (codec errors, rejected paths, HTTP/1.0) carry response code details; the
    # processor's and the routes' replies are JSON already and carry none, `direct_response` or `lua_response`.
    Reply(_cel("response.code >= 400 && response.code < 500 && response.code_details != ''"
               " && response.code_details != 'direct_response' && response.code_details != 'via_upstream'"
               " && response.code_details != 'lua_response'"),
          "bad_request", "invalid_request_error", "The request is not valid HTTP, or its path is not allowed",
          None, nominal=400),
    # Not every 504: the processor's deadline answers one of its own, which carries no details, as its replies do.
    Reply({"or_filter": {"filters": [
        _status_is(500), {"response_flag_filter": {}},
        _cel("response.code >= 500 && response.code_details != '' && response.code_details != 'direct_response'"
             " && response.code_details != 'via_upstream'"),
    ]}}, "gateway_error", "server_error", "The gateway could not process the request", None, nominal=500),
)


def _error(status: int, type_: str, code: str, message: str) -> GatewayError:
    error = GatewayError(message, code=code)
    error.status, error.type = status, type_
    return error


def _body(api: type[Api], error: GatewayError) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(api.error_body(error))
    return body


def _direct(api: type[Api], status: int, type_: str, code: str, message: str) -> dict[str, Any]:
    body = api.error_body(_error(status, type_, code, message)).decode()
    return {"status": status, "body": {"inline_string": body}}


def shapes(apis: Mapping[str, type[Api]]) -> dict[str, type[Api]]:
    """One adapter per error shape (the first with it), whose `error_body` writes that shape; the default first."""
    found: dict[str, type[Api]] = {}
    for api in apis.values():
        found.setdefault(api.error_shape, api)
    if DEFAULT_SHAPE not in found:
        raise ValueError(f"no API answers in the default error shape {DEFAULT_SHAPE!r}")
    return {DEFAULT_SHAPE: found.pop(DEFAULT_SHAPE), **found}


def _post_paths(api: type[Api]) -> list[str]:
    return [api.path, *api.endpoints]


def _paths_regex(paths: Iterable[str], below: bool = False) -> str:
    """One regex for `paths` exactly (`below`: or any path or query under them)."""
    alternatives = "|".join(re.escape(p) for p in paths)
    return f"^({alternatives})([/?].*)?$" if below else f"^({alternatives})$"


def _route_names(api: type[Api]) -> list[str]:
    r = api.route
    return [f"{r}_upgrade", f"{r}_without_body", r, f"{r}_unframed", *api.endpoints.values(), f"{r}_media_type",
            f"{r}_method_not_allowed", f"{r}_not_found"]


def upgrade_routes(apis: Mapping[str, type[Api]]) -> list[dict[str, Any]]:
    """An upgrade (WebSocket) on an API's path, refused in its shape; the template's `upgrade_not_supported` takes
    every other path. Upgrades go first: any route that forwards would otherwise carry the upgrade to Shimmy."""
    return [
        {
            "name": f"{api.route}_upgrade",
            "match": {"safe_regex": {"regex": _paths_regex(_post_paths(api))},
                      "headers": [{"name": "upgrade", "present_match": True}]},
            "direct_response": _direct(api, 400, "invalid_request_error", "websocket_not_supported",
                                       "This path does not accept a WebSocket upgrade: send the request over HTTP"),
            "typed_per_filter_config": NO_FILTERS,
        }
        for api in apis.values()
    ]


def _ext_proc(route: str, mode: dict[str, str]) -> dict[str, Any]:
    """A route's ext_proc override, with a copy of `mode`: each render is the caller's to change (the bench's
    steps did, and a shared mode dict carried one step's change into every later render)."""
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
        "overrides": {"grpc_initial_metadata": [{"key": "x-gateway-route", "value": route}],
                      "processing_mode": dict(mode)},
    }


def _lua(shape: str) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
        "config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute", "name": shape},
    }


def api_routes(api: type[Api], timeout: str, idle_timeout: str) -> list[dict[str, Any]]:
    """Every route of one API but its upgrade route, in match order."""
    r, posts = api.route, _post_paths(api)
    generation = {"cluster": "shimmy", "timeout": timeout, "idle_timeout": idle_timeout,
                  "prefix_rewrite": "/api/generate"}
    framed = {"name": "content-length", "present_match": True}
    routes: list[dict[str, Any]] = [
        {
            # A POST with Content-Length 0 has no body (RFC 9112 6.3); the buffer filter would pass it straight on.
            "name": f"{r}_without_body",
            "match": {"safe_regex": {"regex": _paths_regex(posts)},
                      "headers": [POST, {"name": "content-length", "string_match": {"exact": "0"}}]},
            "direct_response": _direct(api, 400, "invalid_request_error", "missing_body",
                                       "The request body is missing"),
            "typed_per_filter_config": NO_FILTERS,
        },
        {
            "name": r,
            "match": {"path": api.path, "headers": [POST, framed, JSON_BODY]},
            "route": generation,
            "typed_per_filter_config": {"envoy.filters.http.ext_proc": _ext_proc(r, GENERATION_MODE)},
            "metadata": {"filter_metadata": {"shimmy_gateway": {"generation": True}}},
        },
        {
            # A body without Content-Length (HTTP/1.1 chunked, whose Transfer-Encoding Envoy's codec consumes, or
            # HTTP/2 DATA frames) is legal. The route cannot see whether one follows, so the Lua filter waits for it
            # (within MAX_REQUEST_BYTES) and answers missing_body when the request ended at its headers.
            "name": f"{r}_unframed",
            "match": {"path": api.path, "headers": [POST, {"name": "content-length", "present_match": False},
                                                    JSON_BODY]},
            "route": generation,
            "typed_per_filter_config": {"envoy.filters.http.ext_proc": _ext_proc(r, GENERATION_MODE),
                                        "envoy.filters.http.lua": _lua(api.error_shape)},
            "metadata": {"filter_metadata": {"shimmy_gateway": {"generation": True}}},
        },
    ]
    routes += [
        {
            "name": route,
            "match": {"path": path, "headers": [POST, JSON_BODY]},
            "route": {"cluster": "shimmy", "timeout": "30s"},
            "typed_per_filter_config": {"envoy.filters.http.ext_proc": _ext_proc(route, BODY_ONLY_MODE),
                                        "envoy.filters.http.lua": _lua(api.error_shape)},
        }
        for path, route in api.endpoints.items()
    ]
    code, message = api.subpath_error or (
        "not_found", "Unknown path: the gateway serves " + " and ".join(f"POST {p}" for p in posts))
    routes += [
        {
            "name": f"{r}_media_type",
            "match": {"safe_regex": {"regex": _paths_regex(posts)}, "headers": [POST]},
            "direct_response": _direct(api, 415, "invalid_request_error", "unsupported_media_type",
                                       "Content-Type must be application/json"),
            "typed_per_filter_config": NO_FILTERS,
        },
        {
            "name": f"{r}_method_not_allowed",
            "match": {"safe_regex": {"regex": _paths_regex(posts)}},
            "direct_response": _direct(api, 405, "invalid_request_error", "method_not_allowed",
                                       "Method not allowed on this path"),
            "typed_per_filter_config": NO_FILTERS,
        },
        {
            "name": f"{r}_not_found",
            "match": {"prefix": api.path + "/"},
            "direct_response": _direct(api, 404, "invalid_request_error", code, message),
            "typed_per_filter_config": NO_FILTERS,
        },
    ]
    return routes


def virtual_clusters(apis: Mapping[str, type[Api]]) -> list[dict[str, Any]]:
    """Per-API request stats: vhost.gateway.vcluster.<route>.upstream_rq_*."""
    return [
        {"name": api.route, "headers": [{"name": ":path", "string_match": {"exact": api.path}}, POST]}
        for api in apis.values()
    ]


def lua_sources(apis: Mapping[str, type[Api]]) -> dict[str, dict[str, str]]:
    """The Lua filter's source per error shape: a request that ended at its headers gets missing_body."""
    sources = {}
    for shape, api in shapes(apis).items():
        body = api.error_body(_error(400, "invalid_request_error", "missing_body", "The request body is missing"))
        sources[shape] = {"inline_string": (
            "function envoy_on_request(request)\n"
            "  if request:body() == nil then\n"
            '    request:respond({[":status"] = "400", ["content-type"] = "application/json"},\n'
            f"      {json.dumps(body.decode())})\n"
            "  end\n"
            "end\n"
        )}
    return sources


def _mapper(match: dict[str, Any], reply: Reply, api: type[Api], key_hint: str | None) -> dict[str, Any]:
    error = reply.error()
    headers = []
    if reply.code == "invalid_api_key":
        hint = key_hint or "x-api-key: <key>"
        error.message = f"{reply.message}: send {hint}"
        if hint.startswith("Authorization: Bearer"):
            headers.append({"header": {"key": "www-authenticate", "value": "Bearer"}})
    if reply.retry_after:
        headers.append({"header": {"key": "retry-after", "value": reply.retry_after}})
    mapper: dict[str, Any] = {"filter": match}
    if reply.status is not None:
        mapper["status_code"] = reply.status
    if headers:
        mapper["headers_to_add"] = headers
    mapper["body_format_override"] = {"json_format": _body(api, error)}
    return mapper


def _both(*filters: dict[str, Any] | None) -> dict[str, Any]:
    present = [f for f in filters if f is not None]
    return present[0] if len(present) == 1 else {"and_filter": {"filters": present}}


def local_reply_mappers(apis: Mapping[str, type[Api]], key_header: str) -> list[dict[str, Any]]:
    """Envoy's own replies in each API's error shape: the other shapes' first (told apart by path before routing,
    by route name after it), then the default shape's for everything else. No body carries Envoy's detail strings
    or response flags: they are internals, in the access log (`details`, `flags`)."""
    by_shape = shapes(apis)
    default_hint = "Authorization: Bearer <key>" if key_header == "authorization" else f"{key_header}: <key>"
    mappers = []
    for shape in [*list(by_shape)[1:], DEFAULT_SHAPE]:
        members = [api for api in apis.values() if api.error_shape == shape]
        path_filter = route_filter = None
        if shape != DEFAULT_SHAPE:
            paths = [p for api in members for p in _post_paths(api)]
            path_filter = {"header_filter": {"header": {"name": ":path", "string_match": {
                "safe_regex": {"regex": _paths_regex(paths, below=True)}}}}}
            names = ", ".join(f"'{n}'" for api in members for n in _route_names(api))
            route_filter = _cel(f"xds.route_name in [{names}]")
        hint = default_hint if shape == DEFAULT_SHAPE else None
        pre_route = PRE_ROUTE if shape != DEFAULT_SHAPE else (HEADERS_TOO_LARGE, *PRE_ROUTE)
        mappers += [_mapper(_both(reply.match, path_filter), reply, by_shape[shape], hint) for reply in pre_route]
        mappers += [_mapper(_both(route_filter, reply.match), reply, by_shape[shape], hint) for reply in ROUTED]
    return mappers

