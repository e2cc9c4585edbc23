"""attention_maps equal the weights transformers' eager attention returns; the map is drawn on a log scale."""

from __future__ import annotations

import pytest
import torch

from kvpress.visualization import attention_maps, plot_attention_map
from tests.conftest import tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3", "mistral"])
def test_maps_match_the_eager_attention_weights(arch):
    torch.manual_seed(1)
    model = tiny_model(arch, "eager")
    ids = torch.randint(3, 128, (1, int(torch.randint(5, 40, ()))))
    with torch.no_grad():
        reference = model(ids, output_attentions=True).attentions
    maps = attention_maps(model, ids, layers=[0, 2])
    assert sorted(maps) == [0, 2]
    for layer, weights in maps.items():
        torch.testing.assert_close(weights, reference[layer][0].float(), rtol=1e-5, atol=1e-6)
        assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:2]))


def test_last_queries_are_the_last_rows_of_the_full_map():
    model = tiny_model("qwen3", "eager")
    ids = torch.randint(3, 128, (1, 33))
    full = attention_maps(model, ids, layers=[1])[1]
    for q in (1, 7, 33):
        torch.testing.assert_close(attention_maps(model, ids, layers=[1], last_queries=q)[1], full[:, -q:])
    with pytest.raises(ValueError, match=r"last_queries must be None \(every query\) or an int in \[1, 33\]"):
        attention_maps(model, ids, last_queries=34)


def test_any_attention_implementation_gives_the_same_map():
    ids = torch.randint(3, 128, (1, 30))
    eager = attention_maps(tiny_model("llama", "eager"), ids)
    sdpa = attention_maps(tiny_model("llama", "sdpa"), ids)
    assert sorted(eager) == [0, 1, 2]
    for layer in eager:
        torch.testing.assert_close(eager[layer], sdpa[layer])


def test_plot_shows_the_chosen_head_on_a_log_scale():
    ids = torch.randint(3, 128, (1, 25))
    weights = attention_maps(tiny_model("llama"), ids, layers=[1])[1]
    fig = plot_attention_map(weights, head=2, spans={"needle": (5, 9)})
    image = fig.axes[0].get_images()[0]
    shown = torch.as_tensor(image.get_array().filled(float("nan")))
    expected = weights[2].clamp_min(1e-4).masked_fill(torch.ones(25, 25, dtype=torch.bool).triu(1), float("nan"))
    torch.testing.assert_close(shown.float(), expected, equal_nan=True)
    assert type(image.norm).__name__ == "LogNorm"
    assert "needle [5, 9)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    mean = plot_attention_map(weights)  # head=None: the mean over heads
    shown = torch.as_tensor(mean.axes[0].get_images()[0].get_array().filled(0.0)).float()
    torch.testing.assert_close(shown.tril(), weights.mean(0).clamp_min(1e-4).tril())


def test_bad_arguments_are_named():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 10))
    with pytest.raises(ValueError, match=r"layers must be attention layer indices in \[0, 3\)"):
        attention_maps(model, ids, layers=[3])
    with pytest.raises(ValueError, match=r"input_ids must be a \(1, n\) tensor"):
        attention_maps(model, torch.randint(3, 128, (2, 10)))
    weights = attention_maps(model, ids, layers=[0])[0]
    with pytest.raises(ValueError, match=r"head must be in \[0, 4\)"):
        plot_attention_map(weights, head=4)
