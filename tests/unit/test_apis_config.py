"""Issue 16: what gateway/envoy_config.py renders for the client APIs: every generation route's deadline, the key
header, CORS."""

from __future__ import annotations

from typing import Any

from gateway.envoy_config import render
from settings import load


def rendered(**env: str) -> dict[str, Any]:
    return render(load(argv=[], environ=env))


def hcm(config: dict[str, Any]) -> dict[str, Any]:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def routes(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in hcm(config)["route_config"]["virtual_hosts"][0]["routes"]}


def test_every_generation_route_gets_the_deadline_and_idle_timeout() -> None:
    by_name = routes(rendered(GENERATION_TIMEOUT_S="42", STREAM_IDLE_TIMEOUT_S="7"))
    generation = ("chat", "messages", "responses", "completions")
    for name in (*generation, *(f"{n}_unframed" for n in generation)):  # inside the outer limit: 42 s - 1 s
        assert (by_name[name]["route"]["timeout"], by_name[name]["route"]["idle_timeout"]) == ("41s", "7s"), name
    assert by_name["models"]["route"]["timeout"] == "30s"  # not a generation


def test_the_key_is_read_from_the_configured_header_and_x_api_key() -> None:
    def sources(config: dict[str, Any]) -> list[dict[str, str]]:
        [auth] = [f for f in hcm(config)["http_filters"] if f["name"] == "envoy.filters.http.api_key_auth"]
        return auth["typed_config"]["key_sources"]

    assert sources(rendered(GATEWAY_API_KEYS="k")) == [{"header": "authorization"}, {"header": "x-api-key"}]
    custom = rendered(GATEWAY_API_KEYS="k", GATEWAY_API_KEY_HEADER="X-Gateway-Key")
    assert sources(custom) == [{"header": "x-gateway-key"}, {"header": "x-api-key"}]
    messages = [m["body_format_override"]["json_format"] for m in hcm(custom)["local_reply_config"]["mappers"]]
    assert any(m.get("error", {}).get("message") == "Missing or invalid API key: send x-gateway-key: <key>"
               for m in messages)
    assert "envoy.filters.http.api_key_auth" not in str(hcm(rendered())["http_filters"])


def test_cors_is_rendered_only_for_listed_origins() -> None:
    off = rendered()
    assert "envoy.filters.http.cors" not in str(hcm(off)["http_filters"]) and "cors_preflight" not in routes(off)
    assert "access-control-allow-origin" in hcm(off)["route_config"]["response_headers_to_remove"]
    on = rendered(CORS_ALLOWED_ORIGINS="https://a.example, https://b.example", GATEWAY_API_KEYS="k")
    filters = [f["name"] for f in hcm(on)["http_filters"]]
    assert filters.index("envoy.filters.http.cors") < filters.index("envoy.filters.http.api_key_auth")
    policy = hcm(on)["route_config"]["virtual_hosts"][0]["typed_per_filter_config"]["envoy.filters.http.cors"]
    assert policy["allow_origin_string_match"] == [{"exact": "https://a.example"}, {"exact": "https://b.example"}]
    assert policy["forward_not_matching_preflights"] is False
    assert next(iter(routes(on))) == "cors_preflight"
