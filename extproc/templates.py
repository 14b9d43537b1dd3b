"""Chat prompt templates: the gateway renders the prompt and sends Shimmy a raw ``prompt``, never ``messages``.

Shimmy's own rendering of ``messages`` omits the assistant opener, drops ``system`` for some families, puts one
newline after Llama 3 headers where Meta's format has two, and gives Phi-3 ChatML. Rendering here fixes all of that
and tells the gateway which end-of-turn strings to enforce as stop sequences, which ``/api/generate`` never applies.

No template emits a BOS marker, not even Llama 3's ``<|begin_of_text|>``: Shimmy tokenizes with ``AddBos::Always``
and special-token parsing on, so a literal marker would become a second BOS token, which llama.cpp warns about and
which degrades the output. llama.cpp's built-in llama3 template leaves it out for the same reason.

Prompt safety: Shimmy tokenizes the prompt with special-token parsing on, so text that spells a control token
(`<end_of_turn>`, `<|im_start|>`, `<|eot_id|>`) becomes that token and would let a message forge turns. `neutralize`
inserts U+200B (ZERO WIDTH SPACE) right after the opening `<` of every such string in every message's text, whatever
the model's template (an override may be wrong, and a vocabulary may hold another family's markers): the result no
longer equals any special token, so llama.cpp tokenizes it as plain text, and to a reader it looks unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "CONTROL",
    "NEUTRALIZER",
    "STOP_MARKERS",
    "TEMPLATES",
    "check_overrides",
    "neutralize",
    "render",
    "template_for",
]

NEUTRALIZER = "\u200b"
"""What `neutralize` inserts after a control string's `<`: invisible, not a token boundary llama.cpp's special-token
matcher can see through (it matches exact strings), and no vocabulary's special token contains it."""

CONTROL = re.compile(
    r"<(?="
    r"\|[^\s<>|]{1,64}\|>"  # every <|...|> marker: ChatML, Phi-3, Llama 3 (and its reserved tokens), GPT-style
    r"|/?(?:s|unk|pad|bos|eos|mask)>"  # SentencePiece BOS/EOS/UNK (TinyLlama, Mistral), Gemma's <bos> <eos> <pad>
    r"|(?:start|end)_of_(?:turn|image)>"  # Gemma's turn and image markers
    r"|unused\d{1,5}>"  # Gemma's unused control tokens
    r")"
)
"""The `<` of every control string a served vocabulary may parse out of text: templates' markers and their
families' other special tokens. The lookahead keeps the match to the `<`, where the neutralizer goes."""


def neutralize(text: str) -> str:
    """`text` with no control string left in it: U+200B after the `<` of each (see the module docstring)."""
    return CONTROL.sub("<" + NEUTRALIZER, text) if "<" in text else text


@dataclass(frozen=True, slots=True)
class _Format:
    headers: Mapping[str, str]  # canonical role -> text opening its turn; no "system" key: merge it into user turns
    end: str  # text closing every turn
    trim: bool  # strip each message's text, as the model's official template does


