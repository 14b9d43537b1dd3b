"""One Markdown table of a run (absolute numbers, then gateway/plain and gateway/direct ratios) and its JSON twin.

The machine is small and noisy, so absolute numbers travel badly; the ratios, measured minutes apart in the same
run, are what to compare between runs. CPU rows say where a contender spends its time, and the load client's own
CPU share says whether the client, not the contender, was the limit.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.load import RequestRun, StreamRun
from bench.stack import EMULATOR, ENVOY_GATEWAY, ENVOY_PLAIN, EXTPROC
from bench.suite import CONTENDERS, REQUEST_CONCURRENCY, STREAM_CONCURRENCY, STREAM_MAX_TOKENS, Measured, Results

__all__ = ["json_document", "markdown", "write"]

Cells = dict[str, float]  # contender name -> value; a contender without one shows a dash
Runs = dict[str, dict[int, Measured[Any]]]  # contender name -> concurrency -> run
_CPU_STREAMS = 16  # the streaming run whose CPU is divided by the tokens it relayed
# Whose CPU a row shows, per contender: each contender's own Envoy, the processor, and the shared emulator.
_PROCESSES = (
    ("Envoy", {"plain": ENVOY_PLAIN, "gateway": ENVOY_GATEWAY}),
    ("processor", {"gateway": EXTPROC}),
    ("emulator", {c.name: EMULATOR for c in CONTENDERS}),
)


def _number(value: float) -> str:
    """Three significant digits, thousands grouped; NaN (no sample) is a dash."""
    if math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _ratio(top: float | None, bottom: float | None) -> str:
    if top is None or bottom is None or math.isnan(top) or math.isnan(bottom) or bottom == 0:
        return "-"
    return f"{top / bottom:.2f}x"


def _row(label: str, cells: Cells, ratios: bool = True) -> str:
    values = [_number(cells[c.name]) if c.name in cells else "-" for c in CONTENDERS]
    gateway = cells.get("gateway") if ratios else None
    values += [_ratio(gateway, cells.get("plain")), _ratio(gateway, cells.get("direct"))]
    return f"| {label} | {' | '.join(values)} |"


def _at(runs: Runs, n: int, value: Callable[[Measured[Any]], float]) -> Cells:
    """The value of each contender's run at concurrency n."""
    return {name: value(by_n[n]) for name, by_n in runs.items() if n in by_n}


def _share(m: Measured[Any]) -> float:
    return 100 * m.run.client_cpu_share


def _cpu_rows(runs: Runs, n: int, label: str, work: Callable[[Measured[Any]], float]) -> Iterable[str]:
    """CPU seconds of each process kind during the run at concurrency n, divided by the run's `work`."""
    for kind, process in _PROCESSES:
        cells = {
            name: by_n[n].cpu_s[process[name]] / work(by_n[n]) if work(by_n[n]) else math.nan
            for name, by_n in runs.items()
            if name in process and n in by_n
        }
        yield _row(f"{label}: {kind}", cells)


def _per_message_row(runs: Runs, n: int, label: str) -> Iterable[str]:
    """The processor's CPU per ext_proc message: the unit its cost scales with, in either mode."""
    gateway = runs.get("gateway", {}).get(n)
    if gateway and gateway.ext_proc_msgs:
        per = 1000 * gateway.cpu_s[EXTPROC] / gateway.ext_proc_msgs
        yield _row(f"processor CPU ms per ext_proc message, {label}", {"gateway": per})


def _nonstream_rows(results: Results) -> Iterable[str]:
    runs = results.nonstream
    for n in REQUEST_CONCURRENCY:
        conns = "1 connection" if n == 1 else f"{n} connections"
        yield _row(f"non-stream req/s, {conns}", _at(runs, n, lambda m: m.run.rps))
        yield _row(f"non-stream latency p50 ms, {conns}", _at(runs, n, lambda m: m.run.p50_ms))
        yield _row(f"non-stream latency p99 ms, {conns}", _at(runs, n, lambda m: m.run.p99_ms))
    n = REQUEST_CONCURRENCY[-1]
    yield from _cpu_rows(runs, n, f"CPU ms per request, {n} connections", lambda m: m.run.requests / 1000)
    gateway = [m for m in runs.get("gateway", {}).values() if m.ext_proc_streams]
    if gateway:
        msgs = sum(m.ext_proc_msgs for m in gateway) / sum(m.ext_proc_streams for m in gateway)
        yield f"| ext_proc messages per non-stream request | - | - | {msgs:.2f} | - | - |"
    yield from _per_message_row(runs, n, f"{n} connections")
    yield _row(f"load client CPU, % of one core, {n} connections", _at(runs, n, _share), ratios=False)
    for c, run in results.asyncio_ceiling.items():
        cpu = f"{100 * run.client_cpu_share:.0f} %"
        yield f"| asyncio client ceiling req/s, {c} conn. (its CPU {cpu}) | {_number(run.rps)} | - | - | - | - |"


