"""`shimmy-extproc` without Envoy: settings to addresses and credentials, the socket file, graceful shutdown.

The processor as a process, over TLS and behind real Envoy, is tests/integration/test_standalone.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as epg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc import cli
from extproc.server import ExternalProcessor, GrpcServer, _claim_socket_file, unix_socket_path
from settings import load
from tests.unit.test_servicer import CHAT, CHAT_BODY, context


@pytest.mark.parametrize(
    ("port", "host", "address"),
    [
        ("50051", "127.0.0.1", "127.0.0.1:50051"),
        ("50051", "0.0.0.0", "0.0.0.0:50051"),
        ("50051", "::", "[::]:50051"),
        ("50051", "[::1]", "[::1]:50051"),
        ("50051", "", "127.0.0.1:50051"),
        (" 7 ", "localhost", "localhost:7"),
        ("unix:/run/extproc.sock", "0.0.0.0", "unix:/run/extproc.sock"),
    ],
)
def test_grpc_address(port: str, host: str, address: str) -> None:
    assert cli.grpc_address(port, host) == address


@pytest.mark.parametrize("port", ["http", "0", "70000", "-1", ""])
def test_grpc_address_refuses_what_is_not_a_port(port: str) -> None:
    with pytest.raises(ValueError, match="EXTPROC_PORT"):
        cli.grpc_address(port)


@pytest.mark.parametrize(
    ("address", "path"),
    [("unix:/a/b.sock", "/a/b.sock"), ("unix:///a/b.sock", "/a/b.sock"), ("unix:b.sock", "b.sock"),
     ("127.0.0.1:1", None)],
)
def test_unix_socket_path(address: str, path: str | None) -> None:
    assert unix_socket_path(address) == (Path(path) if path else None)


@pytest.mark.parametrize(
    ("cert", "key", "ca", "message"),
    [
        ("c.pem", "", "", "EXTPROC_TLS_CERT is set but EXTPROC_TLS_KEY is not"),
        ("", "k.pem", "", "EXTPROC_TLS_KEY is set but EXTPROC_TLS_CERT is not"),
        ("", "", "ca.pem", "EXTPROC_TLS_CLIENT_CA is set but EXTPROC_TLS_CERT is not"),
        ("c.pem", "", "ca.pem", "EXTPROC_TLS_CERT is set but EXTPROC_TLS_KEY is not"),
    ],
)
def test_half_configured_tls_is_refused(cert: str, key: str, ca: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cli.tls_credentials(cert, key, ca)


def test_no_tls_settings_is_plaintext() -> None:
    assert cli.tls_credentials("", "", "") is None


def test_a_file_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="not a PEM file"):
        cli.tls_credentials(str(tmp_path / "c.pem"), str(tmp_path / "c.pem"), "")


def test_every_setting_is_a_flag_and_an_environment_variable() -> None:
    settings = load(
        cli.SETTINGS,
        ["--extproc-host", "0.0.0.0", "--extproc-reflection", "true", "--shimmy-url", "http://shimmy:9000"],
        environ={"EXTPROC_SHUTDOWN_GRACE_S": "2.5", "EXTPROC_PORT": "unix:/tmp/x.sock", "EXTPROC_HOST": "::"},
    )
    assert settings.extproc_host == "0.0.0.0"  # the flag beats the environment
    assert settings.flag("extproc_reflection")
    assert settings.extproc_shutdown_grace_s == 2.5
    ctx, server = cli.build(settings)
    assert ctx.monitor.base_url == "http://shimmy:9000"
    assert server.address == "unix:/tmp/x.sock" and server.reflection and server.credentials is None


def test_shimmy_url_defaults_to_the_local_port() -> None:
    ctx, server = cli.build(load(cli.SETTINGS, [], environ={"SHIMMY_PORT": "8181"}))
    assert ctx.monitor.base_url == "http://127.0.0.1:8181"
    assert server.address == "127.0.0.1:50051" and not server.reflection


def test_a_shimmy_url_without_a_scheme_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--shimmy-url", "shimmy:8080"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "shimmy-extproc: SHIMMY_URL='shimmy:8080': expected an http:// or https:// URL, or nothing\n"
    )


# ------------------------------------------------------------------------------------------------ the socket file


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="extproc-", dir="/tmp") as d:  # unix socket paths must stay short
        yield Path(d)


def test_a_stale_socket_file_is_removed(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    _claim_socket_file(path)
    assert not path.exists()
    _claim_socket_file(path)  # nothing there: nothing to do


def test_a_live_socket_or_another_file_is_not_taken(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        with pytest.raises(OSError, match="another process is listening"):
            _claim_socket_file(path)
    path.unlink()
    path.write_text("data")
    with pytest.raises(OSError, match="not a socket"):
        _claim_socket_file(path)
    assert path.read_text() == "data"


# ---------------------------------------------------------------------------------------------- graceful shutdown


async def test_graceful_stop_on_a_unix_socket(short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A live stream keeps working through the stop; a new RPC is refused; the socket file goes at the end."""
    caplog.set_level(logging.INFO, logger="extproc")
    path = short_dir / "extproc.sock"
    servicer = ExternalProcessor(context())
    server = GrpcServer(servicer, f"unix:{path}")
    await server.start()
    assert path.exists()
    async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
        call = epg.ExternalProcessorStub(channel).Process(metadata=CHAT)
        await call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=CHAT_BODY, end_of_stream=True)))
        assert (await call.read()).HasField("request_body")
        stopping = asyncio.create_task(server.stop(grace=10))
        for _ in range(100):
            if "shutting down" in caplog.text:
                break
            await asyncio.sleep(0.01)
        assert "1 live stream(s) get up to 10s" in caplog.text
        with pytest.raises(grpc.aio.AioRpcError):  # new RPCs are refused while the live stream goes on
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        headers = ep.HttpHeaders(headers={"headers": [{"key": ":status", "raw_value": b"200"}]})
        await call.write(ep.ProcessingRequest(response_headers=headers))
        assert (await call.read()).HasField("response_headers")
        assert not stopping.done()
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        await asyncio.wait_for(stopping, 5)
    assert "every stream finished" in caplog.text
    assert servicer.live_streams == 0
    assert not path.exists()


async def test_a_stream_past_the_grace_is_cut(unused_tcp_port: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="extproc")
    servicer = ExternalProcessor(context())
    server = GrpcServer(servicer, f"127.0.0.1:{unused_tcp_port}")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{unused_tcp_port}") as channel:
        call = epg.ExternalProcessorStub(channel).Process(metadata=CHAT)
        await call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=CHAT_BODY, end_of_stream=True)))
        await call.read()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await server.stop(grace=0.3)
        assert 0.3 <= loop.time() - started < 2
        with pytest.raises(grpc.aio.AioRpcError):
            await call.read()
    assert "1 live stream(s) cut short" in caplog.text


async def test_a_hurry_cuts_the_grace_short(unused_tcp_port: int) -> None:
    servicer = ExternalProcessor(context())
    server = GrpcServer(servicer, f"127.0.0.1:{unused_tcp_port}")
    await server.start()
    hurry = asyncio.Event()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{unused_tcp_port}") as channel:
        call = epg.ExternalProcessorStub(channel).Process(metadata=CHAT)
        await call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=CHAT_BODY, end_of_stream=True)))
        await call.read()
        loop = asyncio.get_running_loop()
        started = loop.time()
        asyncio.get_running_loop().call_later(0.2, hurry.set)
        await server.stop(grace=30, hurry=hurry)
        assert loop.time() - started < 2
        call.cancel()
