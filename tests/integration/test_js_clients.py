"""The Vercel AI SDK (`ai` 6 with `@ai-sdk/openai-compatible`, `@ai-sdk/openai`'s Responses model and
`@ai-sdk/anthropic`) against the running stack: generateText and streamText, with and without a tool.

Pinned in tests/js/package.json and package-lock.json, installed with `npm ci`; each case runs tests/js/clients.mjs
in Node, which prints what the SDK made of the gateway's answer. `ai` 7 needs Node 22; 6 runs on Node 18 and 20.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import Stack

JS = Path(__file__).resolve().parents[1] / "js"
WEATHER_CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


@pytest.fixture(scope="module")
def node() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed: the AI SDK cases need Node 18 or newer")
    if not (JS / "node_modules" / ".package-lock.json").is_file():
        subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=JS, check=True, timeout=300)
    return node


def run(node: str, stack: Stack, provider: str, mode: str, kind: str) -> dict:
    done = subprocess.run([node, "clients.mjs", provider, mode, kind, stack.url], cwd=JS, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["generate", "stream"])
@pytest.mark.parametrize("provider", ["compatible", "responses", "anthropic"])
def test_text(node: str, stack: Stack, provider: str, mode: str) -> None:
    stack.configure(reply="It is sunny in Paris.")
    result = run(node, stack, provider, mode, "text")
    assert result["text"] == "It is sunny in Paris."
    assert result["finishReason"] == "stop" and result["toolCalls"] == []
    assert result["usage"]["outputTokens"] > 0 and result["usage"]["inputTokens"] > 0


@pytest.mark.parametrize("mode", ["generate", "stream"])
@pytest.mark.parametrize("provider", ["compatible", "responses", "anthropic"])
def test_tool_call(node: str, stack: Stack, provider: str, mode: str) -> None:
    stack.configure(reply=WEATHER_CALL)
    result = run(node, stack, provider, mode, "tool")
    assert result["toolCalls"] == [{"name": "get_weather", "input": {"city": "Paris"}}]
    assert result["finishReason"] == "tool-calls" and result["text"] == ""
