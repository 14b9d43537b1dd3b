from __future__ import annotations

import pytest

from extproc.templates import STOP_MARKERS, TEMPLATES, check_overrides, render, template_for

CONVERSATION = [("system", "Be brief"), ("user", "Hi"), ("assistant", "Hello"), ("user", "Joke?")]
OPENERS = {
    "phi3": "<|assistant|>\n",
    "chatml": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<start_of_turn>model\n",
}


@pytest.mark.parametrize(
    ("template", "prompt"),
    [
        pytest.param(
            "phi3",
            "<|system|>\nBe brief<|end|>\n"
            "<|user|>\nHi<|end|>\n"
            "<|assistant|>\nHello<|end|>\n"
            "<|user|>\nJoke?<|end|>\n"
            "<|assistant|>\n",
            id="phi3",
        ),
        pytest.param(
            "chatml",
            "<|im_start|>system\nBe brief<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello<|im_end|>\n"
            "<|im_start|>user\nJoke?<|im_end|>\n"
            "<|im_start|>assistant\n",
            id="chatml",
        ),
        pytest.param(
            "llama3",
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nJoke?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            id="llama3",
        ),
        pytest.param(
            "gemma",
            "<start_of_turn>user\nBe brief\n\nHi<end_of_turn>\n"
            "<start_of_turn>model\nHello<end_of_turn>\n"
            "<start_of_turn>user\nJoke?<end_of_turn>\n"
            "<start_of_turn>model\n",
            id="gemma-merges-system-into-first-user-turn",
        ),
    ],
)
def test_golden(template: str, prompt: str) -> None:
    assert render(template, CONVERSATION) == prompt


@pytest.mark.parametrize(
    ("template", "prompt"),
    [
        pytest.param("phi3", "<|system|>\nS<|end|>\n<|user|>\nR<|end|>\n<|assistant|>\n", id="phi3-user"),
        pytest.param(
            "chatml",
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>tool\nR<|im_end|>\n<|im_start|>assistant\n",
            id="chatml-tool",
        ),
        pytest.param(
            "llama3",
            "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
            "<|start_header_id|>ipython<|end_header_id|>\n\nR<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            id="llama3-ipython",
        ),
        pytest.param(
            "gemma", "<start_of_turn>user\nS\n\nR<end_of_turn>\n<start_of_turn>model\n", id="gemma-user-with-system"
        ),
    ],
)
def test_developer_is_system_and_tool_role(template: str, prompt: str) -> None:
    assert render(template, [("developer", "S"), ("tool", "R")]) == prompt


@pytest.mark.parametrize(
    ("messages", "prompt"),
    [
        pytest.param([("user", "Hi")], "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", id="no-system"),
        pytest.param(
            [("system", "A"), ("developer", "B"), ("user", "Hi")],
            "<start_of_turn>user\nA\n\nB\n\nHi<end_of_turn>\n<start_of_turn>model\n",
            id="several-system-turns",
        ),
        pytest.param(
            [("system", "A"), ("assistant", "Hello"), ("user", "Hi")],
            "<start_of_turn>model\nHello<end_of_turn>\n<start_of_turn>user\nA\n\nHi<end_of_turn>\n<start_of_turn>model\n",
            id="system-waits-for-a-user-turn",
        ),
        pytest.param(
            [("user", "Hi"), ("system", "A")],
            "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>user\nA<end_of_turn>\n<start_of_turn>model\n",
            id="trailing-system-becomes-user-turn",
        ),
    ],
)
def test_gemma_system_merge(messages: list[tuple[str, str]], prompt: str) -> None:
    assert render("gemma", messages) == prompt


@pytest.mark.parametrize(
    ("template", "text"),
    [
        pytest.param("phi3", " x\n", id="phi3-verbatim"),
        pytest.param("chatml", " x\n", id="chatml-verbatim"),
        pytest.param("llama3", "x", id="llama3-trims"),
        pytest.param("gemma", "x", id="gemma-trims"),
    ],
)
def test_whitespace_follows_official_template(template: str, text: str) -> None:
    assert f"\n{text}<" in render(template, [("user", " x\n")])


@pytest.mark.parametrize(("template", "opener"), OPENERS.items())
def test_empty_conversation_is_just_the_opener(template: str, opener: str) -> None:
    assert render(template, []) == opener


@pytest.mark.parametrize("template", TEMPLATES)
def test_no_bos_marker(template: str) -> None:
    prompt = render(template, CONVERSATION)
    for bos in ("<|begin_of_text|>", "<bos>", "<s>"):
        assert bos not in prompt


@pytest.mark.parametrize(("template", "opener"), OPENERS.items())
def test_every_turn_end_is_a_stop_marker(template: str, opener: str) -> None:
    turn_end = render(template, [("user", "QQQ")]).split("QQQ")[1].removesuffix(opener)
    assert turn_end.strip() in STOP_MARKERS[template]


def test_stop_markers_cover_every_template() -> None:
    assert set(STOP_MARKERS) == set(TEMPLATES) == set(OPENERS)


def test_unknown_role() -> None:
    with pytest.raises(ValueError, match="'function'"):
        render("chatml", [("function", "x")])


def test_unknown_template() -> None:
    with pytest.raises(ValueError, match="'vicuna'"):
        render("vicuna", [("user", "x")])


@pytest.mark.parametrize(
    ("model", "template"),
    [
        pytest.param("phi3-lora", "phi3", id="shimmy-default-model"),
        pytest.param("Phi-3-mini-4k-instruct-q4", "phi3", id="phi-case-insensitive"),
        pytest.param("phi-4-mini", "phi3", id="phi4"),
        pytest.param("llama-3.2-1b-instruct", "llama3", id="llama"),
        pytest.param("Meta-Llama-3-8B-Instruct", "llama3", id="llama-case-insensitive"),
        pytest.param("gemma-2-2b-it", "gemma", id="gemma"),
        pytest.param("qwen2.5-0.5b-instruct", "chatml", id="qwen"),
        pytest.param("my-chatml-model", "chatml", id="chatml"),
        pytest.param("Hermes-2-Pro-Llama-3-8B", "chatml", id="hermes-on-llama-is-chatml"),
        pytest.param("dolphin-2.9-llama3-8b", "chatml", id="dolphin-contains-phi-but-is-chatml"),
        pytest.param("tinyllama-1.1b", "chatml", id="tinyllama-is-chatml-as-in-shimmy"),
        pytest.param("mistral-7b-instruct", "chatml", id="default"),
        pytest.param("", "chatml", id="empty-name"),
    ],
)
def test_template_for_by_name(model: str, template: str) -> None:
    assert template_for(model, {}) == template


def test_override_wins_and_is_exact() -> None:
    overrides = {"phi3-lora": "chatml", "custom": "gemma"}
    assert template_for("phi3-lora", overrides) == "chatml"
    assert template_for("custom", overrides) == "gemma"
    assert template_for("PHI3-LORA", overrides) == "phi3"


def test_bad_override() -> None:
    overrides = {"phi3-lora": "phi3", "my-model": "chatm"}
    check_overrides({"phi3-lora": "phi3"})
    with pytest.raises(ValueError, match=r"'chatm' for model 'my-model'"):
        check_overrides(overrides)
    with pytest.raises(ValueError, match="'chatm'"):
        template_for("my-model", overrides)
