"""Counting tokens: exactly with the served model's vocabulary when we have it, else an estimate.

Shimmy reports no token counts, so `usage.prompt_tokens` is ours, and so is `usage.completion_tokens` where Shimmy
answers in one piece (1.x non-stream, `extproc.generation`): the answer's text is tokenized as the model would
have produced it, without BOS. With `TOKENIZER_GGUF` (the GGUF Shimmy serves
the model from, or any GGUF with the same vocabulary) the processor counts with llama.cpp's tokenizer exactly as
Shimmy tokenizes a prompt: BOS always added (`AddBos::Always`) and special tokens parsed, so a template's
`<|im_start|>` is one token. `TOKENIZER_GGUF=fixed` counts with the emulator's fixed engine's own rule
(`shimmy_spec.fixed_vocab.split`), which is that engine's vocabulary; the supervisor sets it whenever the fixed
engine serves.
Without either, the estimate is UTF-8 bytes / 4, rounded up. `x-gateway-prompt-tokens` says which one a response
used (`Generation.prompt_tokens_kind`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from typing import Any, Protocol

from shimmy_spec.fixed_vocab import split

__all__ = [
    "ESTIMATE",
    "ESTIMATED",
    "EXACT",
    "FIXED",
    "Estimate",
    "GgufCounter",
    "PromptCounter",
    "SplitCounter",
    "counter",
    "estimate_tokens",
]

EXACT, ESTIMATED = "exact", "estimated"
FIXED = "fixed"  # the TOKENIZER_GGUF value naming the emulator's fixed engine's rule instead of a GGUF


def estimate_tokens(text: str) -> int:
    """UTF-8 bytes / 4, rounded up: about right for English with a BPE vocabulary of 32k to 128k tokens."""
    return (len(text.encode()) + 3) // 4


class PromptCounter(Protocol):
    kind: str  # EXACT or ESTIMATED: what the x-gateway-prompt-tokens header says of a count from this counter

    def count(self, model: str, prompt: str) -> int | None:
        """Tokens of the rendered `prompt` for Shimmy's `model`; None: no tokenizer for that model (estimate)."""
        ...

    def count_text(self, model: str, text: str) -> int | None:
        """Tokens of generated `text` (no BOS); None: no tokenizer for that model (estimate)."""
        ...


class Estimate:
    kind = ESTIMATED

    def count(self, model: str, prompt: str) -> int | None:
        return estimate_tokens(prompt)

    def count_text(self, model: str, text: str) -> int | None:
        return estimate_tokens(text)


ESTIMATE = Estimate()


class GgufCounter:
    """Exact counts from a GGUF's vocabulary (llama-cpp-python, the `llm` extra; only the vocabulary is loaded).

    `models`: the Shimmy model names this vocabulary belongs to; other models get None (the caller estimates).
    None means every model.
    """

    kind = EXACT

    def __init__(self, path: str, models: Collection[str] | None = None) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise ValueError(
                f"TOKENIZER_GGUF={path!r} needs llama-cpp-python: the `tokenizer` extra (`make` installs it with a C++"
                " compiler and cmake)"
            ) from None
        from shimmy_spec.llama_logs import route_llama_logs

        route_llama_logs()
        try:
            self._vocab: Any = Llama(model_path=path, vocab_only=True, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ValueError(f"TOKENIZER_GGUF={path!r}: cannot load its vocabulary: {exc}") from None
        self.path = path
        self.models = frozenset(models) if models is not None else None
        self._lock = threading.Lock()  # the event loop and the preparing thread (extproc.processors) share it

    def tokenize(self, text: str, bos: bool = True, special: bool = True) -> list[int]:
        """As Shimmy tokenizes a prompt by default: BOS added, special-token text parsed into control tokens."""
        with self._lock:
            return list(self._vocab.tokenize(text.encode(), add_bos=bos, special=special))

    def count(self, model: str, prompt: str) -> int | None:
        if self.models is not None and model not in self.models:
            return None
        return len(self.tokenize(prompt))

    def count_text(self, model: str, text: str) -> int | None:
        """Generated text re-tokenized: the model's own tokens for it in all but rare non-canonical splits."""
        if self.models is not None and model not in self.models:
            return None
        return len(self.tokenize(text, bos=False)) if text else 0


class SplitCounter:
    """Exact counts for the emulator's fixed engine: its own splitter (`shimmy_spec.fixed_vocab.split`), plus the BOS
    that Shimmy adds to a prompt (as the emulator counts prompts, `shimmy.runtime.prompt_count`).

    `models` as for `GgufCounter`.
    """

    kind = EXACT

    def __init__(self, models: Collection[str] | None = None) -> None:
        self._split: Callable[[str], list[str]] = split
        self.models = frozenset(models) if models is not None else None

    def count(self, model: str, prompt: str) -> int | None:
        if self.models is not None and model not in self.models:
            return None
        return 1 + len(self._split(prompt))

    def count_text(self, model: str, text: str) -> int | None:
        if self.models is not None and model not in self.models:
            return None
        return len(self._split(text))


def counter(tokenizer_gguf: str, models: Collection[str] | None = None) -> PromptCounter:
    """The counter for the `TOKENIZER_GGUF` setting: exact with a path (or `fixed`), the estimate without one.

    ValueError (naming the setting) when the file cannot be used, so a bad setting fails at start.
    """
    path = tokenizer_gguf.strip()
    if path == FIXED:
        return SplitCounter(models)
    return GgufCounter(path, models) if path else ESTIMATE
