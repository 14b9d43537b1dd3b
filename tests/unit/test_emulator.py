"""The Shimmy emulator against the protocol spec (shimmy-api.md), byte for byte where the gateway depends on it."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web

import settings
from shimmy import axum, binary, llama_engine
from shimmy.emulator import EmulatorConfig, create_app
from shimmy.engine import tokenize
from shimmy.native import GENERATE
from shimmy.profiles import profile_for
from shimmy.runtime import BATCH_ASSERT, KV_FULL, Die, prompt_count
from shimmy_spec import versions
from tests.integration.conftest import die_with_parent, free_port

MODEL = "phi3-lora"
REPLY = "Hello! I am the Shimmy emulator. How can I help you today?"
PLAIN = "text/plain; charset=utf-8"
CORS = {
    "access-control-allow-origin": "*",
    "access-control-allow-methods": "GET, POST, OPTIONS",
    "access-control-allow-headers": "Content-Type, Authorization",
    "access-control-max-age": "86400",
}


@dataclass
class Emulator:
    client: httpx.AsyncClient
    config: EmulatorConfig
    url: str

    async def configure(self, **changes: Any) -> None:
        r = await self.client.put("/_emulator/config", json=changes)
        assert r.status_code == 200, r.text

    async def stats(self) -> dict[str, Any]:
        return (await self.client.get("/_emulator/stats")).json()  # type: ignore[no-any-return]

    async def generate(self, **body: Any) -> httpx.Response:
        return await self.client.post("/api/generate", json={"model": MODEL, **body})


@asynccontextmanager
async def serving(
    config: EmulatorConfig, client_timeout: float = 10, die: Die | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """The emulator in this process on a free loopback port, and a client for it. `die` records process deaths."""
    runner = web.AppRunner(create_app(config, die), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=client_timeout) as client:
            yield client, url
    finally:
        await runner.cleanup()


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    config = EmulatorConfig(version="2.5.0", models=[MODEL], reply=REPLY)
    async with serving(config) as (client, url):
        yield Emulator(client, config, url)


def events(body: str) -> list[str]:
    """SSE event data, joined per the SSE spec (one leading space stripped, lines joined with \\n)."""
    out = []
    for block in body.split("\n\n"):
        if block:
            out.append("\n".join(line.removeprefix("data:").removeprefix(" ") for line in block.split("\n")))
    return out


# --- engine and tokenizer ---------------------------------------------------------------------------------------


def test_tokens_look_like_a_bpe_tokenizer_and_rebuild_the_reply() -> None:
    text = "Hello! I am fine.\n\nBye_now 42  x\ty"
    tokens = [t.text for t in tokenize(text)]
    assert tokens[:8] == ["Hello", "!", " I", " am", " fine", ".", "\n\n", "Bye"]
    assert "".join(tokens) == text
    assert tokenize(" world")[0].sse == b"data:  world\n\n"
    assert tokenize("\n")[0].sse == b"data: \ndata: \n\n"


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        ("Hello", b"data: Hello\n\n"),
        (" world", b"data:  world\n\n"),
        ("\n", b"data: \ndata: \n\n"),
        ("!\n\n", b"data: !\ndata: \ndata: \n\n"),
        ("", b"data: \n\n"),
        ("[DONE]", b"data: [DONE]\n\n"),
    ],
)
def test_axum_sse_framing(data: str, wire: bytes) -> None:
    assert axum.sse_event(data) == wire


@pytest.mark.parametrize(
    ("body", "syntax", "message"),
    [
        ("", True, "EOF while parsing a value at line 1 column 0"),
        ('{"model":"m"', True, "EOF while parsing an object at line 1 column 12"),
        ('{"model":"m",}', True, "trailing comma at line 1 column 14"),
        ('{"model":"m"} x', True, "trailing characters at line 1 column 15"),
        ('{"prompt":"hi"}', False, "missing field `model` at line 1 column 15"),
        (
            '{"model":"m","stream":"true"}',
            False,
            'stream: invalid type: string "true", expected a boolean at line 1 column 28',
        ),
        (
            '{"model":"m","max_tokens":-1}',
            False,
            "max_tokens: invalid value: integer `-1`, expected usize at line 1 column 28",
        ),
        (
            '{"model":"m","max_tokens":100.0}',
            False,
            "max_tokens: invalid type: floating point `100.0`, expected usize at line 1 column 31",
        ),
        (
            '{"model":"m","messages":[{"role":"user","content":null}]}',
            False,
            "messages[0].content: invalid type: null, expected a string at line 1 column 54",
        ),
        (
            '{"model":"m","messages":[{"role":"user"}]}',
            False,
            "messages[0]: missing field `content` at line 1 column 40",
        ),
        ('{"model":"m","extra":{"a":[1,}}', True, "extra: expected value at line 1 column 30"),
        (
            '{"model":"m",\n"top_k":1.5}',
            False,
            "top_k: invalid type: floating point `1.5`, expected i32 at line 2 column 11",
        ),
    ],
)
def test_serde_errors_are_reproduced(body: str, syntax: bool, message: str) -> None:
    with pytest.raises(axum.Invalid) as info:
        axum.parse(body, GENERATE)
    assert info.value.syntax is syntax
    assert info.value.path_message(body) == message


def test_valid_bodies_parse_to_plain_json() -> None:
    body = '{"model":"m","stream":null,"max_tokens":0,"unknown":[1,{"x":null}],"temperature":1}'
    assert axum.parse(body, GENERATE) == json.loads(body)


def test_profiles() -> None:
    old, head = profile_for("v1.7.2"), profile_for("2.5.0")
    assert ("POST", "/v1/completions") not in old.routes and ("POST", "/v1/completions") in head.routes
    assert ("POST", "/v1/messages") not in old.routes and ("POST", "/v1/messages") in profile_for("1.7.4").routes
    assert not old.stream_error_event and head.stream_error_event
    assert old.duplicate_discovered and not head.duplicate_discovered
    assert profile_for("1.7.4").models_root and not head.models_root
    with pytest.raises(ValueError, match="not a Shimmy version"):
        profile_for("latest")


def test_binary_recipe(tmp_path: Any) -> None:
    assert binary.command("/opt/shimmy", 8080) == ["/opt/shimmy", "serve", "--bind", "127.0.0.1:8080"]
    assert binary.environment("/m/phi.gguf", "/m;/n") == {
        "SHIMMY_BASE_GGUF": "/m/phi.gguf",
        "SHIMMY_MODEL_PATHS": "/m;/n",
    }
    assert binary.environment("", "") == {}
    gguf = tmp_path / "phi.gguf"
    gguf.write_bytes(b"GGUF")
    assert binary.available(sys.executable, str(gguf), "")
    assert not binary.available(sys.executable, "", "")
    assert not binary.available("no-such-shimmy-binary", str(gguf), "")


# --- /api/generate ------------------------------------------------------------------------------------------------


async def test_generate_streams_when_stream_is_absent(emu: Emulator) -> None:
    r = await emu.generate(prompt="hi")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["transfer-encoding"] == "chunked"
    assert r.text.endswith("data: [DONE]\n\n")
    assert "".join(events(r.text)[:-1]) == REPLY


async def test_stream_wire_bytes(emu: Emulator) -> None:
    await emu.configure(reply="Hi there!\nBye")
    r = await emu.generate(prompt="hi", stream=True)
    assert r.content == b"data: Hi\n\ndata:  there\n\ndata: !\n\ndata: \ndata: \n\ndata: Bye\n\ndata: [DONE]\n\n"
    assert events(r.text) == ["Hi", " there", "!", "\n", "Bye", "[DONE]"]


async def test_stream_null_also_streams(emu: Emulator) -> None:
    r = await emu.generate(stream=None, max_tokens=1)
    assert r.content == b"data: Hello\n\ndata: [DONE]\n\n"


async def test_non_stream_body(emu: Emulator) -> None:
    r = await emu.generate(prompt="hi", stream=False)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.content == json.dumps({"response": REPLY}, separators=(",", ":")).encode()
    assert (await emu.generate(stream=False, max_tokens=2)).json() == {"response": "Hello!"}
    assert (await emu.generate(stream=False, max_tokens=0)).json() == {"response": ""}


async def test_repeat_fills_max_tokens(emu: Emulator) -> None:
    await emu.configure(reply="ab cd", repeat=True)
    assert (await emu.generate(stream=False, max_tokens=5)).json() == {"response": "ab cdab cdab"}


async def test_unknown_model_is_an_empty_404(emu: Emulator) -> None:
    r = await emu.client.post("/api/generate", json={"model": "gpt-4o", "prompt": "hi"})
    assert (r.status_code, r.content) == (404, b"")


@pytest.mark.parametrize(
    ("content", "content_type", "status", "text"),
    [
        (b'{"model":"phi3-lora"}', None, 415, "Expected request with `Content-Type: application/json`"),
        (b'{"model":"phi3-lora"}', "text/json", 415, "Expected request with `Content-Type: application/json`"),
        (
            b"{",
            "application/json",
            400,
            "Failed to parse the request body as JSON: EOF while parsing an object at line 1 column 1",
        ),
        (
            b'{"prompt":"Say hi"}',
            "application/json",
            422,
            "Failed to deserialize the JSON body into the target type: missing field `model` at line 1 column 19",
        ),
        (
            b'{"model":"phi3-lora","max_tokens":-5}',
            "application/json; charset=utf-8",
            422,
            "Failed to deserialize the JSON body into the target type: max_tokens: invalid value: integer `-5`, "
            "expected usize at line 1 column 36",
        ),
        (
            b'{"model":"phi3-lora","max_tokens":1.5}',
            "application/json",
            422,
            "Failed to deserialize the JSON body into the target type: max_tokens: invalid type: floating point "
            "`1.5`, expected usize at line 1 column 37",
        ),
        (
            b'{"model":"phi3-lora","stream":"true"}',
            "application/vnd.shimmy+json",
            422,
            'Failed to deserialize the JSON body into the target type: stream: invalid type: string "true", '
            "expected a boolean at line 1 column 36",
        ),
    ],
)
async def test_axum_rejections_are_plain_text(
    emu: Emulator, content: bytes, content_type: str | None, status: int, text: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = await emu.client.post("/api/generate", content=content, headers=headers)
    assert (r.status_code, r.headers["content-type"], r.text) == (status, PLAIN, text)


async def test_body_over_2_mib_is_413(emu: Emulator) -> None:
    body = json.dumps({"model": MODEL, "prompt": "x" * (2 * 1024 * 1024)}).encode()
    r = await emu.client.post("/api/generate", content=body, headers={"content-type": "application/json"})
    assert (r.status_code, r.text) == (413, "Failed to buffer the request body: length limit exceeded")


async def test_stream_error_is_reported_in_2x(emu: Emulator) -> None:
    await emu.configure(error_after=2)
    r = await emu.generate(stream=True)
    assert r.status_code == 200
    assert r.text == (
        "data: Hello\n\ndata: !\n\ndata: [ERROR] generation failed after 2 tokens (emulated)\n\ndata: [DONE]\n\n"
    )


async def test_stream_error_is_swallowed_in_1x(emu: Emulator) -> None:
    await emu.configure(version="1.7.2", error_after=2)
    r = await emu.generate(stream=True)
    assert r.text == "data: Hello\n\ndata: !\n\ndata: [DONE]\n\n"


async def test_non_stream_generation_failure_is_an_empty_502(emu: Emulator) -> None:
    await emu.configure(error_after=1)
    r = await emu.generate(stream=False)
    assert (r.status_code, r.content) == (502, b"")


async def test_fail_load_is_an_empty_502(emu: Emulator) -> None:
    await emu.configure(fail_load=True)
    for stream in (True, False):
        r = await emu.generate(stream=stream)
        assert (r.status_code, r.content) == (502, b"")
    chat = await emu.client.post("/v1/chat/completions", json=CHAT)
    assert (chat.status_code, chat.content) == (502, b"")


async def test_drop_after_truncates_the_stream(emu: Emulator) -> None:
    await emu.configure(drop_after=2)
    received = b""
    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
        async with emu.client.stream("POST", "/api/generate", json={"model": MODEL}) as r:
            assert r.status_code == 200
            async for chunk in r.aiter_raw():
                received += chunk
    assert received == b"data: Hello\n\ndata: !\n\n"


async def test_drop_after_closes_a_non_stream_request_without_response(emu: Emulator) -> None:
    await emu.configure(drop_after=1)
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        await emu.generate(stream=False)


async def test_carriage_return_token_aborts_the_stream_like_axum(emu: Emulator) -> None:
    await emu.configure(reply="a\r\nb")
    with pytest.raises(httpx.RemoteProtocolError):
        await emu.generate(stream=True)


async def test_hang_answers_nothing_until_the_client_leaves(emu: Emulator) -> None:
    await emu.configure(hang=True)
    with pytest.raises(httpx.ReadTimeout):
        await emu.client.post("/api/generate", json={"model": MODEL, "stream": False}, timeout=0.3)
    for _ in range(40):
        if (await emu.stats())["active_generations"] == 0:
            break
        await asyncio.sleep(0.05)
    assert (await emu.stats())["active_generations"] == 0


async def test_tokens_are_paced_and_flushed_one_by_one(emu: Emulator) -> None:
    await emu.configure(reply="one two three four", token_delay_ms=200)
    arrivals: list[float] = []
    buffer = b""
    start = time.monotonic()
    async with emu.client.stream("POST", "/api/generate", json={"model": MODEL, "stream": True}) as r:
        async for chunk in r.aiter_raw():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                arrivals.append(time.monotonic() - start)
                assert event
    assert len(arrivals) == 5  # four tokens and [DONE]
    gaps = [b - a for a, b in itertools.pairwise(arrivals[:4])]  # [DONE] follows the last token at once
    assert arrivals[0] >= 0.15
    assert all(0.15 <= gap <= 0.6 for gap in gaps), gaps


async def test_stream_burst_sends_every_token_at_once_after_the_generation(emu: Emulator) -> None:
    """A real 1.x stream can arrive in one burst (docs/shimmy-versions.md): one body chunk holds all the events."""
    await emu.configure(reply="one two three four", token_delay_ms=50, stream_burst=True)
    async with emu.client.stream("POST", "/api/generate", json={"model": MODEL, "stream": True}) as r:
        assert r.status_code == 200
        chunks = [chunk async for chunk in r.aiter_raw()]
    assert chunks == [b"data: one\n\ndata:  two\n\ndata:  three\n\ndata:  four\n\ndata: [DONE]\n\n"]


async def test_load_delay_once_in_2x_every_time_in_1x(emu: Emulator) -> None:
    async def elapsed() -> float:
        start = time.monotonic()
        assert (await emu.generate(stream=False, max_tokens=1)).status_code == 200
        return time.monotonic() - start

    await emu.configure(load_delay_ms=300)
    assert await elapsed() >= 0.28
    assert await elapsed() < 0.2
    await emu.configure(version="1.7.2")
    assert await elapsed() >= 0.28
    assert await elapsed() >= 0.28


@pytest.mark.parametrize(("version", "peak"), [("1.8.1", 8), ("2.5.0", 1)])
async def test_1x_runs_generations_side_by_side_2x_one_at_a_time(emu: Emulator, version: str, peak: int) -> None:
    await emu.configure(version=version, reply="a b c", token_delay_ms=30)
    results = await asyncio.gather(*(emu.generate(stream=False) for _ in range(8)))
    assert all(r.json() == {"response": "a b c"} for r in results)
    stats = await emu.stats()
    assert (stats["peak_generations"], stats["active_generations"], stats["queued_generations"]) == (peak, 0, 0)


async def test_messages_are_rendered_like_shimmy(emu: Emulator) -> None:
    messages = [{"role": "user", "content": "Say hi"}]
    await emu.generate(system="You are terse.", messages=messages, prompt="ignored", stream=False)
    expected = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nSay hi<|im_end|>\n"
    assert (await emu.stats())["last_prompt"] == expected


# --- listings, health, metrics -------------------------------------------------------------------------------------


async def test_health_body_per_version(emu: Emulator) -> None:
    r = await emu.client.get("/health")
    body = r.json()
    assert list(body) == sorted(body)
    assert body["version"] == "2.5.0"
    assert body["models"] == {"discovered": 1, "manual": 0, "total": 1}
    assert body["compatibility"] == {"cors": True, "openai": True}
    assert body["endpoints"]["generate"] == "/api/generate"
    assert abs(body["uptime_seconds"] - time.time()) < 5  # epoch seconds, Shimmy's quirk
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3}|\.\d{6}|\.\d{9})?\+00:00", body["timestamp"])

    await emu.configure(version="1.7.2")
    body = (await emu.client.get("/health")).json()
    assert (body["version"], body["models"]) == ("1.7.2", {"discovered": 1, "manual": 1, "total": 1})

    await emu.configure(version="1.2.0")
    assert "endpoints" not in (await emu.client.get("/health")).json()
    await emu.configure(version="1.0.0")
    assert (await emu.client.get("/health")).content == b'{"status":"ok"}'


async def test_v1_models_shape(emu: Emulator) -> None:
    await emu.configure(models=["zeta", MODEL, "zeta"])
    data = (await emu.client.get("/v1/models")).json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == [MODEL, "zeta"]
    entry = data["data"][0]
    assert list(entry) == ["id", "object", "created", "owned_by"]
    assert entry["owned_by"] == "shimmy" and abs(entry["created"] - time.time()) < 5

    await emu.configure(version="1.7.2")
    assert (await emu.client.get("/v1/models")).json()["data"][0]["created"] == 0
    await emu.configure(version="1.7.4")
    assert (await emu.client.get("/v1/models")).json()["data"][0]["root"] == MODEL


async def test_api_models_duplicates_in_1x(emu: Emulator) -> None:
    models = (await emu.client.get("/api/models")).json()["models"]
    assert [(m["name"], m["source"]) for m in models] == [(MODEL, "discovered")]
    await emu.configure(version="1.7.2")
    models = (await emu.client.get("/api/models")).json()["models"]
    assert [(m["name"], m["source"]) for m in models] == [(MODEL, "registered"), (MODEL, "discovered")]
    assert models[0] == {
        "name": MODEL,
        "size_bytes": None,
        "model_type": None,
        "parameter_count": None,
        "source": "registered",
    }
    assert models[1]["model_type"] == "Phi"


async def test_metrics_is_json(emu: Emulator) -> None:
    body = (await emu.client.get("/metrics")).json()
    assert body["service"] == "shimmy" and body["models"]["total_count"] == 1
    assert body["features"] == {"huggingface": True} and body["gpu_detected"] is False
    await emu.configure(version="1.7.2")
    body = (await emu.client.get("/metrics")).json()
    assert "gpu_detected" not in body and body["features"] == {"huggingface": True, "llama": True}


# --- Shimmy's own /v1/chat/completions ---------------------------------------------------------------------------


CHAT = {"model": MODEL, "messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}]}


async def test_chat_streams_by_default_with_shimmy_chunks(emu: Emulator) -> None:
    await emu.configure(reply="Hi there!")
    r = await emu.client.post("/v1/chat/completions", json=CHAT)
    assert r.headers["content-type"] == "text/event-stream"
    data = events(r.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and re.fullmatch(r"chatcmpl-[0-9a-f]{32}", chunks[0]["id"])
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"content": None, "role": "assistant"}
    assert deltas[1:-1] == [{"content": t, "role": None} for t in ("Hi", " there", "!")]
    assert deltas[-1] == {"content": None, "role": None}
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, None, "stop"]
    assert list(deltas[1]) == ["content", "role"]
    prompt = (await emu.stats())["last_prompt"]
    assert prompt == "<|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


async def test_chat_non_stream_when_the_default_is_openais(emu: Emulator) -> None:
    await emu.configure(openai_stream_default=False)
    r = await emu.client.post("/v1/chat/completions", json=CHAT)
    body = r.json()
    assert list(body) == ["id", "object", "created", "model", "choices", "usage"]
    assert body["object"] == "chat.completion"
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": REPLY}, "finish_reason": "stop"}
    ]
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert (await emu.client.post("/v1/chat/completions", json={**CHAT, "stream": True})).text.endswith("[DONE]\n\n")


async def test_chat_stream_error_looks_like_a_normal_end(emu: Emulator) -> None:
    await emu.configure(error_after=1)
    data = events((await emu.client.post("/v1/chat/completions", json={**CHAT, "stream": True})).text)
    assert len(data) == 4 and json.loads(data[2])["choices"][0]["finish_reason"] == "stop" and data[3] == "[DONE]"
    r = await emu.client.post("/v1/chat/completions", json={**CHAT, "stream": False})
    assert (r.status_code, r.content) == (502, b"")


async def test_chat_errors(emu: Emulator) -> None:
    r = await emu.client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o"})
    assert r.status_code == 404
    assert r.json() == {
        "error": {
            "code": "model_not_found",
            "message": "Model 'gpt-4o' not found. Available models: [\"phi3-lora\"]",
            "param": "model",
            "type": "invalid_request_error",
        }
    }
    r = await emu.client.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_messages")
    r = await emu.client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 0})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_max_tokens")
    r = await emu.client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": None}]}
    )
    assert r.status_code == 422 and "untagged enum MessageContent" in r.text

    await emu.configure(version="1.7.2", openai_stream_default=False)
    r = await emu.client.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 200  # 1.x renders an empty prompt and generates
    r = await emu.client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": None}]}
    )
    assert r.status_code == 422 and "messages[0].content: invalid type: null, expected a string" in r.text


async def test_chat_double_framing_before_1_4_2(emu: Emulator) -> None:
    await emu.configure(version="1.4.1", reply="Hi")
    text = (await emu.client.post("/v1/chat/completions", json=CHAT)).text
    assert text.startswith('data: data: {"id":"chatcmpl-')
    assert text.endswith("data: data: [DONE]\ndata: \ndata: \n\n")


async def test_other_compat_routes_exist_only_where_shimmy_has_them(emu: Emulator) -> None:
    r = await emu.client.post("/v1/completions", json={"model": MODEL, "prompt": "two words", "max_tokens": 2})
    assert r.json()["choices"][0]["text"] == "Hello!" and r.json()["usage"]["prompt_tokens"] == 2
    assert (await emu.client.get("/api/tags")).json()["models"][0]["name"] == MODEL
    messages = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    assert (await emu.client.post("/v1/messages", json=messages)).json()["content"] == [
        {"type": "text", "text": "Hello"}
    ]
    await emu.configure(version="1.7.2")
    for method, path in (("POST", "/v1/completions"), ("GET", "/api/tags"), ("POST", "/v1/messages")):
        r = await emu.client.request(method, path)
        assert (r.status_code, r.content) == (404, b"")


# --- routing, CORS, stubs ----------------------------------------------------------------------------------------


async def test_unknown_paths_and_wrong_methods(emu: Emulator) -> None:
    for path in ("/v1/chat-completion", "/api/health", "/v1/models/phi3-lora", "/health/"):
        r = await emu.client.get(path)
        assert (r.status_code, r.content) == (404, b""), path
    r = await emu.client.get("/api/generate")
    assert (r.status_code, r.content, r.headers["allow"]) == (405, b"", "POST")
    r = await emu.client.post("/health")
    assert (r.status_code, r.headers["allow"]) == (405, "GET,HEAD")
    r = await emu.client.head("/health")
    assert (r.status_code, r.content) == (200, b"")


async def test_cors_headers_and_options(emu: Emulator) -> None:
    for method, path in (
        ("OPTIONS", "/api/generate"),
        ("OPTIONS", "/no/such/path"),
        ("GET", "/nope"),
        ("GET", "/health"),
    ):
        r = await emu.client.request(method, path)
        assert {k: r.headers.get(k) for k in CORS} == CORS, (method, path)
    assert (await emu.client.options("/api/generate")).status_code == 200
    stream = await emu.generate(max_tokens=1)
    assert {k: stream.headers.get(k) for k in CORS} == CORS

    await emu.configure(version="1.3.3")  # before the CORS layer
    r = await emu.client.options("/api/generate")
    assert (r.status_code, r.headers["allow"]) == (405, "POST")
    assert "access-control-allow-origin" not in r.headers


async def test_stub_routes(emu: Emulator) -> None:
    r = await emu.client.post("/api/models/my%20model/load")
    assert r.content == b'{"message":"Model my model load requested","status":"pending"}'
    assert (await emu.client.get("/api/models/x/status")).json() == {"loaded": False, "model": "x", "status": "unknown"}
    assert (await emu.client.get("/api/tools")).json() == {"tools": []}
    assert (await emu.client.post("/api/tools/calc/execute", json={})).json() == {"error": "Tool calc not available"}
    assert (await emu.client.post("/api/tools/calc/execute")).status_code == 415
    discovered = (await emu.client.post("/api/models/discover")).json()
    assert discovered["discovered"] == 1 and discovered["models"][0]["source"] == "discovered"
    assert set((await emu.client.get("/diag")).json()) == {"os", "cores", "mem_total_mb"}


async def test_websocket_generate(emu: Emulator) -> None:
    await emu.configure(reply="Hi there")
    async with aiohttp.ClientSession() as session, session.ws_connect(emu.url + "/ws/generate") as ws:
        await ws.send_str(json.dumps({"model": MODEL, "stream": False}))
        frames = [msg.data async for msg in ws]
    assert frames == ["Hi", " there", '{"done":true}']
    async with aiohttp.ClientSession() as session, session.ws_connect(emu.url + "/ws/generate") as ws:
        await ws.send_str(json.dumps({"model": "nope"}))
        assert [msg.data async for msg in ws] == ['{"error":"model not found"}']
    r = await emu.client.get("/ws/generate")
    assert (r.status_code, r.text) == (400, "Connection header did not include 'upgrade'")


# --- the emulator's controls ---------------------------------------------------------------------------------------


async def test_config_controls(emu: Emulator) -> None:
    config = (await emu.client.get("/_emulator/config")).json()
    assert set(config) == {
        "version",
        "models",
        "reply",
        "token_delay_ms",
        "load_delay_ms",
        "repeat",
        "openai_stream_default",
        "fail_load",
        "error_after",
        "drop_after",
        "hang",
        "stall_after",
        "engine",
        "gguf",
        "max_generations",
        "generation_memory_mib",
        "replies",
        "stream_burst",
    }
    assert config["engine"] == "fixed"
    r = await emu.client.put("/_emulator/config", json={"reply": "x", "bogus": 1})
    assert r.status_code == 400 and "bogus" in r.json()["error"]
    bads = ({"token_delay_ms": -1}, {"version": "latest"}, {"models": []}, {"error_after": 1.5}, {"hang": "yes"},
            {"engine": "gpt"}, {"max_generations": 0}, {"replies": "x"}, {"generation_memory_mib": -1})
    for bad in bads:
        assert (await emu.client.put("/_emulator/config", json=bad)).status_code == 400, bad
    assert (await emu.client.put("/_emulator/config", content=b"{")).status_code == 400
    assert (await emu.client.get("/_emulator/config")).json() == config  # nothing changed

    await emu.configure(reply="Changed", version="1.7.2")
    assert emu.config.reply == "Changed"  # the caller's config object is the live one
    assert (await emu.generate(stream=False)).json() == {"response": "Changed"}
    emu.config.reply = "Direct"
    assert (await emu.generate(stream=False)).json() == {"response": "Direct"}

    reset = await emu.client.post("/_emulator/reset")
    assert reset.json() == config
    assert (await emu.generate(stream=False)).json() == {"response": REPLY}


async def test_stats_show_what_reached_shimmy(emu: Emulator) -> None:
    assert await emu.stats() == {
        "generate_requests": 0,
        "last_generate_body": None,
        "last_generate_headers": None,
        "last_prompt": None,
        "last_prompt_tokens": None,
        "last_prompt_count": None,
        "active_generations": 0,
        "abandoned_active": 0,
        "queued_generations": 0,
        "peak_generations": 0,
        "abandoned_generations": 0,
        "memory_mib": 0.0,
        "chat_requests": 0,
    }
    await emu.generate(prompt="p", stream=False, max_tokens=3, stop=["x"])
    await emu.client.post("/v1/chat/completions", json={**CHAT, "stream": False})
    stats = await emu.stats()
    assert stats["generate_requests"] == 1 and stats["chat_requests"] == 1
    assert stats["last_generate_headers"]["Content-Type"] == "application/json"
    assert stats["last_generate_body"] == {
        "model": MODEL,
        "prompt": "p",
        "stream": False,
        "max_tokens": 3,
        "stop": ["x"],
    }
    await emu.client.post("/api/generate", json={"model": MODEL, "max_tokens": -1})
    assert (await emu.stats())["last_generate_body"] == {"model": MODEL, "max_tokens": -1}
    await emu.client.post("/api/generate", content=b"{", headers={"content-type": "application/json"})
    stats = await emu.stats()
    assert stats["generate_requests"] == 3 and stats["last_generate_body"] is None
    await emu.client.post("/_emulator/reset")
    assert (await emu.stats())["generate_requests"] == 0


# --- the console script ------------------------------------------------------------------------------------------


@pytest.mark.stack
def test_console_script_serves_and_stops_on_sigterm() -> None:
    script = shutil.which("shimmy-emulator", path=os.path.dirname(sys.executable))
    assert script is not None
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMULATOR_", "SHIMMY_", "MODEL_NAME"))}
    proc = subprocess.Popen(
        [script, "--shimmy-port", str(port), "--emulator-version", "1.7.2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=die_with_parent,
    )
    try:
        deadline = time.monotonic() + 10
        health = None
        with httpx.Client(timeout=1) as client:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    health = client.get(f"http://127.0.0.1:{port}/health").json()
                    break
                except httpx.TransportError:
                    time.sleep(0.05)
        assert health is not None and health["version"] == "1.7.2"
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=5)
        assert proc.returncode == 0
        assert time.monotonic() - start < 3
        assert f"Shimmy emulator 1.7.2 listening on http://127.0.0.1:{port} (model phi3-lora)" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# --- the backend profile per version (shimmy_spec/versions.py) and the pin -----------------------------------------


def test_the_emulator_defaults_to_the_pinned_shimmy() -> None:
    defaults = {s.env: s.default for s in settings.SETTINGS}
    assert defaults["EMULATOR_VERSION"] == defaults["SHIMMY_VERSION"] == binary.SHIMMY_VERSION == versions.PINNED
    assert EmulatorConfig().version == versions.PINNED


def test_backend_profiles_per_version() -> None:
    old, pinned, two = versions.profile_for("1.7.4"), versions.profile_for("v1.8.1"), versions.profile_for("2.5.0")
    assert (old.context_tokens, old.prompt_batch_tokens, old.prompt_limit) == (4096, 2048, 2048)
    assert (pinned.context_tokens, pinned.prompt_batch_tokens, pinned.prompt_limit) == (4096, 4096, 4096)
    assert (two.context_tokens, two.prompt_batch_tokens, two.prompt_limit) == (None, None, None)
    for one in (old, pinned):
        assert one.line == "1.x" and one.runs_without_gpu and one.model_load_per_request and one.deterministic
        assert not one.serialized and not one.stream_errors_reported and one.prompt_overflow == "abort"
        assert one.sampling == {"max_tokens"} and not one.seeded
    assert two.line == "2.x" and two.serialized and two.stream_errors_reported and not two.runs_without_gpu
    assert two.sampling == {"max_tokens", "temperature", "top_p"} and two.seeded and not two.deterministic
    assert all(p.nonstream_failure_502 and p.parses_special_tokens for p in (old, pinned, two))
    assert (pinned.output_room(4090), pinned.output_room(5000), two.output_room(10)) == (6, 0, None)
    assert versions.parse_version("shimmy 1.8.1") == (1, 8, 1)
    with pytest.raises(ValueError, match="not a Shimmy version"):
        versions.profile_for("latest")
    assert profile_for("1.8.1").backend == pinned and not profile_for("1.8.1").caches_model


def _fake_binary(tmp_path: Any, body: str) -> str:
    path = tmp_path / "shimmy"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_binary_version_asks_the_binary(tmp_path: Any) -> None:
    assert binary.version(_fake_binary(tmp_path, 'echo "shimmy 1.8.1"')) == "1.8.1"
    with pytest.raises(ValueError, match="printed 'Shimmy rocks'"):
        binary.version(_fake_binary(tmp_path, 'echo "Shimmy rocks"'))
    with pytest.raises(ValueError, match="exited 3: boom"):
        binary.version(_fake_binary(tmp_path, "echo boom >&2; exit 3"))
    with pytest.raises(ValueError, match="could not run"):
        binary.version(str(tmp_path / "absent"))


# --- 1.x fidelity: the prompt batch, the context, memory; 2.x: one generation at a time --------------------------


@dataclass
class Deaths:
    """What `die` would have done to the emulator's process: the signals, in order, and the last words."""

    signals: list[int]
    words: list[str]

    def __call__(self, sig: int, words: str) -> None:
        self.signals.append(sig)
        self.words.append(words)


