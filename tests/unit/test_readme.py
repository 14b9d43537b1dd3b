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


def quickstart_blocks(language: str) -> list[str]:
    """The fenced blocks of the README's quickstart section (from its heading to the next `## ` heading)."""
    text = README.read_text()
    section = text[text.index(QUICKSTART):]
    section = section[: section.index("\n## ", len(QUICKSTART))]
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", section, re.S | re.M) if lang == language]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    started = start_stack()
    yield started
    stop_stack(started)
    started.log.unlink(missing_ok=True)


def test_the_quickstart_curl_calls_work_as_written(stack: Stack) -> None:
    [body] = quickstart_blocks("bash")
    assert "http://127.0.0.1:8000/" in body
    script = "set -euo pipefail\n" + body.replace("http://127.0.0.1:8000/", f"{stack.url}/")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert '{"status":"healthy","shimmy_status":"healthy"}' in out
    assert '"object":"list"' in out and '"id":"phi3-lora"' in out
    assert '"object":"chat.completion"' in out and '"finish_reason"' in out
    assert '"object":"chat.completion.chunk"' in out and out.rstrip().endswith("data: [DONE]")


def test_the_quickstart_sdk_snippet_works_as_written(stack: Stack) -> None:
    [body] = quickstart_blocks("python")
    assert 'base_url="http://127.0.0.1:8000/v1"' in body
    code = body.replace("http://127.0.0.1:8000/", f"{stack.url}/")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    reply, streamed = result.stdout.splitlines()[:2]
    assert reply.startswith("Hello! I am the Shimmy emulator.") and "completion_tokens=" in reply
    assert streamed.startswith("Hello! I am the Shimmy emulator.")
