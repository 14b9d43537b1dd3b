"""The image counts tokens exactly with the model it ships (issue 23), checked without a Docker engine.

The image runs real Shimmy with SHIMMY_BASE_GGUF; the supervisor hands the processor that same file as
TOKENIZER_GGUF whenever llama-cpp-python can read it, so a deployment that swaps the model keeps exact counts. These
tests fail when the image would ship without that: its settings do not lead the supervisor to the model's
vocabulary, or it lacks the tokenizer.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

from gateway import cli
from settings import load
from tests.unit.test_deployment import DOCKERFILE, NON_SETTING_ENV, ROOT, Dockerfile

PHI3_VOCAB = ROOT / "tests" / "data" / "ggml-vocab-phi-3.gguf"


def tokenizer_problems(text: str) -> list[str]:
    """What in a Dockerfile would make the image ship without an exact tokenizer for its model."""
    image = Dockerfile.parse(text)
    problems = []
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    if not any(re.match(r"llama-cpp-python\b", dep) for dep in extras.get("tokenizer", [])):
        problems.append("pyproject's tokenizer extra has no llama-cpp-python")
    syncs = [i.args for i in image.stage("python").all("RUN") if "uv sync" in i.args]
    if not syncs or "--extra tokenizer" not in syncs[-1]:
        problems.append("the python stage's last uv sync does not install the tokenizer extra")
    copies = [i.args.split() for i in image.final.all("COPY")]
    if ["--from=python", "/opt/venv", "/opt/venv"] not in copies:
        problems.append("the runtime stage does not copy the python stage's /opt/venv")
    kinds = [(i.keyword, i.args) for i in image.final.instructions]
    model = next((n for n, (k, a) in enumerate(kinds) if k == "COPY" and a.startswith("--from=model")), None)
    check = next((n for n, (k, a) in enumerate(kinds) if k == "RUN" and "require_exact_counts" in a), None)
    user = next((n for n, (k, _) in enumerate(kinds) if k == "USER"), len(kinds))
    if check is None or model is None or not model < check < user:
        problems.append("no build step checks the tokenizer against the model the image ships")
    env = image.final.env({"PATH": "/usr/bin"})
    if env.get("TOKENIZER_GGUF", "") not in ("", env.get("SHIMMY_BASE_GGUF")):
        problems.append("TOKENIZER_GGUF names another file than the model served")
    return problems


def test_the_image_installs_the_tokenizer_and_checks_it_at_build() -> None:
    text = DOCKERFILE.read_text()
    assert tokenizer_problems(text) == []
    # Each way the image could lose it is caught:
    mutations = {
        "tokenizer extra": text.replace("--extra tokenizer", ""),
        "/opt/venv": text.replace("COPY --from=python /opt/venv /opt/venv", "COPY --from=python /src /src"),
        "no build step": re.sub(r" \\\n && python -c \"[^\n]*require_exact_counts[^\n]*", "", text),
        "another file": text.replace("SHIMMY_BACKEND=shimmy \\", "SHIMMY_BACKEND=shimmy TOKENIZER_GGUF=/x.gguf \\"),
    }
    for words, mutated in mutations.items():
        assert any(words in problem for problem in tokenizer_problems(mutated)), words


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


def test_the_build_check_passes_only_with_an_exact_tokenizer(
    image_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "llama_importable", lambda: False)
    with pytest.raises(SystemExit, match="estimated: llama-cpp-python"):
        cli.require_exact_counts(load(argv=[], environ=image_env))
    monkeypatch.setattr(cli, "llama_importable", lambda: True)
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed here (the tokenizer extra)")
    with pytest.raises(SystemExit, match="cannot load its vocabulary"):
        cli.require_exact_counts(load(argv=[], environ={**image_env, "SHIMMY_BASE_GGUF": "/nonexistent.gguf"}))
    cli.require_exact_counts(load(argv=[], environ={**image_env, "SHIMMY_BASE_GGUF": str(PHI3_VOCAB)}))
    assert "exact token counts with" in capsys.readouterr().out
