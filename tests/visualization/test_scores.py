"""The score plot draws the recorded scores of every head, with the kept tokens marked."""

from __future__ import annotations

import math

import pytest
import torch

from kvpress import KnormPress, SnapKVPress
from kvpress.visualization import plot_scores, record_compression
from tests.conftest import tiny_model


def test_lines_are_the_recorded_scores_and_dots_the_kept_tokens():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 40))
    report, _ = record_compression(model, SnapKVPress(0.5, window_size=4), ids)
    fig = plot_scores(report, layer=1, spans={"question": (30, 36)})
    lines = fig.axes[0].get_lines()
    heads = model.config.num_key_value_heads
    assert len(lines) == 2 * heads  # one line and one set of dots per head
    scores, kept = report.scores[1][0], report.kept_mask(1)[0]
    for head in range(heads):
        y = torch.as_tensor(lines[2 * head].get_ydata()).float()
        finite = torch.isfinite(scores[head]) & (scores[head] > 0)
        assert torch.equal(y[finite], scores[head][finite])
        assert bool(y[~finite].isnan().all())  # the observation window scores +inf: not drawn
        dots = torch.as_tensor(lines[2 * head + 1].get_xdata())
        assert torch.equal(dots, torch.arange(40)[kept[head]])
    assert fig.axes[0].get_yscale() == "log"


def test_negative_scores_are_drawn_on_a_linear_axis():
    model = tiny_model("llama")
    report, _ = record_compression(model, KnormPress(0.5), torch.randint(3, 128, (1, 20)))
    fig = plot_scores(report, layer=0, heads=[1], log=False, window=(2, 12))
    y = fig.axes[0].get_lines()[0].get_ydata()
    assert len(y) == 10 and all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(y, report.scores[0][0, 1, 2:12]))
    with pytest.raises(ValueError, match=r"heads must be a non-empty list of kv-heads in \[0, 2\)"):
        plot_scores(report, layer=0, heads=[2])
    with pytest.raises(ValueError, match="no scores recorded for layer 7"):
        plot_scores(report, layer=7)
