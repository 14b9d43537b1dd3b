"""The chat adapter and the generation core, called the way the processor calls them (`GenerationProcessor`)."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from extproc.apis.chat import ChatCompletions
from extproc.generation import Exchange, start
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
