"""The emulator's live state (config, derived profile and engine, counters) and how a generation meets the wire.

A generation behaves like Shimmy's spawned task: it keeps running when the client goes away (sends just fail),
and the failure injections that live below HTTP (`hang`, `drop_after`) are applied here for every route.

What the version's engine does with load (`shimmy_spec.versions`) is applied here too, for every route but /ws/generate:
2.x runs one generation at a time (one model behind a mutex; the others wait, counted as `queued_generations`);
1.x runs them side by side, each holding its own model context (`generation_memory_mib`), and past
`max_generations` the process is killed as the kernel's OOM killer kills it (SIGKILL: connections reset, the
supervisor sees signal 9). 1.x decodes the prompt in one llama.cpp batch: a prompt past the batch trips a
GGML_ASSERT and the process aborts (SIGABRT); a prompt plus output past the 4096-token context fails the
generation once the KV cache is full. Prompts are counted with the engine's tokenizer, or else with the fixed
engine's own splitter plus BOS (`prompt_count`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import functools
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import msgspec
from aiohttp import web

from settings import SETTINGS
from shimmy.axum import DONE, sse_event
from shimmy.engine import Engine, GenerationEngine, GenerationError, GenParams, Token, tokenize
from shimmy.llama_engine import ENGINES, LlamaEngine
from shimmy.profiles import Profile, profile_for

__all__ = [
    "SSE_HEADERS",
    "Die",
    "Dropped",
    "EmulatorConfig",
    "Frames",
    "Runtime",
    "Stats",
    "native_frames",
    "prompt_count",
]

log = logging.getLogger("shimmy.emulator")

_DEFAULTS = {s.env: s.default for s in SETTINGS}
# What shimmy-llama-cpp-sys-2 0.1.123 prints before abort() (Shimmy issues #119, #140) and the error llama-cpp-2
# gives when the KV cache is full (`DecodeError::NoKvCacheSlot`).
BATCH_ASSERT = "llama.cpp/src/llama-context.cpp:997: GGML_ASSERT(n_tokens_all <= cparams.n_batch) failed"
KV_FULL = "Decode Error 1: NoKvCacheSlot"

Die = Callable[[int, str], None]  # (signal, last words on stderr): the process ends; in-process tests record it

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}  # axum's `Sse`
_HANG_POLL_S = 0.05


@dataclass(slots=True)
class EmulatorConfig:
    """Everything `/_emulator/config` shows and changes. Mutating it in place takes effect on the next request."""

    version: str = _DEFAULTS["EMULATOR_VERSION"]
    models: list[str] = field(default_factory=lambda: [_DEFAULTS["MODEL_NAME"]])
    reply: str = _DEFAULTS["EMULATOR_REPLY"]
    token_delay_ms: float = 0.0
    load_delay_ms: float = 2.0  # model load: every request in 1.x, the first in 2.x (real: seconds; kept short)
    repeat: bool = False  # cycle the reply until max_tokens
    openai_stream_default: bool = True  # /v1/chat/completions without `stream` (real Shimmy: SSE)
    fail_load: bool = False  # every generation: 502 empty (500 on /v1/messages)
    error_after: int | None = None  # generation fails after k tokens (or at its end)
    drop_after: int | None = None  # the TCP connection closes after k tokens (0: before the response), nothing more
    hang: bool = False  # generations never answer, until the client goes away
    # A stream goes silent after k tokens (0: right after its headers, a prefill that never ends) and stays so,
    # connection open, until the client goes away: Shimmy stuck mid-generation. Streams only.
    stall_after: int | None = None
    # `fixed` replays `reply`; `llama` runs a GGUF with llama.cpp (`gguf`; empty = the packaged Gemma 3 270M).
    # Engine faults (`reply`, `repeat`, `*_delay_ms`, `fail_load`, `error_after`) apply to the fixed engine only.
    engine: str = "fixed"
    gguf: str = ""
    # 1.x: generations that fit in memory at once; one more and the process is OOM-killed. None: no limit.
    max_generations: int | None = None
    generation_memory_mib: float = 1536.0  # one 1.x generation's context: Phi-3 mini's 4096-token f16 KV cache
    replies: list[str] = field(default_factory=list)  # raw replies for the next generations, one each (fixed engine)
    # Streams hold every token until the generation ends, then send them at once, as a real 1.x stream can arrive
    # (its generation never yields to tokio: docs/shimmy-versions.md, "Streams in one burst"). Headers go out first.
    stream_burst: bool = False

    def __post_init__(self) -> None:
        profile_for(self.version)
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if not self.models:
            raise ValueError("models must not be empty")
        for name in (
            "token_delay_ms",
            "load_delay_ms",
            "error_after",
            "drop_after",
            "stall_after",
            "generation_memory_mib",
        ):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_generations is not None and self.max_generations < 1:
            raise ValueError("max_generations must be at least 1 (or null: no limit)")


@dataclass(slots=True)
class Stats:
    """What reached "Shimmy", for tests. `active_generations` is a gauge, so a reset leaves it alone."""

    generate_requests: int = 0
    last_generate_body: Any = None
    last_generate_headers: dict[str, str] | None = None  # lets tests see what a proxy let through
    last_prompt: str | None = None
    last_prompt_tokens: int | None = None  # the engine's exact count of last_prompt; None without a tokenizer
    last_prompt_count: int | None = None  # what the version's limits were checked with: exact, or the estimate
    active_generations: int = 0  # gauges (kept by a reset): generating now, their clients gone, waiting (2.x)
    abandoned_active: int = 0
    queued_generations: int = 0
    peak_generations: int = 0  # most generations at once since the start or the last reset
    abandoned_generations: int = 0  # generations that went on after their client had left
    memory_mib: float = 0.0  # what the running generations hold (1.x: each its own context; 2.x: one)
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


def prompt_count(prompt: str) -> int:
    """The fixed engine's token estimate of a prompt: its own splitter's pieces, plus the BOS Shimmy always adds."""
    return 1 + len(tokenize(prompt))


def _die(sig: int, words: str) -> None:
    """End this process the way the real one ends: last words on stderr, then the signal (abort, or OOM kill)."""
    if words:
        log.critical("%s", words)
    logging.shutdown()
    signal.raise_signal(sig)


class Runtime:
    """One emulator instance: its config (mutable), the startup copy for resets, and the counters.

    `die` ends the process (SIGABRT for the batch assert, SIGKILL for an OOM kill); in-process tests pass a recorder,
    and the connection is then closed as the dead process would have left it.
    """

    def __init__(self, config: EmulatorConfig, die: Die = _die) -> None:
        self.config = config
        self.startup = copy.deepcopy(config)
        self.stats = Stats()
        self.die = die
        self._model_lock = asyncio.Lock()  # 2.x: the one Airframe runtime behind a mutex
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
        """Back to the startup config, counters zeroed; the gauges keep counting what still runs."""
        for f in dataclasses.fields(EmulatorConfig):
            setattr(self.config, f.name, copy.deepcopy(getattr(self.startup, f.name)))
        self._engine = None
        old = self.stats
        self.stats = Stats(
            active_generations=old.active_generations,
            abandoned_active=old.abandoned_active,
            queued_generations=old.queued_generations,
            peak_generations=old.active_generations,
            memory_mib=old.memory_mib,
        )

    def _kill(self, request: web.Request, sig: int, words: str) -> NoReturn:
        """The process dies here; if `die` returns (a test's recorder), the connection goes as it would."""
        self.die(sig, words)
        _drop(request)

    def _memory(self) -> float:
        active = self.stats.active_generations
        per = self.config.generation_memory_mib
        return per * (min(active, 1) if self.profile.backend.serialized else active)

    @asynccontextmanager
    async def _generating(self, request: web.Request, params: GenParams | None) -> AsyncIterator[_Generation]:
        """One generation's life: the model slot (2.x), memory (1.x), the prompt checks, the counters.

        Counters are read from `self.stats` each time: a reset replaces it while generations still run.
        """
        backend = self.profile.backend
        async with contextlib.AsyncExitStack() as stack:
            if backend.serialized:
                self.stats.queued_generations += 1
                try:
                    await stack.enter_async_context(self._model_lock)
                finally:
                    self.stats.queued_generations -= 1
            limit = self.config.max_generations
            if not backend.serialized and limit is not None and self.stats.active_generations >= limit:
                self._kill(request, signal.SIGKILL, "")  # the kernel says nothing to the process it kills
            prompt = params.prompt if params is not None else ""
            exact = self.engine.prompt_tokens(prompt)
            count = self.stats.last_prompt_count = exact if exact is not None else prompt_count(prompt)
            batch = backend.prompt_batch_tokens
            if batch is not None and count > batch and backend.prompt_overflow == "abort":
                self._kill(request, signal.SIGABRT, BATCH_ASSERT)
            gen = _Generation(request, self, self._kv_room(count))
            self.stats.active_generations += 1
            self.stats.peak_generations = max(self.stats.peak_generations, self.stats.active_generations)
            self.stats.memory_mib = self._memory()
            try:
                if self.config.hang:
                    await _hang(request)
                if self.config.replies and isinstance(self.engine, Engine):
                    gen.reply = self.config.replies.pop(0)
                yield gen
            finally:
                self.stats.active_generations -= 1
                if gen.abandoned:
                    self.stats.abandoned_active -= 1
                self.stats.memory_mib = self._memory()

    def _kv_room(self, prompt_tokens: int) -> int | None:
        """Tokens a generation can emit before its decode finds the KV cache full (1.x); None: no such end.

        Token k is emitted, then decoded at position prompt + k - 1, which fails once that reaches the context.
        """
        context = self.profile.backend.context_tokens
        if context is None or self.profile.backend.context_overflow != "error":
            return None
        return max(context - prompt_tokens + 1, 0)

    def _tokens(self, gen: _Generation, max_tokens: int, params: GenParams | None) -> AsyncIterator[Token]:
        engine = self.engine
        if params is not None and self.profile.backend.deterministic:
            # 1.x picks greedily; its misordered repeat penalty (docs/shimmy-versions.md) is not reproduced, so
            # this is real 1.x at temperature 0, plain greedy, whatever was asked
            params = dataclasses.replace(params, temperature=0.0)
        if gen.reply is not None and isinstance(engine, Engine):
            return engine.generate(max_tokens, params, tokens=tokenize(gen.reply))
        return engine.generate(max_tokens, params)

    async def collect(self, request: web.Request, max_tokens: int, params: GenParams | None = None) -> str:
        """A non-streaming generation's text. Raises GenerationError, or Dropped for the connection faults."""
        async with self._generating(request, params) as gen:
            drop_after = self.config.drop_after
            if drop_after == 0:
                _drop(request)
            pieces: list[str] = []
            async with aclosing(self._tokens(gen, max_tokens, params)) as tokens:
                async for token in tokens:
                    pieces.append(token.text)
                    gen.emitted()
                    if len(pieces) == drop_after:
                        _drop(request)
            if drop_after is not None:
                _drop(request)
            return "".join(pieces)

    async def stream(
        self, request: web.Request, max_tokens: int, frames: Frames, params: GenParams | None = None
    ) -> web.StreamResponse:
        """A streaming generation: one chunk per token, written as soon as the engine yields it."""
        async with self._generating(request, params) as gen:
            drop_after = self.config.drop_after
            if drop_after == 0:  # before the response starts, as in collect(): not even the status line goes out
                _drop(request)
            response = web.StreamResponse(headers=SSE_HEADERS)
            await response.prepare(request)
            sink = _Sink(response)
            await sink.send(frames.head)
            sent = 0
            held: list[bytes] | None = [] if self.config.stream_burst else None
            stall_after = self.config.stall_after
            try:
                async with aclosing(self._tokens(gen, max_tokens, params)) as tokens:
                    async for token in tokens:
                        if sent == stall_after:
                            await _hang(request)
                        frame = frames.token(token)
                        if frame is None:
                            _drop(request)
                        if held is None:
                            await sink.send(frame)
                        else:
                            held.append(frame)
                        sent += 1
                        gen.emitted()
                        if sent == drop_after:
                            _drop(request)
                tail = frames.tail
            except GenerationError as e:
                tail = frames.error(e)
            if drop_after is not None:
                _drop(request)
            await sink.send(b"".join(held or ()) + tail)
            return response


class _Generation:
    """One running generation: whether its client has left (checked per token), and its KV-cache room (1.x)."""

    __slots__ = ("abandoned", "count", "reply", "request", "room", "runtime")

    def __init__(self, request: web.Request, runtime: Runtime, room: int | None) -> None:
        self.request, self.runtime, self.room = request, runtime, room
        self.abandoned = False
        self.count = 0
        self.reply: str | None = None

    def emitted(self) -> None:
        """After each token: note a client that has gone; fail as llama.cpp does once the KV cache is full."""
        self.count += 1
        if not self.abandoned and _gone(self.request):
            self.abandoned = True
            stats = self.runtime.stats
            stats.abandoned_generations += 1
            stats.abandoned_active += 1
        if self.room is not None and self.count >= self.room:
            raise GenerationError(KV_FULL)


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


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
