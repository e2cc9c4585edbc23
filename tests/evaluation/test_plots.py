"""Score-versus-ratio plots: lines grouped per press and panel as the summary rows say, and a PNG that holds them."""

import random

import matplotlib.image
import pytest

from kvpress_evaluation.plots import AVERAGE, line_name, plot_scores, score_curves


def _rows(seed, tasks, presses=("knorm", "snapkv"), ratios=(0.75, 0.25, 0.5)):
    rng = random.Random(seed)
    rows = [{"press": "none", "swept": False, "compression_ratio": 0.0, "kv_bits": None}]
    rows += [{"press": p, "swept": True, "compression_ratio": r, "kv_bits": None} for p in presses for r in ratios]
    rows += [{"press": "knorm", "swept": True, "compression_ratio": r, "kv_bits": 4} for r in ratios]
    rows.append({"press": "think", "swept": False, "compression_ratio": None, "kv_bits": None})
    for row in rows:
        for task in tasks:
            row[task] = round(rng.uniform(0, 100), 2)
        row[AVERAGE] = round(sum(row[t] for t in tasks) / len(tasks), 2)
    return rows


@pytest.mark.parametrize("tasks", [["niah_single_1"], ["a", "b", "c"]])
def test_curves_group_rows_by_press_and_panel(tasks):
    rows = _rows(0, tasks)
    rng = random.Random(1)
    rng.shuffle(rows)
    rows[0] = {**rows[0], tasks[0]: None}  # a run without that task's score is left out of its panel
    curves = score_curves(rows, tasks)
    assert curves.panels == (tasks + [AVERAGE] if len(tasks) > 1 else tasks)
    for panel in curves.panels:
        expected_lines, expected_base = {}, {}
        for row in rows:
            if row[panel] is None:
                continue
            if row["swept"]:
                expected_lines.setdefault(line_name(row), set()).add((row["compression_ratio"], row[panel]))
            else:
                expected_base[line_name(row)] = row[panel]
        assert {k: set(v) for k, v in curves.curves[panel].items()} == expected_lines
        for points in curves.curves[panel].values():
            assert [x for x, _ in points] == sorted(x for x, _ in points)
        assert curves.baselines[panel] == expected_base
    assert "knorm kv4" in curves.curves[tasks[-1]] and line_name({"press": "x", "kv_bits": None}) == "x"


@pytest.mark.parametrize("n_tasks", [1, 4])
def test_png_is_written_with_one_panel_per_task(tmp_path, n_tasks):
    tasks = [f"task{i}" for i in range(n_tasks)]
    path = plot_scores(_rows(2, tasks), tasks, tmp_path / "deep" / "scores.png")
    assert path.is_file() and path.stat().st_size > 1000
    image = matplotlib.image.imread(path)
    # Panels are laid out in rows of three, 4.5 x 3.5 inches each, at 110 dpi.
    cols = min(n_tasks + (n_tasks > 1), 3)
    rows = -(-(n_tasks + (n_tasks > 1)) // cols)
    assert image.shape[:2] == (round(3.5 * rows * 110), round(4.5 * cols * 110))
    assert image[..., :3].std() > 0.05  # not a blank canvas
