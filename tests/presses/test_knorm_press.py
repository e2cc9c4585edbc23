"""KnormPress: the lowest-norm keys are the ones kept (float64 reference), skipped layers stay whole."""

from __future__ import annotations

import pytest
import torch

from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.memory_budget_press import MemoryBudgetPress
from tests.conftest import random_ids, tiny_model
from tests.presses.press_harness import full_layers, prefill, record_scores


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize(("batch", "n", "ratio"), [(1, 23, 0.5), (3, 40, 0.25), (2, 57, 0.8)])
def test_lowest_norm_keys_are_kept(arch, kv_heads, batch, n, ratio):
    model = tiny_model(arch, kv_heads=kv_heads) if arch == "llama" else tiny_model(arch)
    press = KnormPress(ratio)
    seen = record_scores(press)
    cache = prefill(model, press, random_ids(n, batch, seed=n + kv_heads))
    k = round(n * (1 - ratio))
    assert sorted(seen) == full_layers(model)
    for i, rec in seen.items():
        norms = rec.keys.double().pow(2).sum(-1).sqrt()  # (batch, kv_heads, n), float64 reference
        kept = kept_mask(cache.layers[i].keys, rec.keys)
        assert torch.equal(kept.sum(-1), torch.full(norms.shape[:2], k))
        # Every kept key has a norm no larger than any dropped key of its head (a repeated token ties: RoPE keeps
        # the norm, and QK-norm models give every key about the same norm).
        assert bool(
            (norms.masked_fill(~kept, -1).amax(-1) <= norms.masked_fill(kept, float("inf")).amin(-1) + 1e-6).all()
        )


def kept_mask(kept: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``(batch, heads, n)`` True where a row of ``full`` appears among the rows of ``kept``."""
    return (kept[:, :, :, None] == full[:, :, None]).all(-1).any(2)


def test_skipped_layers_keep_every_token():
    model = tiny_model("llama")
    n = 30
    press = KnormPress(0.5, skip_layers=(0,))
    cache = prefill(model, press, random_ids(n, 2, seed=1))
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    assert lengths[0] == n and all(length == n // 2 for length in lengths[1:])


@pytest.mark.parametrize("bad", [(-1,), (0.5,), "0,1", (True,)])
def test_bad_skip_layers_are_named(bad):
    with pytest.raises(ValueError, match="skip_layers must be a tuple of non-negative layer indices"):
        KnormPress(0.5, skip_layers=bad)


def test_skip_layers_beyond_the_model_are_rejected_before_any_tensor():
    model = tiny_model("llama")
    n_layers = model.config.num_hidden_layers
    with pytest.raises(
        ValueError, match=rf"names layers the model does not have; accepted: indices in \[0, {n_layers - 1}\]"
    ):
        with KnormPress(0.5, skip_layers=(n_layers,))(model):
            pass
    cache = prefill(model, KnormPress(0.5), random_ids(10, 1))  # the model is left usable
    assert cache.layers[0].keys.shape[-2] == 5


def test_memory_budget_rejects_skipped_layers():
    with pytest.raises(ValueError, match="skip_layers=\\(\\) inside MemoryBudgetPress"):
        MemoryBudgetPress(KnormPress(skip_layers=(0, 1)), budget_fraction=0.5)
