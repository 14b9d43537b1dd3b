"""Context limits, enforced before Shimmy sees a prompt (docs/shimmy-versions.md, "Context limits").

Past its limits Shimmy does not refuse a prompt: 1.x before 1.8.0 decodes the prompt in one batch of 2048 and aborts
the whole process on a longer one (GGML_ASSERT), every 1.x fails the generation midway once prompt plus output pass
its fixed 4096-token context, and 2.x fails once past `SHIMMY_MAX_CTX`. So the gateway counts the rendered prompt and:

- refuses a prompt over the model's prompt limit (the smaller of its context and the release's prompt batch) with
  OpenAI's 400 `context_length_exceeded`;
- clamps `max_tokens` to what is left of the context, so Shimmy is asked only for what fits, and a generation
  that reaches the clamped limit truthfully ends with `finish_reason: "length"`.

An estimated count (no GGUF for the model) is raised by `ESTIMATE_MARGIN` before it is compared: bytes / 4
undercounts code, numbers and non-Latin text, and an undercount here is the crash the check exists to prevent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from extproc.errors import InvalidRequest
from extproc.tokens import ESTIMATED

__all__ = ["ESTIMATE_MARGIN", "ContextLimits", "parse_context_tokens"]

ESTIMATE_MARGIN = 1.5
"""An estimated prompt count is multiplied by this before the check: bytes / 4 * 1.5 = one token per 2.7 bytes,
which covers code and most non-Latin scripts; only byte-fallback-heavy text (emoji runs) can still undercount."""


@dataclass(frozen=True, slots=True)
class ContextLimits:
    """Each model's context and prompt limit, from the backend profile and the per-model setting."""

    context_tokens: int  # the release's context for every model (1.x: 4096; 2.x: SHIMMY_MAX_CTX)
    prompt_batch_tokens: int | None = None  # the release's one-batch prompt limit, None where prefill is chunked
    per_model: Mapping[str, int] = field(default_factory=dict)  # MODEL_CONTEXT_TOKENS: Shimmy model name -> context

    def context(self, model: str) -> int:
        return self.per_model.get(model, self.context_tokens)

    def prompt_limit(self, model: str) -> int:
        """The most prompt tokens (BOS included) `model` takes: its context, or the release's prompt batch if smaller
        (`BackendProfile.prompt_limit`). The error names this number as the model's maximum context length."""
        context = self.context(model)
        return context if self.prompt_batch_tokens is None else min(context, self.prompt_batch_tokens)

    def fit(self, model: str, prompt_tokens: int, kind: str, max_tokens: int, param: str) -> int:
        """`max_tokens` clamped to what the context leaves; InvalidRequest when the prompt does not fit, or fills the
        context so that not one token could follow.

        `kind`: EXACT or ESTIMATED (then the margin applies). `param`: the request field that holds the prompt.
        """
        counted = math.ceil(prompt_tokens * ESTIMATE_MARGIN) if kind == ESTIMATED else prompt_tokens
        limit = self.prompt_limit(model)
        if counted > limit or counted >= self.context(model):
            what = "messages" if param == "messages" else "prompt"
            raise InvalidRequest(
                f"This model's maximum context length is {limit} tokens. However, your {what} resulted in "
                f"{counted} tokens. Please reduce the length of the {what}.",
                param=param,
                code="context_length_exceeded",
            )
        return min(max_tokens, self.context(model) - counted)


def parse_context_tokens(pairs: Mapping[str, str]) -> dict[str, int]:
    """MODEL_CONTEXT_TOKENS (`model=tokens,...`, already split) as positive integers; ValueError naming it."""
    out: dict[str, int] = {}
    for model, raw in pairs.items():
        try:
            tokens = int(raw)
        except ValueError:
            tokens = 0
        if tokens < 2:
            raise ValueError(f"MODEL_CONTEXT_TOKENS: {model}={raw!r}: expected a whole number of tokens, at least 2")
        out[model] = tokens
    return out
