"""Issues 13 and 25: what the rendered Envoy config makes of the settings, and of the API table.

The behaviour behind each is tested through the running stack (tests/integration/test_faults.py); these pin the
arithmetic, so a change of margin or setting shows up here first.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any, ClassVar

import pytest

from extproc.apis import APIS
from extproc.errors import GatewayError
from extproc.processors import ROUTES
from gateway.cli import envoy_binary
from gateway.envoy_config import render, standalone_example
from settings import ENVOY_MARGIN_S, PROCESSOR_MARGIN_S, load

EXAMPLE = Path(__file__).resolve().parents[2] / "envoy" / "standalone.example.yaml"


def rendered(*argv: str) -> dict[str, Any]:
    return render(load(argv=list(argv), environ={}))


def _named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(item for item in items if item.get("name") == name)


def test_deadlines_nest_inside_the_outer_limit() -> None:
    config = rendered("--generation-timeout-s", "600")
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    chat = _named(hcm["route_config"]["virtual_hosts"][0]["routes"], "chat")["route"]
    ext_proc = _named(hcm["http_filters"], "envoy.filters.http.ext_proc")["typed_config"]
    assert 600 - PROCESSOR_MARGIN_S < 600 - ENVOY_MARGIN_S < 600  # processor < Envoy < KServe
    assert chat["timeout"] == ext_proc["grpc_service"]["timeout"] == f"{600 - ENVOY_MARGIN_S}s"


def test_a_request_waiting_for_a_slot_may_ask_for_its_queue_time_on_top_of_the_message_timeout() -> None:
    config = rendered("--extproc-message-timeout-ms", "1500", "--queue-timeout-s", "30")
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = _named(hcm["http_filters"], "envoy.filters.http.ext_proc")["typed_config"]
    assert (ext_proc["message_timeout"], ext_proc["max_message_timeout"]) == ("1.5s", "31.5s")


def test_an_outer_limit_too_short_for_the_margins_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        rendered("--generation-timeout-s", str(PROCESSOR_MARGIN_S))
    assert exited.value.code == 2
    assert "GENERATION_TIMEOUT_S='2': expected" in capsys.readouterr().err


def test_client_stall_timeout_is_tcp_user_timeout_on_the_listener() -> None:
    listener = rendered("--client-stall-timeout-s", "7")["static_resources"]["listeners"][0]
    [option] = listener["socket_options"]
    assert (option["level"], option["name"]) == (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
    assert option["int_value"] == 7000 and option["state"] == "STATE_LISTENING"


def test_a_host_that_failed_its_checks_gets_no_traffic() -> None:
    shimmy = _named(rendered()["static_resources"]["clusters"], "shimmy")
    assert shimmy["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}
    assert shimmy["health_checks"][0]["unhealthy_threshold"] == 2


def test_the_heap_limit_and_the_connection_cap_come_from_their_settings() -> None:
    overload = rendered("--envoy-max-heap-mb", "300", "--max-connections", "50")["overload_manager"]
    monitors = {m["name"]: m["typed_config"] for m in overload["resource_monitors"]}
    assert monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"] == 300 << 20
    assert monitors["envoy.resource_monitors.global_downstream_max_connections"][
        "max_active_downstream_connections"] == 50
    stop = _named(overload["actions"], "envoy.overload_actions.stop_accepting_requests")
    assert stop["triggers"] == [{"name": "envoy.resource_monitors.fixed_heap", "threshold": {"value": 0.95}}]


def test_envoy_traces_only_when_a_collector_is_set(tmp_path: Any) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT unset: no tracer, no collector cluster. Set: Envoy's OpenTelemetry tracer sends
    to that host and port (TLS for https://), in a config Envoy accepts."""
    import json
    import subprocess

    from gateway.cli import envoy_binary

    plain = rendered()
    hcm = plain["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert "tracing" not in hcm
    assert all(c["name"] != "otel_collector" for c in plain["static_resources"]["clusters"])
    for endpoint, address, port, tls in [("http://127.0.0.1:4317", "127.0.0.1", 4317, False),
                                         ("https://collector.example:443", "collector.example", 443, True)]:
        config = rendered("--otel-exporter-otlp-endpoint", endpoint)
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        assert hcm["tracing"]["provider"]["name"] == "envoy.tracers.opentelemetry"
        collector = _named(config["static_resources"]["clusters"], "otel_collector")
        socket_address = collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
            "socket_address"]
        assert (socket_address["address"], socket_address["port_value"], "transport_socket" in collector) == (
            address, port, tls)
        target = tmp_path / "envoy.json"
        target.write_text(json.dumps(config))
        done = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(target), "--disable-hot-restart"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------------------------- issue 25: the API table


