"""The README's chart: non-stream req/s at 16 connections and token events/s at 64 streams, per contender."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.suite import CONTENDERS, Results

__all__ = ["available", "draw"]

_COLOURS = {"direct": "#9e9e9e", "plain": "#4c72b0", "gateway": "#dd8452", "flask": "#55a868", "litellm": "#c44e52"}


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _panel(ax: Any, title: str, values: dict[str, float], missing: dict[str, str], unit: str) -> None:
    labels = [c.label for c in CONTENDERS]
    heights = [values.get(c.name, 0.0) for c in CONTENDERS]
    colours = [_COLOURS.get(c.name, "#333333") for c in CONTENDERS]
    bars = ax.bar(labels, heights, color=colours)
    positive = [h for h in heights if h > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
        unit += " (log scale)"
    base = values.get("plain")
    for c, bar, height in zip(CONTENDERS, bars, heights, strict=True):
        if c.name in missing or height <= 0:
            text = "not measured" if c.name in missing else "-"
            x = bar.get_x() + bar.get_width() / 2
            ax.text(x, min(positive or [1]), text, ha="center", va="bottom", fontsize=8, rotation=90)
            continue
        text = f"{height:,.0f}"
        if base and c.name != "plain":
            text += f"\n{height / base:.2f}x plain"
        ax.annotate(
            text,
            (bar.get_x() + bar.get_width() / 2, height),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(unit)
    ax.margins(y=0.25)
    ax.tick_params(axis="x", labelsize=9)


def draw(results: Results, path: Path, subtitle: str) -> str | None:
    """Write the PNG; else why not (matplotlib is missing, or the run measured neither quantity)."""
    if not available():
        return "matplotlib is not installed (make bench installs it)"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rps = {name: by_n[16].run.rps for name, by_n in results.nonstream.items() if 16 in by_n}
    tokens = {name: by_n[64].run.tokens_per_s for name, by_n in results.stream.items() if 64 in by_n}
    if not rps and not tokens:
        return "this run measured neither non-stream req/s at 16 nor token events/s at 64"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    _panel(axes[0], "Non-stream chat completions, 16 connections", rps, results.missing, "requests/s")
    _panel(axes[1], "Streaming, 64 concurrent streams", tokens, results.missing, "relayed token events/s")
    fig.suptitle(f"shimmy-gateway vs the alternatives, one run on one machine ({subtitle})", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return None
