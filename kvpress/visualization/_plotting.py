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


def mark_spans(ax, spans: dict[str, tuple[int, int]] | None, axis: str = "x") -> None:
    """Shade each ``name: (start, end)`` token range along ``axis`` ("x" or "y") and list the names in a legend."""
    if not spans:
        return
    for (name, (start, end)), colour in zip(spans.items(), SPAN_COLOURS * len(spans)):
        shade = ax.axvspan if axis == "x" else ax.axhspan
        shade(start - 0.5, end - 0.5, color=colour, alpha=0.25, lw=0, label=f"{name} [{start}, {end})")
    ax.legend(loc="upper right", fontsize="small", framealpha=0.8)


def check_sequence(sequence: int, batch: int) -> None:
    if isinstance(sequence, bool) or not isinstance(sequence, int) or not 0 <= sequence < batch:
        raise ValueError(f"sequence must be an int in [0, {batch}) (the prompt of the batch to draw), got {sequence!r}")
