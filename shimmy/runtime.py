"""The emulator's live state (config, derived profile and engine, counters) and how a generation meets the wire.

A generation behaves like Shimmy's spawned task: it keeps running when the client goes away (sends just fail),
and the failure injections that live below HTTP (`hang`, `drop_after`) are applied here for every route.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import msgspec
from aiohttp import web

from settings import SETTINGS
from shimmy.axum import DONE, sse_event
from shimmy.engine import Engine, GenerationEngine, GenerationError, GenParams, Token
from shimmy.llama_engine import ENGINES, LlamaEngine
from shimmy.profiles import Profile, profile_for

__all__ = ["SSE_HEADERS", "Dropped", "EmulatorConfig", "Frames", "Runtime", "Stats", "native_frames"]

_DEFAULTS = {s.env: s.default for s in SETTINGS}

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}  # axum's `Sse`
_HANG_POLL_S = 0.05


@dataclass(slots=True)
class EmulatorConfig:
    """Everything `/_emulator/config` shows and changes. Mutating it in place takes effect on the next request."""

    version: str = _DEFAULTS["EMULATOR_VERSION"]
    models: list[str] = field(default_factory=lambda: [_DEFAULTS["MODEL_NAME"]])
    reply: str = _DEFAULTS["EMULATOR_REPLY"]
    token_delay_ms: float = 0.0
    load_delay_ms: float = 0.0
    repeat: bool = False  # cycle the reply until max_tokens
    openai_stream_default: bool = True  # /v1/chat/completions without `stream` (real Shimmy: SSE)
    fail_load: bool = False  # every generation: 502 empty (500 on /v1/messages)
    error_after: int | None = None  # generation fails after k tokens (or at its end)
    drop_after: int | None = None  # the TCP connection closes after k tokens (0: before the response), nothing more
    hang: bool = False  # generations never answer, until the client goes away
    # `fixed` replays `reply`; `llama` runs a GGUF with llama.cpp (`gguf`; empty = the packaged Gemma 3 270M).
    # Engine faults (`reply`, `repeat`, `*_delay_ms`, `fail_load`, `error_after`) apply to the fixed engine only.
    engine: str = "fixed"
    gguf: str = ""

    def __post_init__(self) -> None:
        profile_for(self.version)
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if not self.models:
            raise ValueError("models must not be empty")
        for name in ("token_delay_ms", "load_delay_ms", "error_after", "drop_after"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative")


@dataclass(slots=True)
class Stats:
    """What reached "Shimmy", for tests. `active_generations` is a gauge, so a reset leaves it alone."""

    generate_requests: int = 0
    last_generate_body: Any = None
    last_generate_headers: dict[str, str] | None = None  # lets tests see what a proxy let through
    last_prompt: str | None = None
    last_prompt_tokens: int | None = None  # the engine's exact count of last_prompt; None without a tokenizer
    active_generations: int = 0
    chat_requests: int = 0


class Dropped(Exception):
    """The connection is gone (closed on purpose, or by the client during a hang): there is nothing to send."""


@dataclass(frozen=True, slots=True)
class Frames:
    """A route's SSE encoding: what comes before the tokens, each token, and the two possible endings."""

    head: bytes
    token: Callable[[Token], bytes | None]
    tail: bytes
    error: Callable[[GenerationError], bytes]


def native_frames(profile: Profile) -> Frames:
    """/api/generate: raw-text events; a failure is `[ERROR] <msg>` in 2.x and silent in 1.x (§2.3)."""
    if profile.stream_error_event:
        return Frames(b"", _token_sse, DONE, lambda e: sse_event(f"[ERROR] {e}") + DONE)
    return Frames(b"", _token_sse, DONE, lambda e: DONE)


def _token_sse(token: Token) -> bytes | None:
    return token.sse


_profile = functools.cache(profile_for)


