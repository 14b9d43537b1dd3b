"""One Markdown report of a run (the comparison table, the targets, the LiteLLM finding, memory, profile and the
workers experiment), its JSON twin, and the chart.

The machine is small and noisy, so absolute numbers travel badly; the ratios against plain Envoy, measured seconds
apart in the same run, are what to compare between runs. CPU rows say where a contender spends its time, and the
load client's own CPU share says whether the client, not the contender, was the limit.
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
from bench.profile import OTHER
from bench.stack import (
    EMULATOR,
    EMULATOR_LITELLM,
    ENVOY_GATEWAY,
    ENVOY_PLAIN,
    EXTPROC,
    FLASK_WORKERS,
    LITELLM_WORKERS,
    PLAIN_ENVOY_WORKERS,
    is_processor,
)
from bench.suite import (
    API_STREAMS,
    CONTENDERS,
    FLAT_REQUESTS,
    LIVE_STREAM_DELAY_MS,
    LIVE_STREAM_TOKENS,
    LIVE_STREAMS,
    REQUEST_CONCURRENCY,
    STEPS,
    STREAM_CONCURRENCY,
    STREAM_MAX_TOKENS,
    Contender,
    Measured,
    Results,
)

__all__ = ["json_document", "markdown", "targets", "write"]

Cells = dict[str, float]  # contender name -> value; a contender without one shows a dash
Runs = dict[str, dict[int, Measured[Any]]]  # contender name -> concurrency -> run
_CPU_STREAMS = 16  # the streaming run whose CPU is divided by the tokens it relayed
_RSS_LIMIT_MIB = 250e6 / 2**20  # the target's 250 MB, in MiB (238.4)
_FLAT_SLACK_MIB = 5.0  # "flat": Envoy + processor grow by less than this across FLAT_REQUESTS requests
_BASE = "plain"  # ratios are against plain Envoy


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


def _row(results: Results, label: str, cells: Cells, ratios: bool = True) -> str:
    """One row: a cell per contender, `value (ratio to plain Envoy)` where `ratios`."""
    values = []
    base = cells.get(_BASE)
    for c in CONTENDERS:
        if c.name in results.missing:
            values.append("not measured")
        elif c.name not in cells:
            values.append("-")
        elif ratios and c.name != _BASE and base:
            values.append(f"{_number(cells[c.name])} ({_ratio(cells[c.name], base)})")
        else:
            values.append(_number(cells[c.name]))
    return f"| {label} | {' | '.join(values)} |"


def _at(runs: Runs, n: int, value: Callable[[Measured[Any]], float]) -> Cells:
    """The value of each contender's run at concurrency n."""
    return {name: value(by_n[n]) for name, by_n in runs.items() if n in by_n}


def _share(m: Measured[Any]) -> float:
    return 100 * m.run.client_cpu_share


def _contender(name: str) -> Contender:
    return next(c for c in CONTENDERS if c.name == name)


def _cpu_rows(
    results: Results, runs: Runs, n: int, label: str, work: Callable[[Measured[Any]], float]
) -> Iterable[str]:
    """CPU seconds during the run at concurrency n, divided by the run's `work`: the contender's own processes
    (the processor also alone), then its emulator."""
    kinds: list[tuple[str, Callable[[Contender], tuple[str, ...]]]] = [
        ("proxy (all its processes)", lambda c: () if c.name == "direct" else c.processes),
        ("processor alone", lambda c: (EXTPROC,) if EXTPROC in c.processes else ()),
        ("emulator", lambda c: (c.emulator,)),
    ]
    for kind, processes in kinds:
        cells: Cells = {}
        for name, by_n in runs.items():
            m, procs = by_n.get(n), processes(_contender(name))
            if m is not None and procs and work(m):
                cells[name] = sum(m.cpu_s.get(p, math.nan) for p in procs) / work(m)
        yield _row(results, f"{label}: {kind}", cells, ratios=False)


def _per_message_row(results: Results, runs: Runs, n: int, label: str) -> Iterable[str]:
    """The processor's CPU per ext_proc message: the unit its cost scales with, in either mode."""
    gateway = runs.get("gateway", {}).get(n)
    if gateway and gateway.ext_proc_msgs:
        per = 1000 * gateway.cpu_s[EXTPROC] / gateway.ext_proc_msgs
        yield _row(results, f"processor CPU ms per ext_proc message, {label}", {"gateway": per}, ratios=False)


