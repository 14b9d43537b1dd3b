"""Issue 15 through the real commands: bad settings and taken ports refused in one line, and a stack that leaves
nothing behind however its supervisor ends (SIGKILL, SIGHUP)."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Stack, free_port, start_stack, stop_stack

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {
    "shimmy-gateway": ["-m", "gateway.cli", "up"],
    "shimmy-extproc": ["-m", "extproc.cli"],
    "shimmy-emulator": ["-m", "shimmy"],
}


def run(command: str, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *COMMANDS[command], *flags],
        env={**os.environ, "SHIMMY_BACKEND": "emulator", "EMULATOR_ENGINE": "fixed", **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("command", "env", "flags", "line"),
    [
        ("shimmy-gateway", {"GATEWAY_PORT": "70000"}, (), "GATEWAY_PORT='70000': expected an integer from 1 to 65535"),
        ("shimmy-gateway", {"HEALTH_INTERVAL_S": "0"}, (), "HEALTH_INTERVAL_S='0': expected a number of at least 0.01"),
        ("shimmy-gateway", {"MAX_REQUEST_BYTES": "-5"}, (),
         "MAX_REQUEST_BYTES='-5': expected an integer from 1 to 4294967295"),
        ("shimmy-gateway", {"LOG_LEVEL": "verbose"}, (), "LOG_LEVEL='verbose': expected debug, info, warning or error"),
        ("shimmy-gateway", {"PUBLIC_METRICS": "maybe"}, (),
         "PUBLIC_METRICS='maybe': expected true or false (also 1/0, yes/no, on/off)"),
        ("shimmy-gateway", {"MAX_QUEUED_REQUESTS": "0"}, (),
         "MAX_QUEUED_REQUESTS='0': expected an integer of at least 1"),
        ("shimmy-gateway", {"MAX_ACTIVE_REQUESTS": "0"}, (),
         "MAX_ACTIVE_REQUESTS='0': expected an integer of at least 1"),
        ("shimmy-gateway", {"GENERATION_TIMEOUT_S": "0"}, (),
         "GENERATION_TIMEOUT_S='0': expected an integer of at least 3"),
        ("shimmy-gateway", {"EMULATOR_ENGINE": "gpu"}, (), "EMULATOR_ENGINE='gpu': expected auto, llama or fixed"),
        ("shimmy-gateway", {}, ("--gatway-port", "9000"), "unknown flag --gatway-port (did you mean --gateway-port?)"),
        ("shimmy-gateway", {}, ("--gateway-port=x",), "GATEWAY_PORT='x': expected an integer from 1 to 65535"),
        ("shimmy-gateway", {"SHIMMY_PORT": "8000"}, (),
         "GATEWAY_PORT and SHIMMY_PORT are both 8000: expected a port of its own for each"),
        ("shimmy-gateway", {}, ("--extproc-tls-cert", "c.pem"),
         "--extproc-tls-cert: EXTPROC_TLS_CERT is not a setting of shimmy-gateway (see shimmy-gateway --help)"),
        ("shimmy-extproc", {}, ("--envoy-workers", "2"),
         "--envoy-workers: ENVOY_WORKERS is not a setting of shimmy-extproc (see shimmy-extproc --help)"),
        ("shimmy-extproc", {"WARMUP": "sometimes"}, (),
         "WARMUP='sometimes': expected true or false (also 1/0, yes/no, on/off)"),
        ("shimmy-extproc", {"EXTPROC_PORT": "0"}, (),
         "EXTPROC_PORT='0': expected a port from 1 to 65535, or unix:/path"),
        ("shimmy-emulator", {"EMULATOR_VERSION": "latest"}, (),
         "EMULATOR_VERSION='latest': expected a Shimmy version X.Y.Z, e.g. 1.7.2 or 2.5.0"),
        ("shimmy-emulator", {}, ("--shimmy-prot", "1"), "unknown flag --shimmy-prot (did you mean --shimmy-port?)"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_code_2(
    command: str, env: dict[str, str], flags: tuple[str, ...], line: str
) -> None:
    done = run(command, *flags, env=env)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"{command}: {line}\n")


def test_boolean_spellings_are_accepted(tmp_path: Path) -> None:
    env = {"PUBLIC_METRICS": "off", "WARMUP": "YES", "EXTPROC_REFLECTION": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "config"], env={**os.environ, **env}, cwd=ROOT, capture_output=True,
        text=True, timeout=60, check=True,
    )
    assert '"name": "metrics"' not in done.stdout  # PUBLIC_METRICS=off took the metrics route away


def test_config_piped_into_a_reader_that_stops_early_ends_quietly() -> None:
    """`shimmy-gateway config | head`: the config is larger than the (shrunk) pipe, so the reader leaves mid-way."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "config"], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE
    )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        assert reader.readline() == b"{\n"
    _, stderr = proc.communicate(timeout=30)
    assert stderr == b""  # no BrokenPipeError traceback
    assert proc.returncode == -signal.SIGPIPE  # what `cat` does: the shell shows 141