class Runtime:
    """One emulator instance: its config (mutable), the startup copy for resets, and the counters."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.startup = copy.deepcopy(config)
        self.stats = Stats()
        self._engine_key: tuple[Any, ...] = ()
        self._engine: Engine | None = None
        self._llama: LlamaEngine | None = None  # kept across resets: loading a model takes seconds

    @property
    def profile(self) -> Profile:
        return _profile(self.config.version)

    @property
    def engine(self) -> GenerationEngine:
        """Rebuilt only when a setting it depends on changed, so tokens stay precomputed (or the model loaded)."""
        c = self.config
        if c.engine == "llama":
            if self._llama is None or self._llama.gguf != c.gguf:
                self._llama = LlamaEngine(c.gguf)
            return self._llama
        key = (c.reply, c.repeat, c.token_delay_ms, c.load_delay_ms, c.fail_load, c.error_after, c.version)
        if self._engine is None or key != self._engine_key:
            self._engine = Engine(
                c.reply,
                repeat=c.repeat,
                token_delay_ms=c.token_delay_ms,
                load_delay_ms=c.load_delay_ms,
                fail_load=c.fail_load,
                error_after=c.error_after,
                caches_model=self.profile.caches_model,
            )
            self._engine_key = key
        return self._engine

    def record_prompt(self, prompt: str) -> None:
        """What the engine is about to get, for `/_emulator/stats`."""
        self.stats.last_prompt = prompt
        self.stats.last_prompt_tokens = self.engine.prompt_tokens(prompt)

    def update(self, patch: Any) -> None:
        """Merge a JSON object into the config; ValueError says what is wrong and changes nothing."""
        if not isinstance(patch, dict):
            raise ValueError("expected a JSON object")
        names = [f.name for f in dataclasses.fields(EmulatorConfig)]
        unknown = sorted(set(patch) - set(names))
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        try:
            new = msgspec.convert({**dataclasses.asdict(self.config), **patch}, EmulatorConfig, strict=True)
        except msgspec.ValidationError as e:
            raise ValueError(str(e)) from None
        for name in names:
            setattr(self.config, name, getattr(new, name))

    def reset(self) -> None:
        """Back to the startup config, counters zeroed."""
        for f in dataclasses.fields(EmulatorConfig):
            setattr(self.config, f.name, copy.deepcopy(getattr(self.startup, f.name)))
        self._engine = None
        self.stats = Stats(active_generations=self.stats.active_generations)

    @asynccontextmanager
    async def _generating(self, request: web.Request) -> AsyncIterator[None]:
        self.stats.active_generations += 1
        try:
            if self.config.hang:
                await _hang(request)
            yield
        finally:
            self.stats.active_generations -= 1

    async def collect(self, request: web.Request, max_tokens: int, params: GenParams | None = None) -> str:
        """A non-streaming generation's text. Raises GenerationError, or Dropped for the connection faults."""
        async with self._generating(request):
            drop_after = self.config.drop_after
            if drop_after == 0:
                _drop(request)
            pieces: list[str] = []
            async with aclosing(self.engine.generate(max_tokens, params)) as tokens:
                async for token in tokens:
                    pieces.append(token.text)
                    if len(pieces) == drop_after:
                        _drop(request)
            if drop_after is not None:
                _drop(request)
            return "".join(pieces)

    async def stream(
        self, request: web.Request, max_tokens: int, frames: Frames, params: GenParams | None = None
    ) -> web.StreamResponse:
        """A streaming generation: one chunk per token, written as soon as the engine yields it."""
        async with self._generating(request):
            drop_after = self.config.drop_after
            if drop_after == 0:  # before the response starts, as in collect(): not even the status line goes out
                _drop(request)
            response = web.StreamResponse(headers=SSE_HEADERS)
            await response.prepare(request)
            sink = _Sink(response)
            await sink.send(frames.head)
            sent = 0
            try:
                async with aclosing(self.engine.generate(max_tokens, params)) as tokens:
                    async for token in tokens:
                        frame = frames.token(token)
                        if frame is None:
                            _drop(request)
                        await sink.send(frame)
                        sent += 1
                        if sent == drop_after:
                            _drop(request)
                tail = frames.tail
            except GenerationError as e:
                tail = frames.error(e)
            if drop_after is not None:
                _drop(request)
            await sink.send(tail)
            return response


class _Sink:
    """Writes that fail once the client has left are ignored, as Shimmy ignores `tx.send` errors."""

    __slots__ = ("gone", "response")

    def __init__(self, response: web.StreamResponse) -> None:
        self.response, self.gone = response, False

    async def send(self, data: bytes) -> None:
        if data and not self.gone:
            try:
                await self.response.write(data)
            except ConnectionError:
                self.gone = True


def _drop(request: web.Request) -> NoReturn:
    """Close the TCP connection where it stands: no chunked terminator, no response."""
    if request.transport is not None:
        request.transport.close()
    raise Dropped


async def _hang(request: web.Request) -> NoReturn:
    """Never answer; return (by raising Dropped) once the client has gone away.

    Polled: aiohttp signals a disconnect only by cancelling the handler, which would also stop the
    background generations that Shimmy lets run to completion.
    """
    while (transport := request.transport) is not None and not transport.is_closing():  # noqa: ASYNC110
        await asyncio.sleep(_HANG_POLL_S)
    raise Dropped
