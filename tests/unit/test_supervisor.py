"""The supervisor against real child processes (small Python scripts), and the readiness probes against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from gateway import cli
from gateway.probes import envoy_ready, grpc_serving, http_ok, listens, port_free
from gateway.supervisor import Backoff, Child, Port, format_line, supervise
from settings import load
from shimmy.llama_engine import EngineChoice
from tests.integration.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.stack  # real child processes, most of them for seconds

# Prints its PID, then writes the ready file named by argv[1] and sleeps; argv[2], if given, is an exit delay.
SLEEPER = textwrap.dedent("""
    import os, pathlib, sys, time
    print("pid", os.getpid(), flush=True)
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 60)
""")


def python(script: str, *args: object) -> list[str]:
    return [sys.executable, "-c", script, *map(str, args)]


def exists(path: Path) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return await asyncio.to_thread(path.exists)

    return probe


async def never() -> bool:
    return False


def pids(lines: list[str], name: str = r"\w+") -> list[int]:
    """The PIDs that children named `name` (a regex) printed as `pid N`."""
    return [int(m[1]) for line in lines if (m := re.match(rf"\[{name}\] +pid (\d+)$", line))]


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for init (a reparented grandchild)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def dies(pid: int) -> bool:
    """Whether `pid` is dead within a second: a killed process closes its files a moment before it is marked dead."""
    for _ in range(50):
        if not alive(pid):
            return True
        await asyncio.sleep(0.02)
    return False


class Run:
    """One in-process `supervise` call with its output collected."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.ready_calls = 0

    def on_ready(self) -> None:
        self.ready_calls += 1

    async def __call__(self, *children: Child, stop_timeout: float = 2.0) -> int:
        async with asyncio.timeout(15):
            return await supervise(
                children, on_ready=self.on_ready, stop_timeout=stop_timeout, printer=self.lines.append
            )

    def index(self, text: str) -> int:
        return next(i for i, line in enumerate(self.lines) if text in line)


def test_format_line_pads_after_the_bracket() -> None:
    assert format_line("envoy", 10, "hi") == "[envoy]      hi"
    assert format_line("supervisor", 10, "hi") == "[supervisor] hi"


def test_backoff_doubles_to_the_cap_and_resets_after_a_long_run() -> None:
    backoff = Backoff()
    assert [backoff.delay(up_for=1.0) for _ in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]
    assert backoff.delay(up_for=30.0) == 0.5
    assert backoff.delay(up_for=0.0) == 1


async def test_children_start_in_order_and_an_exit_after_ready_stops_the_rest(tmp_path: Path) -> None:
    a_ready, b_ready = tmp_path / "a", tmp_path / "b"
    second = textwrap.dedent("""
        import os, pathlib, sys, time
        print("saw a:", pathlib.Path(sys.argv[1]).exists(), flush=True)
        pathlib.Path(sys.argv[2]).touch()
        time.sleep(0.5)
        sys.stdout.buffer.write(b"bad \\xff\\r\\nlast words without newline")
        sys.exit(3)
    """)
    run = Run()
    code = await run(
        Child("a", python("import time; time.sleep(0.3); " + SLEEPER, a_ready), exists(a_ready)),
        Child("b", python(second, a_ready, b_ready), exists(b_ready)),
    )
    assert code == 1
    assert run.ready_calls == 1
    assert "[b]          saw a: True" in run.lines
    assert "[b]          bad \ufffd" in run.lines
    assert run.index("last words without newline") < run.index("[supervisor] b exited with code 3")
    [a_pid] = pids(run.lines, "a")
    assert not alive(a_pid)


async def test_exit_before_ready_stops_the_children_already_running(tmp_path: Path) -> None:
    run = Run()
    code = await run(
        Child("a", python(SLEEPER, tmp_path / "a"), exists(tmp_path / "a")),
        Child("b", python("print('boom'); raise SystemExit(1)"), never),
    )
    assert code == 1
    assert run.ready_calls == 0
    assert run.index("[b]          boom") < run.index("[supervisor] b exited with code 1 before it was ready")
    assert not alive(pids(run.lines, "a")[0])


