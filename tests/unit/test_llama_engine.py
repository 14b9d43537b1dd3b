"""Real local inference, the parts that need no model: UTF-8 pieces, the engine choice, the model cache, the
sampling options, prompt-token counters, and what the supervisor tells its children."""

from __future__ import annotations

import json
import platform
import sys
import types
from pathlib import Path

import pytest

from extproc import tokens
from gateway import cli
from settings import load
from shimmy import binary, llama_engine, models
from shimmy.engine import GenParams, LoadError
from shimmy.llama_engine import EngineChoice, LlamaEngine, Utf8Pieces, choose_engine
from tests.unit.translate import start_chat

# --- one event per token, whole characters only --------------------------------------------------------------


def test_utf8_pieces_carry_a_split_character_to_the_next_token() -> None:
    pieces = Utf8Pieces()
    e_acute, emoji = "é".encode(), "😀".encode()
    assert pieces.feed(b" caf") == " caf"
    assert pieces.feed(e_acute[:1]) == ""  # an event with empty text: the count of events stays one per token
    assert pieces.pending()
    assert pieces.feed(e_acute[1:] + b"!") == "é!"
    assert not pieces.pending()
    # a 4-byte character over three tokens (byte-fallback pieces)
    assert [pieces.feed(emoji[:1]), pieces.feed(emoji[1:3]), pieces.feed(emoji[3:])] == ["", "", "😀"]


def test_utf8_pieces_replace_bytes_that_never_form_a_character() -> None:
    pieces = Utf8Pieces()
    assert pieces.feed(b"\xff") == "\ufffd"
    assert pieces.feed(b"\xe2\x82") == ""
    assert pieces.feed(b"x") == "\ufffdx"  # the sequence broke off: one replacement, then the new text


# --- which engine -----------------------------------------------------------------------------------------------


@pytest.fixture
def no_llama(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_engine, "llama_importable", lambda: False)


