"""The API adapters and the generation core, called the way the processor calls them (`GenerationProcessor`)."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from extproc.apis.chat import ChatCompletions
from extproc.generation import Api, Exchange, start
from extproc.tokens import ESTIMATE, PromptCounter


def start_chat(
    body: bytes,
    overrides: Mapping[str, str],
    known_models: Collection[str] | None = None,
    timeout: float = 600.0,
    aliases: Mapping[str, str] | None = None,
    *,
    counter: PromptCounter = ESTIMATE,
) -> tuple[bytes, Exchange]:
    request, api = ChatCompletions.parse(body)
    return start(request, api, overrides, known_models, timeout, aliases, counter=counter)


def start_api(api: type[Api], body: bytes, known_models: Collection[str] | None = None) -> tuple[bytes, Exchange]:
    """Any adapter's request through `start`, with no template overrides, aliases or deadline pressure."""
    request, adapter = api.parse(body)
    return start(request, adapter, {}, known_models)


def shimmy_stream(*tokens: str, done: bool = True) -> bytes:
    """Shimmy's wire bytes for these tokens (axum framing: one `data:` line per line of the token)."""
    out = "".join("".join(f"data: {line}\n" for line in t.split("\n")) + "\n" for t in tokens)
    return (out + ("data: [DONE]\n\n" if done else "")).encode()
