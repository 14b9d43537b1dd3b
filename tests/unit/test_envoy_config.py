"""Issue 13: what the rendered Envoy config makes of the timeout, stall and health settings.

The behaviour behind each is tested through the running stack (tests/integration/test_faults.py); these pin the
arithmetic, so a change of margin or setting shows up here first.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from gateway.envoy_config import render
from settings import ENVOY_MARGIN_S, PROCESSOR_MARGIN_S, load


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
