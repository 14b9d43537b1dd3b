"""How the real Shimmy binary is pinned and started (spec §7).

1.7.4 is the last 1.7 release: it has the fixed SSE framing (1.4.2/1.5.0), `--model-path` (1.7.3) and the
template stop strings on chat (1.7.4), and with an explicit `--bind IP:PORT` it avoids v1.7.0's `--bind auto`
panic. Shimmy reads neither `SHIMMY_PORT` nor `SHIMMY_HOST`, so the address always goes on the command line.
"""

from __future__ import annotations

import os
import shutil

__all__ = ["SHIMMY_VERSION", "available", "command", "environment"]

SHIMMY_VERSION = "1.7.4"


def command(shimmy_bin: str, port: int) -> list[str]:
    """`shimmy serve` on loopback only; the gateway in front is the public face."""
    return [shimmy_bin, "serve", "--bind", f"127.0.0.1:{port}"]


def environment(base_gguf: str, model_dir: str) -> dict[str, str]:
    """The variables Shimmy reads for its models.

    `SHIMMY_BASE_GGUF` is registered as `phi3-lora` in 1.x (`tinyllama-1.1b` in 2.x), and its directory is
    scanned too. `SHIMMY_MODEL_PATHS` lists more directories to scan, separated by semicolons (not colons,
    whatever Shimmy's docs say).
    """
    env: dict[str, str] = {}
    if base_gguf:
        env["SHIMMY_BASE_GGUF"] = base_gguf
    if model_dir:
        env["SHIMMY_MODEL_PATHS"] = model_dir
    return env


def available(shimmy_bin: str, base_gguf: str, model_dir: str) -> bool:
    """The binary is on PATH (or a path to an executable) and a model file or directory exists."""
    has_model = (bool(base_gguf) and os.path.isfile(base_gguf)) or (bool(model_dir) and os.path.isdir(model_dir))
    return shutil.which(shimmy_bin) is not None and has_model
