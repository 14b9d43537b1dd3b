"""Render envoy/gateway.yaml with the configured ports, timeouts and limits.

The shipped file is a complete, valid config with the default settings; rendering changes only the fields
found here by name (listener `gateway`, routes `chat` and `metrics`, the ext_proc and buffer filters, clusters
`shimmy`, `extproc` and `envoy_admin`), so the YAML stays the one place where routing, health checks and
replies are declared.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from settings import Settings

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


def _require_api_keys(hcm: dict[str, Any], routes: list[dict[str, Any]], raw_keys: str) -> None:
    """Put Envoy's api_key_auth filter first; health stays open, because probes carry no key."""
    keys = [k.strip() for k in raw_keys.split(",") if k.strip()]
    hcm["http_filters"].insert(
        0,
        {
            "name": "envoy.filters.http.api_key_auth",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
                "credentials": [{"key": key, "client": f"key-{i}"} for i, key in enumerate(keys)],
                "key_sources": [{"header": "authorization"}],
                "forwarding": {"hide_credentials": True},  # Shimmy never sees a client's key
            },
        },
    )
    _named(routes, "health").setdefault("typed_per_filter_config", {})["envoy.filters.http.api_key_auth"] = {
        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
        "disabled": True,
    }


def render(settings: Settings, source: Path | None = None) -> dict[str, Any]:
    """The Envoy bootstrap for `settings`, as a dict (Envoy reads the JSON dump of it)."""
    config: dict[str, Any] = yaml.safe_load((source or config_path()).read_text())
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": settings.envoy_admin_port}

    resources = config["static_resources"]
    listener = _named(resources["listeners"], "gateway")
    listener["address"]["socket_address"]["port_value"] = settings.gateway_port
    listener["per_connection_buffer_limit_bytes"] = settings.max_request_bytes
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stream_idle_timeout"] = _seconds(settings.stream_idle_timeout_s)

    # Envoy's deadline is a backstop one second behind the processor's, so a stream still flowing at the
    # deadline ends with the processor's in-band error rather than a reset.
    route_timeout = settings.generation_timeout_s + 1
    vhost = hcm["route_config"]["virtual_hosts"][0]
    routes = vhost["routes"]
    if not settings.flag("public_metrics"):
        routes.remove(_named(routes, "metrics"))
        routes.remove(_named(routes, "metrics_method_not_allowed"))
        vhost["virtual_clusters"].remove(_named(vhost["virtual_clusters"], "metrics"))
    chat = _named(routes, "chat")["route"]
    chat["timeout"] = _seconds(route_timeout)
    chat["idle_timeout"] = _seconds(settings.stream_idle_timeout_s)

    _named(hcm["http_filters"], "envoy.filters.http.buffer")["typed_config"]["max_request_bytes"] = (
        settings.max_request_bytes
    )
    ext_proc = _named(hcm["http_filters"], "envoy.filters.http.ext_proc")["typed_config"]
    ext_proc["message_timeout"] = _seconds(settings.extproc_message_timeout_ms / 1000)
    ext_proc["grpc_service"]["timeout"] = _seconds(route_timeout)
    if settings.gateway_api_keys.strip():
        _require_api_keys(hcm, routes, settings.gateway_api_keys)

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
