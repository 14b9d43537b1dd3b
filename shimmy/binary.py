"""How the real Shimmy binary is pinned, started and asked its version (spec §7).

The pin (`shimmy_spec.versions.PINNED`) is the last llama.cpp release published unyanked on crates.io: CPU-only, the
fixed SSE framing, `--model-path`, template stop strings on chat, and a prompt batch as large as the 4096-token
context (1.8.0; 1.7.x aborts the process past 2048 prompt tokens). docs/shimmy-versions.md has the evidence. With
an explicit `--bind IP:PORT` it avoids v1.7.0's `--bind auto` panic. Shimmy reads neither `SHIMMY_PORT` nor
`SHIMMY_HOST`, so the address always goes on the command line.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from shimmy_spec.versions import PINNED, parse_version

__all__ = ["SHIMMY_VERSION", "available", "command", "environment", "version"]

SHIMMY_VERSION = PINNED
_VERSION_TIMEOUT_S = 30.0


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


def version(shimmy_bin: str) -> str:
    """X.Y.Z of the binary, from `shimmy --version` (clap prints `shimmy 1.8.1`).

    ValueError says why when the binary cannot be run or prints something else: a binary that cannot answer
    `--version` cannot serve either.
    """
    try:
        done = subprocess.run(
            [shimmy_bin, "--version"], capture_output=True, text=True, timeout=_VERSION_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"`{shimmy_bin} --version` could not run: {exc}") from None
    out = done.stdout.strip()
    if done.returncode != 0:
        raise ValueError(f"`{shimmy_bin} --version` exited {done.returncode}: {(done.stderr or out).strip()[:200]}")
    try:
        return "{}.{}.{}".format(*parse_version(out.splitlines()[-1] if out else ""))
    except ValueError:
        raise ValueError(f"`{shimmy_bin} --version` printed {out[:200]!r}, not `shimmy X.Y.Z`") from None
