"""Issue 5: the stack started exactly as the image starts it, without a Docker engine.

The final stage's ENV and CMD are read from the Dockerfile, and only what cannot exist here is changed: the emulator
stands in for the Shimmy binary and the model, free ports replace 8000/8080 (and the fixed admin and processor
ports: this machine is shared), the image's paths are re-rooted in a temporary directory (its virtualenv is this
one), and the working directory is a read-only copy of what the image is built from. No variable of the test's own
environment leaks in. Then the endpoints, the image's HEALTHCHECK command, and SIGTERM as tini delivers it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from tests.integration.conftest import Stack, die_with_parent, free_port, stop_stack, wait_healthy
from tests.unit.test_deployment import DOCKERFILE, ROOT, Dockerfile, healthcheck_command

IMAGE_VENV = "/opt/venv"
# The image's base (python:3.11-slim-bookworm) PATH, which the final stage's `ENV PATH=...:$PATH` extends.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Container:
    stack: Stack
    env: dict[str, str]
    root: Path  # the image's filesystem paths are re-rooted here
    workdir: Path
    model_name: str


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def localize(value: str, root: Path, workdir: Path, image_workdir: str) -> str:
    """An image path as a path here: the image's venv is this venv, its working directory the read-only copy."""
    if value == IMAGE_VENV or value.startswith(IMAGE_VENV + "/"):
        return sys.prefix + value.removeprefix(IMAGE_VENV)
    if value == image_workdir:
        return str(workdir)
    if value.startswith("/"):
        return str(root / value.lstrip("/"))
    return value


def image_environment(dockerfile: Dockerfile, root: Path, workdir: Path) -> dict[str, str]:
    """The final stage's ENV with its paths localized; PATH keeps the base image's entries after ours."""
    image_workdir = dockerfile.final.last("WORKDIR").args
    env = dockerfile.final.env({"PATH": "\0"})  # a marker for where the base PATH goes
    out: dict[str, str] = {}
    for name, value in env.items():
        if name == "PATH":
            entries = [localize(e, root, workdir, image_workdir) for e in value.split(":") if e != "\0"]
            out[name] = ":".join([*entries, os.environ.get("PATH", BASE_PATH)])
        else:
            out[name] = localize(value, root, workdir, image_workdir)
    return out


