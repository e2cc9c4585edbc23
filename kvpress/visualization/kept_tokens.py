"""Kept-token maps: which prefilled tokens each (layer, kv-head) of the cache still holds after a press."""

from __future__ import annotations

import torch

from kvpress.presses.report import CompressionReport
from kvpress.visualization._plotting import as_report, axes, check_sequence, mark_spans, pyplot, token_range


def kept_matrix(report: CompressionReport, sequence: int = 0, layers: list[int] | None = None) -> torch.Tensor:
    """``(len(layers) * kv_heads, n)`` bool, row ``l * kv_heads + h`` = tokens kept by kv-head ``h`` of the ``l``-th
    listed layer (default: every compressed layer), for one sequence of the batch."""
    report = as_report(report)
    layers = _layers(report, layers)
    masks = [report.kept_mask(i) for i in layers]
    check_sequence(sequence, masks[0].shape[0])
    lengths = {m.shape[-1] for m in masks}
    if len(lengths) > 1:
        raise ValueError(f"the recorded layers saw prefills of different lengths {sorted(lengths)}; draw them apart")
    return torch.cat([m[sequence] for m in masks], dim=0)


def span_kept_share(
    report: CompressionReport, span: tuple[int, int], sequence: int = 0, layers: list[int] | None = None
) -> torch.Tensor:
    """``(len(layers), kv_heads)`` float: the share of the tokens in ``span`` = ``(start, end)`` that each head kept."""
    report = as_report(report)
    layers = _layers(report, layers)
    start, end = token_range(span, report.original_lengths[layers[0]], "span")
    shares = [report.kept_mask(i)[sequence, :, start:end].double().mean(-1) for i in layers]
    return torch.stack(shares).float()


def plot_kept_tokens(
    report: CompressionReport,
    spans: dict[str, tuple[int, int]] | None = None,
    layers: list[int] | None = None,
    sequence: int = 0,
    window: tuple[int, int] | None = None,
    title: str | None = None,
    ax=None,
):
    """Draw the kept-token map: context position across, one row per (layer, kv-head), dark = kept.

    Args:
        report: a ``CompressionReport`` recorded with ``record_kept=True``, or the pipeline's ``CompressionSummary``.
        spans: ``{name: (start, end)}`` token ranges to shade (the needle, the question...).
        layers: compressed layers to draw (default: all), top to bottom.
        sequence: which prompt of the batch.
        window: ``(start, end)`` to zoom on a range of positions.
    Returns:
        The matplotlib figure.
    """
    report = as_report(report)
    layers = _layers(report, layers)
    kept = kept_matrix(report, sequence, layers).float()
    heads = kept.shape[0] // len(layers)
    start, end = token_range(window, kept.shape[1], "window")
    fig, ax = axes(ax, (10, max(2.5, 0.06 * kept.shape[0] + 1.5)))
    ax.imshow(
        kept[:, start:end].numpy(),
        aspect="auto",
        cmap=pyplot().get_cmap("Greys"),
        vmin=0,
        vmax=1.3,  # kept tokens in dark grey, so span shading stays visible on them
        interpolation="none",
        extent=(start - 0.5, end - 0.5, kept.shape[0] - 0.5, -0.5),
    )
    for row in range(heads, kept.shape[0], heads):
        ax.axhline(row - 0.5, color="white", lw=0.6)
    step = max(1, len(layers) // 12)
    ax.set_yticks([k * heads + (heads - 1) / 2 for k in range(0, len(layers), step)])
    ax.set_yticklabels([f"layer {layers[k]}" for k in range(0, len(layers), step)])
    ax.set_xlabel("context position (token)")
    ax.set_ylabel(f"layer × kv-head ({heads}/layer)")
    mark_spans(ax, spans, visible=(start, end))
    kept_share = kept[:, start:end].mean().item()
    ax.set_title(title or f"tokens kept (dark): {kept_share:.0%} of positions {start}–{end - 1}")
    return fig


def _layers(report: CompressionReport, layers: list[int] | None) -> list[int]:
    recorded = sorted(report.kept_indices)
    if not recorded:
        raise ValueError(
            "the report holds no kept tokens: record them with the pipeline's record_kept=True (with "
            "return_report=True), `with press(model, record_kept=True) as report:` or "
            "kvpress.visualization.record_compression"
        )
    if layers is None:
        return recorded
    missing = [i for i in layers if i not in report.kept_indices]
    if missing or not layers:
        raise ValueError(f"layers must be a non-empty list of recorded layers {recorded}, got {list(layers)}")
    return list(layers)
