"""The processor under load, profiled with py-spy: where its time goes, by kind of code.

py-spy samples the processor's stacks (`--native`, so gRPC's Cython and C core, upb and msgspec show as what they
are) into collapsed stacks (`bench/results/profile.txt`: one stack and its count a line, the input of flamegraph.pl
and speedscope). Each sample is put in the first category found walking from the innermost frame outwards, so a
stdlib function our code calls counts as our code, and a protobuf call made by our code counts as protobuf.
Samples whose innermost frame is an epoll wait are the event loop or gRPC's poller waiting for work: idle, and left
out of the shares.

py-spy samples wall-clock time: a thread that is runnable but not running (the 2 cores are shared with Envoy, the
emulator and the load client) is sampled where it was preempted, typically on the way out of a system call. So the
shares are compared with the processor's CPU time over the same window (from /proc) in the report.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CATEGORIES", "Profile", "available", "start", "summarize"]

# (category, substrings of a frame), tried in this order on each frame from the innermost one out.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("protobuf (upb)", ("_message.abi3.so", "upb_", "PyUpb", "google/protobuf")),
    ("msgspec", ("msgspec",)),
    ("metrics (prometheus_client)", ("prometheus_client",)),
    ("our code (extproc/, and the stdlib it calls)", ("extproc/", "gateway/")),
    ("gRPC aio (Cython, C core, grpc/aio)", ("cygrpc", "grpc/", "grpc_core", "libgrpc")),
    ("event loop (uvloop, asyncio)", ("uvloop", "loop.c", "asyncio/", "_asynciomodule", "uv__", "uv_run")),
)
OTHER = "other (interpreter, GC, libc)"
_IDLE = ("epoll_wait", "epoll_pwait")
# Innermost frames that are system calls: kernel time (sending to Envoy, waking a poller), or a preemption point.
_SYSCALLS = ("sendmsg", "write", "writev", "recvmsg", "recv", "read", "syscall", "eventfd_write", "send")


@dataclass(slots=True)
class Profile:
    seconds: float
    samples: int = 0
    idle: int = 0
    by_category: Counter[str] = field(default_factory=Counter)
    # (category, system call) -> samples whose innermost frame is that call
    syscalls: Counter[tuple[str, str]] = field(default_factory=Counter)
    our_lines: Counter[str] = field(default_factory=Counter)  # our innermost frame, for the samples that are ours
    threads: Counter[str] = field(default_factory=Counter)
    cpu_s: float = 0.0  # the processor's CPU seconds over the window, from /proc
    rps: float = 0.0  # what the load achieved while being profiled

    @property
    def busy(self) -> int:
        return self.samples - self.idle


def available() -> str | None:
    """py-spy's path (the venv's first), or None."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def start(py_spy: str, pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy recording `pid` for `seconds` into `out` (collapsed stacks), in the background."""
    argv = [py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "100"]
    argv += ["--native", "--threads", "--format", "raw", "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _function(frame: str) -> str:
    return frame.split(" (", 1)[0]


def summarize(raw: Path, seconds: float) -> Profile:
    profile = Profile(seconds)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        profile.samples += n
        profile.threads[frames[0].split(":")[-1].strip()] += n
        if _function(frames[-1]) in _IDLE:
            profile.idle += n
            continue
        category = OTHER
        for frame in reversed(frames[1:]):
            hit = next((name for name, keys in CATEGORIES if any(k in frame for k in keys)), None)
            if hit is not None:
                category = hit
                if hit.startswith("our code"):
                    profile.our_lines[frame] += n
                break
        profile.by_category[category] += n
        leaf = _function(frames[-1])
        if leaf in _SYSCALLS:
            profile.syscalls[(category, leaf)] += n
    return profile
