"""Render envoy/gateway.yaml with the configured ports, timeouts and limits, and the client APIs.

The template holds every part that is no API's; rendering changes the fields found here by name (listener
`gateway`, route `metrics`, the ext_proc, Lua and buffer filters, clusters `shimmy`, `extproc` and `envoy_admin`,
the overload manager's monitors) and adds each API's routes, virtual cluster and local-reply mappers from
`extproc.apis.APIS` (gateway/envoy_apis.py). envoy/standalone.example.yaml is this render (`standalone_example`).
With keys it adds the api_key_auth filter (and, when the key is read from `Authorization`, a route requiring the
bearer scheme); with CORS_ALLOWED_ORIGINS, the CORS filter; with METRICS_PORT, a loopback copy of the listener
serving only the metrics.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from extproc.apis import APIS
from extproc.generation import Api
from extproc.responses_ws import MAX_AGE_S
from gateway import envoy_apis
from settings import ENVOY_MARGIN_S, Settings, waiting_message_timeout_s

__all__ = ["config_path", "extproc_addresses", "render"]


def config_path() -> Path:
    """envoy/gateway.yaml of a source checkout, or the copy the wheel installs under share/."""
    for candidate in (
        Path(__file__).resolve().parents[1] / "envoy" / "gateway.yaml",
        Path(sys.prefix) / "share" / "shimmy-gateway" / "envoy" / "gateway.yaml",
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("envoy/gateway.yaml is neither in the source tree nor installed under share/")


def _named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(item for item in items if item.get("name") == name)


def _endpoint(cluster: dict[str, Any]) -> dict[str, Any]:
    return cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _key_header(settings: Settings) -> str:
    """The header API keys are read from besides x-api-key (what a 401 tells an OpenAI client to send)."""
    return settings.gateway_api_key_header.strip().lower() or "authorization"


def _require_api_keys(hcm: dict[str, Any], routes: list[dict[str, Any]], raw_keys: str, header: str) -> None:
    """Put Envoy's api_key_auth filter first (after the access log's path); health stays open, because probes
    carry no key.

    The key is read from `header` (Authorization by default; behind SAP AI Core that one carries AI Core's own
    token, so another is configured) and from `x-api-key`, where Anthropic's clients send it.
    """
    keys = [k.strip() for k in raw_keys.split(",") if k.strip()]
    header = header.strip().lower() or "authorization"
    sources = [{"header": h} for h in dict.fromkeys((header, "x-api-key"))]
    filters = hcm["http_filters"]
    filters.insert(
        filters.index(_named(filters, "envoy.filters.http.set_filter_state")) + 1,  # after the access log's path
        {
            "name": "envoy.filters.http.api_key_auth",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
                "credentials": [{"key": key, "client": f"key-{i}"} for i, key in enumerate(keys)],
                "key_sources": sources,
                "forwarding": {"hide_credentials": True},  # Shimmy never sees a client's key
            },
        },
    )
    _named(routes, "health").setdefault("typed_per_filter_config", {})["envoy.filters.http.api_key_auth"] = {
        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
        "disabled": True,
    }
    if header == "authorization":
        # Envoy's filter also takes a bare `Authorization: <key>`; the bearer scheme is required, as documented.
        _require_bearer_scheme(routes)


def _require_bearer_scheme(routes: list[dict[str, Any]]) -> None:
    """A present `Authorization` without `Bearer ` is a 401, before the key filter could take it as a bare key."""
    routes.insert(
        routes.index(_named(routes, "health")) + 1,
        {
            "name": "bearer_scheme_required",
            "match": {
                "prefix": "/",
                "headers": [{"name": "authorization", "string_match": {"prefix": "Bearer "}, "invert_match": True}],
            },
            "direct_response": {"status": 401},  # the local-reply mapper writes the body and WWW-Authenticate
            "typed_per_filter_config": _named(routes, "not_found")["typed_per_filter_config"],
        },
    )


def _responses_websocket(settings: Settings, resources: dict[str, Any], routes: list[dict[str, Any]]) -> None:
    """Route WebSocket upgrades of /v1/responses to the processor's socket (extproc/responses_ws.py), before the
    upgrade routes that refuse them; without a socket (`config` renders no stack of its own) they stay refused.

    Envoy's idle timer must not cut a connection the processor keeps (between turns it closes one itself after
    RESPONSES_WS_IDLE_TIMEOUT_S; within a turn events flow, or the turn's own idle limit applies), and its stream
    limit must let a turn begun just before the connection's hour is up finish. No ext_proc and no buffer here:
    each turn comes back through this listener as a POST /v1/responses, where everything applies."""
    cluster = _named(resources["clusters"], "responses_ws")
    path = str(getattr(settings, "responses_ws_socket", "") or "").strip()
    if not path:
        resources["clusters"].remove(cluster)
        return
    _endpoint(cluster)["address"] = {"pipe": {"path": path}}
    idle = max(settings.responses_ws_idle_timeout_s, settings.stream_idle_timeout_s) + 5
    route = {
        "name": "responses_websocket",
        "match": {"path": "/v1/responses", "headers": [
            {"name": ":method", "string_match": {"exact": "GET"}},
            {"name": "upgrade", "string_match": {"exact": "websocket", "ignore_case": True}},
        ]},
        "route": {
            "cluster": "responses_ws",
            "timeout": "0s",  # a connection lives for many turns: max_stream_duration bounds it
            "idle_timeout": _seconds(idle),
            "max_stream_duration": {"max_stream_duration": _seconds(MAX_AGE_S + settings.generation_timeout_s)},
        },
        "typed_per_filter_config": envoy_apis.NO_FILTERS,
    }
    first_upgrade = next(i for i, r in enumerate(routes) if r["name"].endswith("_upgrade") or r["name"] ==
                         "upgrade_not_supported")
    routes.insert(first_upgrade, route)


def _metrics_listener(gateway: dict[str, Any], port: int) -> dict[str, Any]:
    """A copy of the public listener on 127.0.0.1 that serves only the metrics routes, with no key required."""
    listener = copy.deepcopy(gateway)
    listener["name"] = "metrics"
    listener["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stat_prefix"] = "metrics"
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.api_key_auth"]
    vhost = hcm["route_config"]["virtual_hosts"][0]
    vhost.pop("virtual_clusters", None)
    kept = ("upgrade_not_supported", "metrics", "metrics_method_not_allowed", "not_found")
    vhost["routes"] = [r for r in vhost["routes"] if r["name"] in kept]
    return listener


def _allow_cors(hcm: dict[str, Any], vhost: dict[str, Any], raw_origins: str) -> None:
    """Envoy's CORS filter before the key check (a preflight carries no key), with the listed origins allowed on
    every route.

    The filter only acts on routes that forward (not on `direct_response` ones, where every OPTIONS would land),
    so preflights get a route of their own; the filter answers every one of them itself, allowed or not
    (`forward_not_matching_preflights: false`), and nothing reaches Shimmy.
    """
    origins = [o.strip() for o in raw_origins.split(",") if o.strip()]
    filters = hcm["http_filters"]
    filters.insert(
        filters.index(_named(filters, "envoy.filters.http.set_filter_state")) + 1,  # the access log keeps the path
        {
            "name": "envoy.filters.http.cors",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"},
        },
    )
    vhost.setdefault("typed_per_filter_config", {})["envoy.filters.http.cors"] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": [{"exact": origin} for origin in origins],
        "allow_methods": "GET, POST, OPTIONS",
        "allow_headers": "authorization, content-type, x-api-key, anthropic-version, anthropic-beta, x-request-id",
        "expose_headers": "x-request-id, x-gateway-prompt-tokens, retry-after",
        "max_age": "600",
        "forward_not_matching_preflights": False,
    }
    preflight = {
        "name": "cors_preflight",
        "match": {
            "prefix": "/",
            "headers": [
                {"name": ":method", "string_match": {"exact": "OPTIONS"}},
                {"name": "origin", "present_match": True},
                {"name": "access-control-request-method", "present_match": True},
            ],
        },
        "route": {"cluster": "shimmy", "timeout": "5s"},
        "typed_per_filter_config": _named(vhost["routes"], "not_found")["typed_per_filter_config"],
    }
    vhost["routes"].insert(0, preflight)


def _trace(hcm: dict[str, Any], clusters: list[dict[str, Any]], endpoint: str) -> None:
    """Envoy's OpenTelemetry tracer: a span per request (a client's `traceparent` continued), one per ext_proc call
    as its child, whose context the processor's span continues (extproc/tracing.py); OTLP/gRPC to `endpoint`."""
    url = urlsplit(endpoint)
    tags = {"gen_ai.request.model": "model", "shimmy.api": "api", "shimmy.outcome": "outcome",
            "gen_ai.usage.input_tokens": "prompt_tokens", "gen_ai.usage.output_tokens": "completion_tokens"}
    hcm["tracing"] = {
        "random_sampling": {"value": 100},
        # The request's span carries what the processor reported (its dynamic metadata, as in the access log).
        "custom_tags": [
            {"tag": tag, "metadata": {"kind": {"request": {}}, "metadata_key": {"key": "shimmy_gateway",
                                                                                   "path": [{"key": key}]}}}
            for tag, key in tags.items()
        ],
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": "otel_collector"}, "timeout": "2s"},
                "service_name": "shimmy-gateway",
            },
        },
    }
    collector: dict[str, Any] = {
        "name": "otel_collector",
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "otel_collector",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": url.hostname or "127.0.0.1", "port_value": url.port or 4317}}}}]}],
        },
    }
    if url.scheme == "https":
        collector["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": url.hostname,
            },
        }
    clusters.append(collector)