def _stream_rows(results: Results) -> Iterable[str]:
    runs = results.stream
    yield _row("stream time to first token p50 ms, 1 stream", _at(runs, 1, lambda m: m.run.ttft_p50_ms))
    for n in STREAM_CONCURRENCY:
        label = "1 stream" if n == 1 else f"{n} streams"
        yield _row(f"stream tokens/s, {label}", _at(runs, n, lambda m: m.run.tokens_per_s))
    n = _CPU_STREAMS
    yield from _cpu_rows(runs, n, f"CPU s per 1,000 tokens, {n} streams", lambda m: m.run.tokens / 1000)
    gateway = runs.get("gateway", {}).get(n)
    if gateway and gateway.run.tokens:
        yield _row(f"ext_proc messages per token, {n} streams", {"gateway": gateway.ext_proc_msgs / gateway.run.tokens})
    yield from _per_message_row(runs, n, f"{n} streams")
    top = STREAM_CONCURRENCY[-1]
    yield _row(f"load client CPU, % of one core, {top} streams", _at(runs, top, _share), ratios=False)


def _rss_rows(rss: dict[str, float]) -> Iterable[str]:
    yield _row("peak RSS MiB: Envoy", {"plain": rss[ENVOY_PLAIN], "gateway": rss[ENVOY_GATEWAY]})
    yield _row("peak RSS MiB: processor", {"gateway": rss[EXTPROC]})
    yield _row("peak RSS MiB: emulator (one, shared by all)", {"direct": rss[EMULATOR]})


def _errors(results: Results) -> list[str]:
    runs: list[tuple[str, RequestRun | StreamRun]] = [
        (f"{name} {kind} at {n}", m.run)
        for kind, table in (("non-stream", results.nonstream), ("stream", results.stream))
        for name, by_n in table.items()
        for n, m in by_n.items()
    ]
    runs += [(f"asyncio ceiling at {n}", run) for n, run in results.asyncio_ceiling.items()]
    return [
        f"{where}: " + ", ".join(f"{count} {reason}" for reason, count in run.errors.items())
        for where, run in runs
        if run.errors
    ]


def markdown(results: Results, meta: dict[str, str]) -> str:
    options = results.options
    client = (
        "wrk (`-t1`, keep-alive, `--latency`)"
        if options.wrk
        else "the asyncio client, as wrk is not installed (so the direct column is also the client's ceiling)"
    )
    warmup = f" after a {options.warmup} s warm-up" if options.warmup else " (no warm-up)"
    lines = [
        f"# Benchmark, {meta['date']}",
        "",
        f"Commit {meta['commit']} · {meta['cores']} cores, 1-min load average {meta['loadavg']} at the start; "
        f"other processes took {100 * results.others_cpu_share:.0f} % of the machine during the run · "
        f"Envoy {meta['envoy']} `--concurrency 2` · {options.seconds} s per run{warmup} · "
        f"settings changed from the defaults: `{meta['settings']}`.",
        f"Non-stream load: {client}. Streams (max_tokens {STREAM_MAX_TOKENS}, emulator `repeat`): the asyncio "
        "client (aiohttp, uvloop). Emulator: no token delay. Ratios: gateway ÷ plain Envoy, gateway ÷ direct.",
        "",
        f"| measure | {' | '.join(c.label for c in CONTENDERS)} | gateway / plain | gateway / direct |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    if results.nonstream:
        lines += _nonstream_rows(results)
    if results.stream:
        lines += _stream_rows(results)
    lines += _rss_rows(results.peak_rss_mib)
    errors = _errors(results)
    lines += ["", "Failed requests: " + ("; ".join(errors) if errors else "none") + "."]
    return "\n".join(lines) + "\n"


def _run_json(run: RequestRun | StreamRun) -> dict[str, Any]:
    derived = {"rps": run.rps} if isinstance(run, RequestRun) else {"tokens_per_s": run.tokens_per_s}
    return {**asdict(run), **derived, "client_cpu_share": run.client_cpu_share}


def json_document(results: Results, meta: dict[str, str]) -> dict[str, Any]:
    def runs(table: dict[str, dict[int, Measured[Any]]]) -> dict[str, Any]:
        return {
            name: {str(n): {**asdict(m), "run": _run_json(m.run)} for n, m in by_concurrency.items()}
            for name, by_concurrency in table.items()
        }

    return {
        "meta": meta,
        "options": asdict(results.options),
        "nonstream": runs(results.nonstream),
        "asyncio_ceiling": {str(n): _run_json(run) for n, run in results.asyncio_ceiling.items()},
        "stream": runs(results.stream),
        "peak_rss_mib": results.peak_rss_mib,
        "others_cpu_share": results.others_cpu_share,
    }


def write(directory: Path, text: str, document: dict[str, Any]) -> None:
    """latest.md and latest.json, each written whole through a .tmp file, so a reader never sees half of one."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in (("latest.md", text), ("latest.json", json.dumps(document, indent=2) + "\n")):
        tmp = directory / f"{name}.tmp"
        tmp.write_text(content)
        os.replace(tmp, directory / name)
