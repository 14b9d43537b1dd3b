"""Every setting of the gateway, in one place.

Each setting is an environment variable and the same name as a command-line flag
(`GATEWAY_PORT` <-> `--gateway-port`). A flag beats the environment, the environment beats the
default. The README's settings table is checked against `SETTINGS` by a test, so the two cannot drift.
Each command (`shimmy-gateway`, `shimmy-extproc`, `shimmy-emulator`) reads only the settings it uses.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SETTINGS", "Setting", "Settings", "load", "parse_pairs"]


@dataclass(frozen=True, slots=True)
class Setting:
    env: str
    default: str
    help: str
    kind: type = str  # str, int or float; booleans are "true"/"false" strings parsed by Settings.flag()

    @property
    def flag(self) -> str:
        return "--" + self.env.lower().replace("_", "-")

    @property
    def attr(self) -> str:
        return self.env.lower()


SETTINGS: tuple[Setting, ...] = (
    Setting("GATEWAY_PORT", "8000", "Public port of Envoy, bound on every interface.", int),
    Setting("SHIMMY_PORT", "8080", "Port of the Shimmy backend (real or emulator), bound on 127.0.0.1.", int),
    Setting("ENVOY_ADMIN_PORT", "9901", "Envoy admin port, bound on 127.0.0.1 only.", int),
    Setting("EXTPROC_PORT", "50051", "Processor gRPC port (on EXTPROC_HOST), or `unix:/path` for a unix socket."),
    Setting("EXTPROC_WORKERS", "1", "Processor processes in the stack, on EXTPROC_PORT and the ports after it.", int),
    Setting("ENVOY_WORKERS", "1", "Envoy worker threads (`--concurrency`); one outpaces the processor.", int),
    Setting("SHIMMY_BACKEND", "auto", "`auto`, `shimmy` (real binary), `emulator`, or `external` (not started here)."),
    Setting("MODEL_NAME", "phi3-lora", "Model name served by the backend and listed by `/v1/models`."),
    Setting("MODEL_ALIASES", "", "Names clients may use instead, `alias=model,...` (e.g. `gpt-4o-mini=phi3-lora`)."),
    Setting("LOG_LEVEL", "info", "`debug`, `info`, `warning` or `error`."),
    Setting("SHIMMY_BASE_GGUF", "", "Path of the GGUF model for real Shimmy; `auto` needs it (or SHIMMY_MODEL_DIR)."),
    Setting("SHIMMY_MODEL_DIR", "", "Directory of GGUF models for real Shimmy (`SHIMMY_MODEL_PATHS`)."),
    Setting("SHIMMY_BIN", "shimmy", "Name or path of the real Shimmy binary."),
    Setting(
        "PROMPT_TEMPLATES",
        "",
        "Template per model, `model=template,...` (phi3, chatml, llama3, gemma).",
    ),
    Setting("GENERATION_TIMEOUT_S", "600", "Deadline of one chat completion (504, or in-band once streaming).", int),
    Setting("STREAM_IDLE_TIMEOUT_S", "300", "Longest silence on a request or response before Envoy resets it.", int),
    Setting("EXTPROC_MESSAGE_TIMEOUT_MS", "5000", "Envoy's limit on the processor's answer to one message.", int),
    Setting("PUBLIC_METRICS", "true", "Serve Prometheus metrics on `/metrics` and `/v1/metrics` of the public port."),
    Setting("MAX_REQUEST_BYTES", "1048576", "Largest request body accepted (413 beyond it).", int),
    Setting("MAX_ACTIVE_REQUESTS", "2", "Chat requests Envoy lets into Shimmy at once.", int),
    Setting("MAX_QUEUED_REQUESTS", "16", "Chat requests queued in Envoy for Shimmy (429 beyond).", int),
    Setting("GATEWAY_API_KEYS", "", "Comma-separated bearer keys; empty turns the check off."),
    Setting("HEALTH_INTERVAL_S", "2", "How often the processor and Envoy probe Shimmy's `/health`.", float),
    Setting("WARMUP", "false", "Keep `/health` at 503 until Shimmy has answered one tiny generation."),
    Setting("DRAIN_TIMEOUT_S", "20", "On SIGTERM, how long in-flight requests may finish before the stop.", float),
    Setting("EXTPROC_HOST", "127.0.0.1", "Address the processor's TCP port binds; `0.0.0.0` for a standalone service."),
    Setting("EXTPROC_TLS_CERT", "", "PEM certificate (chain) of the processor; with EXTPROC_TLS_KEY it serves TLS."),
    Setting("EXTPROC_TLS_KEY", "", "PEM private key (unencrypted) of EXTPROC_TLS_CERT."),
    Setting("EXTPROC_TLS_CLIENT_CA", "", "PEM CA bundle; set, the processor requires client certificates (mTLS)."),
    Setting("EXTPROC_REFLECTION", "false", "Serve gRPC reflection for the ext_proc and health services."),
    Setting(
        "EXTPROC_SHUTDOWN_GRACE_S",
        "10",
        "On SIGTERM, how long the processor's live streams may finish before it exits.",
        float,
    ),
    Setting("SHIMMY_URL", "", "Shimmy base URL the processor probes; empty means `http://127.0.0.1:$SHIMMY_PORT`."),
    Setting("SHIMMY_VERSION", "1.8.1", "Version of an `external` Shimmy; a started binary is asked (`--version`)."),
    Setting("EMULATOR_VERSION", "1.8.1", "Shimmy version the emulator mimics (e.g. `1.8.1`, the image's, or `2.5.0`)."),
    Setting("EMULATOR_REPLY", "Hello! I am the Shimmy emulator. How can I help you today?", "Emulator reply text."),
    Setting("EMULATOR_TOKEN_DELAY_MS", "0", "Emulator pause between tokens.", float),
    Setting(
        "EMULATOR_OPENAI_STREAM_DEFAULT", "true", "Emulator `/v1/chat/completions` value of an absent `stream`."
    ),
    Setting(
        "EMULATOR_ENGINE",
        "auto",
        "`llama` (a GGUF run by llama.cpp, the `llm` extra), `fixed` (EMULATOR_REPLY), `auto`: llama if installed.",
    ),
    Setting("EMULATOR_GGUF", "", "GGUF the emulator's llama engine runs; empty means the packaged Gemma 3 270M."),
    Setting("TOKENIZER_GGUF", "", "GGUF whose vocabulary counts prompt tokens exactly; empty means estimate them."),
)

_BY_ENV = {s.env: s for s in SETTINGS}


@dataclass(frozen=True, slots=True)
class Settings:
    """Resolved values, typed. Build with `load()`."""

    values: Mapping[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def flag(self, name: str) -> bool:
        return str(self.values[name]).strip().lower() in {"1", "true", "yes", "on"}

    def env(self) -> dict[str, str]:
        """The settings as environment variables, for child processes."""
        return {s.env: str(self.values[s.attr]) for s in SETTINGS if s.attr in self.values}


def _convert(setting: Setting, raw: str) -> Any:
    try:
        return setting.kind(raw)
    except ValueError:
        raise SystemExit(f"{setting.env}={raw!r}: expected {setting.kind.__name__}") from None


def load(
    names: Iterable[str] | None = None,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    prog: str | None = None,
    description: str | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> Settings:
    """Resolve `names` (all settings when None) from flags, then the environment, then defaults."""
    environ = os.environ if environ is None else environ
    chosen = [_BY_ENV[n] for n in names] if names is not None else list(SETTINGS)
    parser = parser or argparse.ArgumentParser(prog=prog, description=description)
    for s in chosen:
        parser.add_argument(s.flag, dest=s.attr, default=None, metavar=s.env, help=f"{s.help} Default: {s.default!r}.")
    args, _ = parser.parse_known_args(argv)
    values: dict[str, Any] = {}
    for s in chosen:
        raw = getattr(args, s.attr)
        if raw is None:
            raw = environ.get(s.env, s.default)
        values[s.attr] = _convert(s, raw)
    return Settings(values)


def parse_pairs(raw: str, setting: str) -> dict[str, str]:
    """A `name=value,...` setting (PROMPT_TEMPLATES, MODEL_ALIASES) as a dict."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in raw.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise SystemExit(f"{setting}: expected name=value, got {item!r}")
        out[name.strip()] = value.strip()
    return out