def render(
    settings: Settings, source: Path | None = None, apis: Mapping[str, type[Api]] | None = None
) -> dict[str, Any]:
    """The Envoy bootstrap for `settings`, as a dict (Envoy reads the JSON dump of it): the template with the
    client APIs' routes, virtual clusters and error replies rendered from `apis` (extproc.apis.APIS)."""
    apis = APIS if apis is None else apis
    config: dict[str, Any] = yaml.safe_load((source or config_path()).read_text())
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": settings.envoy_admin_port}

    resources = config["static_resources"]
    listener = _named(resources["listeners"], "gateway")
    listener["address"]["socket_address"]["port_value"] = settings.gateway_port
    listener["per_connection_buffer_limit_bytes"] = settings.max_request_bytes
    [stall] = listener["socket_options"]  # TCP_USER_TIMEOUT: a client that reads nothing is cut
    stall["int_value"] = settings.client_stall_timeout_s * 1000
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stream_idle_timeout"] = _seconds(settings.stream_idle_timeout_s)
    hcm["request_headers_timeout"] = listener["listener_filters_timeout"] = _seconds(settings.request_headers_timeout_s)
    hcm["xff_num_trusted_hops"] = settings.xff_trusted_hops
    hcm["max_request_headers_kb"] = envoy_apis.HEADERS_KB
    hcm["common_http_protocol_options"]["max_headers_count"] = envoy_apis.HEADERS_COUNT
    hcm["local_reply_config"]["mappers"] += envoy_apis.local_reply_mappers(apis, _key_header(settings))
    _named(hcm["http_filters"], "envoy.filters.http.lua")["typed_config"]["source_codes"] = envoy_apis.lua_sources(
        apis)
    connections, heap = config["overload_manager"]["resource_monitors"]
    connections["typed_config"]["max_active_downstream_connections"] = settings.max_connections
    heap["typed_config"]["max_heap_size_bytes"] = settings.envoy_max_heap_mb << 20
    if settings.metrics_port:
        metrics_listener = _metrics_listener(listener, settings.metrics_port)  # before keys or PUBLIC_METRICS apply

    # Deadlines nest inside GENERATION_TIMEOUT_S, the outer proxy's limit (settings.PROCESSOR_MARGIN_S): Envoy's
    # route timeout is a backstop between the processor's deadline and it, so a stream still flowing at the
    # deadline ends with the processor's error (in-band, or a 504 before Shimmy's first byte), and a 1.x one-piece
    # answer (nothing before it is whole) gets Envoy's 504 before the outer cut.
    route_timeout = settings.generation_timeout_s - ENVOY_MARGIN_S
    vhost = hcm["route_config"]["virtual_hosts"][0]
    routes = vhost["routes"]
    if not settings.flag("public_metrics"):
        routes.remove(_named(routes, "metrics"))
        routes.remove(_named(routes, "metrics_method_not_allowed"))
        vhost["virtual_clusters"].remove(_named(vhost["virtual_clusters"], "metrics"))
    routes[routes.index(_named(routes, "upgrade_not_supported")):0] = envoy_apis.upgrade_routes(apis)
    at = routes.index(_named(routes, "method_not_allowed"))
    routes[at:at] = [
        route
        for api in apis.values()
        for route in envoy_apis.api_routes(api, _seconds(route_timeout), _seconds(settings.stream_idle_timeout_s))
    ]
    vhost["virtual_clusters"] += envoy_apis.virtual_clusters(apis)

    _responses_websocket(settings, resources, routes)

    _named(hcm["http_filters"], "envoy.filters.http.buffer")["typed_config"]["max_request_bytes"] = (
        settings.max_request_bytes
    )
    ext_proc = _named(hcm["http_filters"], "envoy.filters.http.ext_proc")["typed_config"]
    ext_proc["message_timeout"] = _seconds(settings.extproc_message_timeout_ms / 1000)
    ext_proc["max_message_timeout"] = _seconds(  # what a request waiting for a slot asks for (docs/admission.md)
        waiting_message_timeout_s(settings.extproc_message_timeout_ms, settings.queue_timeout_s)
    )
    ext_proc["grpc_service"]["timeout"] = _seconds(route_timeout)
    if settings.gateway_api_keys.strip():
        _require_api_keys(hcm, routes, settings.gateway_api_keys, settings.gateway_api_key_header)
    if settings.cors_allowed_origins.strip():
        _allow_cors(hcm, vhost, settings.cors_allowed_origins)
    if settings.metrics_port:
        resources["listeners"].append(metrics_listener)
    if settings.otel_exporter_otlp_endpoint.strip():
        _trace(hcm, resources["clusters"], settings.otel_exporter_otlp_endpoint.strip())

    shimmy = _named(resources["clusters"], "shimmy")
    _endpoint(shimmy)["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": settings.shimmy_port}}
    # The processor admits generations (extproc/admission.py: a slot until Shimmy is done, queue, 429); this is the
    # backstop behind it. HTTP/1.1 carries one request per connection, so the connection limit caps the requests
    # Shimmy sees at once even if the processor were wrong about a live one; the pending queue only bridges the
    # moment a finished request's connection returns to the pool. max_requests must not be that tight: Envoy still
    # counts a request as active while the processor works on its response, after the connection went back to the
    # pool, and a queued request picked up on that connection would overflow with a spurious 429.
    [limits] = shimmy["circuit_breakers"]["thresholds"]
    limits["max_connections"] = settings.max_active_requests
    limits["max_pending_requests"] = settings.max_queued_requests
    limits["max_requests"] = settings.max_active_requests + settings.max_queued_requests
    for check in shimmy["health_checks"]:
        check["interval"] = check["no_traffic_interval"] = _seconds(settings.health_interval_s)

    _endpoint(_named(resources["clusters"], "envoy_admin"))["address"]["socket_address"]["port_value"] = (
        settings.envoy_admin_port
    )

    # One endpoint per processor worker; Envoy's round robin spreads the streams (SO_REUSEPORT on one port does
    # not: Envoy keeps a couple of long-lived HTTP/2 connections, and the kernel often puts them on one process).
    extproc = _named(resources["clusters"], "extproc")
    # One ext_proc stream per request in flight; never the first limit a burst meets (envoy/gateway.yaml).
    in_flight = settings.max_connections * hcm["http2_protocol_options"]["max_concurrent_streams"]
    [breaker] = extproc["circuit_breakers"]["thresholds"]
    breaker["max_requests"] = breaker["max_pending_requests"] = in_flight + 100  # + headroom
    streams = extproc["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
        "explicit_http_config"]["http2_protocol_options"]["max_concurrent_streams"]
    chats = settings.max_active_requests + settings.max_queued_requests  # each holds a stream for its whole life
    per_pool = 1 + -(-chats // streams)  # ceil, + one connection's worth for health, models and metrics
    breaker["max_connections"] = per_pool * settings.envoy_workers * settings.extproc_workers
    for check in extproc["health_checks"]:
        check["interval"] = check["no_traffic_interval"] = _seconds(settings.health_interval_s)
    extproc["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": address}} for address in extproc_addresses(settings)
    ]
    return config


