"""Run Shimmy, the processor and Envoy as children of one long-lived process, and stop them together.

Each child gets its own session: a terminal's Ctrl-C or hangup reaches only the supervisor, which then stops the
children in reverse order (SIGHUP, the terminal closing, is a stop like SIGTERM). Signalling the child's whole process
group also takes any grandchildren with it, so nothing is left behind. Should the supervisor itself be killed
(SIGKILL), no handler runs: on Linux each child is started through a few lines of Python that set PR_SET_PDEATHSIG
before they exec the real program, so the kernel kills the child when the thread that spawned it dies. Children are
spawned from the event loop's thread, which lives as long as they do (Envoy sets its own death signal too).

"Ready" means every child's probe passed and, where the child declares ports, that the child itself listens on
them: a probe answered by some other process already on that port does not count. A port already in use is found
before anything starts, or when a child dies at start because another process took its port meanwhile; either way
the supervisor says which port and which setting, and returns 2.

Children are spawned with `loop.subprocess_exec` and a protocol rather than `create_subprocess_exec`: on Python 3.11
`Process.wait()` returns only once the output pipe closes, so a grandchild holding stdout would hide the child's exit.
The protocol hears about the exit itself, and splits output into lines without a reader task or a line-length limit.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from subprocess import DEVNULL, PIPE, STDOUT
from typing import Literal, NamedTuple

from gateway import probes

__all__ = ["PORT_IN_USE", "Backoff", "Child", "Port", "format_line", "supervise"]

_POLL_INTERVAL = 0.1
_MAX_LINE = 64 * 1024  # a longer unterminated run of output is printed in pieces, so memory stays bounded
_DRAIN_TIMEOUT = 1.0  # output still open this long after the group died belongs to an escaped process: give up
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_SUPERVISOR = "supervisor"
PORT_IN_USE = 2  # the supervisor's exit code when a port is taken: a setting to change, like a bad value

# Run as `python -c _GUARD <supervisor pid> <program path> <argv...>`: die with the supervisor, then become the child.
# A supervisor already gone by the time the death signal is set (getppid changed) means the child must not start.
_GUARD = """\
import ctypes, os, signal, sys
if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
    sys.exit("cannot set PR_SET_PDEATHSIG: " + os.strerror(ctypes.get_errno()))
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[3:])
"""


def _guarded(argv: Sequence[str], env: Mapping[str, str] | None) -> list[str]:
    """`argv` behind the death-signal guard on Linux (the only kernel with PR_SET_PDEATHSIG); as is elsewhere.

    The program is looked up here, so a missing one is the same OSError as without the guard.
    """
    if not sys.platform.startswith("linux"):
        return list(argv)
    program = shutil.which(argv[0], path=(os.environ if env is None else env).get("PATH", os.defpath))
    if program is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv[0])
    return [sys.executable, "-I", "-S", "-c", _GUARD, str(os.getpid()), program, *argv]


class Port(NamedTuple):
    """A port a child listens on, and the setting that chose it (named in the error when the port is taken)."""

    setting: str
    host: str
    number: int


class _Failure(NamedTuple):
    message: str
    code: int = 1


@dataclass(frozen=True, slots=True)
class Child:
    """One program to run; `name` is its log prefix."""

    name: str
    argv: Sequence[str]
    ready: Callable[[], Awaitable[bool]]  # polled every 0.1 s until True; must not hang (probes carry a timeout)
    env: Mapping[str, str] | None = None  # the child's whole environment; None inherits ours
    ready_timeout: float = 60.0
    restart: bool = False  # restart it with backoff when it dies after being ready, instead of stopping everything
    on_state: Callable[[Literal["up", "down"]], None] | None = None  # told when a restarting child goes down/up
    drain: Callable[[], Awaitable[None]] | None = None  # awaited before SIGTERM on a shutdown: finish in-flight work
    ports: Sequence[Port] = ()  # checked free before anything starts; ready only once the child itself listens
    on_crash: str = ""  # said after a death by a crash signal (SIGSEGV, SIGILL...): what crashed, and what to do


@dataclass(slots=True)
class Backoff:
    """Delay before each restart: a crash loop slows down, a child that ran a while restarts quickly."""

    first: float = 0.5
    cap: float = 10.0
    reset_after: float = 30.0
    _next: float = field(init=False)

    def __post_init__(self) -> None:
        self._next = self.first

    def delay(self, up_for: float) -> float:
        """The wait before the next start of a child that stayed up `up_for` seconds."""
        if up_for >= self.reset_after:
            self._next = self.first
        delay, self._next = self._next, min(self._next * 2, self.cap)
        return delay


def format_line(name: str, width: int, line: str) -> str:
    """`[name] line`, with the text starting in the same column for every name up to `width` characters."""
    return f"{'[' + name + ']':<{width + 2}} {line}"


def _print_line(line: str) -> None:
    try:
        print(line, flush=True)
    except OSError:  # the terminal is gone (SIGHUP) or the reader left: stopping the children matters more
        pass


def _in_use(port: Port) -> str:
    return f"port {port.number} ({port.setting}) is already in use: stop what holds it, or set {port.setting}"


def _taken(children: Iterable[Child]) -> str | None:
    """The first port of `children` that another process holds, as the supervisor's one-line error."""
    for child in children:
        for port in child.ports:
            if not probes.port_free(port.host, port.number):
                return _in_use(port)
    return None


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_CRASHES = frozenset({signal.SIGSEGV, signal.SIGILL, signal.SIGBUS, signal.SIGFPE, signal.SIGABRT})