async def test_ready_timeout_stops_the_child(tmp_path: Path) -> None:
    run = Run()
    assert await run(Child("a", python(SLEEPER, tmp_path / "a"), never, ready_timeout=0.5)) == 1
    assert "[supervisor] a not ready after 0.5 s" in run.lines
    assert not alive(pids(run.lines, "a")[0])


async def test_a_program_that_cannot_start_is_reported() -> None:
    run = Run()
    assert await run(Child("a", ["/nonexistent/program"], never)) == 1
    assert run.lines[0].startswith("[supervisor] cannot start a: [Errno 2]")


# Listens on argv[1] (127.0.0.1), then writes the ready file argv[2] and sleeps.
HOLDER = textwrap.dedent("""
    import pathlib, socket, sys, time
    sock = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    pathlib.Path(sys.argv[2]).touch()
    time.sleep(60)
""")
# Tries to listen on argv[1]; when it cannot, exits 1 if argv[2] says so, else stays up without listening.
TAKER = textwrap.dedent("""
    import socket, sys, time
    try:
        socket.create_server(("127.0.0.1", int(sys.argv[1])))
    except OSError as exc:
        print(exc, flush=True)
        if sys.argv[2] == "exit":
            sys.exit(1)
    time.sleep(60)
""")


def connects(port: int) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True

    return probe


