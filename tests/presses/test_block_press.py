"""BlockPress: KeyDiff's block-wise eviction against a plain-Python float64 loop (the anchor follows the kept set)."""

import pytest
import torch

from kvpress.presses.block_press import BlockPress
from kvpress.presses.keydiff_press import KeyDiffPress
from kvpress.presses.knorm_press import KnormPress
from tests.conftest import tiny_model
from tests.presses.press_harness import full_layers, kept_positions, prefill
from tests.presses.test_keydiff_press import reference as keydiff_f64


def distinct_ids(model, n: int, batch: int, seed: int) -> torch.Tensor:
    """``(batch, n)`` ids without repeats (a repeated token ties with itself) and without the padding id 0 (its
    embedding, so its key, is zero in the tiny models)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(model.config.vocab_size - 1, generator=gen)[:n] + 1 for _ in range(batch)])


def blockwise_f64(keys: torch.Tensor, k: int, block: int) -> list:
    b, h, n, _ = keys.shape
    out = []
    for i in range(b):
        row = []
        for j in range(h):
            kept = []
            for start in range(0, n, block):
                kept += list(range(start, min(start + block, n)))
                if len(kept) > k:
                    s = keydiff_f64(keys[i : i + 1, j : j + 1, kept])[0, 0].tolist()
                    best = sorted(range(len(kept)), key=lambda t: s[t], reverse=True)[:k]
                    kept = sorted(kept[t] for t in best)
            row.append(kept)
        out.append(row)
    return out


@pytest.mark.parametrize(("batch", "n", "block", "ratio"), [(1, 40, 8, 0.5), (2, 37, 5, 0.3), (2, 50, 64, 0.6)])
def test_blockwise_keydiff_matches_the_plain_loop(arch, batch, n, block, ratio):
    model = tiny_model(arch)
    press = BlockPress(KeyDiffPress(ratio), block_size=block)
    keys_of = {}

    def capture(module, hidden_states, keys, values, attentions, kwargs):
        keys_of.setdefault(module.layer_idx, keys.clone())
        return original(module, hidden_states, keys, values, attentions, kwargs)

    original = press.compress
    press.compress = capture
    cache = prefill(model, press, distinct_ids(model, n, batch, seed=n))
    assert sorted(keys_of) == full_layers(model)
    k = round(n * (1 - ratio))
    for i, keys in keys_of.items():
        assert kept_positions(cache.layers[i].keys, keys).tolist() == blockwise_f64(keys, k, block)


def test_a_set_independent_scorer_keeps_the_global_top():
    """Knorm scores a token alone, so block-wise eviction ends at its global top-k."""
    model = tiny_model("llama")
    ids = distinct_ids(model, 45, 2, seed=1)
    blockwise, whole = (
        prefill(model, BlockPress(KnormPress(0.5), block_size=6), ids),
        prefill(model, KnormPress(0.5), ids),
    )
    for a, b in zip(blockwise.layers, whole.layers):
        assert torch.equal(a.keys, b.keys)