def _llama3(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


# Tool results: ChatML has a "tool" role; Llama 3.1 names it "ipython"; Phi-3 and Gemma have none, so a tool result
# is a user-side turn, which is where the model expects input it did not write.
_FORMATS: dict[str, _Format] = {
    # microsoft/Phi-3-mini-4k-instruct tokenizer_config.json (revision with a system role).
    "phi3": _Format(
        headers={
            "system": "<|system|>\n",
            "user": "<|user|>\n",
            "assistant": "<|assistant|>\n",
            "tool": "<|user|>\n",
        },
        end="<|end|>\n",
        trim=False,
    ),
    "chatml": _Format(
        headers={
            "system": "<|im_start|>system\n",
            "user": "<|im_start|>user\n",
            "assistant": "<|im_start|>assistant\n",
            "tool": "<|im_start|>tool\n",
        },
        end="<|im_end|>\n",
        trim=False,
    ),
    # Meta's Llama 3 / 3.1 template, minus <|begin_of_text|> (see the module docstring).
    "llama3": _Format(
        headers={
            "system": _llama3("system"),
            "user": _llama3("user"),
            "assistant": _llama3("assistant"),
            "tool": _llama3("ipython"),
        },
        end="<|eot_id|>",
        trim=True,
    ),
    # Gemma 2/3: only "user" and "model" turns; Gemma 3's template prefixes system text to the first user turn.
    "gemma": _Format(
        headers={
            "user": "<start_of_turn>user\n",
            "assistant": "<start_of_turn>model\n",
            "tool": "<start_of_turn>user\n",
        },
        end="<end_of_turn>\n",
        trim=True,
    ),
}

TEMPLATES: tuple[str, ...] = tuple(_FORMATS)

STOP_MARKERS: dict[str, tuple[str, ...]] = {
    "phi3": ("<|end|>", "<|endoftext|>", "<|user|>"),
    "chatml": ("<|im_end|>", "<|im_start|>"),
    "llama3": ("<|eot_id|>", "<|end_of_text|>"),
    "gemma": ("<end_of_turn>",),
}
"""Each template's end-of-turn strings, enforced by the gateway as stop sequences because Shimmy applies none."""

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}

# Checked in order, first match wins. ChatML fine-tune markers come first because such fine-tunes are often built
# on Llama or Phi bases (Hermes-2-Pro-Llama-3, dolphin-llama3), and "dolphin" contains "phi". TinyLlama lacks the
# Llama 3 special tokens; Shimmy itself serves it with ChatML.
_NAME_RULES: tuple[tuple[str, str], ...] = (
    ("chatml", "chatml"),
    ("hermes", "chatml"),
    ("qwen", "chatml"),
    ("dolphin", "chatml"),
    ("tinyllama", "chatml"),
    ("phi", "phi3"),
    ("llama", "llama3"),
    ("gemma", "gemma"),
)
_DEFAULT = "chatml"


def render(template: str, messages: Sequence[tuple[str, str]]) -> str:
    """Render (role, text) messages into a prompt that ends with the assistant opener, so the model answers next.

    ``developer`` is a system turn. A ``tool`` turn uses the template's tool role where it has one (ChatML
    ``tool``, Llama 3.1 ``ipython``), else a user turn. For a template without a system role (Gemma), system text
    is prepended to the next user-side turn with a blank line, as Gemma 3's template does; if no such turn
    follows, it becomes a user turn of its own just before the opener, so instructions are never dropped.
    """
    fmt = _FORMATS.get(template)
    if fmt is None:
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    headers = fmt.headers
    user = headers["user"]
    parts: list[str] = []
    system: list[str] = []  # system text waiting for a user-side turn; only for templates without a system role
    for role, text in messages:
        canonical = _ROLES.get(role)
        if canonical is None:
            raise ValueError(f"unsupported message role {role!r}")
        if fmt.trim:
            text = text.strip()
        text = neutralize(text)
        header = headers.get(canonical)
        if header is None:
            system.append(text)
            continue
        if system and header == user:
            system.append(text)
            text = "\n\n".join(system)
            system.clear()
        parts += (header, text, fmt.end)
    if system:
        parts += (user, "\n\n".join(system), fmt.end)
    parts.append(headers["assistant"])
    return "".join(parts)


def template_for(model: str, overrides: Mapping[str, str]) -> str:
    """Pick the template for a model: an exact-name override wins, else a guess from the name, else ChatML."""
    template = overrides.get(model)
    if template is not None:
        if template not in _FORMATS:
            raise ValueError(
                f"unknown template {template!r} for model {model!r}; expected one of {', '.join(TEMPLATES)}"
            )
        return template
    name = model.lower()
    for marker, template in _NAME_RULES:
        if marker in name:
            return template
    return _DEFAULT


def check_overrides(overrides: Mapping[str, str]) -> None:
    """Validate configured overrides at start-up, so a typo fails fast instead of on the model's first request."""
    for model in overrides:
        template_for(model, overrides)