async def test_a_port_in_use_before_the_start_is_named_and_nothing_starts(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        run = Run()
        code = await run(
            Child("a", python(SLEEPER, tmp_path / "a"), exists(tmp_path / "a")),
            Child("b", python(TAKER, port, "exit"), connects(port), ports=(Port("B_PORT", "127.0.0.1", port),)),
        )
    assert code == 2 and run.ready_calls == 0
    assert run.lines == [f"[supervisor] port {port} (B_PORT) is already in use: stop what holds it, or set B_PORT"]


async def test_a_child_that_dies_because_its_port_was_taken_meanwhile_names_the_port(tmp_path: Path) -> None:
    port = free_port()  # free when the supervisor checks; `a` takes it before `b` starts
    run = Run()
    code = await run(
        Child("a", python(HOLDER, port, tmp_path / "a"), exists(tmp_path / "a")),
        Child("b", python(TAKER, port, "exit"), connects(port), ports=(Port("B_PORT", "127.0.0.1", port),)),
    )
    assert code == 2 and run.ready_calls == 0
    assert run.lines[-1] == (
        f"[supervisor] b exited with code 1: port {port} (B_PORT) is already in use: stop what holds it, or set B_PORT"
    )


async def test_a_probe_answered_by_another_process_on_the_port_is_not_ready(tmp_path: Path) -> None:
    port = free_port()
    run = Run()
    code = await run(
        Child("a", python(HOLDER, port, tmp_path / "a"), exists(tmp_path / "a")),
        Child("b", python(TAKER, port, "stay"), connects(port), ports=(Port("B_PORT", "127.0.0.1", port),),
              ready_timeout=1.0),
    )
    assert code == 1 and run.ready_calls == 0  # `a` answered b's probe all along, but b never listened
    assert run.lines[-1] == "[supervisor] b not ready after 1 s"


def test_listens_tells_whose_port_it_is_even_behind_a_wrapper_script() -> None:
    """A SHIMMY_BIN that is a shell script running the real program (no exec) still counts as listening."""
    program = "import socket, time; s = socket.create_server(('127.0.0.1', 0)); print(s.getsockname()[1], flush=True)"
    with subprocess.Popen(["sh", "-c", f'{sys.executable} -c "{program}; time.sleep(30)"; true'],
                          stdout=subprocess.PIPE, start_new_session=True, text=True) as wrapper:
        try:
            assert wrapper.stdout is not None
            port = int(wrapper.stdout.readline())
            assert listens(wrapper.pid, port) is True
            assert listens(os.getpid(), port) is False
            assert not port_free("127.0.0.1", port)
        finally:
            os.killpg(wrapper.pid, signal.SIGKILL)


async def test_a_supervisor_killed_with_sigkill_takes_its_children_along(tmp_path: Path) -> None:
    async with supervisor_process("asyncio", 5, "shimmy:sleep", "extproc:sleep") as supervisor:
        await supervisor.read_until(ready_with(2))
        supervisor.process.kill()
        await supervisor.process.wait()
        children = pids(supervisor.lines)
        assert all([await dies(pid) for pid in children])


async def test_a_child_that_ignores_sigterm_is_killed_after_stop_timeout(tmp_path: Path) -> None:
    stubborn = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + SLEEPER
    run = Run()
    code = await run(
        Child("a", python(stubborn, tmp_path / "a"), exists(tmp_path / "a")),
        Child("b", python(SLEEPER, tmp_path / "b", 0.3), exists(tmp_path / "b")),
        stop_timeout=0.5,
    )
    assert code == 1
    assert "[supervisor] a still running, sending SIGKILL" in run.lines
    assert not alive(pids(run.lines, "a")[0])


async def test_restart_brings_the_child_back_and_leaves_later_children_alone(tmp_path: Path) -> None:
    flaky = textwrap.dedent("""
        import os, pathlib, sys, time
        ready, runs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
        n = int(runs.read_text()) + 1 if runs.exists() else 1
        runs.write_text(str(n))
        print("pid", os.getpid(), flush=True)
        ready.touch()
        if n == 1:
            time.sleep(0.3)
            ready.unlink()
            sys.exit(2)
        time.sleep(60)
    """)
    states: list[str] = []
    up = asyncio.Event()

    def on_state(state: str) -> None:
        states.append(state)
        if state == "up":
            up.set()

    run = Run()
    task = asyncio.create_task(
        run(
            Child(
                "a",
                python(flaky, tmp_path / "a", tmp_path / "runs"),
                exists(tmp_path / "a"),
                restart=True,
                on_state=on_state,
            ),
            Child("b", python(SLEEPER, tmp_path / "b"), exists(tmp_path / "b")),
        )
    )
    try:
        async with asyncio.timeout(5):
            await up.wait()
        assert states == ["down", "up"]
        assert "[supervisor] a exited with code 2" in run.lines
        assert "[supervisor] restarting a in 0.5 s" in run.lines
        first_a, second_a = pids(run.lines, "a")
        [b] = pids(run.lines, "b")
        assert not alive(first_a)
        assert alive(second_a) and alive(b)
    finally:
        task.cancel()  # cancelling supervise is an exception path too: it must still stop everything
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not any(map(alive, [*pids(run.lines, "a"), *pids(run.lines, "b")]))


async def test_a_crash_signal_is_named_with_the_childs_advice(tmp_path: Path) -> None:
    """A segfault (llama.cpp inside the emulator) reads as one line naming the signal and what to do about it."""
    crasher = "import os, pathlib, signal, sys, time; pathlib.Path(sys.argv[1]).touch(); time.sleep(0.3); " \
              "os.kill(os.getpid(), signal.SIGSEGV)"
    run = Run()
    assert await run(Child("a", python(crasher, tmp_path / "a"), exists(tmp_path / "a"), on_crash="try X=fixed")) == 1
    assert "[supervisor] a was killed by signal 11 (SIGSEGV): try X=fixed" in run.lines


def test_the_emulator_running_llama_cpp_names_the_engine_and_the_fallback_when_it_crashes() -> None:
    settings = load(argv=[], environ={})
    llama = EngineChoice("llama", "/models/m.gguf", False, "engine llama.cpp")
    [emulator] = cli.backend_child(settings, "emulator", {}, llama)
    assert "llama.cpp engine crashed" in emulator.on_crash and "EMULATOR_ENGINE=fixed" in emulator.on_crash
    [fixed] = cli.backend_child(settings, "emulator", {}, EngineChoice("fixed", "", False, "engine fixed"))
    assert fixed.on_crash == ""


async def test_an_exception_in_the_supervisor_stops_everything(tmp_path: Path) -> None:
    lines: list[str] = []

    def on_ready() -> None:
        raise RuntimeError("caller bug")

    with pytest.raises(RuntimeError, match="caller bug"):
        await supervise(
            [Child("a", python(SLEEPER, tmp_path / "a"), exists(tmp_path / "a"))],
            on_ready=on_ready,
            printer=lines.append,
        )
    assert not alive(pids(lines, "a")[0])


# `supervise` in its own process, so that real signals can reach it and it can run on uvloop as well.
# argv: event loop, stop_timeout, the child script, then one `name:mode` per child.
SUPERVISOR_SCRIPT = textwrap.dedent("""
    import asyncio, sys, uvloop
    from gateway.supervisor import Child, supervise

    async def ready():
        return True

    loop, stop_timeout, script, *specs = sys.argv[1:]
    children = [Child(n, [sys.executable, "-c", script, mode], ready) for n, mode in (s.split(":") for s in specs)]
    run = uvloop.run if loop == "uvloop" else asyncio.run
    sys.exit(run(supervise(children, on_ready=lambda: print("READY", flush=True), stop_timeout=float(stop_timeout))))
""")

# Modes: "sleep" prints its PID and sleeps; "stubborn" does the same but ignores SIGTERM; "orphaner" starts a
# grandchild that prints *its* PID and sleeps, then exits, leaving the grandchild holding the output pipe.
CHILD_SCRIPT = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    SLEEP = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(60)"
    if sys.argv[1] == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.argv[1] == "orphaner":
        subprocess.Popen([sys.executable, "-c", SLEEP])
        time.sleep(0.5)
    else:
        exec(SLEEP)
""")


class SupervisorProcess:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        self.process = process
        self._stdout = process.stdout
        self.lines: list[str] = []

    async def read_until(self, done: Callable[[list[str]], bool]) -> None:
        async with asyncio.timeout(10):
            while not done(self.lines):
                line = await self._stdout.readline()
                assert line, f"supervisor ended early: {self.lines}"
                self.lines.append(line.decode().rstrip("\n"))

    async def finish(self) -> int:
        """The rest of the output, and the exit code, which must come within 5 s."""
        async with asyncio.timeout(5):
            self.lines += (await self._stdout.read()).decode().splitlines()
            return await self.process.wait()


@contextlib.asynccontextmanager
async def supervisor_process(loop: str, stop_timeout: float, *children: str) -> AsyncIterator[SupervisorProcess]:
    process = await asyncio.create_subprocess_exec(
        *python(SUPERVISOR_SCRIPT, loop, stop_timeout, CHILD_SCRIPT, *children),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        yield SupervisorProcess(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def ready_with(count: int) -> Callable[[list[str]], bool]:
    return lambda lines: "READY" in lines and len(pids(lines)) == count


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
async def test_a_signal_stops_all_children_with_the_shell_exit_code(loop: str, sig: signal.Signals, code: int) -> None:
    async with supervisor_process(loop, 5, "shimmy:sleep", "extproc:sleep", "envoy:sleep") as supervisor:
        await supervisor.read_until(ready_with(3))
        supervisor.process.send_signal(sig)
        assert await supervisor.finish() == code
    assert f"[supervisor] received {sig.name}, stopping" in supervisor.lines
    assert all(pids(supervisor.lines, name) for name in ("shimmy", "extproc", "envoy"))
    assert not any(map(alive, pids(supervisor.lines)))


async def test_a_second_signal_kills_at_once() -> None:
    async with supervisor_process("asyncio", 30, "envoy:stubborn") as supervisor:
        await supervisor.read_until(ready_with(1))
        supervisor.process.send_signal(signal.SIGTERM)
        await supervisor.read_until(lambda lines: "[supervisor] received SIGTERM, stopping" in lines)
        supervisor.process.send_signal(signal.SIGINT)
        assert await supervisor.finish() == 143
    assert "[supervisor] envoy still running, sending SIGKILL" in supervisor.lines
    assert not alive(pids(supervisor.lines)[0])


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_a_child_exit_is_seen_while_a_grandchild_holds_its_output_and_the_grandchild_is_killed(
    loop: str,
) -> None:
    async with supervisor_process(loop, 5, "shimmy:orphaner") as supervisor:
        assert await supervisor.finish() == 1  # within 5 s, though the grandchild would sleep for 60
    assert "[supervisor] shimmy exited with code 0" in supervisor.lines
    assert await dies(pids(supervisor.lines)[0])


@pytest.fixture
async def http_server() -> AsyncIterator[tuple[int, dict[str, tuple[int, str]]]]:
    """A server whose `/ready` and `/health` answer with the (status, body) in the returned dict."""
    answers: dict[str, tuple[int, str]] = {"/ready": (200, "LIVE\n"), "/health": (200, "ok")}

    async def handle(request: web.Request) -> web.Response:
        status, body = answers.get(request.path, (404, "no"))
        return web.Response(status=status, text=body)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1], answers
    finally:
        await runner.cleanup()


async def test_http_ok(http_server: tuple[int, dict[str, tuple[int, str]]]) -> None:
    port, answers = http_server
    assert await http_ok(f"http://127.0.0.1:{port}/health")
    assert not await http_ok(f"http://127.0.0.1:{port}/missing")
    answers["/health"] = (503, "starting")
    assert not await http_ok(f"http://127.0.0.1:{port}/health")
    assert not await http_ok(f"http://127.0.0.1:{free_port()}/health")


async def test_envoy_ready(http_server: tuple[int, dict[str, tuple[int, str]]]) -> None:
    port, answers = http_server
    assert await envoy_ready(port)
    answers["/ready"] = (503, "PRE_INITIALIZING\n")
    assert not await envoy_ready(port)
    answers["/ready"] = (200, "DRAINING\n")
    assert not await envoy_ready(port)
    assert not await envoy_ready(free_port())


@pytest.mark.parametrize("where", ["tcp", "unix"])
async def test_grpc_serving(where: str, tmp_path: Path) -> None:
    server = grpc.aio.server()
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if where == "tcp":
        target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    else:
        target = f"unix:{tmp_path / 'health.sock'}"
        server.add_insecure_port(target)
    await server.start()
    try:
        assert await grpc_serving(target)
        await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert not await grpc_serving(target)
    finally:
        await server.stop(None)
    assert not await grpc_serving(target)


async def test_grpc_serving_on_a_closed_port() -> None:
    assert not await grpc_serving(f"127.0.0.1:{free_port()}")


# --- the stack's command lines -------------------------------------------------------------------------------


def test_envoy_gets_the_configured_worker_count() -> None:
    """Left alone, Envoy would start a worker per core it sees (the host's, in a container). The default, 1, is
    checked on a running Envoy in tests/integration/test_observability.py."""
    settings = load(argv=[], environ={"ENVOY_WORKERS": "3"})
    argv = list(next(c for c in cli.children(settings, "emulator", Path("/dev/null")) if c.name == "envoy").argv)
    assert argv[argv.index("--concurrency") + 1] == "3"


@pytest.mark.parametrize("name", ["ENVOY_WORKERS", "EXTPROC_WORKERS"])
def test_worker_counts_below_one_are_refused(name: str) -> None:
    env = {**os.environ, name: "0"}
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "up"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2
    high = {"ENVOY_WORKERS": 256, "EXTPROC_WORKERS": 64}[name]
    assert done.stderr == f"shimmy-gateway: {name}='0': expected an integer from 1 to {high}\n"


def test_the_websocket_socket_finds_a_short_home_when_tmpdir_is_deep(tmp_path: Path) -> None:
    """A unix socket path has at most 107 bytes, and a legal TMPDIR can be longer than that leaves room for (the
    container contract's is): the socket then goes to a private directory in /tmp, which the caller removes."""
    shallow = tmp_path / "w"
    assert cli.private_socket_dir(shallow) == shallow
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    chosen = cli.private_socket_dir(deep)
    try:
        assert chosen.parent == Path("/tmp") and chosen.is_dir() and (chosen.stat().st_mode & 0o777) == 0o700
        assert len(os.fsencode(chosen / cli.SOCKET_NAME)) <= 107
    finally:
        chosen.rmdir()
