"""The README: its settings table is the documentation of `settings/__init__.py` (they must agree), and its
quickstart works as written against a live stack (`shimmy-gateway up` with the emulator, on free ports)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from settings import SETTINGS
from shimmy import llama_engine
from tests.integration.conftest import Stack, start_stack, stop_stack

README = Path(__file__).resolve().parents[2] / "README.md"


def test_settings_table_matches_the_code() -> None:
    rows = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1].startswith("`--"):
            env, flag, default = (c.strip("`") for c in cells[:3])
            rows[env] = (flag, default, cells[3])
    assert rows == {s.env: (s.flag, s.default, s.help) for s in SETTINGS}


# ------------------------------------------------------------------------------------ the quickstart, run as written


QUICKSTART = "## Quickstart, per client API"
CHAT = "### OpenAI chat completions"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# Every curl of a snippet fails on an HTTP error status, so a 4xx or 5xx answer cannot pass for a working call.
STRICT_CURL = 'curl() { command curl --fail-with-body "$@"; }\nset -euo pipefail\n'


def section(text: str, heading: str) -> str:
    """From `heading` to the next heading of the same level or higher."""
    level = heading.split(" ")[0]
    start = text.index(heading + "\n")
    ends = [m.start() for m in re.finditer(rf"^#{{1,{len(level)}}} ", text[start + len(heading):], re.M)]
    return text[start: start + len(heading) + ends[0]] if ends else text[start:]


def quickstart_blocks(language: str, heading: str = QUICKSTART) -> list[str]:
    text = section(README.read_text(), heading)
    return [body for lang, body in FENCE.findall(text) if lang == language]


def live(body: str, stack: Stack) -> str:
    assert "http://127.0.0.1:8000/" in body, body
    return body.replace("http://127.0.0.1:8000/", f"{stack.url}/")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    started = start_stack()
    yield started
    stop_stack(started)
    started.log.unlink(missing_ok=True)


@pytest.mark.stack
def test_every_quickstart_snippet_runs_as_written(stack: Stack) -> None:
    """Each client API's snippets, curl and SDK, exit 0 against the live stack (curl failing on HTTP errors)."""
    assert quickstart_blocks("bash") and quickstart_blocks("python")
    for body in quickstart_blocks("bash"):
        result = subprocess.run(["bash", "-c", STRICT_CURL + live(body, stack)], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{body}"
    for body in quickstart_blocks("python"):
        result = subprocess.run([sys.executable, "-c", live(body, stack)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{result.stderr}\n{body}"


@pytest.mark.stack
def test_the_chat_quickstart_shows_what_it_says(stack: Stack) -> None:
    [curl_calls] = quickstart_blocks("bash", CHAT)
    result = subprocess.run(["bash", "-c", STRICT_CURL + live(curl_calls, stack)], capture_output=True, text=True,
                            timeout=60)
    out = result.stdout
    assert '{"status":"healthy","shimmy_status":"healthy"}' in out
    assert '"object":"list"' in out and '"id":"phi3-lora"' in out
    assert '"object":"chat.completion"' in out and '"finish_reason"' in out
    assert '"object":"chat.completion.chunk"' in out and out.rstrip().endswith("data: [DONE]")

    [sdk] = quickstart_blocks("python", CHAT)
    assert 'base_url="http://127.0.0.1:8000/v1"' in sdk
    result = subprocess.run([sys.executable, "-c", live(sdk, stack)], capture_output=True, text=True, timeout=60)
    reply, streamed = result.stdout.splitlines()[:2]
    assert reply.startswith("Hello! I am the Shimmy emulator.") and "completion_tokens=" in reply
    assert streamed.startswith("Hello! I am the Shimmy emulator.")


# ------------------------------------------------------------------------------- the same, on what `make run` starts


@pytest.fixture(scope="module")
def default_stack() -> Iterator[Stack]:
    """`make run`'s stack: the default engine, llama.cpp with the packaged model when the llm extra is installed."""
    if not llama_engine.engine_available()[0]:
        pytest.skip("the llm extra is not installed: make run serves the fixed reply, tested above")
    started = start_stack({"EMULATOR_ENGINE": "auto"}, timeout=120)
    yield started
    stop_stack(started)
    started.log.unlink(missing_ok=True)


@pytest.mark.stack
@pytest.mark.timeout(600)  # a real model on 2 shared cores: 256 tokens per answer at 10 to 60 tokens/s
def test_the_chat_quickstart_runs_on_the_default_engine(default_stack: Stack) -> None:
    """What `make run` gives: a real model answers the chat snippets, streams included, and the emulator never dies
    (a llama.cpp built for another CPU died of signal 11 at the first generation, while the fixed engine passed)."""
    [curl_calls] = quickstart_blocks("bash", CHAT)
    result = subprocess.run(["bash", "-c", STRICT_CURL + live(curl_calls, default_stack)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert '"object":"chat.completion"' in result.stdout and result.stdout.rstrip().endswith("data: [DONE]")
    [sdk] = quickstart_blocks("python", CHAT)
    result = subprocess.run([sys.executable, "-c", live(sdk, default_stack)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    reply, _, streamed = result.stdout.partition("completion_tokens=")  # the model's text may hold line breaks
    assert reply.strip() and streamed.partition("\n")[2].strip(), result.stdout  # the reply, then the stream
    assert "Shimmy emulator" not in result.stdout, result.stdout  # the model's words, not the fixed reply
    output = default_stack.output()
    assert "engine llama.cpp" in output and "[supervisor] shimmy" not in output, output
