"""Per-head budgets: how many tokens each (layer, kv-head) kept, the picture of head-adaptive presses."""

from __future__ import annotations

import torch

from kvpress.presses.report import CompressionReport
from kvpress.visualization._plotting import as_report, axes, check_sequence


def plot_head_budgets(report: CompressionReport, sequence: int = 0, title: str | None = None, ax=None):
    """Draw the share of the prefill each kv-head of each compressed layer kept (layers down, heads across).

    Needs only ``report.kept_lengths``, so it works without ``record_kept``. A uniform press gives one flat colour;
    head-adaptive presses (AdaKV) and layer schedules (PyramidKV) show their allocation.

    Returns:
        The matplotlib figure.
    """
    report = as_report(report)
    layers = report.compressed_layers
    if not layers:
        raise ValueError("the report holds no compressed layer (was a prefill run inside `with press(model)`?)")
    check_sequence(sequence, report.kept_lengths[layers[0]].shape[0])
    share = [report.kept_lengths[i][sequence].double() / report.original_lengths[i] for i in layers]
    grid = torch.stack(share).numpy()
    heads = grid.shape[1]
    fig, ax = axes(ax, (max(5.5, 0.45 * heads + 3.5), max(3.5, 0.18 * len(layers) + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="none")
    fig.colorbar(image, ax=ax, label="share of the prefill kept")
    ax.set_xticks(range(heads))
    ax.set_xlabel("kv-head")
    step = max(1, len(layers) // 15)
    ax.set_yticks(range(0, len(layers), step))
    ax.set_yticklabels([str(layers[k]) for k in range(0, len(layers), step)])
    ax.set_ylabel("layer")
    ax.set_title(title or f"kept share per head (mean {grid.mean():.0%})", fontsize="medium")
    return fig