def extproc_addresses(settings: Settings) -> list[dict[str, Any]]:
    """Envoy addresses of the stack's processor workers: EXTPROC_PORT and the ports after it, or one socket."""
    port = str(settings.extproc_port)
    if port.startswith("unix:"):
        if settings.extproc_workers != 1:
            raise SystemExit("EXTPROC_WORKERS > 1 needs a TCP EXTPROC_PORT, not a unix socket")
        return [{"pipe": {"path": port.removeprefix("unix:")}}]
    first = int(port)
    return [
        {"socket_address": {"address": "127.0.0.1", "port_value": first + i}} for i in range(settings.extproc_workers)
    ]


STANDALONE_HEADER = """\
# Example: your own Envoy in front of Shimmy, with `shimmy-extproc` running as a separate service over mTLS.
#
# GENERATED by `python -m gateway.envoy_config > envoy/standalone.example.yaml`: the config `shimmy-gateway up`
# renders with the default settings (envoy/gateway.yaml and the API table, gateway/envoy_config.py), with TLS to
# the processor. tests/unit/test_envoy_config.py keeps this file equal to that render; do not edit it by hand.
# tests/integration/test_standalone.py runs it with real Envoy.
#
# Copy the pieces you need into your Envoy config: the HTTP filters (their order matters), the routes (their
# `typed_per_filter_config` tells the processor which endpoint a stream is: x-gateway-route), the local-reply
# mappers (each API's error shape), the `extproc` cluster and the `shimmy` cluster; the metrics route, its
# `envoy_admin` cluster and the access log are optional.
#
# The processor side (`shimmy-extproc --help` lists every setting; each is also an environment variable):
#   shimmy-extproc --extproc-host 0.0.0.0 --extproc-port 50051 \\
#     --extproc-tls-cert server.crt --extproc-tls-key server.key --extproc-tls-client-ca ca.crt \\
#     --shimmy-url http://shimmy.internal:8080 --model-name phi3-lora
#
# Placeholders to replace:
#   - the PEM files under /etc/shimmy-gateway/tls/: the CA that signed the processor's certificate, and Envoy's
#     client certificate and key (the processor's EXTPROC_TLS_CLIENT_CA must trust their issuer);
#   - the processor's address (127.0.0.1:50051) and the DNS name in its certificate (`sni` and the SAN match,
#     shimmy-extproc.example.internal);
#   - Shimmy's address (127.0.0.1:8080).
# For a DNS name instead of an IP, make the cluster `type: STRICT_DNS`. For a processor on a unix socket
# (EXTPROC_PORT=unix:/path), give the endpoint `address: {pipe: {path: /path}}` and drop `transport_socket`.
#
# Keep the timeouts consistent with the processor's settings (defaults here): the generation routes' `timeout`
# and the ext_proc `grpc_service.timeout` are GENERATION_TIMEOUT_S - 1 s (the processor ends a late stream in-band
# at GENERATION_TIMEOUT_S - 2 s); the buffer filter's `max_request_bytes` is MAX_REQUEST_BYTES.
"""
STANDALONE_TLS_DIR = "/etc/shimmy-gateway/tls/"
STANDALONE_SNI = "shimmy-extproc.example.internal"