def copy_build_context(dockerfile: Dockerfile, destination: Path) -> None:
    """What the image is built from (the python stage's COPY sources), then read-only, as /app is to UID 65534."""
    destination.mkdir()
    for instruction in dockerfile.stage("python").all("COPY"):
        source = ROOT / instruction.args.split()[0]
        target = destination / source.name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    for path in [destination, *destination.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def make_writable(directory: Path) -> None:
    for path in [directory, *directory.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.parse(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def container(dockerfile: Dockerfile, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    base = tmp_path_factory.mktemp("container")
    root, workdir = base / "root", base / "app"
    copy_build_context(dockerfile, workdir)
    env = image_environment(dockerfile, root, workdir)
    for name in ("HOME", "TMPDIR"):  # the image creates both, owned by 65534 (checked by the unit tests)
        Path(env[name]).mkdir(parents=True)
    ports = {name: free_port() for name in ("GATEWAY_PORT", "SHIMMY_PORT", "ENVOY_ADMIN_PORT", "EXTPROC_PORT")}
    # No Shimmy binary or model file here: the emulator stands in, with its fixed-reply engine (a real model is
    # tests/integration/test_real_model.py's business), as the Shimmy release the image pins.
    env.update(
        {name: str(port) for name, port in ports.items()},
        SHIMMY_BACKEND="emulator",
        EMULATOR_ENGINE="fixed",
        EMULATOR_VERSION=dockerfile.global_args["SHIMMY_VERSION"],
    )
    before = snapshot(workdir)

    log = base / "container.log"
    with log.open("wb") as out:
        # What tini runs; tini's part, handing SIGTERM on, is played by the test itself below.
        proc = subprocess.Popen(
            dockerfile.final.last("CMD").json(), cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    stack = Stack(proc, log, ports["GATEWAY_PORT"], ports["SHIMMY_PORT"], ports["ENVOY_ADMIN_PORT"], 0)
    try:
        deadline = time.monotonic() + 60
        while "[supervisor] ready" not in stack.output():
            assert proc.poll() is None, f"the stack exited with {proc.returncode}:\n{stack.output()}"
            assert time.monotonic() < deadline, f"the stack did not start:\n{stack.output()}"
            time.sleep(0.1)
        wait_healthy(stack, timeout=60)
        yield Container(stack, env, root, workdir, env["MODEL_NAME"])
    finally:
        stop_stack(stack)
        assert snapshot(workdir) == before, "the stack wrote into its read-only working directory"
        make_writable(workdir)


@pytest.fixture
def client(container: Container) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=container.stack.url, timeout=30, trust_env=False) as http:
        yield http


def test_environment_is_the_images(container: Container) -> None:
    env = container.env
    assert env["PATH"].split(":")[0] == str(Path(sys.prefix) / "bin")
    assert shutil.which("shimmy-gateway", path=env["PATH"]) == str(Path(sys.prefix) / "bin" / "shimmy-gateway")
    assert Path(env["HOME"]).is_relative_to(container.root) and Path(env["TMPDIR"]).is_relative_to(container.root)
    assert env["MODEL_NAME"] == "phi3-lora"
    assert "HEALTH_INTERVAL_S" not in env, "the image's own probe interval, not the test suite's"


def test_health(client: httpx.Client) -> None:
    reply = client.get("/v1/health")
    assert reply.status_code == 200
    assert reply.json() == {"status": "healthy", "shimmy_status": "healthy"}


def test_the_emulator_is_the_pinned_shimmy(container: Container, dockerfile: Dockerfile) -> None:
    shimmy = f"http://127.0.0.1:{container.stack.shimmy_port}/health"
    assert httpx.get(shimmy, timeout=5).json()["version"] == dockerfile.global_args["SHIMMY_VERSION"]
    assert "Shimmy " + dockerfile.global_args["SHIMMY_VERSION"] + " (emulator backend)" in container.stack.output()


def test_models(client: httpx.Client, container: Container) -> None:
    reply = client.get("/v1/models")
    assert reply.status_code == 200
    body = reply.json()
    assert body["object"] == "list"
    assert container.model_name in [m["id"] for m in body["data"]]


def test_chat_completion(client: httpx.Client, container: Container) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.post("/v1/chat/completions", json={"model": container.model_name, "messages": messages})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion" and body["model"] == container.model_name
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] > 0


def test_streamed_chat_completion(client: httpx.Client, container: Container) -> None:
    request = {"model": container.model_name, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    with client.stream("POST", "/v1/chat/completions", json=request) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert len(lines) > 2 and lines[-1] == "data: [DONE]"


def test_rendered_envoy_config_lives_in_tmpdir(container: Container) -> None:
    workdirs = list(Path(container.env["TMPDIR"]).glob("shimmy-gateway-*"))
    assert len(workdirs) == 1 and (workdirs[0] / "envoy.json").is_file()


def websocket_socket(container: Container) -> Path:
    """Where the supervisor put Responses WebSocket mode's unix socket: the pipe in the rendered Envoy config."""
    (workdir,) = Path(container.env["TMPDIR"]).glob("shimmy-gateway-*")
    pipes = re.findall(r'"pipe": \{"path": "([^"]+)"', (workdir / "envoy.json").read_text())
    assert len(set(pipes)) == 1, pipes
    return Path(pipes[0])


def test_responses_websocket_mode(container: Container) -> None:
    """The image's TMPDIR here is deep in pytest's temporary tree, too deep for a unix socket path (107 bytes): the
    supervisor must still find its WebSocket socket a home, and a turn must work through Envoy."""
    assert len(os.fsencode(websocket_socket(container))) <= 107
    with connect(f"ws://127.0.0.1:{container.stack.gateway_port}/v1/responses", open_timeout=10) as ws:
        ws.send(json.dumps({"type": "response.create", "model": container.model_name, "input": "Hi", "store": False}))
        events = []
        while not events or events[-1]["type"] not in ("response.completed", "response.failed", "error"):
            events.append(json.loads(ws.recv(timeout=30)))
    assert events[-1]["type"] == "response.completed", events[-1]
    (message,) = events[-1]["response"]["output"]
    assert message["type"] == "message" and message["content"][0]["text"]


def test_image_healthcheck_command(container: Container, dockerfile: Dockerfile) -> None:
    command = healthcheck_command(dockerfile.final.last("HEALTHCHECK"))
    result = subprocess.run(command, env=container.env, cwd=container.workdir, capture_output=True, timeout=10)
    assert result.returncode == 0, result.stderr.decode()


def test_sigterm_stops_everything_cleanly(container: Container, dockerfile: Dockerfile) -> None:
    """Last in this module: tini hands SIGTERM to the supervisor, which must stop every child and exit quickly."""
    stack = container.stack
    socket_path = websocket_socket(container)
    started = time.monotonic()
    stack.proc.send_signal(signal.SIGTERM)
    returncode = stack.proc.wait(timeout=15)
    elapsed = time.monotonic() - started
    output = stack.output()
    assert returncode == 128 + signal.SIGTERM, output
    assert elapsed < 10, f"stopping took {elapsed:.1f} s"
    assert "received SIGTERM, stopping" in output and "SIGKILL" not in output, output
    assert port_closed(stack.gateway_port) and port_closed(stack.shimmy_port), "a child outlived the supervisor"
    assert not list(Path(container.env["TMPDIR"]).iterdir()), "the supervisor leaves its temporary files behind"
    assert not socket_path.parent.exists(), "the supervisor leaves its WebSocket socket's directory behind"
    command = healthcheck_command(dockerfile.final.last("HEALTHCHECK"))
    result = subprocess.run(command, env=container.env, cwd=container.workdir, capture_output=True, timeout=10)
    assert result.returncode != 0, "the HEALTHCHECK must fail once the gateway is gone"
