"""The image counts tokens exactly with the model it ships (issue 23), checked without a Docker engine.

The image runs real Shimmy with SHIMMY_BASE_GGUF; the supervisor hands the processor that same file as
TOKENIZER_GGUF whenever llama-cpp-python can read it, so a deployment that swaps the model keeps exact counts. These
tests fail when the image would ship without that: its settings do not lead the supervisor to the model's
vocabulary, or it lacks the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import cli
from settings import load
from tests.unit.test_deployment import DOCKERFILE, NON_SETTING_ENV, Dockerfile


@pytest.fixture(scope="module")
def image_env() -> dict[str, str]:
    """The settings the image's runtime stage sets (what `shimmy-gateway up` reads in the container)."""
    env = Dockerfile.parse(DOCKERFILE.read_text()).final.env({"PATH": "/usr/bin"})
    return {name: value for name, value in env.items() if name not in NON_SETTING_ENV}


def _processor_env(environ: dict[str, str], backend: str) -> dict[str, str]:
    kids = {c.name: c for c in cli.children(load(argv=[], environ=environ), backend, Path("/dev/null"), None, "1.8.1")}
    return kids["extproc"].env


def test_the_image_gives_the_processor_its_models_vocabulary(
    image_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert image_env["SHIMMY_BACKEND"] == "shimmy" and image_env["SHIMMY_BASE_GGUF"].endswith(".gguf")
    # An explicit TOKENIZER_GGUF would outlive a deployment's own SHIMMY_BASE_GGUF: the image leaves it derived.
    assert image_env.get("TOKENIZER_GGUF", "") in ("", image_env["SHIMMY_BASE_GGUF"])
    monkeypatch.setattr(cli, "llama_importable", lambda: True)
    settings = load(argv=[], environ=image_env)
    assert cli.estimated_counts(settings, "shimmy") is None
    assert _processor_env(image_env, "shimmy")["TOKENIZER_GGUF"] == image_env["SHIMMY_BASE_GGUF"]
    # A deployment that serves another model gets that model's vocabulary, with no second setting to change.
    other = {**image_env, "SHIMMY_BASE_GGUF": "/models/qwen.gguf"}
    assert _processor_env(other, "shimmy")["TOKENIZER_GGUF"] == "/models/qwen.gguf"


def test_without_the_tokenizer_the_counts_are_estimated_and_the_start_says_why(
    image_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "llama_importable", lambda: False)
    settings = load(argv=[], environ=image_env)
    assert "llama-cpp-python" in (cli.estimated_counts(settings, "shimmy") or "")
    assert _processor_env(image_env, "shimmy")["TOKENIZER_GGUF"] == ""
    directory = load(argv=[], environ={**image_env, "SHIMMY_BASE_GGUF": "", "SHIMMY_MODEL_DIR": "/models"})
    assert "TOKENIZER_GGUF" in (cli.estimated_counts(directory, "shimmy") or "")
    assert cli.estimated_counts(load(argv=[], environ={}), "external")
    assert cli.estimated_counts(load(argv=[], environ={"TOKENIZER_GGUF": "/m.gguf"}), "external") is None
    assert cli.estimated_counts(load(argv=[], environ={}), "emulator") is None  # the engine's own rule: exact