def standalone_example() -> str:
    """envoy/standalone.example.yaml: the default render, with mTLS to a processor that runs as its own service."""
    from settings import load  # the defaults, whatever this process's environment says

    config = render(load(argv=[], environ={}))
    extproc = _named(config["static_resources"]["clusters"], "extproc")
    extproc["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": STANDALONE_SNI,
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificates": [{
                    "certificate_chain": {"filename": STANDALONE_TLS_DIR + "envoy-client.crt"},
                    "private_key": {"filename": STANDALONE_TLS_DIR + "envoy-client.key"},
                }],
                "validation_context": {
                    "trusted_ca": {"filename": STANDALONE_TLS_DIR + "ca.crt"},
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": STANDALONE_SNI}}],
                },
            },
        },
    }
    return STANDALONE_HEADER + yaml.dump(config, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


class _Dumper(yaml.SafeDumper):
    """YAML a person can read: short mappings and lists on one line, multi-line strings as blocks, no aliases."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _short(data: object) -> bool:
    return len(json.dumps(data)) <= 80


_Dumper.add_representer(dict, lambda d, data: d.represent_mapping(
    "tag:yaml.org,2002:map", data.items(), flow_style=_short(data)))
_Dumper.add_representer(list, lambda d, data: d.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=_short(data)))
_Dumper.add_representer(str, lambda d, data: d.represent_scalar(
    "tag:yaml.org,2002:str", data, style="|" if "\n" in data else None))


if __name__ == "__main__":
    sys.stdout.write(standalone_example())