@pytest.fixture
async def mortal() -> AsyncIterator[tuple[Emulator, Deaths]]:
    deaths = Deaths([], [])
    config = EmulatorConfig(version="1.8.1", models=[MODEL], reply=REPLY)
    async with serving(config, die=deaths) as (client, url):
        yield Emulator(client, config, url), deaths


def _prompt(tokens: int) -> str:
    """A prompt the fixed engine counts as `tokens` tokens, BOS included."""
    prompt = " ".join(["w"] * (tokens - 1))
    assert prompt_count(prompt) == tokens
    return prompt


@pytest.mark.parametrize(
    ("version", "tokens", "dies"),
    [("1.7.4", 2048, False), ("1.7.4", 2049, True), ("1.8.1", 4095, False), ("1.8.1", 4097, True),
     ("2.5.0", 9000, False)],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_a_prompt_past_the_1x_batch_aborts_the_process(
    mortal: tuple[Emulator, Deaths], version: str, tokens: int, dies: bool, stream: bool
) -> None:
    emu, deaths = mortal
    await emu.configure(version=version, max_generations=None)
    if dies:
        with pytest.raises(httpx.TransportError):
            await emu.generate(prompt=_prompt(tokens), stream=stream, max_tokens=1)
        assert (deaths.signals, deaths.words) == ([signal.SIGABRT], [BATCH_ASSERT])
    else:
        assert (await emu.generate(prompt=_prompt(tokens), stream=stream, max_tokens=1)).status_code == 200
        assert deaths.signals == []
    assert (await emu.stats())["last_prompt_count"] == tokens


async def test_a_full_1x_context_fails_the_generation(mortal: tuple[Emulator, Deaths]) -> None:
    """Token k is decoded at position prompt + k - 1: the one that reaches 4096 fails (502, or a quiet stream end)."""
    emu, _ = mortal
    await emu.configure(reply="a b c d", repeat=True)
    prompt = _prompt(4090)  # room for 7 tokens: the 7th is emitted, then its decode fails
    assert (await emu.generate(prompt=prompt, stream=False, max_tokens=6)).json() == {"response": "a b c da b"}
    r = await emu.generate(prompt=prompt, stream=False, max_tokens=7)
    assert (r.status_code, r.content) == (502, b"")
    r = await emu.generate(prompt=prompt, stream=True, max_tokens=100)
    assert r.text == "".join(f"data: {t}\n\n" for t in ["a", " b", " c", " d", "a", " b", " c"]) + "data: [DONE]\n\n"
    await emu.configure(version="2.5.0")
    r = await emu.generate(prompt=prompt, stream=True, max_tokens=100)
    assert KV_FULL not in r.text and r.text.count("data: ") == 101


async def test_1x_generations_hold_memory_and_one_too_many_is_oom_killed(mortal: tuple[Emulator, Deaths]) -> None:
    emu, deaths = mortal
    await emu.configure(reply="a b c d e f", token_delay_ms=50, max_generations=2)
    async with (
        emu.client.stream("POST", "/api/generate", json={"model": MODEL, "stream": True}) as first,
        emu.client.stream("POST", "/api/generate", json={"model": MODEL, "stream": True}) as second,
    ):
        await anext(first.aiter_raw())
        await anext(second.aiter_raw())
        stats = await emu.stats()
        assert (stats["active_generations"], stats["memory_mib"]) == (2, 3072.0)
        with pytest.raises(httpx.TransportError):
            await emu.generate(stream=False)
        assert deaths.signals == [signal.SIGKILL]
    for _ in range(200):  # the two generations run on without their clients
        if (await emu.stats())["active_generations"] == 0:
            break
        await asyncio.sleep(0.01)
    assert (await emu.stats())["memory_mib"] == 0.0


async def test_2x_queues_generations_behind_the_one_model(emu: Emulator) -> None:
    await emu.configure(reply="a b c", token_delay_ms=50)
    async with emu.client.stream("POST", "/api/generate", json={"model": MODEL, "stream": True}) as first:
        await anext(first.aiter_raw())
        waiting = asyncio.create_task(emu.generate(stream=False))
        for _ in range(100):
            if (await emu.stats())["queued_generations"] == 1:
                break
            await asyncio.sleep(0.01)
        stats = await emu.stats()
        assert (stats["queued_generations"], stats["active_generations"], stats["memory_mib"]) == (1, 1, 1536.0)
    assert (await waiting).json() == {"response": "a b c"}
    assert (await emu.stats())["peak_generations"] == 1


async def test_abandoned_generations_run_on_and_are_counted(emu: Emulator) -> None:
    await emu.configure(reply="a b c d e f g h", token_delay_ms=20)
    async with emu.client.stream("POST", "/api/generate", json={"model": MODEL, "stream": True}) as r:
        await anext(r.aiter_raw())
    for _ in range(200):  # the generation goes on without its client, then ends
        stats = await emu.stats()
        if stats["active_generations"] == 0:
            break
        await asyncio.sleep(0.01)
    assert (stats["active_generations"], stats["abandoned_generations"], stats["abandoned_active"]) == (0, 1, 0)
    assert (await emu.generate(stream=False)).status_code == 200
    assert (await emu.stats())["abandoned_generations"] == 1


async def test_the_gauges_survive_a_reset_while_generations_run(emu: Emulator) -> None:
    await emu.configure(version="1.8.1", reply="a b c d e f g h", token_delay_ms=20)
    async with emu.client.stream("POST", "/api/generate", json={"model": MODEL, "stream": True}) as r:
        await anext(r.aiter_raw())
        assert (await emu.client.post("/_emulator/reset")).status_code == 200
        assert (await emu.stats())["active_generations"] == 1
    for _ in range(200):
        stats = await emu.stats()
        if stats["active_generations"] == 0:
            break
        await asyncio.sleep(0.01)
    assert (stats["active_generations"], stats["abandoned_active"], stats["memory_mib"]) == (0, 0, 0.0)


async def test_queued_replies_are_used_one_per_generation(emu: Emulator) -> None:
    await emu.configure(replies=['{"name": "get_weather"}', "second"])
    assert (await emu.generate(stream=False)).json() == {"response": '{"name": "get_weather"}'}
    r = await emu.client.post("/v1/chat/completions", json={**CHAT, "stream": False})
    assert r.json()["choices"][0]["message"]["content"] == "second"
    assert (await emu.generate(stream=False)).json() == {"response": REPLY}
    assert (await emu.client.get("/_emulator/config")).json()["replies"] == []


def _start_emulator(version: str, port: int) -> subprocess.Popen[str]:
    script = shutil.which("shimmy-emulator", path=os.path.dirname(sys.executable))
    assert script is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMULATOR_", "SHIMMY_", "MODEL_NAME"))}
    env["EMULATOR_ENGINE"] = "fixed"
    proc = subprocess.Popen(
        [script, "--shimmy-port", str(port), "--emulator-version", version],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=die_with_parent,
    )
    deadline = time.monotonic() + 10
    with httpx.Client(timeout=1) as client:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                client.get(f"http://127.0.0.1:{port}/health")
                return proc
            except httpx.TransportError:
                time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the emulator did not start: {proc.communicate()[1]}")


@pytest.mark.stack
@pytest.mark.parametrize(
    ("config", "body", "sig", "last_words"),
    [
        ({}, {"prompt": " ".join(["w"] * 5000)}, signal.SIGABRT, BATCH_ASSERT),
        ({"max_generations": 1, "hang": True}, {}, signal.SIGKILL, None),
    ],
    ids=["batch-assert", "oom-kill"],
)
def test_the_emulator_process_dies_as_the_real_one(
    config: dict[str, Any], body: dict[str, Any], sig: int, last_words: str | None
) -> None:
    """What the supervisor sees: the process gone by SIGABRT (llama.cpp's assert) or SIGKILL (the OOM killer)."""
    port = free_port()
    proc = _start_emulator("1.8.1", port)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=5) as client:
            assert client.put(f"{url}/_emulator/config", json=config).status_code == 200
            first = None
            if config.get("hang"):  # one generation takes the memory; the next one is one too many
                first = subprocess.Popen(
                    [sys.executable, "-c", f"import httpx; httpx.post('{url}/api/generate', "
                     f"json={{'model': '{MODEL}', 'stream': False}}, timeout=30)"],
                    stderr=subprocess.DEVNULL, preexec_fn=die_with_parent,
                )
                for _ in range(200):
                    if client.get(f"{url}/_emulator/stats").json()["active_generations"] == 1:
                        break
                    time.sleep(0.02)
            with pytest.raises(httpx.TransportError):
                client.post(f"{url}/api/generate", json={"model": MODEL, "stream": False, **body})
        _, stderr = proc.communicate(timeout=5)
        assert proc.returncode == -sig
        if last_words:
            assert last_words in stderr
        if first is not None:
            first.kill()
            first.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.stack
@pytest.mark.skipif(not llama_engine.engine_available()[0], reason="no llm extra (llama.cpp and its model)")
async def test_1x_decodes_greedily_whatever_the_sampling_fields_say() -> None:
    """1.x's sampler chain ends in greedy(): temperature and seed change nothing. 2.x samples (seed 42 default)."""
    prompt = "<start_of_turn>user\nWrite a line about the sea.<end_of_turn>\n<start_of_turn>model\n"
    config = EmulatorConfig(version="1.8.1", models=[MODEL], engine="llama")
    async with serving(config, client_timeout=60) as (client, _):

        async def answer(seed: int) -> str:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 1.5, "seed": seed}
            r = await client.post("/api/generate", json={**body, "stream": False})
            return r.json()["response"]  # type: ignore[no-any-return]

        assert await answer(1) == await answer(2)
        await client.put("/_emulator/config", json={"version": "2.5.0"})
        assert await answer(1) != await answer(2)