def _spread_row(results: Results, rounds: dict[str, dict[int, list[float]]], n: int, label: str) -> Iterable[str]:
    """The lowest and highest round behind a median cell: how much the machine moved during the comparison."""
    if results.options.rounds < 2:
        return
    values = []
    for c in CONTENDERS:
        runs = rounds.get(c.name, {}).get(n)
        if c.name in results.missing:
            values.append("not measured")
        else:
            values.append(f"{_number(runs[0])} to {_number(runs[-1])}" if runs else "-")
    yield f"| {label}: lowest to highest round | {' | '.join(values)} |"


def _nonstream_rows(results: Results) -> Iterable[str]:
    runs = results.nonstream
    for n in REQUEST_CONCURRENCY:
        conns = "1 connection" if n == 1 else f"{n} connections"
        yield _row(results, f"**non-stream req/s, {conns}**", _at(runs, n, lambda m: m.run.rps))
        yield _row(results, f"non-stream latency p50 ms, {conns}", _at(runs, n, lambda m: m.run.p50_ms))
        yield _row(results, f"non-stream latency p99 ms, {conns}", _at(runs, n, lambda m: m.run.p99_ms))
    n = REQUEST_CONCURRENCY[-1]
    yield from _spread_row(results, results.nonstream_rounds, n, f"non-stream req/s, {n} connections")
    yield from _cpu_rows(results, runs, n, f"CPU ms per request, {n} conn.", lambda m: m.run.requests / 1000)
    gateway = [m for m in runs.get("gateway", {}).values() if m.ext_proc_streams]
    if gateway:
        msgs = sum(m.ext_proc_msgs for m in gateway) / sum(m.ext_proc_streams for m in gateway)
        yield _row(results, "ext_proc messages per non-stream request", {"gateway": msgs}, ratios=False)
    yield from _per_message_row(results, runs, n, f"{n} connections")
    yield _row(results, f"load client CPU, % of one core, {n} connections", _at(runs, n, _share), ratios=False)
    for c, run in results.asyncio_ceiling.items():
        label = f"asyncio client ceiling req/s, {c} conn. (its CPU {100 * run.client_cpu_share:.0f} %)"
        yield _row(results, label, {"direct": run.rps}, ratios=False)


def _stream_rows(results: Results) -> Iterable[str]:
    runs = results.stream
    top = STREAM_CONCURRENCY[-1]
    yield _row(results, "stream time to first token p50 ms, 1 stream", _at(runs, 1, lambda m: m.run.ttft_p50_ms))
    yield _row(
        results, f"stream time to first token p50 ms, {top} streams", _at(runs, top, lambda m: m.run.ttft_p50_ms)
    )
    yield _row(
        results, f"stream time to first token p99 ms, {top} streams", _at(runs, top, lambda m: m.run.ttft_p99_ms)
    )
    for n in STREAM_CONCURRENCY:
        label = "1 stream" if n == 1 else f"{n} streams"
        yield _row(results, f"**stream token events/s, {label}**", _at(runs, n, lambda m: m.run.tokens_per_s))
    yield from _spread_row(results, results.stream_rounds, top, f"stream token events/s, {top} streams")
    yield _row(results, f"streams completed, {top} streams", _at(runs, top, lambda m: m.run.streams_done), False)
    n = _CPU_STREAMS
    yield from _cpu_rows(results, runs, n, f"CPU s per 1,000 tokens, {n} streams", lambda m: m.run.tokens / 1000)
    gateway = runs.get("gateway", {}).get(n)
    if gateway and gateway.run.tokens:
        per = gateway.ext_proc_msgs / gateway.run.tokens
        yield _row(results, f"ext_proc messages per token, {n} streams", {"gateway": per}, ratios=False)
    yield from _per_message_row(results, runs, n, f"{n} streams")
    yield _row(results, f"load client CPU, % of one core, {top} streams", _at(runs, top, _share), ratios=False)


def _rss_rows(results: Results) -> Iterable[str]:
    cells = {c.name: v for c in CONTENDERS if (v := results.contender_peak_rss(c)) is not None}
    cells.pop("direct", None)
    yield _row(results, "**peak RSS MiB, the proxy's processes**", cells)
    rss = results.peak_rss_mib
    emulators = {"direct": rss.get(EMULATOR, math.nan)}
    if EMULATOR_LITELLM in rss:
        emulators["litellm"] = rss[EMULATOR_LITELLM]
    yield _row(results, "peak RSS MiB, emulator", emulators, ratios=False)


