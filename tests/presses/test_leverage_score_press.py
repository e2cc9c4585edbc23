"""LeverageScorePress: z-scored leverage of the sketched pre-RoPE keys against a float64 solve (un-rotation by plain
float64 RoPE), and one-forward prefills only."""

import math

import pytest
import torch

from kvpress.presses.leverage_score_press import LeverageScorePress
from tests.conftest import random_ids, tiny_model
from tests.presses.press_harness import assert_keeps_top, full_layers, prefill, record_scores, rotate_f64


def zscore_f64(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(-1, keepdim=True)) / x.std(-1, correction=0, keepdim=True)


def leverage_f64(rec, sketch_dimension: int, seed: int) -> torch.Tensor:
    """z-scored ``x_i (XᵀX)⁻¹ x_iᵀ`` of the sketched pre-RoPE keys, in float64 through a linear solve."""
    pre = rotate_f64(rec.keys, rec.cos, rec.sin, inverse=True)
    d = pre.shape[-1]
    if sketch_dimension < d:
        gen = torch.Generator().manual_seed(seed)
        pre = pre @ (torch.randn(d, sketch_dimension, generator=gen) / math.sqrt(sketch_dimension)).double()
    gram = pre.transpose(-1, -2) @ pre
    solved = torch.linalg.solve(gram, pre.transpose(-1, -2))  # (b, h, s, n)
    return zscore_f64((pre * solved.transpose(-1, -2)).sum(-1))


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize(("batch", "n", "sketch", "ratio"), [(1, 40, 48, 0.5), (2, 57, 8, 0.3), (3, 33, 12, 0.7)])
def test_scores_match_the_float64_reference(arch, kv_heads, batch, n, sketch, ratio):
    model = tiny_model(arch, kv_heads=kv_heads) if arch == "llama" else tiny_model(arch)
    press = LeverageScorePress(ratio, sketch_dimension=sketch, seed=5)
    seen = record_scores(press)
    cache = prefill(model, press, random_ids(n, batch, seed=n + 1))
    assert sorted(seen) == full_layers(model)
    for i, rec in seen.items():
        want = leverage_f64(rec, sketch, 5)
        torch.testing.assert_close(rec.scores.double(), want, rtol=2e-3, atol=2e-3)
        assert_keeps_top(cache.layers[i].keys, rec.keys, want, tol=5e-3)


def test_leverage_sums_to_the_rank_before_the_zscore():
    from kvpress.presses.leverage_score_press import leverage_scores

    x = torch.randn(2, 3, 50, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(leverage_scores(x, None).sum(-1), torch.full((2, 3), 16.0), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sketch_dimension", [48, 64])
def test_keys_with_outlier_channels_match_the_float64_solve(dtype, sketch_dimension):
    """Trained models' keys carry a few channels 1e3-1e4 times larger than the rest; once the sketch mixes them into
    every column, the Gram matrix is too ill-conditioned for a float32 Cholesky. The leverage must still match a
    float64 solve."""
    from kvpress.presses.leverage_score_press import leverage_scores, sketch_matrix

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 300, 64, generator=gen, dtype=torch.float64)
    x[..., 5] *= 3e3
    x[..., 17] *= 1e4
    x[1, 1, :, 9] = x[1, 1, :, 2]  # a rank-deficient head: the ridge keeps it factorisable
    sketch = sketch_matrix(64, sketch_dimension, 0, "cpu")
    got = leverage_scores(x.to(dtype), sketch)
    xd = x.to(dtype).double()
    xd = xd if sketch is None else xd @ sketch.double()
    s = xd.shape[-1]
    gram = xd.transpose(-1, -2) @ xd
    gram = gram + 1e-6 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(s, dtype=torch.float64)
    want = (xd * torch.linalg.solve(gram, xd.transpose(-1, -2)).transpose(-1, -2)).sum(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
