"""Real local inference for the emulator: a GGUF model run by llama.cpp (`llama-cpp-python`, the `llm` extra).

`LlamaEngine` has the fixed engine's interface (`load`, `prompt_tokens`, `generate`), so every route streams its
tokens through the same Shimmy framing. Like Shimmy it renders nothing: it gets the prompt the route has (the
gateway's pre-rendered `prompt` on `/api/generate`, or the emulator's own rendering of `messages`). It tokenizes
the way Shimmy does (BOS always added, special tokens such as `<start_of_turn>` parsed), clears the KV cache for
every request (Shimmy 2.x), samples with the request's `temperature`, `top_p`, `top_k` and `seed` (repeat
penalty 1.1 over the last 64 tokens, as Shimmy), and stops at an end-of-generation token or `max_tokens`.

llama.cpp blocks, so a generation runs on the engine's one worker thread and hands tokens to the event loop
through a queue as they are sampled; one generation runs at a time (a lock, as Shimmy 2.x holds one model), and a
thread lock on the model keeps any second thread from ever decoding on it at the same time.

**Portable.** A crash inside llama.cpp is a crash of the emulator, so the model is opened only on a build without
CPU-specific kernels that crash: `make` builds llama.cpp with GGML_NATIVE=OFF (AVX2 level), and a build with AMX
kernels (`-march=native` on a CPU with AMX: every generation died of signal 11 there) is refused with a clear
error. llama-cpp-python 0.3.36's `Llama()` has no `use_extra_bufts` parameter (extra keywords are silently
ignored), so the build is the only way to keep those kernels out; only its public API is used here.

**One event per engine token, text possibly empty.** A token's bytes can end inside a UTF-8 character (byte-fallback
pieces of emoji or CJK). An incremental decoder carries the partial bytes over to the next token, so each event
holds only whole characters; a token that completes none yields an event with empty text. That keeps the count of
events equal to the count of tokens, which is how the gateway's `usage.completion_tokens` stays exact. Bytes that
can never form a character become U+FFFD; a character still incomplete when generation ends is dropped.

`choose_engine` is the one place that decides which engine the emulator runs (`EMULATOR_ENGINE`): the supervisor
calls it once and passes the result to the emulator and the processor, and `shimmy-emulator` alone calls it too.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import importlib.util
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shimmy import models
from shimmy.engine import GenerationError, GenParams, LoadError, Token, make_token
from shimmy_spec.llama_logs import route_llama_logs

__all__ = [
    "CHOICES",
    "ENGINES",
    "EngineChoice",
    "LlamaEngine",
    "Utf8Pieces",
    "choose_engine",
    "engine_available",
    "llama_importable",
]

log = logging.getLogger("shimmy.emulator")

ENGINES = ("fixed", "llama")
CHOICES = ("auto", *ENGINES)
N_CTX = 4096  # Shimmy's context size (1.x builds a 4096-token context per request)
REPEAT_LAST_N = 64  # llama.cpp's default penalty window, as Shimmy uses it
INSTALL_HINT = "install a C++ compiler and CMake, then: make clean && make"
# Kernels of a `-march=native` build that crashed llama.cpp (signal 11 at every decode) on the CPUs they target.
UNSAFE_KERNELS = ("AMX_INT8 = 1",)
REBUILD_HINT = "rebuild it portably: .uv/bin/uv cache clean llama-cpp-python && make clean && make"
_END = object()


def llama_importable() -> bool:
    """Is llama-cpp-python installed? (Checked without importing it: the import loads a shared library.)"""
    try:
        return importlib.util.find_spec("llama_cpp") is not None
    except (ImportError, ValueError):
        return False


def engine_available(gguf: str = "") -> tuple[bool, str]:
    """Can the llama engine run `gguf` (empty: the packaged Gemma 3 270M)? Also says why not."""
    if not llama_importable():
        return False, f"llama_cpp is not installed ({INSTALL_HINT})"
    if gguf:
        if not Path(gguf).is_file():
            return False, f"EMULATOR_GGUF={gguf!r} is not a file"
        return True, "EMULATOR_GGUF is set"
    if not models.packaged_available():
        return False, f"the {models.PACKAGE} package is not installed ({INSTALL_HINT})"
    return True, f"the packaged Gemma 3 270M ({models.PACKAGE})"


@dataclass(frozen=True, slots=True)
class EngineChoice:
    engine: str  # "fixed" or "llama"
    gguf: str  # the model file the llama engine runs; "" for the fixed engine
    packaged: bool  # gguf is the packaged Gemma 3 270M, so prompts need the gemma template
    reason: str  # one line for the log: which engine, and why

    @property
    def template(self) -> str | None:
        """The prompt template the gateway must use for this model, when the model dictates one."""
        return models.TEMPLATE if self.packaged else None


def choose_engine(wanted: str, gguf: str = "") -> EngineChoice:
    """Resolve `EMULATOR_ENGINE` (auto, fixed, llama) and `EMULATOR_GGUF` (empty: the packaged model).

    `auto` is llama when llama_cpp and a model are available, else fixed. For the packaged model this assembles
    the GGUF into the cache on first use (about a second). ValueError: `llama` was asked for and cannot run.
    """
    wanted, gguf = wanted.strip().lower(), gguf.strip()
    if wanted not in CHOICES:
        raise ValueError(f"EMULATOR_ENGINE must be one of {', '.join(CHOICES)}, not {wanted!r}")
    if wanted == "fixed":
        return EngineChoice("fixed", "", False, "engine fixed (EMULATOR_ENGINE=fixed): replays EMULATOR_REPLY")
    ok, why = engine_available(gguf)
    if not ok:
        if wanted == "llama":
            raise ValueError(f"EMULATOR_ENGINE=llama cannot run: {why}")
        return EngineChoice("fixed", "", False, f"engine fixed (EMULATOR_ENGINE=auto): {why}")
    packaged = not gguf
    if packaged:
        try:
            gguf = str(models.default_gguf())
        except (ImportError, OSError, ValueError) as exc:
            if wanted == "llama":
                raise ValueError(f"EMULATOR_ENGINE=llama: cannot assemble the packaged model: {exc}") from None
            return EngineChoice("fixed", "", False, f"engine fixed (EMULATOR_ENGINE=auto): packaged model: {exc}")
    return EngineChoice("llama", gguf, packaged, f"engine llama.cpp (EMULATOR_ENGINE={wanted}): {why}, {gguf}")


class Utf8Pieces:
    """Token bytes in, whole characters out: an incomplete UTF-8 sequence waits for the next token's bytes."""

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def pending(self) -> bool:
        """Bytes held back, waiting to complete a character."""
        return bool(self._decoder.getstate()[0])


