"""What a Shimmy release does with a generation, as data: the backend profile the gateway and the emulator share.

Pure data (standard library only), so the processor, the supervisor and the emulator can all import it. Every field
was read from Shimmy's source at the tags named in docs/shimmy-versions.md, which cites file and line; the protocol
quirks of each release (routes, health bodies, SSE framing) live in `shimmy.profiles`, which builds on this.

The image pins `PINNED`; `shimmy --version` on a real binary (`shimmy.binary.version`) or the `SHIMMY_VERSION`
setting (an external Shimmy) names the version whose profile applies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["PINNED", "BackendProfile", "parse_version", "profile_for"]

PINNED = "1.8.1"  # the Dockerfile's SHIMMY_VERSION (a unit test keeps them equal); why: docs/shimmy-versions.md

# llama.cpp's sampler chain in 1.x: temp -> top_p -> top_k -> penalties -> greedy. Greedy takes the best remaining
# candidate, so decoding is deterministic, but the penalty reaches llama.cpp as repeat 0.0 / presence 1.1 (arguments
# misordered), so a candidate seen in the last 64 tokens with a positive logit becomes +inf and wins: repeats are
# favoured. temperature <= 0 keeps only the best token (plain greedy); otherwise temperature, top_p and top_k only
# decide which candidates the penalty may pick; none makes the output vary as OpenAI means it. No seed is used.
# Details: docs/shimmy-versions.md, "Sampling".
_SAMPLING_1X = frozenset({"max_tokens"})
# Airframe (2.x) samples for real: temperature (0 = greedy), top_p, repetition penalty and a seed (42 by default);
# `top_k` is dropped (src/engine/airframe.rs@v2.5.0:55-64).
_SAMPLING_2X = frozenset({"max_tokens", "temperature", "top_p"})


@dataclass(frozen=True, slots=True)
class BackendProfile:
    """How one Shimmy release runs a generation, where its clients can feel it. Field comments say the values."""

    version: str  # X.Y.Z
    engine: str  # "llama.cpp" (1.x, in-process via shimmy-llama-cpp-2) or "airframe" (2.x, WebGPU through wgpu)
    runs_without_gpu: bool  # 1.x: llama.cpp's CPU backend; 2.x loads GGUF only through a wgpu (GPU) adapter
    context_tokens: int | None  # every model's context (1.x: 4096, fixed); None: SHIMMY_MAX_CTX or the model's own
    prompt_batch_tokens: int | None  # most prompt tokens decoded at once; None: chunked prefill, no such limit
    prompt_overflow: str  # past prompt_batch_tokens: "abort" = GGML_ASSERT, the whole process dies on SIGABRT
    context_overflow: str  # prompt + output past the context: "error" = the generation fails midway
    stream_errors_reported: bool  # /api/generate stream: `data: [ERROR] <msg>` before `[DONE]` (2.x); else swallowed
    nonstream_failure_502: bool  # /api/generate with "stream": false answers 502 (empty) when generation fails
    serialized: bool  # generations run one at a time (2.x: one model behind a mutex); else concurrently (1.x)
    model_load_per_request: bool  # 1.x reloads the GGUF and builds a fresh context for every request
    sampling: frozenset[str]  # /api/generate fields honoured as OpenAI means them (the rest are accepted, moot)
    deterministic: bool  # same prompt and sampling fields, same output, no seed (1.x: a greedy pick)
    seeded: bool  # a seed is used (2.x: always 42 on /api/generate, which has no `seed` field)
    parses_special_tokens: bool  # prompt text such as `<|end|>` becomes the control token itself
    utf8_split_fails: bool  # a generated token that is not whole UTF-8 fails the generation (byte-level BPE vocabs)

    @property
    def line(self) -> str:
        """`1.x` or `2.x`: the engine generation, which decides almost every field."""
        return f"{self.version.split('.')[0]}.x"

    @property
    def prompt_limit(self) -> int | None:
        """The most prompt tokens (BOS included) this release takes without failing or dying: batch and context."""
        limits = [n for n in (self.prompt_batch_tokens, self.context_tokens) if n is not None]
        return min(limits) if limits else None


    def output_room(self, prompt_tokens: int) -> int | None:
        """The most `max_tokens` that cannot overflow the context after a prompt of `prompt_tokens` (BOS included).

        1.x emits token k, then decodes it at position prompt + k - 1: with prompt + max_tokens <= context every
        decode fits; one more and the last token is followed by a failure (a swallowed one, on a stream), not by a
        `length` stop. None: the context is not known here (2.x: SHIMMY_MAX_CTX or the model's own).
        """
        if self.context_tokens is None:
            return None
        return max(self.context_tokens - prompt_tokens, 0)


def parse_version(version: str) -> tuple[int, int, int]:
    """`1.8.1`, `v2.5.0`, `shimmy 1.8.1` (what `shimmy --version` prints), pre-release suffixes allowed."""
    m = re.fullmatch(r"(?:shimmy\s+)?v?(\d+)\.(\d+)\.(\d+)(?:-[0-9A-Za-z.-]+)?", version.strip())
    if m is None:
        raise ValueError(f"not a Shimmy version: {version!r} (expected X.Y.Z, e.g. {PINNED} or 2.5.0)")
    return int(m[1]), int(m[2]), int(m[3])


def profile_for(version: str) -> BackendProfile:
    """The backend profile of `version`; ValueError when it is not X.Y.Z."""
    v = parse_version(version)
    one = v < (2, 0, 0)
    context = 4096 if one else None
    return BackendProfile(
        version="{}.{}.{}".format(*v),
        engine="llama.cpp" if one else "airframe",
        runs_without_gpu=one,
        context_tokens=context,
        # 1.8.0 sized the batch to the context (at least 2048, at most 8192), fixing issue #140's abort.
        prompt_batch_tokens=(2048 if v < (1, 8, 0) else 4096) if one else None,
        prompt_overflow="abort" if one else "error",
        context_overflow="error",
        stream_errors_reported=not one,
        nonstream_failure_502=True,
        serialized=not one,
        model_load_per_request=one,
        sampling=_SAMPLING_1X if one else _SAMPLING_2X,
        deterministic=one,
        seeded=not one,
        parses_special_tokens=True,
        utf8_split_fails=one,
    )
