"""The emulator's fixed engine's tokenizer: its whole vocabulary, in effect (a word, a number, a punctuation run,
each with at most one leading space; newline runs; other blank runs).

The emulator generates with it (`shimmy.engine`) and the processor counts with it where the fixed engine serves
(`extproc.tokens`, TOKENIZER_GGUF=fixed), so the count of a one-piece answer equals the tokens generated; it lives
here so the processor needs none of the emulator for it.
"""

from __future__ import annotations

import re

__all__ = ["split"]

_TOKEN = re.compile(r"\n+| ?[^\W\d_]+| ?\d+| ?[^\s\w]+| ?_+|[^\S\n]+")


def split(text: str) -> list[str]:
    """The fixed engine's tokens of `text` as strings."""
    return _TOKEN.findall(text)
