"""Shared plotting helpers: a matplotlib import that says how to install it, axes creation, span marks."""

from __future__ import annotations

SPAN_COLOURS = ("tab:red", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink")


def pyplot():
    """``matplotlib.pyplot``, or an ImportError that says how to get it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - matplotlib is installed wherever the tests run
        raise ImportError(
            "kvpress.visualization draws with matplotlib: pip install matplotlib (or kvpress[notebooks])"
        ) from err
    return plt


def log_norm(vmin: float, vmax: float):
    """A logarithmic colour normalisation from ``vmin`` to ``vmax``."""
    pyplot()
    from matplotlib.colors import LogNorm

    return LogNorm(vmin=vmin, vmax=vmax)


def axes(ax, figsize: tuple[float, float]):
    """``(figure, ax)``: the given axes, or a new figure of ``figsize`` inches."""
    if ax is not None:
        return ax.figure, ax
    fig, ax = pyplot().subplots(figsize=figsize, layout="constrained")
    return fig, ax


def mark_spans(
    ax, spans: dict[str, tuple[int, int]] | None, visible: tuple[int, int] | None = None, fill: bool = True
) -> None:
    """Mark each ``name: (start, end)`` token range along x and name it in a legend outside the axes.

    A span keeps its colour (its rank in ``spans``) whichever spans fall inside ``visible`` = ``(start, end)``.
    ``fill=False`` draws the range's edges instead of shading it, leaving the colours of an image underneath true.
    """
    if not spans:
        return
    shown = False
    for (name, (start, end)), colour in zip(spans.items(), SPAN_COLOURS * len(spans)):
        if visible is not None and (end <= visible[0] or start >= visible[1]):
            continue
        label = f"{name} [{start}, {end})"
        if fill:
            ax.axvspan(start - 0.5, end - 0.5, color=colour, alpha=0.3, lw=0, label=label)
        else:
            ax.axvline(start - 0.5, color=colour, lw=1.2, label=label)
            ax.axvline(end - 0.5, color=colour, lw=1.2)
        shown = True
    if shown and fill:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    elif shown:  # an attention map: its upper right is the masked future, empty
        ax.legend(loc="upper right", fontsize="small", framealpha=0.8)


def as_report(report):
    """The :class:`CompressionReport` of ``report`` (a report, or the pipeline's ``CompressionSummary``)."""
    from kvpress.presses.report import CompressionReport

    inner = getattr(report, "layers", report)
    if not isinstance(inner, CompressionReport):
        raise ValueError(
            "report must be a CompressionReport (`with press(model, record_kept=True) as report:`) or the pipeline's "
            f"CompressionSummary (return_report=True, record_kept=True), got {type(report).__name__}"
        )
    return inner


def token_range(value: tuple[int, int] | None, n: int, name: str) -> tuple[int, int]:
    """``value`` as ``(start, end)`` inside ``n`` tokens (``None``: all of them), or a ValueError naming ``name``."""
    if value is None:
        return 0, n
    start, end = value
    if not 0 <= start < end <= n:
        raise ValueError(f"{name} must be (start, end) with 0 <= start < end <= {n} (tokens), got {value!r}")
    return start, end


def check_sequence(sequence: int, batch: int) -> None:
    if isinstance(sequence, bool) or not isinstance(sequence, int) or not 0 <= sequence < batch:
        raise ValueError(f"sequence must be an int in [0, {batch}) (the prompt of the batch to draw), got {sequence!r}")