def _describe(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        return f"was killed by signal {-returncode} ({signal.Signals(-returncode).name})"
    except ValueError:
        return f"was killed by signal {-returncode}"


def _advice(child: Child, returncode: int) -> str:
    """`child`'s `on_crash` advice, after a colon, when a crash signal ended it."""
    return f": {child.on_crash}" if child.on_crash and -returncode in _CRASHES else ""


class _Output(asyncio.SubprocessProtocol):
    """Hands a child's output on line by line and notes when the child exits and when its output ends."""

    def __init__(self, emit: Callable[[bytes], None]) -> None:
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.drained: asyncio.Future[None] = loop.create_future()
        self._emit = emit
        self._pending = b""

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        *lines, self._pending = (self._pending + data).split(b"\n")
        if len(self._pending) > _MAX_LINE:
            lines.append(self._pending)
            self._pending = b""
        for line in lines:
            self._emit(line)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if self._pending:
            self._emit(self._pending)
        self.drained.set_result(None)

    def process_exited(self) -> None:
        self.exited.set_result(None)


@dataclass(slots=True)
class _Running:
    child: Child
    transport: asyncio.SubprocessTransport
    output: _Output
    reaped: bool = False  # our own flag: uvloop's transport says is_closing() as soon as the child exits

    @property
    def pid(self) -> int:
        return self.transport.get_pid()

    @property
    def returncode(self) -> int:
        returncode = self.transport.get_returncode()
        assert returncode is not None, "asked before the child exited"
        return returncode


class _Supervisor:
    def __init__(self, children: Sequence[Child], printer: Callable[[str], None], stop_timeout: float) -> None:
        names = [child.name for child in children]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"need at least one child, each with its own name: {names}")
        self._children = children
        self._printer = printer
        self._stop_timeout = stop_timeout
        self._width = max(len(name) for name in [*names, _SUPERVISOR])
        self._running: dict[str, _Running] = {}  # in start order; a restart replaces its entry in place
        self._signals: list[int] = []
        self._stopping = False
        loop = asyncio.get_running_loop()
        self._signalled: asyncio.Future[None] = loop.create_future()
        self._kill_now: asyncio.Future[None] = loop.create_future()  # a second signal, or any signal while stopping

    async def run(self, on_ready: Callable[[], None]) -> int:
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, self._record, sig)
        work = asyncio.create_task(self._work(on_ready))
        try:
            await asyncio.wait({work, self._signalled}, return_when=asyncio.FIRST_COMPLETED)
            if self._signals:
                self._say(f"received {signal.Signals(self._signals[0]).name}, stopping")
                return 128 + self._signals[0]
            return work.result()
        finally:
            self._stopping = True
            work.cancel()
            await asyncio.wait({work})
            await self._stop_all()
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)

    def _record(self, sig: int) -> None:
        self._signals.append(sig)
        _resolve(self._signalled)
        if self._stopping or len(self._signals) > 1:
            _resolve(self._kill_now)

    async def _work(self, on_ready: Callable[[], None]) -> int:
        if (taken := _taken(self._children)) is not None:
            self._say(taken)
            return PORT_IN_USE
        for child in self._children:
            if (failure := await self._launch(child)) is not None:
                self._say(failure.message)
                return failure.code
        on_ready()
        watchers = [asyncio.create_task(self._watch(child)) for child in self._children]
        try:
            done, _ = await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
            return done.pop().result()
        finally:
            for watcher in watchers:
                watcher.cancel()
            await asyncio.wait(watchers)

    async def _launch(self, child: Child) -> _Failure | None:
        """Start `child` and wait until its probe passes on its own ports; return why it failed, or None."""
        loop = asyncio.get_running_loop()
        output = _Output(lambda line: self._emit(child.name, line))
        try:
            transport, _ = await loop.subprocess_exec(
                lambda: output,
                *_guarded(child.argv, child.env),
                stdin=DEVNULL,
                stdout=PIPE,
                stderr=STDOUT,
                env=child.env,
                start_new_session=True,
            )
        except OSError as exc:
            return _Failure(f"cannot start {child.name}: {exc}")
        running = self._running[child.name] = _Running(child, transport, output)
        try:
            async with asyncio.timeout(child.ready_timeout):
                # Polling is the contract: a probe is the only way to know a child is serving.
                while not output.exited.done() and not await self._serving(running):  # noqa: ASYNC110
                    await asyncio.sleep(_POLL_INTERVAL)
        except TimeoutError:
            return _Failure(f"{child.name} not ready after {child.ready_timeout:g} s")
        if output.exited.done():
            await self._reap(running)
            if (taken := _taken([child])) is not None:  # someone took the port between our check and its bind
                return _Failure(f"{child.name} {_describe(running.returncode)}: {taken}", PORT_IN_USE)
            died = _describe(running.returncode)
            return _Failure(f"{child.name} {died} before it was ready{_advice(child, running.returncode)}")
        return None

    async def _serving(self, running: _Running) -> bool:
        """The probe passes and the answer came from this child: it listens on each of its ports itself."""
        if not await running.child.ready():
            return False
        return all(probes.listens(running.pid, port.number) is not False for port in running.child.ports)

    async def _watch(self, child: Child) -> int:
        """Wait for a ready child to exit; restart it if it may be, else return the supervisor's exit code."""
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        while True:
            up_since = loop.time()
            running = self._running[child.name]
            await asyncio.shield(running.output.exited)  # cancelling this watcher must not cancel the shared future
            await self._reap(running)  # print its last words before the verdict
            self._say(f"{child.name} {_describe(running.returncode)}{_advice(child, running.returncode)}")
            if not child.restart:
                return 1
            self._notify(child, "down")
            delay = backoff.delay(up_for=loop.time() - up_since)
            while (failure := await self._restart(child, delay)) is not None:
                self._say(failure.message)
                delay = backoff.delay(up_for=0.0)
            self._notify(child, "up")

    async def _restart(self, child: Child, delay: float) -> _Failure | None:
        self._say(f"restarting {child.name} in {delay:g} s")
        await asyncio.sleep(delay)
        if (failure := await self._launch(child)) is not None:
            await self._stop(self._running[child.name])
        return failure

    async def _stop_all(self) -> None:
        for running in reversed(list(self._running.values())):
            await self._stop(running)

    async def _stop(self, running: _Running) -> None:
        """Drain it if it can be; SIGTERM its group; SIGKILL it after `stop_timeout`, or at once on another signal."""
        drain = running.child.drain
        if drain is not None and self._signals and not running.output.exited.done() and not self._kill_now.done():
            self._say(f"draining {running.child.name}")
            draining = asyncio.ensure_future(drain())
            await asyncio.wait({draining, running.output.exited, self._kill_now}, return_when=asyncio.FIRST_COMPLETED)
            draining.cancel()
        if not running.output.exited.done():
            _signal_group(running.pid, signal.SIGTERM)
            await asyncio.wait(
                {running.output.exited, self._kill_now}, timeout=self._stop_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not running.output.exited.done():
                self._say(f"{running.child.name} still running, sending SIGKILL")
        await self._reap(running)

    async def _reap(self, running: _Running) -> None:
        """Kill what is left of the child's group, so no grandchild outlives it, and collect its last output."""
        if running.reaped:
            return
        # Safe after the leader is gone: Linux keeps its PID reserved while any member of its group lives.
        _signal_group(running.pid, signal.SIGKILL)
        await asyncio.shield(running.output.exited)
        await asyncio.wait({running.output.drained}, timeout=_DRAIN_TIMEOUT)
        running.transport.close()
        running.reaped = True

    def _notify(self, child: Child, state: Literal["up", "down"]) -> None:
        if child.on_state is not None:
            child.on_state(state)

    def _emit(self, name: str, line: bytes) -> None:
        self._printer(format_line(name, self._width, line.decode(errors="replace").removesuffix("\r")))

    def _say(self, message: str) -> None:
        self._printer(format_line(_SUPERVISOR, self._width, message))


async def supervise(
    children: Sequence[Child],
    *,
    on_ready: Callable[[], None],
    stop_timeout: float = 5.0,
    printer: Callable[[str], None] = _print_line,
) -> int:
    """Start `children` in order, each once the one before is ready, and keep them running.

    Returns 2 when a port is already in use, 1 when a child fails to start or exits (a restarting child is
    restarted instead), and 129/130/143 after SIGHUP/SIGINT/SIGTERM. Whatever happens, every child is stopped
    before this returns or raises.
    """
    return await _Supervisor(children, printer, stop_timeout).run(on_ready)