def _errors(results: Results) -> list[str]:
    runs: list[tuple[str, RequestRun | StreamRun]] = [
        (f"{name} {kind} at {n}", m.run)
        for kind, table in (
            ("non-stream", results.nonstream),
            ("stream", results.stream),
            ("stream", results.api_streams),
        )
        for name, by_n in table.items()
        for n, m in by_n.items()
    ]
    runs += [(f"asyncio ceiling at {n}", run) for n, run in results.asyncio_ceiling.items()]
    if results.rss and results.rss.flat_run:
        runs.append((f"gateway, {FLAT_REQUESTS:,} requests", results.rss.flat_run))
    if results.rss and results.rss.live_run:
        runs.append((f"gateway, {LIVE_STREAMS} live streams", results.rss.live_run))
    if results.rss:
        runs += [(f"{name}, {LIVE_STREAMS} live streams", r) for name, r in results.rss.live_others.items()]
    runs += [(f"workers experiment, {w.processes} process(es)", w.run) for w in results.workers]
    runs += [
        (f"steps, {step} at {n}", m.run) for step, by_n in results.steps.items() for n, ms in by_n.items() for m in ms
    ]
    return [
        f"{where}: " + ", ".join(f"{count} {reason}" for reason, count in run.errors.items())
        for where, run in runs
        if run.errors
    ]


# --- targets ---------------------------------------------------------------------------------------------------


def _value(runs: Runs, name: str, n: int, get: Callable[[Measured[Any]], float]) -> float | None:
    m = runs.get(name, {}).get(n)
    return None if m is None else get(m)


def targets(results: Results) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each of issue 7's targets this run can judge."""
    out: list[tuple[str, str, str]] = []

    def at_least(target: str, top: float | None, bottom: float | None, floor: float, what: str) -> None:
        if top is None or bottom is None or not bottom:
            out.append((target, "not measured", "-"))
            return
        ratio = top / bottom
        verdict = "**met**" if ratio >= floor else f"**missed**: {floor / ratio:.1f}x short ({floor - ratio:+.2f})"
        out.append((target, f"{ratio:.2f}x ({_number(top)} vs {_number(bottom)} {what})", verdict))

    ns, st = results.nonstream, results.stream
    rps16 = lambda m: m.run.rps  # noqa: E731
    gateway16 = _value(ns, "gateway", 16, rps16)
    at_least(
        "non-stream req/s at 16: gateway ≥ 50 % of plain Envoy",
        gateway16,
        _value(ns, "plain", 16, rps16),
        0.5,
        "req/s",
    )
    gp50, pp50 = _value(ns, "gateway", 1, lambda m: m.run.p50_ms), _value(ns, "plain", 1, lambda m: m.run.p50_ms)
    if gp50 is None or pp50 is None:
        out.append(("added p50 latency over plain Envoy at 1 connection ≤ 1 ms", "not measured", "-"))
    else:
        added = gp50 - pp50
        verdict = "**met**" if added <= 1.0 else f"**missed** by {added - 1.0:.2f} ms"
        out.append(
            (
                "added p50 latency over plain Envoy at 1 connection ≤ 1 ms",
                f"{added:+.2f} ms ({gp50:.2f} vs {pp50:.2f})",
                verdict,
            )
        )
    tok64 = lambda m: m.run.tokens_per_s  # noqa: E731
    at_least(
        "token events/s at 64 streams: gateway ≥ 50 % of plain Envoy",
        _value(st, "gateway", 64, tok64),
        _value(st, "plain", 64, tok64),
        0.5,
        "events/s",
    )
    for name, label in (("flask", "the Flask proxy"), ("litellm", "LiteLLM")):
        target = f"non-stream req/s at 16: gateway ≥ 3x {label}"
        if name in results.missing:
            out.append((target, f"not measured: {results.missing[name]}", "-"))
        else:
            at_least(target, gateway16, _value(ns, name, 16, rps16), 3.0, "req/s")
    rss = results.rss
    if rss is None or rss.live_run is None:
        out.append(("Envoy + processor RSS ≤ 250 MB with 256 live streams", "not measured", "-"))
    else:
        peak = rss.live_peak_mib
        verdict = "**met**" if peak <= _RSS_LIMIT_MIB else f"**missed** by {peak - _RSS_LIMIT_MIB:.0f} MiB"
        if rss.live_max_active < LIVE_STREAMS:
            verdict += f" (but only {rss.live_max_active} streams were seen open at once)"
        parts = ", ".join(f"{p} {v:.0f}" for p, v in rss.live_peak_by_process.items())
        out.append(
            (
                f"Envoy + processor RSS ≤ 250 MB (= {_RSS_LIMIT_MIB:.0f} MiB) with {LIVE_STREAMS} live streams",
                f"{peak:.0f} MiB peak VmRSS ({parts}); {rss.live_max_active} streams open at once",
                verdict,
            )
        )
    if rss is None or rss.flat_run is None:
        out.append(("RSS flat across 10,000 requests", "not measured", "-"))
    else:
        before, after = sum(rss.before_mib.values()), sum(rss.after_mib.values())
        grew = after - before
        verdict = "**met**" if grew < _FLAT_SLACK_MIB else f"**missed**: grew {grew:.1f} MiB"
        parts = ", ".join(f"{p} {rss.before_mib[p]:.1f} → {rss.after_mib[p]:.1f}" for p in rss.before_mib)
        out.append(
            (
                f"Envoy + processor RSS flat across {rss.flat_run.requests:,} requests "
                f"(growth < {_FLAT_SLACK_MIB:.0f} MiB)",
                f"{before:.1f} → {after:.1f} MiB ({grew:+.1f}; {parts})",
                verdict,
            )
        )
    return out