@pytest.fixture
def fake_llama(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """llama_cpp and the model package "installed"; the packaged model assembles to a file in tmp_path."""
    gguf = tmp_path / "packaged.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(llama_engine, "llama_importable", lambda: True)
    monkeypatch.setattr(models, "packaged_available", lambda: True)
    monkeypatch.setattr(models, "default_gguf", lambda: gguf)
    return gguf


def test_fixed_is_always_possible(no_llama: None) -> None:
    choice = choose_engine("fixed", "/nonexistent.gguf")
    assert (choice.engine, choice.gguf, choice.template) == ("fixed", "", None)


def test_auto_falls_back_to_fixed_and_says_why(no_llama: None) -> None:
    choice = choose_engine("auto")
    assert choice.engine == "fixed"
    assert "llama_cpp is not installed" in choice.reason and "C++ compiler and CMake, then: make" in choice.reason


def test_llama_without_llama_cpp_is_an_error(no_llama: None) -> None:
    with pytest.raises(ValueError, match="EMULATOR_ENGINE=llama cannot run: llama_cpp is not installed"):
        choose_engine("llama")


def test_auto_runs_the_packaged_model_with_the_gemma_template(fake_llama: Path) -> None:
    choice = choose_engine(" AUTO ")
    assert choice == EngineChoice("llama", str(fake_llama), True, choice.reason)
    assert choice.template == "gemma"
    assert "packaged Gemma 3 270M" in choice.reason


def test_a_gguf_path_wins_and_dictates_no_template(fake_llama: Path, tmp_path: Path) -> None:
    own = tmp_path / "own.gguf"
    own.write_bytes(b"GGUF")
    choice = choose_engine("llama", str(own))
    assert (choice.engine, choice.gguf, choice.packaged, choice.template) == ("llama", str(own), False, None)
    assert choose_engine("auto", str(tmp_path / "missing.gguf")).engine == "fixed"
    with pytest.raises(ValueError, match="is not a file"):
        choose_engine("llama", str(tmp_path / "missing.gguf"))


def test_auto_without_the_model_package(fake_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "packaged_available", lambda: False)
    choice = choose_engine("auto")
    assert choice.engine == "fixed" and models.PACKAGE in choice.reason


def test_unknown_engine() -> None:
    with pytest.raises(ValueError, match="auto, fixed, llama"):
        choose_engine("gpt")


# --- a portable llama.cpp ----------------------------------------------------------------------------------------

needs_llama_cpp = pytest.mark.skipif(not llama_engine.llama_importable(), reason="no llm extra (llama.cpp)")


@needs_llama_cpp
def test_the_installed_llama_cpp_has_no_kernels_of_the_building_cpu() -> None:
    """make builds llama.cpp with GGML_NATIVE=OFF: a -march=native build on a CPU with AMX died of signal 11 at every
    generation there, and one built on an AVX-512 machine dies of SIGILL on an older one (a cached wheel, an image)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    assert "AMX" not in info and "AVX512" not in info, info
    if platform.machine() == "x86_64":
        assert "AVX2 = 1" in info, info  # the portable level is still fast


@needs_llama_cpp
async def test_a_build_with_amx_kernels_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_cpp

    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: b"CPU : AVX2 = 1 | AMX_INT8 = 1 | ")
    with pytest.raises(LoadError, match=r"AMX_INT8 kernels .*make clean && make; or EMULATOR_ENGINE=fixed$"):
        await LlamaEngine("/nonexistent/model.gguf").load()


# --- the packaged model's cache ---------------------------------------------------------------------------------


def test_default_gguf_assembles_once_into_our_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Path] = []

    def assemble(output_path: str, overwrite: bool = False) -> Path:
        calls.append(Path(output_path))
        Path(output_path).write_bytes(b"GGUF model")
        return Path(output_path)

    package = types.SimpleNamespace(MODEL_NAME="m.gguf", EXPECTED_SHA256="ab" * 32, assemble=assemble)
    monkeypatch.setitem(sys.modules, models.PACKAGE, package)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = models.default_gguf()
    assert first == tmp_path / "shimmy-gateway" / "models" / f"m-{'ab' * 8}.gguf"
    assert first.read_bytes() == b"GGUF model"
    assert models.default_gguf() == first and len(calls) == 1  # the second start costs nothing
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary file left behind


def test_default_gguf_leaves_nothing_when_assembly_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def assemble(output_path: str, overwrite: bool = False) -> Path:
        Path(output_path).write_bytes(b"half")
        raise ValueError("Assembled file sha256 did not match expected value")

    package = types.SimpleNamespace(MODEL_NAME="m.gguf", EXPECTED_SHA256="cd" * 32, assemble=assemble)
    monkeypatch.setitem(sys.modules, models.PACKAGE, package)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="sha256"):
        models.default_gguf()
    assert list((tmp_path / "shimmy-gateway" / "models").iterdir()) == []


# --- sampling options from a request body ---------------------------------------------------------------------


def test_gen_params_take_the_body_and_keep_shimmys_defaults() -> None:
    assert GenParams.from_body("p", {}) == GenParams("p", 0.7, 0.9, 40, 42, 1.1)
    body = {"temperature": 0, "top_p": 0.5, "top_k": 3, "seed": 7, "max_tokens": 9}
    assert GenParams.from_body("p", body) == GenParams("p", 0.0, 0.5, 3, 7)
    assert GenParams.from_body("p", {"seed": "7", "top_k": True, "temperature": None, "top_k_": 1}) == GenParams("p")
    assert GenParams.from_body("p", {"seed": 1.5}).seed == 42


# --- prompt-token counters ---------------------------------------------------------------------------------------


class _Exact:
    kind = tokens.EXACT

    def count(self, model: str, prompt: str) -> int | None:
        return 7 if model == "phi3-lora" else None


def _chat(model: str = "phi3-lora") -> bytes:
    return b'{"model": "%s", "messages": [{"role": "user", "content": "Hi there"}]}' % model.encode()


def test_start_chat_counts_with_the_counter_and_says_so() -> None:
    _, state = start_chat(_chat(), {}, counter=_Exact())
    assert (state.gen.prompt_tokens, state.gen.prompt_tokens_kind) == (7, "exact")
    _, other = start_chat(_chat("qwen"), {}, counter=_Exact())  # no vocabulary for that model: the estimate
    assert other.gen.prompt_tokens_kind == "estimated"
    shimmy, default = start_chat(_chat(), {})
    prompt = json.loads(shimmy)["prompt"]
    assert (default.gen.prompt_tokens, default.gen.prompt_tokens_kind) == (tokens.estimate_tokens(prompt), "estimated")
    assert tokens.estimate_tokens("abcde") == 2


def test_counter_setting() -> None:
    assert tokens.counter("") is tokens.ESTIMATE and tokens.counter("  ") is tokens.ESTIMATE
    with pytest.raises(ValueError, match="TOKENIZER_GGUF"):
        tokens.counter("/nonexistent/model.gguf")


# --- the supervisor decides once and tells both children ---------------------------------------------------------


def _envs(engine: EngineChoice | None, backend: str = "emulator", **env: str) -> tuple[dict, dict]:
    settings = load(argv=[], environ=env)
    kids = {c.name: c for c in cli.children(settings, backend, Path("/dev/null"), engine)}
    return kids["shimmy"].env if "shimmy" in kids else {}, kids["extproc"].env


def test_children_follow_the_packaged_model() -> None:
    engine = EngineChoice("llama", "/cache/gemma.gguf", True, "why")
    shimmy, extproc = _envs(engine)
    assert (shimmy["EMULATOR_ENGINE"], shimmy["EMULATOR_GGUF"]) == ("llama", "/cache/gemma.gguf")
    assert extproc["TOKENIZER_GGUF"] == "/cache/gemma.gguf"
    assert extproc["PROMPT_TEMPLATES"] == "phi3-lora=gemma"
    # the user's own template for the model, and their tokenizer, win; other models' templates are kept
    _, extproc = _envs(engine, PROMPT_TEMPLATES="phi3-lora=chatml", TOKENIZER_GGUF="/mine.gguf")
    assert (extproc["PROMPT_TEMPLATES"], extproc["TOKENIZER_GGUF"]) == ("phi3-lora=chatml", "/mine.gguf")
    _, extproc = _envs(engine, PROMPT_TEMPLATES="qwen=chatml")
    assert extproc["PROMPT_TEMPLATES"] == "qwen=chatml,phi3-lora=gemma"


def test_children_with_an_own_gguf_or_the_fixed_engine() -> None:
    _, extproc = _envs(EngineChoice("llama", "/m/qwen.gguf", False, "why"))
    assert (extproc["PROMPT_TEMPLATES"], extproc["TOKENIZER_GGUF"]) == ("", "/m/qwen.gguf")
    shimmy, extproc = _envs(EngineChoice("fixed", "", False, "why"))
    assert shimmy["EMULATOR_ENGINE"] == "fixed" and extproc["TOKENIZER_GGUF"] == "fixed"  # its own rule: exact


def test_the_processor_is_told_the_shimmy_version(tmp_path: Path) -> None:
    """The emulator's EMULATOR_VERSION, an external Shimmy's SHIMMY_VERSION, a started binary's `--version`."""
    _, extproc = _envs(EngineChoice("fixed", "", False, "why"), EMULATOR_VERSION="2.5.0", SHIMMY_VERSION="1.7.4")
    assert extproc["SHIMMY_VERSION"] == "2.5.0"
    _, extproc = _envs(None, "external", EMULATOR_VERSION="2.5.0", SHIMMY_VERSION="1.7.4")
    assert extproc["SHIMMY_VERSION"] == "1.7.4"
    _, extproc = _envs(None, "external")
    assert extproc["SHIMMY_VERSION"] == binary.SHIMMY_VERSION
    fake = tmp_path / "shimmy"
    fake.write_text("#!/bin/sh\necho 'shimmy 1.7.4'\n")
    fake.chmod(0o755)
    settings = load(argv=[], environ={"SHIMMY_BIN": str(fake), "SHIMMY_VERSION": "2.5.0"})
    version = cli.backend_version(settings, "shimmy")
    kids = {c.name: c for c in cli.children(settings, "shimmy", Path("/dev/null"), None, version)}
    assert kids["extproc"].env["SHIMMY_VERSION"] == "1.7.4"
    with pytest.raises(SystemExit, match="could not run"):
        cli.backend_version(load(argv=[], environ={"SHIMMY_BIN": str(tmp_path / "absent")}), "shimmy")
