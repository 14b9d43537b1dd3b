"""Issue 6: Envoy stats, Prometheus on the public port, JSON access logs with tokens, request ids, aliases."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.integration.conftest import Stack, start_stack, stop_stack

CHAT = {"model": "phi3-lora", "messages": [{"role": "user", "content": "x"}]}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when it is not there yet."""
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.partition("}")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def access_log(stack: Stack, request_id: str) -> dict:
    """The access log line of one request; Envoy flushes its log buffer on a timer, so wait for it."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in stack.output().splitlines():
            if line.startswith("[envoy]") and request_id in line:
                return json.loads(line.partition(" ")[2].strip())
        time.sleep(0.1)
    raise AssertionError(f"no access log line for {request_id}")


def quiet_metrics(stack: Stack, path: str = "/metrics") -> str:
    """Metrics once no earlier test's request is still in flight (a cancelled stream is counted when it ends)."""
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(f"{stack.url}{path}").text
        if metric(text, "shimmy_live_streams") <= 1 or time.monotonic() > deadline:  # 1: this /metrics request
            return text
        time.sleep(0.1)


@pytest.mark.parametrize("path", ["/metrics", "/v1/metrics"])
def test_metrics_change_after_a_request(stack: Stack, path: str) -> None:
    before = quiet_metrics(stack, path)
    first = httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, "max_tokens": 3})
    first.raise_for_status()
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 2}) as r:
        list(r.iter_lines())
    resp = httpx.get(f"{stack.url}{path}")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    after = resp.text
    model = {"gen_ai_request_model": "phi3-lora", "api": "chat"}  # other APIs' requests have series of their own
    tokens = "gen_ai_client_token_usage_sum"
    output, prompt = {**model, "gen_ai_token_type": "output"}, {**model, "gen_ai_token_type": "input"}
    counted = first.json()["usage"]["completion_tokens"] + 2  # the non-stream answer's usage, and the stream's 2
    assert metric(after, tokens, **output) - metric(before, tokens, **output) == counted
    assert metric(after, tokens, **prompt) > metric(before, tokens, **prompt)
    duration = "gen_ai_server_request_duration_seconds_count"
    ok = {**model, "gen_ai_operation_name": "chat", "error_type": ""}
    assert sum(metric(after, duration, **ok, stream=s) - metric(before, duration, **ok, stream=s)
               for s in ("true", "false")) == 2
    ttft = "gen_ai_server_time_to_first_token_seconds_count"
    assert metric(after, ttft, **model) - metric(before, ttft, **model) == 1
    non_stream = {**ok, "stream": "false"}
    assert metric(after, duration, **non_stream) - metric(before, duration, **non_stream) == 1
    assert "shimmy_live_streams" in after
    # Envoy's own stats come along: per-endpoint (virtual cluster), upstream (Shimmy) and the ext_proc filter.
    chat = {"envoy_virtual_cluster": "chat", "envoy_response_code": "200"}
    assert metric(after, "envoy_vhost_vcluster_upstream_rq", **chat) - metric(
        before, "envoy_vhost_vcluster_upstream_rq", **chat) == 2
    assert metric(after, "envoy_cluster_upstream_rq_total", envoy_cluster_name="shimmy") > 0
    started = "envoy_http_ext_proc_shimmy_streams_started"
    assert metric(after, started, envoy_http_conn_manager_prefix="gateway") > metric(before, started)


def test_errors_are_counted_by_type(stack: Stack) -> None:
    labels = {"error_type": "unsupported_parameter", "api": "chat", "gen_ai_operation_name": "chat"}
    count = "gen_ai_server_request_duration_seconds_count"
    before = metric(quiet_metrics(stack), count, **labels)
    httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, "n": 3})
    after = metric(httpx.get(f"{stack.url}/metrics").text, count, **labels)
    assert after - before == 1