def _processor_cpu_s(m: Measured[Any]) -> float:
    """The processor's CPU in a run: the shipped process, or the bench variants that replaced it."""
    return sum(v for name, v in m.cpu_s.items() if is_processor(name))


def _free_processor_ceiling(results: Results) -> list[str]:
    """What the gateway could reach at 16 connections if the processor cost nothing: the machine's cores divided
    by the CPU everything else spends per request (the gateway's Envoy, the emulator, the load client)."""
    m, plain = results.nonstream.get("gateway", {}).get(16), results.nonstream.get(_BASE, {}).get(16)
    if m is None or plain is None or not m.run.requests:
        return []
    per_request = {
        "Envoy (with its ext_proc client)": m.cpu_s.get(ENVOY_GATEWAY, 0.0),
        "the emulator (streaming SSE to it)": m.cpu_s.get(EMULATOR, 0.0),
        "the load client": m.run.client_cpu_s,
    }
    per_request = {k: 1000 * v / m.run.requests for k, v in per_request.items()}
    total = sum(per_request.values())
    plain_ms = 1000 * sum(plain.cpu_s.get(p, 0.0) for p in (ENVOY_PLAIN, EMULATOR)) / (plain.run.requests or 1)
    ceiling = (os.cpu_count() or 1) * 1000 / total if total else math.nan
    parts = ", ".join(f"{k} {v:.3f}" for k, v in per_request.items())
    return [
        "",
        f"**A processor costing nothing** would still leave the gateway at most {_number(ceiling)} req/s at 16 "
        f"connections on these {os.cpu_count()} cores, {_ratio(ceiling, plain.run.rps)} plain Envoy: the rest of "
        f"the gateway spends {total:.3f} ms of CPU per request ({parts}), against {plain_ms:.3f} ms for plain "
        "Envoy and the emulator.",
    ]