# --- ports ----------------------------------------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """Another program's listening socket, on all interfaces like Envoy's public port."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock


@pytest.mark.parametrize("setting", ["GATEWAY_PORT", "ENVOY_ADMIN_PORT", "SHIMMY_PORT", "EXTPROC_PORT"])
def test_a_port_in_use_is_one_line_naming_it_and_never_ready(setting: str, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    ports = {name: str(free_port()) for name in ("GATEWAY_PORT", "ENVOY_ADMIN_PORT", "SHIMMY_PORT", "EXTPROC_PORT")}
    done = run("shimmy-gateway", env={**ports, setting: str(port)})
    assert done.returncode == 2
    assert "[supervisor] ready" not in done.stdout
    assert done.stdout.splitlines()[-1] == (
        f"[supervisor] port {port} ({setting}) is already in use: stop what holds it, or set {setting}"
    )


# --- a stack that ends ----------------------------------------------------------------------------------------


def _ports(stack: Stack) -> list[int]:
    return [stack.gateway_port, stack.admin_port, stack.shimmy_port, stack.extproc_port, stack.extproc_port + 1]


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (taken while it lives: after its death they are init's)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _all_closed(ports: list[int], within: float) -> list[int]:
    """Polls until no port has a listener, or `within` seconds; returns those still listening."""
    deadline = time.monotonic() + within
    while (still := [p for p in ports if _listening(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return still


def _kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)  # each child leads its own group
        except OSError:
            pass


def test_sigkill_of_the_supervisor_leaves_no_listener_behind() -> None:
    stack = start_stack({"EXTPROC_WORKERS": "2"})
    children = _children(stack.proc.pid)
    try:
        assert len(children) == 4  # emulator, two processors, Envoy
        assert not [p for p in _ports(stack) if not _listening(p)]
        stack.proc.kill()
        stack.proc.wait()
        assert _all_closed(_ports(stack), within=5) == []
    finally:
        _kill_leftovers(children)
        stop_stack(stack)
        stack.log.unlink(missing_ok=True)


def test_sighup_stops_the_stack_cleanly() -> None:
    stack = start_stack()
    children = _children(stack.proc.pid)
    try:
        stack.proc.send_signal(signal.SIGHUP)
        assert stack.proc.wait(timeout=30) == 128 + signal.SIGHUP
        assert "[supervisor] received SIGHUP, stopping" in stack.output()
        assert _all_closed(_ports(stack)[:4], within=0) == []
    finally:
        _kill_leftovers(children)
        stop_stack(stack)
        stack.log.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Running, not a zombie (in a container without an init, nobody may reap an orphan that exits)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_test_process_killed_mid_run_leaves_no_stack_behind() -> None:
    """A test run that crashes (a segfault in a test, SIGKILL) takes its stacks with it: the tests' launcher asks the
    kernel for SIGTERM to each stack when the test process dies, and the stack's supervisor takes its children."""
    parent = (
        "import sys, time\n"
        "from tests.integration.conftest import start_stack\n"
        "stack = start_stack()\n"
        "print(stack.log, stack.proc.pid, stack.gateway_port, stack.shimmy_port, stack.admin_port, stack.extproc_port,"
        " flush=True)\n"
        "time.sleep(120)\n"
    )
    with subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                          start_new_session=True) as test_process:
        assert test_process.stdout is not None
        log, supervisor_pid, *port_numbers = test_process.stdout.readline().split()
        supervisor, ports = int(supervisor_pid), [int(n) for n in port_numbers]
        children = _children(supervisor)
        try:
            assert len(children) == 3 and not [p for p in ports if not _listening(p)]  # emulator, processor, Envoy
            test_process.kill()
            test_process.wait()
            deadline = time.monotonic() + 30
            while _alive(supervisor) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _alive(supervisor), "the stack outlived the test process"
            assert not [pid for pid in children if _alive(pid)]
            assert _all_closed(ports, within=5) == []
        finally:
            _kill_leftovers([supervisor, *children])
            Path(log).unlink(missing_ok=True)
