"""The needle-in-a-haystack heatmap: mean score per (context length, needle depth) cell of a grid."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NeedleCells:
    """Scores of a needle grid aggregated per cell.

    Attributes:
        lengths: context lengths in tokens, ascending (the columns, x axis).
        depths: needle depths in percent of the context, ascending (the rows, y axis, 0 at the top).
        means: ``means[i][j]``: mean score (0 to 100) of the records at ``depths[i]`` and ``lengths[j]``; ``nan``
            for a cell without records.
        counts: ``counts[i][j]``: number of records in that cell.
    """

    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    means: tuple[tuple[float, ...], ...]
    counts: tuple[tuple[int, ...], ...]

    @property
    def mean(self) -> float:
        """Mean score over all records (cells weighted by their number of records)."""
        total = sum(m * c for row_m, row_c in zip(self.means, self.counts) for m, c in zip(row_m, row_c) if c)
        return total / sum(map(sum, self.counts))


def needle_cells(records: Iterable[Mapping]) -> NeedleCells:
    """Mean score per (depth, length) cell of ``records``.

    Args:
        records: mappings with ``length`` (context tokens, int > 0), ``depth`` (percent, in [0, 100]) and ``score``
            (in [0, 100]); depths are compared as floats (``50`` and ``50.0`` are one row).

    Raises:
        ValueError: no records, or a record with a missing or out-of-range value (its position and key named).
    """
    sums: dict[tuple[float, int], float] = defaultdict(float)
    counts: dict[tuple[float, int], int] = defaultdict(int)
    for number, record in enumerate(records):
        length, depth, score = (_value(record, key, number) for key in ("length", "depth", "score"))
        if not float(length).is_integer() or length <= 0:
            raise ValueError(f"records[{number}]['length'] must be a positive int (tokens), got {length!r}")
        if not 0 <= depth <= 100:
            raise ValueError(f"records[{number}]['depth'] must be in [0, 100] (percent), got {depth!r}")
        if not 0 <= score <= 100:
            raise ValueError(f"records[{number}]['score'] must be in [0, 100], got {score!r}")
        key = (float(depth), int(length))
        sums[key] += float(score)
        counts[key] += 1
    if not counts:
        raise ValueError("records must hold at least one scored record")
    depths = tuple(sorted({d for d, _ in counts}))
    lengths = tuple(sorted({n for _, n in counts}))
    return NeedleCells(
        lengths=lengths,
        depths=depths,
        means=tuple(
            tuple(sums[d, n] / counts[d, n] if counts.get((d, n)) else math.nan for n in lengths) for d in depths
        ),
        counts=tuple(tuple(counts.get((d, n), 0) for n in lengths) for d in depths),
    )


def _value(record: Mapping, key: str, number: int) -> float:
    value = record.get(key) if isinstance(record, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"records[{number}] needs a number under {key!r} (keys: length, depth, score), got {value!r}")
    return value


def cell_label(mean: float) -> str:
    """The annotation of a cell: its mean score rounded to an integer (empty for a cell without records)."""
    return "" if math.isnan(mean) else f"{mean:.0f}"


def heatmap_figure(cells: NeedleCells, title: str = "Needle in a haystack"):
    """A matplotlib ``Figure`` (Agg canvas) of ``cells``: lengths on x, depths on y, annotated cells, colorbar 0-100.

    The title gets the overall mean appended.
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_depths, n_lengths = len(cells.depths), len(cells.lengths)
    figure = Figure(figsize=(max(5.0, 1.0 + 0.8 * n_lengths), max(3.5, 1.2 + 0.4 * n_depths)), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    image = ax.imshow(
        np.array(cells.means, dtype=float),
        cmap=colormaps["RdYlGn"].with_extremes(bad="lightgrey"),  # grey: a cell without records
        vmin=0,
        vmax=100,
        aspect="auto",
        interpolation="nearest",
    )
    for i, row in enumerate(cells.means):
        for j, mean in enumerate(row):
            if not math.isnan(mean):
                # White on the dark ends of the colour map, black in its light middle.
                colour = "white" if mean < 20 or mean > 80 else "black"
                ax.text(j, i, cell_label(mean), ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(n_lengths), [str(n) for n in cells.lengths], rotation=45 if n_lengths > 8 else 0)
    ax.set_yticks(range(n_depths), [f"{d:g}" for d in cells.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (% of the context)")
    ax.set_title(f"{title} (mean {cells.mean:.1f})")
    colorbar = figure.colorbar(image, ax=ax, label="score")
    colorbar.set_ticks([0, 20, 40, 60, 80, 100])
    return figure


def plot_needle_heatmap(records_or_cells, path, title: str = "Needle in a haystack") -> Path:
    """Write the heatmap of ``records_or_cells`` (records as :func:`needle_cells` takes, or a :class:`NeedleCells`)
    as an image at ``path`` (PNG for a ``.png`` name; parent folders are created); returns the path."""
    cells = records_or_cells if isinstance(records_or_cells, NeedleCells) else needle_cells(records_or_cells)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heatmap_figure(cells, title).savefig(path, dpi=120)
    return path
