"""Shimmy's prompt rendering (spec §8.1-8.2), so the emulator's engine sees the prompt a real one would.

Models are named after their files, so the registry's template guess is by name: ChatML, or Llama3 when the
name has one of the profile's markers. The third family, OpenChat, is only reached by unnamed templates.
"""

from __future__ import annotations

from collections.abc import Sequence

from shimmy.profiles import Profile

__all__ = ["chat_prompt", "family", "render"]

Message = tuple[str, str]  # (role, content)


def family(model: str, profile: Profile) -> str:
    """`llama3` or `chatml`, as the registry's `infer_template` decides for that version."""
    name = model.lower()
    return "llama3" if any(marker in name for marker in profile.llama3_markers) else "chatml"


def render(family: str, system: str | None, messages: Sequence[Message], final_input: str | None) -> str:
    """Shimmy's template renderer: (system?, history, final user input?) -> prompt text."""
    if family == "llama3":
        out = []
        if system is not None:
            out.append(f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n{system}<|eot_id|>")
        out += [f"<|start_header_id|>{role}<|end_header_id|>\n{content}<|eot_id|>" for role, content in messages]
        if final_input is not None:
            out.append(
                f"<|start_header_id|>user<|end_header_id|>\n{final_input}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n"
            )
        return "".join(out)
    out = [f"<|im_start|>system\n{system}<|im_end|>\n"] if system is not None else []
    out += [f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages]
    if final_input is not None:
        out.append(f"<|im_start|>user\n{final_input}<|im_end|>\n<|im_start|>assistant\n")
    return "".join(out)


def chat_prompt(family: str, messages: Sequence[Message], profile: Profile) -> str:
    """/v1/chat/completions: the last user message is the input, the history is all but the last message."""
    users = [content for role, content in messages if role == "user"]
    if not profile.chat_assistant_turn or not users:
        return render(family, None, messages, None)
    return render(family, None, messages[:-1], users[-1])
