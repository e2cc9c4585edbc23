"""The per-head budget map shows each (layer, kv-head)'s kept share of the prefill."""

from __future__ import annotations

import torch

from kvpress import AdaKVPress, KnormPress, PyramidKVPress
from kvpress.visualization import plot_head_budgets, record_compression
from tests.conftest import tiny_model


def test_cells_are_kept_lengths_over_the_prefill():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 50))
    for press in (AdaKVPress(KnormPress(0.5)), PyramidKVPress(0.5, window_size=2, beta=4)):
        report, _ = record_compression(model, press, ids)
        fig = plot_head_budgets(report, sequence=1)
        grid = torch.as_tensor(fig.axes[0].get_images()[0].get_array()).double()
        expected = torch.stack([report.kept_lengths[i][1] for i in range(3)]).double() / 50
        torch.testing.assert_close(grid, expected)
    assert len(set(expected[:, 0].tolist())) > 1  # PyramidKV: budgets shrink with depth
