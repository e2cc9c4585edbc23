"""The kept-token map draws exactly the recorded kept positions; span shares count a span's kept tokens per head."""

from __future__ import annotations

import pytest
import torch

from kvpress import AdaKVPress, KnormPress, SnapKVPress
from kvpress.visualization import plot_kept_tokens, record_compression, span_kept_share
from kvpress.visualization.kept_tokens import kept_matrix
from tests.conftest import tiny_model


def _image(fig) -> torch.Tensor:
    return torch.as_tensor(fig.axes[0].get_images()[0].get_array())


@pytest.mark.parametrize("press", [KnormPress(0.5), AdaKVPress(SnapKVPress(0.5, window_size=4))], ids=repr)
def test_map_rows_are_the_kept_positions_of_each_layer_and_head(press):
    model = tiny_model("llama")
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 36))
    report, _ = record_compression(model, press, ids)
    fig = plot_kept_tokens(report, spans={"needle": (10, 14)}, sequence=1)
    image = _image(fig)
    heads = model.config.num_key_value_heads
    assert image.shape == (3 * heads, 36)
    for layer in range(3):
        for head in range(heads):
            kept = report.kept_indices[layer][1, head]
            expected = torch.zeros(36)
            expected[kept[kept >= 0]] = 1
            assert torch.equal(image[layer * heads + head].float(), expected)
    zoom = _image(plot_kept_tokens(report, layers=[2], window=(5, 20)))
    assert torch.equal(zoom.float(), kept_matrix(report, 0, [2])[:, 5:20].float())


def test_span_share_counts_each_heads_kept_tokens_in_the_span():
    model = tiny_model("qwen2")
    ids = torch.randint(3, 128, (1, 30))
    report, _ = record_compression(model, AdaKVPress(KnormPress(0.6)), ids)
    share = span_kept_share(report, (4, 12))
    assert share.shape == (3, model.config.num_key_value_heads)
    for layer in range(3):
        for head in range(share.shape[1]):
            kept = set(report.kept_indices[layer][0, head].tolist())
            assert share[layer, head].item() == pytest.approx(len(kept & set(range(4, 12))) / 8)
    with pytest.raises(ValueError, match=r"span must be \(start, end\) with 0 <= start < end <= 30"):
        span_kept_share(report, (4, 31))


def test_a_report_without_recorded_tokens_says_how_to_record_them():
    model = tiny_model("llama")
    report, _ = record_compression(model, KnormPress(0.5), torch.randint(3, 128, (1, 20)))
    report.kept_indices.clear()
    with pytest.raises(ValueError, match="record_kept=True"):
        plot_kept_tokens(report)
    report, _ = record_compression(model, KnormPress(0.5), torch.randint(3, 128, (1, 20)))
    with pytest.raises(ValueError, match=r"layers must be a non-empty list of recorded layers \[0, 1, 2\]"):
        plot_kept_tokens(report, layers=[5])
    with pytest.raises(ValueError, match=r"sequence must be an int in \[0, 1\)"):
        plot_kept_tokens(report, sequence=1)


def test_a_span_keeps_its_colour_and_the_pipeline_summary_is_accepted():
    from kvpress.compression_summary import CompressionSummary

    model = tiny_model("llama")
    report, _ = record_compression(model, KnormPress(0.5), torch.randint(3, 128, (1, 40)))
    summary = CompressionSummary(None, "DynamicCache", 40, 0.5, 1, 1, layers=report)
    spans = {"needle": (5, 9), "question": (30, 36)}

    def colours(fig):
        return {p.get_label().split(" [")[0]: p.get_facecolor() for p in fig.axes[0].patches}

    both = colours(plot_kept_tokens(summary, spans=spans))
    question_only = colours(plot_kept_tokens(summary, spans=spans, window=(20, 40)))
    assert set(both) == {"needle", "question"} and set(question_only) == {"question"}
    assert question_only["question"] == both["question"] != both["needle"]
    torch.testing.assert_close(span_kept_share(summary, (5, 9)), span_kept_share(report, (5, 9)))
    with pytest.raises(ValueError, match="report must be a CompressionReport .* got dict"):
        plot_kept_tokens({"layers": 1})
