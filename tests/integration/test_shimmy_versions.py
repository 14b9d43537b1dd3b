"""Issue 12 through the running stack, on the Shimmy the image pins (1.x): what its engine does to a long prompt.

The emulator's 1.x profile dies as the real one does when a prompt exceeds llama.cpp's batch (SIGABRT), so each
test here has a stack of its own: before the processor enforced the context, this one took the whole stack down.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from shimmy_spec.versions import PINNED, profile_for
from tests.integration.conftest import Stack, start_stack, stop_stack

LIMIT = profile_for(PINNED).prompt_limit or 0


@pytest.fixture
def own_stack() -> Iterator[Stack]:
    started = start_stack({"EMULATOR_VERSION": PINNED})
    yield started
    stop_stack(started)
    started.log.unlink(missing_ok=True)


def test_a_prompt_past_the_context_is_refused_and_shimmy_lives(own_stack: Stack) -> None:
    text = " ".join(["word"] * (2 * LIMIT))  # twice the context by any count
    body = {"model": "phi3-lora", "messages": [{"role": "user", "content": text}], "max_tokens": 16}
    try:
        reply = httpx.post(f"{own_stack.url}/v1/chat/completions", json=body, timeout=30)
    except httpx.TransportError as exc:  # Shimmy aborted (SIGABRT) and took the stack down
        pytest.fail(f"the stack went down with Shimmy ({exc!r}):\n{own_stack.output()[-1500:]}")
    shimmy_alive = own_stack.proc.poll() is None and own_stack.emulator_stats()["generate_requests"] == 0
    assert (reply.status_code, shimmy_alive) == (400, True), reply.text
    error = reply.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")
    assert error["message"].startswith(f"This model's maximum context length is {LIMIT} tokens.")
