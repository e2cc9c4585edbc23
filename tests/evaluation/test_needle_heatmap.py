"""Needle heatmap: per-cell means against a plain reference, the drawn image and labels, the PNG, bad records."""

from __future__ import annotations

import math
import random

import matplotlib.image
import numpy as np
import pytest

from kvpress_evaluation.needle.heatmap import NeedleCells, cell_label, heatmap_figure, needle_cells, plot_needle_heatmap


def random_records(seed: int) -> list[dict]:
    """Records over a random grid, a random number of them per cell (some cells empty), in random order."""
    rng = random.Random(seed)
    lengths = rng.sample([500, 1000, 2000, 4000, 8000, 16000, 32000], rng.randint(1, 5))
    depths = rng.sample([0, 5, 12.5, 25, 50, 75, 90, 100], rng.randint(1, 6))
    records = [
        {"length": n, "depth": d, "score": rng.choice([0, 100, rng.uniform(0, 100)])}
        for n in lengths
        for d in depths
        for _ in range(rng.choice([0, 1, 1, 2, 3, 7]))
    ]
    if not records:
        records = [{"length": lengths[0], "depth": depths[0], "score": 50.0}]
    rng.shuffle(records)
    return records


def reference(records: list[dict]) -> tuple[list[int], list[float], dict]:
    """Sorted lengths and depths, and {(depth, length): (mean, count)} in float64, by plain filtering."""
    lengths = sorted({r["length"] for r in records})
    depths = sorted({float(r["depth"]) for r in records})
    cells = {}
    for d in depths:
        for n in lengths:
            scores = np.array([r["score"] for r in records if r["length"] == n and float(r["depth"]) == d], np.float64)
            cells[d, n] = (scores.mean() if scores.size else math.nan, scores.size)
    return lengths, depths, cells


@pytest.mark.parametrize("seed", range(8))
def test_cells_are_the_mean_of_the_records_of_each_cell(seed):
    records = random_records(seed)
    cells = needle_cells(records)
    lengths, depths, want = reference(records)
    assert cells.lengths == tuple(lengths) and cells.depths == tuple(depths)
    for i, d in enumerate(depths):
        for j, n in enumerate(lengths):
            mean, count = want[d, n]
            assert cells.counts[i][j] == count
            if count:
                assert cells.means[i][j] == pytest.approx(mean, rel=1e-12, abs=1e-12)
            else:
                assert math.isnan(cells.means[i][j])
    assert cells.mean == pytest.approx(np.mean([r["score"] for r in records]), rel=1e-12)


def test_int_and_float_depths_share_a_row():
    cells = needle_cells(
        [
            {"length": 1000, "depth": 50, "score": 100},
            {"length": 1000, "depth": 50.0, "score": 0},
            {"length": 1000, "depth": 0, "score": 100},
        ]
    )
    assert cells.depths == (0.0, 50.0) and cells.means == ((100.0,), (50.0,)) and cells.counts == ((1,), (2,))


@pytest.mark.parametrize("seed", range(3))
def test_figure_draws_the_cells_with_labels_and_a_0_to_100_colour_scale(seed):
    cells = needle_cells(random_records(seed))
    figure = heatmap_figure(cells, title="knorm 0.5")
    ax = figure.axes[0]
    (image,) = ax.images
    drawn = np.ma.filled(image.get_array().astype(float), np.nan)
    np.testing.assert_array_equal(drawn, np.array(cells.means, dtype=float))
    assert image.get_clim() == (0, 100)
    # One annotation per non-empty cell, at the cell, reading its rounded mean.
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in ax.texts}
    want = {(j, i): cell_label(m) for i, row in enumerate(cells.means) for j, m in enumerate(row) if not math.isnan(m)}
    assert texts == want and len(ax.texts) == len(want)
    # Lengths along x, depths down y (0 at the top), in percent.
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(n) for n in cells.lengths]
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{d:g}" for d in cells.depths]
    bottom, top = ax.get_ylim()
    assert bottom > top
    assert ax.get_title().startswith("knorm 0.5 (mean ") and f"{cells.mean:.1f}" in ax.get_title()
    colorbar_ax = figure.axes[1]
    assert colorbar_ax.get_ylim() == (0, 100)


def test_cell_label_rounds_and_blanks_empty_cells():
    assert cell_label(66.66) == "67" and cell_label(0.0) == "0" and cell_label(100.0) == "100"
    assert cell_label(math.nan) == ""


def test_png_written_from_records_or_cells(tmp_path):
    records = random_records(11)
    path = plot_needle_heatmap(records, tmp_path / "a" / "b" / "heat.png", title="grid")
    assert path == tmp_path / "a" / "b" / "heat.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
    # Not a blank canvas: the cells' colours are there.
    assert pixels[..., :3].std() > 0.05
    again = plot_needle_heatmap(needle_cells(records), tmp_path / "again.png", title="grid")
    np.testing.assert_array_equal(matplotlib.image.imread(again), pixels)


@pytest.mark.parametrize(
    "records, message",
    [
        ([], "at least one"),
        ([{"length": 1000, "depth": 10}], "records\\[0\\] needs a number under 'score'"),
        (
            [{"length": 1000, "depth": 10, "score": 1}, {"length": 0, "depth": 10, "score": 1}],
            "records\\[1\\]\\['length'\\]",
        ),
        ([{"length": 1000.5, "depth": 10, "score": 1}], "records\\[0\\]\\['length'\\]"),
        ([{"length": 1000, "depth": 120, "score": 1}], "records\\[0\\]\\['depth'\\] must be in \\[0, 100\\]"),
        ([{"length": 1000, "depth": 10, "score": -1}], "records\\[0\\]\\['score'\\] must be in \\[0, 100\\]"),
        ([{"length": 1000, "depth": 10, "score": float("nan")}], "under 'score'"),
        ([{"length": 1000, "depth": "10", "score": 1}], "under 'depth'"),
        (["not a record"], "records\\[0\\] needs a number under 'length'"),
    ],
)
def test_bad_records_are_named(records, message):
    with pytest.raises(ValueError, match=message):
        needle_cells(records)


def test_cells_dataclass_mean_weights_cells_by_records():
    cells = NeedleCells(lengths=(1, 2), depths=(0.0,), means=((100.0, 0.0),), counts=((3, 1),))
    assert cells.mean == 75.0
