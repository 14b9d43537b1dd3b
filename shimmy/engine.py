"""The deterministic fake inference engine: replays a configured reply token by token.

The reply is cut the way a BPE tokenizer roughly would (`"Hello"`, `"!"`, `" I"`, `" am"`, `"\\n\\n"`), so clients
meet the same SSE framing quirks as with a real model: leading-space tokens and multi-line tokens. Tokens and
their wire encodings are computed once per configuration, because the benchmark pushes thousands of requests a
second through here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from shimmy.axum import sse_event
from shimmy_spec.fixed_vocab import split

__all__ = [
    "Engine",
    "GenParams",
    "GenerationEngine",
    "GenerationError",
    "LoadError",
    "Token",
    "make_token",
    "split",
    "tokenize",
]

_YIELD_EVERY = 64


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    sse: bytes | None  # the /api/generate event; None when axum would panic on it (a `\r`, §2.3)
    json: str  # the text as a JSON string literal, for OpenAI chunks


def make_token(piece: str) -> Token:
    """One engine token's text with its wire encodings."""
    return Token(piece, None if "\r" in piece else sse_event(piece), json.dumps(piece, ensure_ascii=False))


def tokenize(text: str) -> tuple[Token, ...]:
    """Tokens whose concatenation is exactly `text`."""
    return tuple(make_token(piece) for piece in split(text))


@dataclass(frozen=True, slots=True)
class GenParams:
    """What a route hands the engine besides `max_tokens`: the prompt it rendered (or got) and the sampling.

    Defaults are Shimmy's (`GenOptions::default()`, and the seed Airframe uses when none is given). The fixed
    engine ignores all of it; the llama.cpp engine (`shimmy.llama_engine`) honours it.
    """

    prompt: str = ""
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    seed: int = 42
    repeat_penalty: float = 1.1

    @classmethod
    def from_body(cls, prompt: str, body: dict[str, object]) -> GenParams:
        """From a request body's `temperature`, `top_p`, `top_k` and `seed`; absent or null keeps the default.

        `seed` is an emulator extension: real Shimmy's routes ignore it (Airframe then uses 42).
        """
        values: dict[str, object] = {"prompt": prompt}
        for name, kind in (("temperature", float), ("top_p", float), ("top_k", int), ("seed", int)):
            value = body.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                if kind is int and (not float(value).is_integer()):
                    continue
                values[name] = kind(value)
        return cls(**values)  # type: ignore[arg-type]


class GenerationEngine(Protocol):
    """What the routes use of an engine: the fixed-text `Engine` here, or `shimmy.llama_engine.LlamaEngine`."""

    async def load(self) -> None: ...

    def prompt_tokens(self, prompt: str) -> int | None: ...

    def generate(self, max_tokens: int, params: GenParams | None = None) -> AsyncIterator[Token]: ...


class LoadError(Exception):
    """`engine.load` failed: Shimmy answers 502 (500 on /v1/messages) with an empty body."""


class GenerationError(Exception):
    """Generation failed midway; what the client sees depends on the route and the version."""


class Engine:
    """One model slot, with the failure injection the emulator's tests need.

    `caches_model` is 2.x behaviour: the model loads once. 1.x reloads the GGUF for every request, so there
    every generation pays `load_delay_ms`.
    """

    def __init__(
        self,
        reply: str,
        *,
        repeat: bool = False,
        token_delay_ms: float = 0.0,
        load_delay_ms: float = 0.0,
        fail_load: bool = False,
        error_after: int | None = None,
        caches_model: bool = True,
    ) -> None:
        self.tokens = tokenize(reply)
        self.repeat = repeat
        self.token_delay = token_delay_ms / 1000
        self.load_delay = load_delay_ms / 1000
        self.fail_load = fail_load
        self.error_after = error_after
        self.caches_model = caches_model
        self._loaded = False

    async def load(self) -> None:
        if self.fail_load:
            raise LoadError("failed to load model (emulated)")
        if self.load_delay and not (self.caches_model and self._loaded):
            await asyncio.sleep(self.load_delay)
        self._loaded = True

    def count(self, max_tokens: int) -> int:
        """How many tokens a generation of at most `max_tokens` yields."""
        if not self.tokens:
            return 0
        return max_tokens if self.repeat else min(max_tokens, len(self.tokens))

    def prompt_tokens(self, prompt: str) -> int | None:
        """The prompt's token count; None: this engine has no tokenizer."""
        return None

    async def generate(
        self, max_tokens: int, params: GenParams | None = None, tokens: tuple[Token, ...] | None = None
    ) -> AsyncIterator[Token]:
        """Yield the reply's tokens, paced. With `error_after` set, fail after that many (or at the end).

        `params` (prompt, sampling) do not change a fixed reply. `tokens`: this generation's own reply (a queued
        one) instead of the configured reply.
        """
        tokens = self.tokens if tokens is None else tokens
        n = len(tokens)
        count = 0 if not n else max_tokens if self.repeat else min(max_tokens, n)
        fail_at = None if self.error_after is None else min(self.error_after, count)
        for i in range(count):
            if i == fail_at:
                break
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            elif i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)  # a long unpaced generation must not starve the other requests
            yield tokens[i % n]
        if fail_at is not None:
            raise GenerationError(f"generation failed after {fail_at} tokens (emulated)")