def test_metrics_route_exposes_nothing_else_of_admin(stack: Stack) -> None:
    for path in ("/metrics/../clusters", "/metrics?format=json", "/v1/metrics/extra", "/stats/prometheus"):
        resp = httpx.get(f"{stack.url}{path}")
        assert resp.status_code == 404 or resp.text.startswith("# TYPE"), (path, resp.status_code)
        assert "cluster.shimmy.default.total_match_count" not in resp.text  # admin's plain /stats format
    assert httpx.post(f"{stack.url}/metrics").status_code == 405


def test_access_log_has_request_id_tokens_and_timings(stack: Stack) -> None:
    resp = httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, "max_tokens": 4},
                      headers={"x-request-id": "trace-me-123"})
    assert resp.headers["x-request-id"] == "trace-me-123"  # propagated and returned
    entry = access_log(stack, "trace-me-123")
    assert entry["source"] == "envoy" and entry["method"] == "POST" and entry["path"] == "/v1/chat/completions"
    assert entry["status"] == 200 and entry["flags"] == "-"
    assert entry["model"] == "phi3-lora" and entry["outcome"] == "ok"
    usage = resp.json()["usage"]
    assert entry["completion_tokens"] == usage["completion_tokens"] and entry["prompt_tokens"] == usage["prompt_tokens"]
    assert entry["processor_duration_ms"] >= 0 and entry["duration_ms"] >= 0

    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json={**CHAT, "stream": True},
                      headers={"x-request-id": "stream-456"}) as streamed:
        list(streamed.iter_lines())
    entry = access_log(stack, "stream-456")
    assert entry["completion_tokens"] > 0 and entry["ttft_ms"] >= 0


def test_a_request_id_is_made_when_the_client_sends_none(stack: Stack) -> None:
    resp = httpx.get(f"{stack.url}/v1/models")
    assert re.fullmatch(r"[0-9a-f-]{36}", resp.headers["x-request-id"])


@pytest.fixture(scope="module")
def aliased() -> Iterator[Stack]:
    stack = start_stack({"MODEL_ALIASES": "gpt-4o-mini=phi3-lora, gpt-4=phi3-lora, orphan=not-served",
                         "PUBLIC_METRICS": "false"})
    try:
        yield stack
    finally:
        stop_stack(stack)


def test_aliases_let_unchanged_openai_code_work(aliased: Stack) -> None:
    client = openai.OpenAI(base_url=f"{aliased.url}/v1", api_key="unused", max_retries=0)
    assert sorted(m.id for m in client.models.list().data) == ["gpt-4", "gpt-4o-mini", "phi3-lora"]
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    assert completion.model == "gpt-4o-mini"  # the name the client asked for
    assert aliased.emulator_stats()["last_generate_body"]["model"] == "phi3-lora"  # what Shimmy serves
    chunks = list(client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}],
                                                 stream=True))
    assert {c.model for c in chunks} == {"gpt-4"}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="orphan", messages=[{"role": "user", "content": "Hi"}])
    client.close()


def test_public_metrics_can_be_turned_off(aliased: Stack) -> None:
    for path in ("/metrics", "/v1/metrics"):
        resp = httpx.get(f"{aliased.url}{path}")
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


def _envoy_workers(stack: Stack) -> int:
    info = httpx.get(f"http://127.0.0.1:{stack.admin_port}/server_info").json()
    return int(info["command_line_options"]["concurrency"])


def test_envoy_runs_one_worker_by_default(stack: Stack) -> None:
    assert _envoy_workers(stack) == 1


def test_several_processor_workers_share_the_load_and_envoy_workers_are_set() -> None:
    stack = start_stack({"EXTPROC_WORKERS": "2", "ENVOY_WORKERS": "2"})
    try:
        assert _envoy_workers(stack) == 2
        for _ in range(12):
            httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}).raise_for_status()
        clusters = httpx.get(f"http://127.0.0.1:{stack.admin_port}/clusters").text
        per_worker = [int(line.rsplit("::", 1)[1]) for line in clusters.splitlines()
                      if line.startswith("extproc::127.0.0.1:") and "::rq_total::" in line]
        assert len(per_worker) == 2 and all(n > 0 for n in per_worker), per_worker
        assert "[extproc-2]" in stack.output()
    finally:
        stop_stack(stack)