def token_piece(vocab: Any, token: int) -> bytes:
    """A token's bytes, special tokens rendered as their text (llama-cpp-python's own helper truncates at 32)."""
    import llama_cpp

    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, True)
        if n >= 0:
            return buf.raw[:n]
        size = -n


def _threads() -> int:
    """Half the usable cores (at least one), leaving the rest to Envoy, the processor and the client.

    llama.cpp's worker threads spin at barriers: with as many threads as cores, any other busy process makes
    them wait on a descheduled peer. Measured on 2 cores with other load: 1 thread kept 65 tok/s, 2 threads fell
    to between 2 and 50 tok/s.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


class LlamaEngine:
    """One GGUF model, loaded on first use (lazily, as Shimmy does) and kept."""

    def __init__(self, gguf: str = "", *, n_ctx: int = N_CTX, n_threads: int | None = None) -> None:
        self.gguf = gguf  # empty: the packaged Gemma 3 270M
        self.n_ctx = n_ctx
        self.n_threads = n_threads or _threads()
        self._llm: Any = None
        self._load_lock = asyncio.Lock()
        self._lock = asyncio.Lock()  # one generation at a time; released when the worker thread is done
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llama")
        self._model_lock = threading.Lock()  # held by whichever thread uses the Llama object's context

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    async def load(self) -> None:
        if self._llm is not None:
            return
        async with self._load_lock:
            if self._llm is None:
                try:
                    self._llm = await asyncio.get_running_loop().run_in_executor(self._executor, self._open)
                except Exception as exc:  # ImportError, ValueError from llama.cpp, OSError
                    log.error("cannot load the model %s: %s", self.gguf or "(packaged)", exc)
                    raise LoadError(str(exc)) from exc

    def _open(self) -> Any:
        import llama_cpp

        route_llama_logs()
        unsafe = [k.split()[0] for k in UNSAFE_KERNELS if k in llama_cpp.llama_print_system_info().decode()]
        if unsafe:
            raise ValueError(
                f"this llama.cpp build has {', '.join(unsafe)} kernels (built with -march=native), which crash on "
                f"every generation: {REBUILD_HINT}; or EMULATOR_ENGINE=fixed"
            )
        path = self.gguf or str(models.default_gguf())
        llm = llama_cpp.Llama(
            model_path=path,
            n_ctx=self.n_ctx,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads,
            last_n_tokens_size=REPEAT_LAST_N,
            seed=42,
            verbose=False,
        )
        log.info("llama.cpp loaded %s (threads %d, context %d)", path, self.n_threads, self.n_ctx)
        return llm

    def tokenize(self, prompt: str) -> list[int]:
        """As Shimmy: BOS always added, special tokens parsed. Needs the model loaded. It reads the vocabulary only,
        never the context, so the event loop may call it while the worker thread decodes."""
        return list(self._llm.tokenize(prompt.encode(), add_bos=True, special=True))

    def prompt_tokens(self, prompt: str) -> int | None:
        return len(self.tokenize(prompt)) if self._llm is not None else None

    async def generate(self, max_tokens: int, params: GenParams | None = None) -> AsyncIterator[Token]:
        """Yield tokens as the worker thread samples them. Closing the generator early stops the worker."""
        params = params or GenParams()
        await self.load()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()

        def put(item: object) -> bool:
            if cancelled.is_set():
                return False
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                return False
            return True

        await self._lock.acquire()
        try:
            future = loop.run_in_executor(self._executor, self._run, params, max_tokens, put, cancelled)
        except BaseException:
            self._lock.release()
            raise
        future.add_done_callback(lambda _: self._lock.release())
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise GenerationError(str(item)) from item
                yield item  # type: ignore[misc]
        finally:
            cancelled.set()

    def _run(
        self, params: GenParams, max_tokens: int, put: Callable[[object], bool], cancelled: threading.Event
    ) -> None:
        """The worker thread: the generation, under the model's lock, then its end (or its failure) to the queue."""
        try:
            with self._model_lock:
                self._generate(params, max_tokens, put, cancelled)
            put(_END)
        except Exception as exc:  # llama.cpp decode failures, a prompt over the context
            log.error("generation failed: %s", exc)
            put(exc)

    def _generate(
        self, params: GenParams, max_tokens: int, put: Callable[[object], bool], cancelled: threading.Event
    ) -> None:
        """Evaluate the prompt, then sample and hand over one token at a time."""
        import llama_cpp

        llm = self._llm
        prompt = self.tokenize(params.prompt)
        room = llm.n_ctx() - len(prompt)
        if room <= 0:
            raise ValueError(f"the prompt is {len(prompt)} tokens; the context holds {llm.n_ctx()}")
        budget = min(max_tokens, room)
        if budget <= 0:
            return
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        pieces = Utf8Pieces()
        llm.reset()  # no KV reuse between requests: Shimmy 2.x clears it, and outputs stay repeatable
        llm.set_seed(params.seed % 2**32)
        sampled = llm.generate(
            prompt,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=0.0,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
        )
        count = 0
        for token in sampled:
            if cancelled.is_set() or llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            if not put(make_token(pieces.feed(token_piece(vocab, token)))):
                break
            count += 1
            if count >= budget:
                break
        sampled.close()
