"""Issue 2: chat completions, models and health through real Envoy, the real processor and the emulator."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import openai
import pytest

from tests.integration.conftest import Stack

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="the seed guide's calls need curl")


def curl(*args: str) -> tuple[int, dict]:
    """Run curl as the seed guide does; return (status, JSON body)."""
    out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", *args], capture_output=True, text=True, check=True)
    body, _, status = out.stdout.rpartition("\n")
    return int(status), json.loads(body)


# The seed guide's three calls, verbatim but for the deployment URL.


def test_seed_health_call(stack: Stack) -> None:
    status, body = curl("-X", "GET", f"{stack.url}/health")
    assert status == 200
    assert body == {"status": "healthy", "shimmy_status": "healthy"}


def test_seed_models_call(stack: Stack) -> None:
    status, body = curl("-X", "GET", f"{stack.url}/v1/models")
    assert status == 200
    assert body["object"] == "list"
    [model] = body["data"]
    assert model["id"] == "phi3-lora" and model["object"] == "model" and model["owned_by"] == "shimmy"
    assert isinstance(model["created"], int) and model["created"] > 1_600_000_000


def test_seed_chat_call(stack: Stack) -> None:
    status, body = curl(
        "-X", "POST", f"{stack.url}/v1/chat/completions",
        "-H", "Content-Type: application/json",
        "-d", """{
    "model": "phi3-lora",
    "messages": [
      {
        "role": "user",
        "content": "What is the capital of France?"
      }
    ],
    "max_tokens": 100,
    "temperature": 0.7
  }""",
    )  # fmt: skip
    assert status == 200
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "phi3-lora"
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_shimmy_receives_a_rendered_prompt_with_explicit_stream(stack: Stack) -> None:
    httpx.post(f"{stack.url}/v1/chat/completions", json={
        "model": "phi3-lora", "messages": [{"role": "system", "content": "Be brief"},
                                           {"role": "user", "content": "Hi"}], "max_tokens": 5,
    }).raise_for_status()
    sent = stack.emulator_stats()["last_generate_body"]
    assert sent["prompt"] == "<|system|>\nBe brief<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    # 1.x swallows a stream's failure, so a non-stream client's answer is asked for in one piece there
    assert sent["stream"] is not stack.shimmy_version().startswith("1.") and sent["max_tokens"] == 5
    assert "messages" not in sent


def test_completion_tokens_are_exact_and_length_is_truthful(versioned_stack: Stack) -> None:
    """2.x streams to us, one event per token: exact. 1.x answers in one piece, which the processor tokenizes with
    the fixed engine's own rule (the supervisor's TOKENIZER_GGUF=fixed): exact too, and the headers say so."""
    stack = versioned_stack
    stack.configure(reply="one two three four five six", repeat=False)
    full = httpx.post(f"{stack.url}/v1/chat/completions",
                      json={"model": "phi3-lora", "messages": [{"role": "user", "content": "x"}]}).json()
    assert full["choices"][0]["message"]["content"] == "one two three four five six"
    assert full["usage"]["completion_tokens"] == 6
    assert full["choices"][0]["finish_reason"] == "stop"
    cut = httpx.post(f"{stack.url}/v1/chat/completions",
                     json={"model": "phi3-lora", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]})
    assert cut.json()["choices"][0]["message"]["content"] == "one two three"
    assert cut.json()["usage"]["completion_tokens"] == 3
    assert cut.json()["choices"][0]["finish_reason"] == "length"
    assert cut.headers["x-gateway-prompt-tokens"] == cut.headers["x-gateway-completion-tokens"] == "exact"


def test_stop_sequences_are_enforced_by_the_gateway(stack: Stack) -> None:
    stack.configure(reply="alpha beta gamma delta")
    body = httpx.post(f"{stack.url}/v1/chat/completions", json={
        "model": "phi3-lora", "messages": [{"role": "user", "content": "x"}], "stop": ["a gam"],
    }).json()
    assert body["choices"][0]["message"]["content"] == "alpha bet"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_openai_sdk_chat_and_models(stack: Stack) -> None:
    # 1.x answers in one piece, counted with the fixed engine's own rule: 4 of its 5 tokens, so "length"
    stack.configure(reply="Lorem ipsum dolor sit amet")
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    models = client.models.list()
    assert [m.id for m in models.data] == ["phi3-lora"]
    completion = client.chat.completions.create(
        model="phi3-lora", messages=[{"role": "user", "content": "Hello"}], max_tokens=4
    )
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    client.close()


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        pytest.param({"model": "phi3-lora", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n", id="n"),
        pytest.param({"model": "phi3-lora", "messages": [{"role": "user", "content": "x"}],
                      "tools": [{"type": "function", "function": {"name": "no spaces"}}]}, 400,
                     "tools[0].function.name", id="tool-name"),
        pytest.param({"model": "phi3-lora", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages[0].content[0].type",
            id="image"),
        pytest.param({"model": "phi3-lora", "messages": []}, 400, "messages", id="empty-messages"),
        pytest.param({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model", id="model"),
    ],
)
def test_refused_requests_never_reach_shimmy(stack: Stack, payload: dict, status: int, param: str) -> None:
    before = stack.emulator_stats()["generate_requests"]
    resp = httpx.post(f"{stack.url}/v1/chat/completions", json=payload)
    assert resp.status_code == status
    assert resp.headers["content-type"] == "application/json"
    assert resp.json()["error"]["param"] == param
    assert stack.emulator_stats()["generate_requests"] == before


def test_openai_sdk_sees_typed_errors(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="phi3-lora", messages=[{"role": "user", "content": "x"}], temperature=3)
    assert bad.value.param == "temperature"
    client.close()


def test_non_stream_request_costs_two_ext_proc_messages_and_one_per_shimmy_chunk(stack: Stack) -> None:
    """Shimmy's body is streamed to the processor (so a non-stream answer can end early): 1 token, 1 chunk."""
    prefix = "http.gateway.ext_proc.shimmy."
    before = stack.envoy_stats(prefix)
    httpx.post(f"{stack.url}/v1/chat/completions",
               json={"model": "phi3-lora", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
               ).raise_for_status()
    after = stack.envoy_stats(prefix)
    # request body, response headers, then Shimmy's chunks: the token, [DONE], the end (Envoy may merge them)
    assert 3 <= after[prefix + "stream_msgs_sent"] - before.get(prefix + "stream_msgs_sent", 0) <= 5
    assert after[prefix + "streams_started"] - before.get(prefix + "streams_started", 0) == 1


def test_v1_health_is_the_same_answer(stack: Stack) -> None:
    resp = httpx.get(f"{stack.url}/v1/health")
    assert resp.status_code == 200 and resp.json() == {"status": "healthy", "shimmy_status": "healthy"}


def test_envoy_validates_the_shipped_and_rendered_config(tmp_path) -> None:
    from gateway.cli import envoy_binary

    rendered = tmp_path / "rendered.json"
    rendered.write_text(subprocess.run([sys.executable, "-m", "gateway.cli", "config", "--gateway-port", "18123"],
                                       capture_output=True, text=True, check=True).stdout)
    for path in ("envoy/gateway.yaml", str(rendered)):
        out = subprocess.run([envoy_binary(), "--mode", "validate", "-c", path], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "OK" in out.stdout + out.stderr
    assert json.loads(rendered.read_text())["static_resources"]["listeners"][0]["address"]["socket_address"][
        "port_value"] == 18123


def test_log_lines_carry_their_source(stack: Stack) -> None:
    httpx.get(f"{stack.url}/v1/models")
    lines = [ln for ln in stack.output().splitlines() if ln.strip()]
    assert any(ln.startswith("[shimmy] ") for ln in lines)
    assert any(ln.startswith("[extproc] ") for ln in lines)
    assert any(ln.startswith("[envoy] ") for ln in lines)
    assert all(ln.startswith(("[shimmy] ", "[extproc] ", "[envoy] ", "[supervisor] ")) for ln in lines)