def _targets_section(results: Results) -> list[str]:
    lines = ["## Targets (issue 7, item 3)", "", "| target | this run | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in targets(results)]
    return lines + _free_processor_ceiling(results)


def _median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else math.nan


def _steps_section(results: Results) -> list[str]:
    if not results.steps:
        return []
    rounds = len(next(iter(results.steps.values())).get(16, []))
    lines = [
        "## What each step buys: the shipped gateway, each speed-up undone on its own, and what was tried and not kept",
        "",
        f"Non-stream load through the gateway, interleaved rounds: {rounds}; Envoy and the processor started afresh "
        "for every configuration (`bench.extproc_variant`, otherwise the shipped processor); each cell the median "
        "round. Our own code's share (msgspec, precomputed SSE framing, the stop-sequence fast path) is in the CPU "
        "split above.",
        "",
        "| configuration | req/s, 16 conn. | vs shipped | p50 ms, 1 conn. | vs shipped | ext_proc messages per "
        "request | processor CPU µs per request | Envoy CPU µs per request |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    base_rps = _median(m.run.rps for m in results.steps.get("shipped", {}).get(16, []))
    base_p50 = _median(m.run.p50_ms for m in results.steps.get("shipped", {}).get(1, []))
    for step, label in STEPS:
        runs = results.steps.get(step, {})
        at16, at1 = runs.get(16, []), runs.get(1, [])
        if not at16 or not at1:
            continue
        rps, p50 = _median(m.run.rps for m in at16), _median(m.run.p50_ms for m in at1)
        requests = sum(m.run.requests for m in at16) or 1
        msgs = sum(m.ext_proc_msgs for m in at16) / requests
        proc = 1e6 * sum(_processor_cpu_s(m) for m in at16) / requests
        envoy = 1e6 * sum(m.cpu_s.get(ENVOY_GATEWAY, 0.0) for m in at16) / requests
        same = step == "shipped"
        lines.append(
            f"| {label} | {_number(rps)} | {'' if same else _ratio(rps, base_rps)} | {p50:.2f} | "
            f"{'' if same else f'{p50 - base_p50:+.2f} ms'} | {msgs:.2f} | {proc:.0f} | {envoy:.0f} |"
        )
    return lines


def _finding_section(results: Results) -> list[str]:
    f = results.litellm_finding
    if f is None:
        why = results.missing.get("litellm", "not run")
        return ["## LiteLLM against a faithful Shimmy", "", f"Not measured: {why}."]
    body = f["body"]
    try:
        body = json.loads(body)["error"]["message"]  # the text, without a second layer of JSON escapes
    except (ValueError, KeyError, TypeError):
        pass
    excerpt = " ".join(str(body).split())[:420].replace("`", "'")
    return [
        "## LiteLLM against a faithful Shimmy",
        "",
        "An OpenAI client's non-stream chat completion through LiteLLM's proxy, with the emulator as real Shimmy is "
        "(`/v1/chat/completions` streams when `stream` is absent): LiteLLM leaves `stream` out of the upstream call, "
        "gets SSE back, and answers",
        "",
        f"**HTTP {f['status']} after {f['seconds']:.1f} s and {f['upstream_attempts']} upstream calls** "
        "(the emulator's request count: LiteLLM retried):",
        "",
        f"> {excerpt}…",
        "",
        "For the throughput runs, LiteLLM's own emulator instance was then switched to OpenAI's default "
        '(`PUT /_emulator/config {"openai_stream_default": false}`); the emulator the other contenders share '
        "was left as it was.",
    ]


def _cpu_split_lines(results: Results) -> list[str]:
    split = results.cpu_split
    if split is None or not split.run.requests:
        return []
    n = split.run.requests
    total = 1e6 * split.process_cpu_s / n
    ours = split.part_ns.get("dispatch", 0) / 1000 / n
    wire = (split.part_ns.get("deserialize", 0) + split.part_ns.get("serialize", 0)) / 1000 / n
    rest = total - ours - wire
    msgs = split.calls.get("dispatch", 0) / n

    def pct(x: float) -> str:
        return f"{100 * x / total:.0f} %" if total else "-"

    return [
        f"**CPU per request, timed inside the processor** (`time.thread_time_ns` around each part, bench-only "
        f"`bench.extproc_variant`; 16 connections, {_number(split.run.rps)} req/s, {msgs:.2f} ext_proc messages per "
        "request):",
        "",
        "| part | CPU µs per request | share |",
        "|---|--:|--:|",
        f"| our code: `dispatch` of every message (phase handlers, with their protobuf field access and msgspec) "
        f"| {ours:.0f} | {pct(ours)} |",
        f"| protobuf wire format: `FromString` + `SerializeToString` | {wire:.0f} | {pct(wire)} |",
        f"| the rest: gRPC aio (Cython + C core), event loop, interpreter glue | {rest:.0f} | {pct(rest)} |",
        f"| the whole process (from /proc) | {total:.0f} | 100 % |",
        "",
    ]


def _profile_section(results: Results) -> list[str]:
    if "profile" not in results.options.sections:
        return []
    p = results.profile
    lines = ["## Where the processor's time goes (16-connection non-stream load)", "", *_cpu_split_lines(results)]
    if p is None:
        return [*lines, results.profile_note or "Not profiled."]
    busy = p.busy or 1
    lines += [
        f"**py-spy**: {p.samples:,} samples over {p.seconds:.0f} s (`--native`, 100 Hz, all threads: "
        + ", ".join(f"{t} {n}" for t, n in p.threads.most_common())
        + f"); {p.idle:,} of them waiting in epoll (idle), {p.busy:,} busy. The processor used "
        f"{p.cpu_s / p.seconds:.2f} cores of CPU over the window (from /proc), at {_number(p.rps)} req/s "
        "(py-spy pauses the process for each sample, so less than unprofiled). py-spy samples wall-clock time: a "
        "thread preempted in a system call (the 2 cores are shared) counts as busy there. Shares of the busy "
        "samples:",
        "",
        "| where | share | of which in system calls |",
        "|---|--:|---|",
    ]
    for category, n in p.by_category.most_common():
        calls = [(call, k) for (cat, call), k in p.syscalls.most_common() if cat == category]
        detail = ", ".join(f"`{call}` {100 * k / busy:.0f} %" for call, k in calls) or "-"
        lines.append(f"| {category} | {100 * n / busy:.0f} % | {detail} |")
    if OTHER not in p.by_category:
        lines.append(f"| {OTHER} | 0 % | - |")
    ours = ", ".join(f"`{frame}` {100 * n / busy:.1f} %" for frame, n in p.our_lines.most_common(6))
    lines += [
        "",
        f"Our code's hottest innermost frames: {ours or '-'}.",
        f"Collapsed stacks: `{results.profile_note}`.",
    ]
    return lines


def _workers_section(results: Results) -> list[str]:
    if not results.workers:
        return []
    lines = [
        "## Processor workers: `EXTPROC_WORKERS=N`",
        "",
        "The shipped processor first, then `bench.extproc_variant` (the same processor) as `EXTPROC_WORKERS` runs "
        "it: N processes on consecutive ports, one Envoy endpoint each, with 2, 1 and 2 processes, each run seconds "
        "after the previous one.",
        "",
        "| run | processor processes | non-stream req/s, 16 conn. | p50 ms | p99 ms | Envoy connections per process "
        "| processor CPU, cores (per process) |",
        "|--:|--:|--:|--:|--:|---|---|",
    ]
    base = results.workers[0].run.rps
    for i, w in enumerate(results.workers, 1):
        conns = ", ".join(f"{n}" for n in w.connections.values())
        seconds = w.run.seconds or 1
        cores = f"{sum(w.cpu_s.values()) / seconds:.2f}"
        if len(w.cpu_s) > 1:
            cores += " (" + ", ".join(f"{v / seconds:.2f}" for v in w.cpu_s.values()) + ")"
        ratio = "" if i == 1 else f" ({_ratio(w.run.rps, base)})"
        shipped = " (shipped)" if i == 1 else ""
        lines.append(
            f"| {i} | {w.processes}{shipped} | {_number(w.run.rps)}{ratio} | {w.run.p50_ms:.2f} | {w.run.p99_ms:.2f} "
            f"| {conns} | {cores} |"
        )
    by_n: dict[int, list[float]] = {}
    for w in results.workers[1:]:
        by_n.setdefault(w.processes, []).append(w.run.rps)
    if len(by_n) == 2:
        means = {n: sum(v) / len(v) for n, v in by_n.items()}
        one, many = means[min(means)], means[max(means)]
        lines += [
            "",
            f"Mean of the variant's runs: {max(means)} processes {_number(many)} req/s, "
            f"1 process {_number(one)} req/s: {_ratio(many, one)}.",
        ]
    return lines


def markdown(results: Results, meta: dict[str, str], chart: str | None = None) -> str:
    options = results.options
    client = (
        "wrk (`-t1`, keep-alive, `--latency`)"
        if options.wrk
        else "the asyncio client, as wrk is not installed (so the direct column is also the client's ceiling)"
    )
    warmup = f" after a {options.warmup} s warm-up" if options.warmup else " (no warm-up)"
    rounds = (
        f"{options.rounds} interleaved rounds of {options.seconds} s per run{warmup}, each cell the median round"
        if options.rounds > 1
        else f"{options.seconds} s per run{warmup}"
    )
    lines = [
        f"# Benchmark, {meta['date']}",
        "",
        f"Commit {meta['commit']} · {meta['cores']} cores, 1-min load average {meta['loadavg']} at the start; "
        f"other processes took {100 * results.others_cpu_share:.0f} % of the machine during the run · "
        f"Envoy {meta['envoy']}: plain `--concurrency {PLAIN_ENVOY_WORKERS}`, the gateway's "
        f"`--concurrency {meta.get('gateway_envoy_workers', '?')}` (`ENVOY_WORKERS`, as shipped) · "
        f"Flask proxy: gunicorn, {FLASK_WORKERS} sync workers · "
        f"LiteLLM {meta.get('litellm', '-')}, {LITELLM_WORKERS} worker · {rounds} · "
        f"settings changed from the defaults: `{meta['settings']}` · {meta.get('duration_s', '?')} s in all.",
        f"Non-stream load (max_tokens 16): {client}. Streams (max_tokens {STREAM_MAX_TOKENS}, emulator `repeat`): "
        "the asyncio client (aiohttp, uvloop). Emulator: fixed reply, no token delay. "
        "In parentheses: the ratio to plain Envoy in this run.",
        "",
    ]
    if chart:
        lines += [f"![non-stream req/s and token events/s per contender]({chart})", ""]
    lines += [
        f"| measure | {' | '.join(c.label for c in CONTENDERS)} |",
        "|---|" + "--:|" * len(CONTENDERS),
    ]
    if results.nonstream:
        lines += _nonstream_rows(results)
    if results.stream:
        lines += _stream_rows(results)
    if results.peak_rss_mib:
        lines += _rss_rows(results)
    errors = _errors(results)
    lines += ["", "Failed requests: " + ("; ".join(errors) if errors else "none") + "."]
    if results.missing:
        lines += ["", "Not measured: " + "; ".join(f"{name}: {why}" for name, why in results.missing.items()) + "."]
    sections = (
        _targets_section,
        _api_streams_section,
        _finding_section,
        _memory_section,
        _profile_section,
        _workers_section,
        _steps_section,
    )
    for section in sections:
        part = section(results)
        if part:
            lines += ["", *part]
    return "\n".join(lines) + "\n"


def _api_streams_section(results: Results) -> list[str]:
    """Issue 16: the gateway's Messages and Responses streams beside its chat streams, measured in the same rounds."""
    chat = results.stream.get("gateway", {})
    if not results.api_streams or not chat:
        return []
    apis = [c for c in API_STREAMS if c.name in results.api_streams]
    lines = [
        "## Client APIs on the gateway: stream relay rate",
        "",
        "The same 64-token streams through the gateway's chat, Anthropic Messages and OpenAI Responses routes, "
        "interleaved in the same rounds (one generation core; only the adapters' framing differs). "
        "In parentheses: the ratio to chat.",
        "",
        "| measure | gateway, chat | " + " | ".join(c.label for c in apis) + " |",
        "|---|--:|" + "--:|" * len(apis),
    ]
    for n in STREAM_CONCURRENCY:
        base = chat[n].run.tokens_per_s if n in chat else None
        cells = [_number(base) if base is not None else "-"]
        for c in apis:
            m = results.api_streams[c.name].get(n)
            cells.append(f"{_number(m.run.tokens_per_s)} ({_ratio(m.run.tokens_per_s, base)})" if m else "-")
        lines.append(f"| token events/s, {n} stream{'s' if n > 1 else ''} | {' | '.join(cells)} |")
    n = _CPU_STREAMS
    cells = []
    for m in (chat.get(n), *(results.api_streams[c.name].get(n) for c in apis)):
        cells.append(_number(m.cpu_s[EXTPROC] / (m.run.tokens / 1000)) if m and m.run.tokens else "-")
    lines.append(f"| processor CPU s per 1,000 tokens, {n} streams | {' | '.join(cells)} |")
    return lines


def _memory_section(results: Results) -> list[str]:
    rss = results.rss
    if rss is None or rss.live_run is None:
        return []
    run = rss.live_run
    return [
        "## Memory with live streams",
        "",
        f"{LIVE_STREAMS} streams kept open through the gateway for {run.seconds:.0f} s, the emulator paced "
        f"({LIVE_STREAM_TOKENS} tokens {LIVE_STREAM_DELAY_MS:.0f} ms apart, so each stream lives "
        f"{LIVE_STREAM_TOKENS * LIVE_STREAM_DELAY_MS / 1000:.0f} s): {run.tokens:,} token events, "
        f"{run.streams_done} streams completed, time to first token p50 {run.ttft_p50_ms:.0f} ms / p99 "
        f"{run.ttft_p99_ms:.0f} ms; at most {rss.live_max_active} requests open from Envoy to the emulator at once "
        f"(sampled every 0.1 s, as was VmRSS).",
        "",
        "The same paced streams, through each proxy in turn:",
        "",
        "| proxy | streams answered (got a first token within the run) | streams completed | token events/s "
        "| time to first token p50 / p99 ms | failed |",
        "|---|--:|--:|--:|--:|---|",
        *(
            f"| {_contender(name).label} | {r.streams_answered} | {r.streams_done} "
            f"| {_number(r.tokens_per_s)} | {_number(r.ttft_p50_ms)} / {_number(r.ttft_p99_ms)} "
            f"| {', '.join(f'{n} {why}' for why, n in r.errors.items()) or 'none'} |"
            for name, r in [("gateway", run), *rss.live_others.items()]
        ),
    ]


def _run_json(run: RequestRun | StreamRun) -> dict[str, Any]:
    derived = {"rps": run.rps} if isinstance(run, RequestRun) else {"tokens_per_s": run.tokens_per_s}
    return {**asdict(run), **derived, "client_cpu_share": run.client_cpu_share}


def json_document(results: Results, meta: dict[str, str]) -> dict[str, Any]:
    def runs(table: dict[str, dict[int, Measured[Any]]]) -> dict[str, Any]:
        return {
            name: {str(n): {**asdict(m), "run": _run_json(m.run)} for n, m in by_concurrency.items()}
            for name, by_concurrency in table.items()
        }

    rss = None
    if results.rss is not None:
        r = results.rss
        rss = {
            "before_mib": r.before_mib,
            "after_mib": r.after_mib,
            "flat_run": _run_json(r.flat_run) if r.flat_run else None,
            "live_run": _run_json(r.live_run) if r.live_run else None,
            "live_peak_mib": r.live_peak_mib,
            "live_peak_by_process": r.live_peak_by_process,
            "live_max_active": r.live_max_active,
            "live_others": {name: _run_json(run) for name, run in r.live_others.items()},
        }
    prof = None
    if results.profile is not None:
        p = results.profile
        prof = {
            "seconds": p.seconds,
            "samples": p.samples,
            "idle": p.idle,
            "by_category": dict(p.by_category),
            "syscalls": {f"{cat} / {call}": n for (cat, call), n in p.syscalls.items()},
            "our_lines": dict(p.our_lines.most_common(20)),
            "threads": dict(p.threads),
            "cpu_s": p.cpu_s,
            "rps": p.rps,
        }
    return {
        "meta": meta,
        "options": asdict(results.options),
        "missing": results.missing,
        "litellm_finding": results.litellm_finding,
        "nonstream": runs(results.nonstream),
        "asyncio_ceiling": {str(n): _run_json(run) for n, run in results.asyncio_ceiling.items()},
        "stream": runs(results.stream),
        "nonstream_rounds": results.nonstream_rounds,
        "stream_rounds": results.stream_rounds,
        "api_streams": runs(results.api_streams),
        "peak_rss_mib": results.peak_rss_mib,
        "contender_peak_rss_mib": {c.name: results.contender_peak_rss(c) for c in CONTENDERS},
        "rss_check": rss,
        "profile": prof,
        "workers": [{**asdict(w), "run": _run_json(w.run)} for w in results.workers],
        "steps": {
            step: {
                str(n): [{"run": _run_json(m.run), "cpu_s": m.cpu_s, "ext_proc_msgs": m.ext_proc_msgs} for m in runs]
                for n, runs in by_n.items()
            }
            for step, by_n in results.steps.items()
        },
        "targets": [{"target": t, "measured": m, "verdict": v} for t, m, v in targets(results)],
        "others_cpu_share": results.others_cpu_share,
    }


def write(directory: Path, files: dict[str, str]) -> None:
    """Each file written whole through a .tmp file, so a reader never sees half of one."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        tmp = directory / f"{name}.tmp"
        tmp.write_text(content)
        os.replace(tmp, directory / name)


def json_text(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2) + "\n"
