"""Every setting of the gateway, in one place, checked in one place.

Each setting is an environment variable and the same name as a command-line flag
(`GATEWAY_PORT` <-> `--gateway-port`). A flag beats the environment, the environment beats the
default. The README's settings table is checked against `SETTINGS` by a test, so the two cannot drift.
Each command (`shimmy-gateway`, `shimmy-extproc`, `shimmy-emulator`) reads only the settings it uses, and
`load()` checks every one of them before the command starts anything: a bad value, or a flag the command does not
know, is one line on stderr naming the setting, the value and what is accepted, and exit code 2.
This package imports nothing of the project's, so every other package may import it.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, NoReturn

__all__ = [
    "ENVOY_MARGIN_S",
    "PROCESSOR_MARGIN_S",
    "SETTINGS",
    "UNIX_PATH_MAX",
    "Parser",
    "Setting",
    "SettingError",
    "Settings",
    "fail",
    "load",
    "parse_bool",
    "parse_pairs",
    "waiting_message_timeout_s",
]

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_BOOLEANS = "true or false (also 1/0, yes/no, on/off)"


class SettingError(ValueError):
    """A value a setting cannot take. The message is one line: the setting, the value, what is accepted."""


def parse_bool(raw: str, setting: str = "value") -> bool:
    """true/false, 1/0, yes/no, on/off (any case); anything else is refused rather than read as false."""
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SettingError(f"{setting}={raw!r}: expected {_BOOLEANS}")


UNIX_PATH_MAX = 107  # bytes of a unix socket path on Linux (sun_path is 108 with its NUL)


def _socket_path(text: str) -> None:
    if len(os.fsencode(text.strip())) > UNIX_PATH_MAX:
        raise ValueError(f"a unix socket path of at most {UNIX_PATH_MAX} bytes")


def _port_or_socket(text: str) -> None:
    if text.startswith("unix:") and len(text) > len("unix:"):
        _socket_path(text.removeprefix("unix:").removeprefix("//"))
        return
    if not (text.isdigit() and 1 <= int(text) <= 65535):
        raise ValueError("a port from 1 to 65535, or unix:/path")


def _not_empty(text: str) -> None:
    if not text.strip():
        raise ValueError("a non-empty value")


def _http_url(text: str) -> None:
    if text.strip() and not text.strip().startswith(("http://", "https://")):
        raise ValueError("an http:// or https:// URL, or nothing")


def _version(text: str) -> None:
    if not re.fullmatch(r"v?\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?", text.strip()):
        raise ValueError("a Shimmy version X.Y.Z, e.g. 1.7.2 or 2.5.0")


def _header_name(text: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", text.strip()):
        raise ValueError("an HTTP header name, e.g. authorization or x-gateway-key")


def _pairs(text: str) -> None:
    try:
        parse_pairs(text, "")
    except SettingError:
        raise ValueError("name=value pairs separated by commas") from None

# The deadlines nest inside GENERATION_TIMEOUT_S, the outermost limit (on AI Core, KServe's `timeout`, whose clock
# starts first), so the client always gets an OpenAI error before an outer layer cuts the connection: the processor
# ends a chat this much earlier (in-band once streaming), Envoy's route timeout, its backstop, ENVOY_MARGIN_S earlier.
PROCESSOR_MARGIN_S = 2
ENVOY_MARGIN_S = 1


def waiting_message_timeout_s(message_timeout_ms: int, queue_timeout_s: float) -> float:
    """Envoy's limit on the answer to a request body that waits for a generation slot: the processor asks for it
    (`override_message_timeout`) when the request starts waiting, Envoy's `max_message_timeout` allows it. The usual
    message's time, plus the queue's: the processor's 429 always comes first."""
    return message_timeout_ms / 1000 + queue_timeout_s


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting. The positional form `Setting(NAME, default, help, kind)` stays valid; the checks are keywords."""

    env: str
    default: str
    help: str
    kind: type = str  # str, int, float or bool (true/false/1/0/yes/no/on/off)
    _: KW_ONLY
    low: float | None = None  # inclusive bounds of an int or float setting
    high: float | None = None
    choices: tuple[str, ...] = ()  # the only values a str setting may take (compared in lower case)
    check: Callable[[str], None] | None = None  # raises ValueError("what is accepted") for a bad str value

    @property
    def flag(self) -> str:
        return "--" + self.env.lower().replace("_", "-")

    @property
    def attr(self) -> str:
        return self.env.lower()

    def accepted(self) -> str:
        """What the setting accepts, as the end of "expected ..."."""
        if self.kind is bool:
            return _BOOLEANS
        if self.choices:
            *rest, last = self.choices
            return f"{', '.join(rest)} or {last}" if rest else last
        if self.kind in (int, float):
            noun = "an integer" if self.kind is int else "a number"
            shown = "{:g}" if self.kind is float else "{:d}"
            low, high = (None if b is None else shown.format(b) for b in (self.low, self.high))
            if low is not None and high is not None:
                return f"{noun} from {low} to {high}"
            if low is not None:
                return f"{noun} of at least {low}"
            if high is not None:
                return f"{noun} of at most {high}"
            return noun
        return "text"

    def parse(self, raw: str) -> Any:
        """The typed value of `raw`; SettingError names the setting, the value and what is accepted."""
        if self.kind is bool:
            return parse_bool(raw, self.env)
        text = raw.strip()
        if self.kind in (int, float):
            try:
                value = self.kind(text)
            except ValueError:
                raise SettingError(f"{self.env}={raw!r}: expected {self.accepted()}") from None
            if not math.isfinite(value) or (self.low is not None and value < self.low) or (
                self.high is not None and value > self.high
            ):
                raise SettingError(f"{self.env}={raw!r}: expected {self.accepted()}")
            return value
        if self.choices:
            if text.lower() not in self.choices:
                raise SettingError(f"{self.env}={raw!r}: expected {self.accepted()}")
            return text.lower()
        if self.check is not None:
            try:
                self.check(raw)
            except ValueError as exc:
                raise SettingError(f"{self.env}={raw!r}: expected {exc}") from None
        return raw


_PORT: dict[str, Any] = {"low": 1, "high": 65535}

SETTINGS: tuple[Setting, ...] = (
    Setting("GATEWAY_PORT", "8000", "Public port of Envoy, bound on every interface.", int, **_PORT),
    Setting("SHIMMY_PORT", "8080", "Port of the Shimmy backend (real or emulator), bound on 127.0.0.1.", int, **_PORT),
    Setting("ENVOY_ADMIN_PORT", "9901", "Envoy admin port, bound on 127.0.0.1 only.", int, **_PORT),
    Setting("EXTPROC_PORT", "50051", "Processor gRPC port (on EXTPROC_HOST), or `unix:/path` for a unix socket.",
            check=_port_or_socket),
    Setting("EXTPROC_WORKERS", "1", "Processor processes in the stack, on EXTPROC_PORT and the ports after it.", int,
            low=1, high=64),
    Setting("ENVOY_WORKERS", "1", "Envoy worker threads (`--concurrency`); one outpaces the processor.",
            int, low=1, high=256),
    Setting("SHIMMY_BACKEND", "auto", "`auto`, `shimmy` (real binary), `emulator`, or `external` (not started here).",
            choices=("auto", "shimmy", "emulator", "external")),
    Setting("MODEL_NAME", "phi3-lora", "Model name served by the backend and listed by `/v1/models`.",
            check=_not_empty),
    Setting("MODEL_ALIASES", "", "Names clients may use instead, `alias=model,...` (e.g. `gpt-4o-mini=phi3-lora`).",
            check=_pairs),
    Setting("LOG_LEVEL", "info", "`debug`, `info`, `warning` or `error`.",
            choices=("debug", "info", "warning", "error")),
    Setting("SHIMMY_BASE_GGUF", "", "Path of the GGUF model for real Shimmy; `auto` needs it (or SHIMMY_MODEL_DIR)."),
    Setting("SHIMMY_MODEL_DIR", "", "Directory of GGUF models for real Shimmy (`SHIMMY_MODEL_PATHS`)."),
    Setting("SHIMMY_BIN", "shimmy", "Name or path of the real Shimmy binary."),
    Setting(
        "PROMPT_TEMPLATES",
        "",
        "Template per model, `model=template,...` (phi3, chatml, llama3, gemma).",
        check=_pairs,
    ),
    Setting(
        "GENERATION_TIMEOUT_S",
        "600",
        "Outer limit of one chat completion (KServe's `timeout`); the gateway answers an OpenAI error 2 s before it.",
        int,
        low=PROCESSOR_MARGIN_S + 1,
    ),
    Setting("STREAM_IDLE_TIMEOUT_S", "300", "Longest silence on a request or response before Envoy resets it.",
            int, low=1),
    Setting("CLIENT_STALL_TIMEOUT_S", "30", "Longest a client may read nothing of its response before its connection"
            " is cut.", int, low=1),
    Setting("EXTPROC_MESSAGE_TIMEOUT_MS", "5000", "Envoy's limit on the processor's answer to one message.", int,
            low=1, high=3_600_000),
    Setting("PUBLIC_METRICS", "true", "Serve Prometheus metrics on `/metrics` and `/v1/metrics` of the public port.",
            bool),
    Setting("MAX_REQUEST_BYTES", "1048576", "Largest request body accepted (413 beyond it).",
            int, low=1, high=2**32 - 1),
    Setting("MAX_ACTIVE_REQUESTS", "2", "Generations inside Shimmy at once, until Shimmy is done with each.", int,
            low=1),
    Setting("MAX_QUEUED_REQUESTS", "16", "Requests waiting for a generation slot (429 beyond, or past the wait).", int,
            low=1),
    Setting("QUEUE_TIMEOUT_S", "4", "Longest a request waits for a generation slot before its 429 `queue_full`.",
            float, low=0.1, high=3600),
    Setting("GATEWAY_API_KEYS", "", "Comma-separated bearer keys; empty turns the check off."),
    Setting("MAX_CONNECTIONS", "1024", "Client connections Envoy holds at once; one more is closed on accept.", int,
            low=1),
    Setting("ENVOY_MAX_HEAP_MB", "512", "Envoy's heap limit: past 95 % of it, new requests get 503 `overloaded`.",
            int, low=1, high=1 << 20),
    Setting("REQUEST_HEADERS_TIMEOUT_S", "10",
            "Seconds a new connection may stay silent, and a request may take to send its headers; then closed.",
            int, low=1),
    Setting("XFF_TRUSTED_HOPS", "0",
            "Proxies in front of Envoy whose `X-Forwarded-For` entry names the client (the access log's `client`).",
            int, low=0, high=16),
    Setting("METRICS_PORT", "0", "Port on 127.0.0.1 serving `/metrics` keyless, for scrapers; 0: none.", int,
            low=0, high=65535),
    Setting(
        "GATEWAY_API_KEY_HEADER",
        "authorization",
        "Header the key is read from (`Bearer <key>` in `authorization`); `x-api-key` is always read too.",
        check=_header_name,
    ),
    Setting("CORS_ALLOWED_ORIGINS", "", "Comma-separated browser origins allowed by CORS; empty turns CORS off."),
    Setting("RESPONSES_WS_MAX_CONNECTIONS", "64", "Responses WebSocket mode connections at once (429 beyond).", int,
            low=1),
    Setting("RESPONSES_WS_MAX_TURNS", "1000", "`response.create` turns one WebSocket connection may run.", int,
            low=1),
    Setting("RESPONSES_WS_IDLE_TIMEOUT_S", "300", "Longest wait for a WebSocket client's next turn before the close.",
            float, low=1),
    Setting("RESPONSES_WS_SOCKET", "", "Unix socket the processor serves WebSocket mode on; `shimmy-gateway up` sets"
            " it for its first worker.", check=_socket_path),
    Setting("HEALTH_INTERVAL_S", "2", "How often the processor and Envoy probe Shimmy's `/health`.", float,
            low=0.01),
    Setting("WARMUP", "false", "Keep `/health` at 503 until Shimmy has answered one tiny generation.", bool),
    Setting("DRAIN_TIMEOUT_S", "20", "On SIGTERM, how long in-flight requests may finish before the stop.",
            float, low=0),
    Setting("EXTPROC_HOST", "127.0.0.1", "Address the processor's TCP port binds; `0.0.0.0` for a standalone service."),
    Setting("EXTPROC_TLS_CERT", "", "PEM certificate (chain) of the processor; with EXTPROC_TLS_KEY it serves TLS."),
    Setting("EXTPROC_TLS_KEY", "", "PEM private key (unencrypted) of EXTPROC_TLS_CERT."),
    Setting("EXTPROC_TLS_CLIENT_CA", "", "PEM CA bundle; set, the processor requires client certificates (mTLS)."),
    Setting("EXTPROC_REFLECTION", "false", "Serve gRPC reflection for the ext_proc and health services.", bool),
    Setting(
        "EXTPROC_SHUTDOWN_GRACE_S",
        "10",
        "On SIGTERM, how long the processor's live streams may finish before it exits.",
        float,
        low=0,
    ),
    Setting("SHIMMY_URL", "", "Shimmy base URL the processor probes; empty means `http://127.0.0.1:$SHIMMY_PORT`.",
            check=_http_url),
    Setting("SHIMMY_VERSION", "1.8.1", "Version of an `external` Shimmy; a started binary is asked (`--version`).",
            check=_version),
    Setting("EMULATOR_VERSION", "1.8.1", "Shimmy version the emulator mimics (e.g. `1.8.1`, the image's, or `2.5.0`).",
            check=_version),
    Setting("EMULATOR_REPLY", "Hello! I am the Shimmy emulator. How can I help you today?", "Emulator reply text."),
    Setting("EMULATOR_TOKEN_DELAY_MS", "0", "Emulator pause between tokens.", float, low=0),
    Setting(
        "EMULATOR_OPENAI_STREAM_DEFAULT", "true", "Emulator `/v1/chat/completions` value of an absent `stream`.", bool
    ),
    Setting(
        "EMULATOR_ENGINE",
        "auto",
        "`llama` (a GGUF run by llama.cpp, the `llm` extra), `fixed` (EMULATOR_REPLY), `auto`: llama if installed.",
        choices=("auto", "llama", "fixed"),
    ),
    Setting("EMULATOR_GGUF", "", "GGUF the emulator's llama engine runs; empty means the packaged Gemma 3 270M."),
    Setting(
        "TOKENIZER_GGUF",
        "",
        "GGUF whose vocabulary counts tokens exactly (`fixed`: the emulator's fixed engine); "
        "empty: derived, or estimated.",
    ),
    Setting("SHIMMY_MAX_CTX", "2048", "Context (tokens) of a 2.x Shimmy, which reads it too; 1.x has 4096.", int,
            low=512, high=131072),
    Setting("MODEL_CONTEXT_TOKENS", "", "Context per model, `model=tokens,...`, overriding the Shimmy version's.",
            check=_pairs),
    Setting("OTEL_EXPORTER_OTLP_ENDPOINT", "", "OTLP/gRPC collector (`http://host:4317`) Envoy and the processor "
            "send traces to; empty: no traces.", check=_http_url),
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
        value = self.values[name]
        return value if isinstance(value, bool) else parse_bool(str(value), name.upper())

    def env(self) -> dict[str, str]:
        """The settings as environment variables, for child processes."""
        return {s.env: _text(self.values[s.attr]) for s in SETTINGS if s.attr in self.values}


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def fail(prog: str, *lines: str) -> NoReturn:
    """Print each error as one `prog: ...` line on stderr and exit 2, the code of a usage error."""
    for line in lines:
        print(f"{prog}: {line}", file=sys.stderr, flush=True)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and no abbreviated flags: `--gateway` is not `--gateway-port`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see {self.prog} --help)")


def _unknown(prog: str, arg: str, known: Iterable[str]) -> str:
    """Why `arg` is refused, with the closest flag this command knows."""
    if not arg.startswith("-"):
        return f"unexpected argument {arg!r} (see {prog} --help)"
    name = arg.partition("=")[0]
    setting = _BY_ENV.get(name.removeprefix("--").replace("-", "_").upper())
    if setting is not None:
        return f"{name}: {setting.env} is not a setting of {prog} (see {prog} --help)"
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"see {prog} --help"
    return f"unknown flag {name} ({hint})"


def load(
    names: Iterable[str] | None = None,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    prog: str | None = None,
    description: str | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> Settings:
    """Resolve `names` (all settings when None) from flags, then the environment, then defaults.

    Every value is checked here; errors (bad values, unknown flags or arguments) go to stderr one line each and
    the process exits 2 (SystemExit), before the command has started anything.
    """
    environ = os.environ if environ is None else environ
    chosen = [_BY_ENV[n] for n in names] if names is not None else list(SETTINGS)
    parser = parser or Parser(prog=prog, description=description)
    for s in chosen:
        text = f"{s.help} Default: {s.default!r}.".replace("%", "%%")  # argparse %-formats help ("95 %" of a limit)
        parser.add_argument(s.flag, dest=s.attr, default=None, metavar=s.env, help=text)
    args, extras = parser.parse_known_args(argv)
    known = [flag for action in parser._actions for flag in action.option_strings]
    errors = [
        _unknown(parser.prog, arg, known)
        for i, arg in enumerate(extras)
        if arg.startswith("-") or i == 0 or not extras[i - 1].startswith("-")  # not the value of an unknown flag
    ]
    values: dict[str, Any] = {}
    for s in chosen:
        raw = getattr(args, s.attr)
        try:
            values[s.attr] = s.parse(environ.get(s.env, s.default) if raw is None else raw)
        except SettingError as exc:
            errors.append(str(exc))
    if errors:
        fail(parser.prog, *errors)
    return Settings(values)


def parse_pairs(raw: str, setting: str) -> dict[str, str]:
    """A `name=value,...` setting (PROMPT_TEMPLATES, MODEL_ALIASES) as a dict; SettingError for a malformed one."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in raw.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise SettingError(f"{setting}={raw!r}: expected name=value pairs separated by commas, got {item!r}")
        out[name.strip()] = value.strip()
    return out
