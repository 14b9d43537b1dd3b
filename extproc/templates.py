"""Chat prompt templates: the gateway renders the prompt and sends Shimmy a raw ``prompt``, never ``messages``.

Shimmy's own rendering of ``messages`` omits the assistant opener, drops ``system`` for some families, puts one
newline after Llama 3 headers where Meta's format has two, and gives Phi-3 ChatML. Rendering here fixes all of that
and tells the gateway which end-of-turn strings to enforce as stop sequences, which ``/api/generate`` never applies.

No template emits a BOS marker, not even Llama 3's ``<|begin_of_text|>``: Shimmy tokenizes with ``AddBos::Always``
and special-token parsing on, so a literal marker would become a second BOS token, which llama.cpp warns about and
which degrades the output. llama.cpp's built-in llama3 template leaves it out for the same reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["STOP_MARKERS", "TEMPLATES", "check_overrides", "render", "template_for"]


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
