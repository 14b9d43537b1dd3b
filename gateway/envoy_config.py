"""Render envoy/gateway.yaml with the configured ports, timeouts and limits.

The shipped file is a complete, valid config with the default settings; rendering changes only the fields
found here by name (listener `gateway`, route `metrics`, the generation routes (marked `generation` in their
metadata: chat, messages, responses, completions), the ext_proc and buffer filters, clusters `shimmy`, `extproc`
and `envoy_admin`, the overload manager's connection cap), so the YAML stays the one place where routing, health
checks and replies are declared. With keys it adds the api_key_auth filter (and, when the key is read from
`Authorization`, a route requiring the bearer scheme); with CORS_ALLOWED_ORIGINS, the CORS filter; with
METRICS_PORT, a loopback copy of the listener serving only the metrics.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from settings import ENVOY_MARGIN_S, Settings

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


def _generation_routes(routes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The routes that run a generation (one per client API), marked in the YAML's route metadata."""
    marked = (r.get("metadata", {}).get("filter_metadata", {}).get("shimmy_gateway", {}) for r in routes)
    return [r for r, meta in zip(routes, marked, strict=True) if meta.get("generation")]


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
        return
    for mapper in hcm["local_reply_config"]["mappers"]:
        if mapper.get("headers_to_add", [{}])[0].get("header", {}).get("key") == "www-authenticate":
            error = mapper["body_format_override"]["json_format"]["error"]
            error["message"] = f"Missing or invalid API key: send {header}: <key>"
            del mapper["headers_to_add"]  # not a Bearer challenge any more


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
    kept = ("metrics", "metrics_method_not_allowed", "not_found")
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


def render(settings: Settings, source: Path | None = None) -> dict[str, Any]:
    """The Envoy bootstrap for `settings`, as a dict (Envoy reads the JSON dump of it)."""
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
    hcm["request_headers_timeout"] = _seconds(settings.request_headers_timeout_s)
    connections, heap = config["overload_manager"]["resource_monitors"]
    connections["typed_config"]["max_active_downstream_connections"] = settings.max_connections
    heap["typed_config"]["max_heap_size_bytes"] = settings.envoy_max_heap_mb << 20
    if settings.metrics_port:
        metrics_listener = _metrics_listener(listener, settings.metrics_port)  # before keys or PUBLIC_METRICS apply

    # Deadlines nest inside GENERATION_TIMEOUT_S, the outer proxy's limit (settings.PROCESSOR_MARGIN_S): Envoy's
    # route timeout is a backstop between the processor's deadline and it, so a stream still flowing at the
    # deadline ends with the processor's in-band error, and a silent Shimmy gets Envoy's 504 before the outer cut.
    route_timeout = settings.generation_timeout_s - ENVOY_MARGIN_S
    vhost = hcm["route_config"]["virtual_hosts"][0]
    routes = vhost["routes"]
    if not settings.flag("public_metrics"):
        routes.remove(_named(routes, "metrics"))
        routes.remove(_named(routes, "metrics_method_not_allowed"))
        vhost["virtual_clusters"].remove(_named(vhost["virtual_clusters"], "metrics"))
    for generation in _generation_routes(routes):
        generation["route"]["timeout"] = _seconds(route_timeout)
        generation["route"]["idle_timeout"] = _seconds(settings.stream_idle_timeout_s)

    _named(hcm["http_filters"], "envoy.filters.http.buffer")["typed_config"]["max_request_bytes"] = (
        settings.max_request_bytes
    )
    ext_proc = _named(hcm["http_filters"], "envoy.filters.http.ext_proc")["typed_config"]
    ext_proc["message_timeout"] = _seconds(settings.extproc_message_timeout_ms / 1000)
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
