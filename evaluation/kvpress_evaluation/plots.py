"""Score versus compression ratio: one line per press, one panel per task plus the average (matplotlib, Agg)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

AVERAGE = "average"


@dataclass
class ScoreCurves:
    """What :func:`plot_scores` draws.

    Attributes:
        panels: the panel names: the tasks, then ``average`` when there are several tasks.
        curves: ``{panel: {line: [(ratio, score), ...]}}`` sorted by ratio, for presses swept over ratios.
        baselines: ``{panel: {line: score}}`` for runs without a ratio axis (no press, or a press with its own budget),
            drawn as horizontal dashed lines.
    """

    panels: list[str]
    curves: dict[str, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)


def line_name(row: dict) -> str:
    """The legend entry of a summary row: its press label, with ``kvN`` for an N-bit quantized cache (``kvquantN``,
    ``gearN`` for those storages)."""
    bits, method = row.get("kv_bits"), row.get("kv_method") or "kivi"
    if not bits:
        return row["press"]
    return f"{row['press']} kv{bits}" if method == "kivi" else f"{row['press']} {method}{bits}"


def score_curves(rows: list[dict], tasks: list[str]) -> ScoreCurves:
    """Group summary rows (``press``, ``swept``, ``compression_ratio``, ``kv_bits``, one score per task and
    ``average``) into lines. Rows with ``swept`` false are baselines; missing scores are skipped."""
    panels = [*tasks, AVERAGE] if len(tasks) > 1 else list(tasks)
    out = ScoreCurves(panels, {p: {} for p in panels}, {p: {} for p in panels})
    for row in rows:
        name = line_name(row)
        for panel in panels:
            score = row.get(panel)
            if score is None or (isinstance(score, float) and math.isnan(score)):
                continue
            if row.get("swept"):
                out.curves[panel].setdefault(name, []).append((float(row["compression_ratio"]), float(score)))
            else:
                out.baselines[panel][name] = float(score)
    for lines in out.curves.values():
        for points in lines.values():
            points.sort()
    return out


def plot_scores(rows: list[dict], tasks: list[str], path) -> Path:
    """Draw :func:`score_curves` of ``rows`` into the PNG ``path``; returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = score_curves(rows, tasks)
    n = len(data.panels)
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.5 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, data.panels):
        for name, points in data.curves[panel].items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=name)
        for name, score in data.baselines[panel].items():
            ax.axhline(score, linestyle="--", color="gray" if name == "none" else None, label=name)
        ax.set_title(panel)
        ax.set_xlabel("compression ratio")
        ax.set_ylabel("score")
        ax.set_xlim(-0.02, 1.0)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False)
        fig.tight_layout(rect=(0, 0.08 + 0.02 * ((len(labels) - 1) // 4), 1, 1))
    else:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