def _validate(config: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    out = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "OK" in out.stdout + out.stderr, out.stdout + out.stderr


@pytest.mark.parametrize("argv", [
    [],
    ["--gateway-api-keys", "a,b", "--cors-allowed-origins", "https://a.example", "--metrics-port", "9199",
     "--public-metrics", "false", "--xff-trusted-hops", "2"],
    ["--gateway-api-keys", "a", "--gateway-api-key-header", "x-gateway-key", "--extproc-port", "unix:/tmp/x.sock"],
    ["--extproc-workers", "3", "--generation-timeout-s", "30", "--request-headers-timeout-s", "3",
     "--queue-timeout-s", "0.5"],
])
def test_envoy_validates_every_render(argv: list[str], tmp_path: Path) -> None:
    _validate(rendered(*argv), tmp_path)


def test_each_render_is_its_own_to_change() -> None:
    """A caller may change what render returns (the bench's steps do) without changing the next render."""
    first = json.dumps(rendered())
    hcm = rendered()["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        for config in route.get("typed_per_filter_config", {}).values():
            for value in config.get("overrides", {}).values():
                if isinstance(value, dict):
                    value["changed"] = "yes"
    assert json.dumps(rendered()) == first


def test_the_standalone_example_is_the_render() -> None:
    """envoy/standalone.example.yaml is generated (`python -m gateway.envoy_config`); it cannot drift from the
    config the gateway runs (the example once said 601 s where the gateway rendered 599 s)."""
    assert EXAMPLE.read_text() == standalone_example(), "regenerate: python -m gateway.envoy_config > " + str(EXAMPLE)


def test_every_endpoint_of_an_api_is_served_by_the_processor() -> None:
    for api in APIS.values():
        assert api.route in ROUTES
        for route in api.endpoints.values():
            assert route in ROUTES, route


class Echo:
    """A throwaway API in an error shape of its own: everything Envoy says for it comes from these lines."""

    route: ClassVar[str] = "echo"
    path: ClassVar[str] = "/v1/echo"
    error_shape: ClassVar[str] = "plain"
    endpoints: ClassVar[dict[str, str]] = {"/v1/echo/count": "echo_count"}
    subpath_error: ClassVar[tuple[str, str] | None] = ("no_such_echo", "Echoes are not kept")

    @staticmethod
    def error_body(exc: GatewayError) -> bytes:
        return json.dumps({"oops": exc.message, "why": exc.code, "status": exc.status}).encode()


def test_adding_an_api_is_its_adapter_and_its_table_entry(tmp_path: Path) -> None:
    config = render(load(argv=[], environ={}), apis={**APIS, "echo": Echo})  # type: ignore[dict-item]
    _validate(config, tmp_path)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    vhost = hcm["route_config"]["virtual_hosts"][0]
    names = [r["name"] for r in vhost["routes"]]
    ours = ["echo_without_body", "echo", "echo_unframed", "echo_count", "echo_media_type", "echo_method_not_allowed",
            "echo_not_found"]
    assert [n for n in names if n.startswith("echo")] == ["echo_upgrade", *ours]
    assert names.index("echo_upgrade") < names.index("upgrade_not_supported") < names.index("health")
    assert names.index("echo_not_found") < names.index("not_found")
    by_name = {r["name"]: r for r in vhost["routes"]}
    echo = by_name["echo"]
    assert echo["match"]["path"] == "/v1/echo" and echo["route"]["timeout"] == f"{600 - ENVOY_MARGIN_S}s"
    assert echo["metadata"] == {"filter_metadata": {"shimmy_gateway": {"generation": True}}}
    override = echo["typed_per_filter_config"]["envoy.filters.http.ext_proc"]["overrides"]
    assert override["grpc_initial_metadata"] == [{"key": "x-gateway-route", "value": "echo"}]
    count = by_name["echo_count"]["typed_per_filter_config"]["envoy.filters.http.ext_proc"]["overrides"]
    assert count["grpc_initial_metadata"] == [{"key": "x-gateway-route", "value": "echo_count"}]
    assert json.loads(by_name["echo_not_found"]["direct_response"]["body"]["inline_string"]) == {
        "oops": "Echoes are not kept", "why": "no_such_echo", "status": 404}
    assert json.loads(by_name["echo_upgrade"]["direct_response"]["body"]["inline_string"])["why"] == (
        "websocket_not_supported")
    assert {"name": "echo", "headers": [{"name": ":path", "string_match": {"exact": "/v1/echo"}},
                                        {"name": ":method", "string_match": {"exact": "POST"}}]} in (
        vhost["virtual_clusters"])
    # Envoy's own replies in the new shape: on its routes by name, before routing by its paths.
    plain = [m for m in hcm["local_reply_config"]["mappers"]
             if "oops" in m["body_format_override"]["json_format"]]
    whys = [m["body_format_override"]["json_format"]["why"] for m in plain]
    assert whys[:2] == ["overloaded", "upgrade_not_supported"]  # a 431 has no path yet: the default shape's
    assert {"queue_full", "backend_unavailable", "timeout", "request_too_large", "gateway_error"} <= set(whys)
    assert "'echo_unframed'" in json.dumps(plain[2]["filter"]) and "/v1/echo" in json.dumps(plain[0]["filter"])
    assert "Echoes" not in json.dumps(hcm["local_reply_config"]["mappers"])
    lua = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.lua")["typed_config"]
    assert '\\"oops\\"' in lua["source_codes"]["plain"]["inline_string"]


def test_the_processor_workers_are_health_checked_over_grpc_and_ejected_at_a_refused_connection() -> None:
    config = rendered("--health-interval-s", "3", "--extproc-workers", "2")
    extproc = _named(config["static_resources"]["clusters"], "extproc")
    [check] = extproc["health_checks"]
    assert check["grpc_health_check"] == {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"}
    assert check["interval"] == check["no_traffic_interval"] == "3s"
    outlier = extproc["outlier_detection"]
    assert outlier["split_external_local_origin_errors"] and outlier["consecutive_local_origin_failure"] == 1
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    retry = _named(hcm["http_filters"], "envoy.filters.http.ext_proc")["typed_config"]["grpc_service"]["retry_policy"]
    assert retry["retry_on"] == "connect-failure,refused-stream"  # never a stream the processor has seen
