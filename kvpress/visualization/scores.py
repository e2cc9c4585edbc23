"""Token scores: the importance a press gave each prefilled token, the numbers behind its choice."""

from __future__ import annotations

import torch

from kvpress.presses.report import CompressionReport
from kvpress.visualization._plotting import as_report, axes, check_sequence, mark_spans, token_range


def plot_scores(
    report: CompressionReport,
    layer: int,
    heads: list[int] | None = None,
    spans: dict[str, tuple[int, int]] | None = None,
    sequence: int = 0,
    window: tuple[int, int] | None = None,
    log: bool = True,
    title: str | None = None,
    ax=None,
):
    """Draw the scores of one layer along the context, one line per kv-head, kept tokens dotted.

    Args:
        report: recorded with ``record_kept=True`` from a press that ranks tokens by a score (a
            ``CompressionReport`` or the pipeline's ``CompressionSummary``).
        layer: the compressed layer to draw.
        heads: kv-heads to draw (default: all).
        spans: ``{name: (start, end)}`` token ranges to shade.
        window: ``(start, end)`` to zoom on a range of positions.
        log: logarithmic score axis (attention-based scores span orders of magnitude); infinite scores (tokens a
            press always keeps, such as an observation window) are left out of the lines.
    Returns:
        The matplotlib figure.
    """
    report = as_report(report)
    if layer not in report.scores:
        raise ValueError(
            f"no scores recorded for layer {layer}; recorded: {sorted(report.scores)} (scores exist for presses that "
            "rank tokens by a score, recorded with record_kept=True)"
        )
    scores = report.scores[layer]
    check_sequence(sequence, scores.shape[0])
    scores, kept = scores[sequence], report.kept_mask(layer)[sequence]
    heads = list(range(scores.shape[0])) if heads is None else list(heads)
    if not heads or any(not 0 <= h < scores.shape[0] for h in heads):
        raise ValueError(f"heads must be a non-empty list of kv-heads in [0, {scores.shape[0]}), got {heads}")
    n = scores.shape[-1]
    start, end = token_range(window, n, "window")
    fig, ax = axes(ax, (10, 3.5))
    positions = torch.arange(start, end)
    for head, colour in zip(heads, _colours(len(heads))):
        line = scores[head, start:end].clone()
        line[~torch.isfinite(line)] = float("nan")
        if log:
            line[line <= 0] = float("nan")
        ax.plot(positions.numpy(), line.numpy(), lw=0.8, color=colour, label=f"kv-head {head}")
        chosen = kept[head, start:end]
        ax.plot(positions[chosen].numpy(), line[chosen].numpy(), "o", ms=3, color=colour, mec="black", mew=0.4)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("context position (token)")
    ax.set_ylabel("score (dots: kept)")
    mark_spans(ax, spans, visible=(start, end))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    ax.set_title(title or f"layer {layer}: token scores")
    return fig


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)] if n <= 10 else [cmap(i / n) for i in range(n)]
