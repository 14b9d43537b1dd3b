"""wrk as the non-stream load generator: a C client costs the 2-core machine far less CPU than the asyncio one.

The POST body comes from a Lua script, `--latency` adds the percentile table, and the text report is parsed.
One thread (`-t1`): wrk needs well under one core here, and every core it does not take goes to the contenders.
wrk's CPU is read from the kernel's accounting of waited-for children (`RUSAGE_CHILDREN`), which only wrk adds to,
as the stack's processes are still running while it is read.
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
from pathlib import Path

from bench.load import RequestRun

__all__ = ["WrkError", "available", "parse", "run", "script"]

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PERCENTILE = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


class WrkError(RuntimeError):
    """wrk failed or printed something this parser does not understand."""


def available() -> str | None:
    """wrk's path, or None: the harness then falls back to the asyncio client and installs nothing."""
    return shutil.which("wrk")


def script(body: bytes, path: Path, headers: dict[str, str] | None = None) -> Path:
    """Write a Lua script that makes every request a JSON POST of `body` (a long bracket string needs no escaping)."""
    text = body.decode()
    if "]==]" in text:
        raise ValueError("the body would end the Lua long string early")
    extra = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
    path.write_text(
        f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n{extra}wrk.body = [==[{text}]==]\n'
    )
    return path


def parse(output: str, concurrency: int, client_cpu_s: float) -> RequestRun:
    """The numbers of wrk's `--latency` report. Non-2xx answers and socket errors both count as errors."""
    total = _TOTAL.search(output)
    percentiles = {int(q): float(v) * _UNITS[u] for q, v, u in _PERCENTILE.findall(output)}
    if total is None or set(percentiles) != {50, 99}:
        raise WrkError(f"unexpected wrk output:\n{output}")
    errors: dict[str, int] = {}
    if non_2xx := _NON_2XX.search(output):
        errors["non-2xx"] = int(non_2xx.group(1))
    if sockets := _SOCKET_ERRORS.search(output):
        for kind, count in zip(("connect", "read", "write", "timeout"), sockets.groups(), strict=True):
            if int(count):
                errors[f"socket {kind}"] = int(count)
    return RequestRun(
        client="wrk",
        concurrency=concurrency,
        seconds=float(total.group(2)) * _UNITS[total.group(3)],
        requests=int(total.group(1)) - errors.get("non-2xx", 0),
        errors=errors,
        p50_ms=percentiles[50] * 1000,
        p99_ms=percentiles[99] * 1000,
        client_cpu_s=client_cpu_s,
    )


def run(binary: str, url: str, lua: Path, concurrency: int, seconds: int) -> RequestRun:
    """One wrk run of whole `seconds` (wrk takes no fractions), bounded by a generous wall-clock timeout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    argv = [binary, "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", str(lua), url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise WrkError(f"wrk exited with {done.returncode}:\n{done.stdout}{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return parse(done.stdout, concurrency, cpu)
