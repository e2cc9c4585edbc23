"""CriticalKVPress and CriticalAdaKVPress: the first stage keeps the inner press's best, the second the best of the
rest by score times the L1 norm of the value through W_o (float64 reference, per head), on every architecture."""

import pytest
import torch

from kvpress.cache.varlen_cache import VarlenCache
from kvpress.generation import CompressedContext
from kvpress.presses.critical_adakv_press import CriticalAdaKVPress
from kvpress.presses.criticalkv_press import CriticalKVPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.snapkv_press import SnapKVPress
from tests.conftest import random_ids, tiny_model
from tests.presses.press_harness import full_layers, kept_positions, prefill, record_scores


def value_norms_f64(module, values: torch.Tensor) -> torch.Tensor:
    """Mean over a kv head's query heads of ``sum_c |W_o^(j) v_i|_c`` in float64, one head at a time."""
    w = module.o_proj.weight.detach().double()
    b, h_kv, n, d = values.shape
    heads = w.shape[1] // d
    out = torch.zeros(b, h_kv, n, dtype=torch.float64)
    for j in range(heads):
        kv = j // (heads // h_kv)
        out[:, kv] += (values[:, kv].double() @ w[:, j * d : (j + 1) * d].T).abs().sum(-1) / (heads // h_kv)
    return out


def reference_kept(inner: torch.Tensor, norms: torch.Tensor, k: int, ratio: float) -> list[list[list[int]]]:
    """Per (sequence, head), the kept positions: +inf tokens, then the inner best up to round(ratio * k), then the
    best of the rest by shifted score times norm (plain Python over float64 values)."""
    out = []
    for b in range(inner.shape[0]):
        row = []
        for h in range(inner.shape[1]):
            s = inner[b, h].tolist()
            finite = [x for x in s if x != float("inf")]
            low = min(min(finite), 0.0)
            order = sorted(range(len(s)), key=lambda i: (s[i], i), reverse=True)
            first = set(order[: round(ratio * k)])
            rest = [i for i in range(len(s)) if i not in first]
            rest.sort(key=lambda i: ((s[i] - low) * float(norms[b, h, i]), i), reverse=True)
            row.append(sorted(first | set(rest[: k - len(first)])))
        out.append(row)
    return out


@pytest.mark.parametrize("inner", ["knorm", "snapkv"])
@pytest.mark.parametrize(("batch", "n", "ratio", "stage"), [(1, 30, 0.5, 0.5), (2, 41, 0.3, 0.25), (2, 36, 0.7, 1.0)])
def test_kept_tokens_match_the_two_stage_reference(arch, inner, batch, n, ratio, stage):
    model = tiny_model(arch)
    scorer = (
        KnormPress(ratio) if inner == "knorm" else SnapKVPress(ratio, window_size=4, kernel_size=1)
    )  # no pooling: no ties
    press = CriticalKVPress(scorer, first_stage_ratio=stage)
    inner_scores = record_scores(scorer)
    seen = record_scores(press)
    # Distinct tokens: a repeated token's key has the same norm at every position (Knorm ties).
    gen = torch.Generator().manual_seed(n + batch)
    ids = torch.stack([torch.randperm(model.config.vocab_size, generator=gen)[:n] for _ in range(batch)])
    cache = prefill(model, press, ids)
    assert sorted(seen) == full_layers(model)
    k = round(n * (1 - ratio))
    for i, rec in seen.items():
        s = inner_scores[i].scores.double()
        if inner == "snapkv":  # the window is kept whole: +inf, taken first
            assert bool(s[..., -4:].isposinf().all())
        want = reference_kept(s, value_norms_f64(rec.module, rec.values), k, stage)
        assert kept_positions(cache.layers[i].keys, rec.keys).tolist() == want


def test_critical_adakv_shares_each_layer_budget_over_heads_in_a_varlen_cache():
    model = tiny_model("llama", kv_heads=4)
    ids = random_ids(48, seed=3)
    press = CriticalAdaKVPress(SnapKVPress(0.5, window_size=4), alpha_safeguard=0.2, first_stage_ratio=0.5)
    assert isinstance(press.press, CriticalKVPress) and press.capabilities.head_variable
    ctx = CompressedContext.prefill(model, ids, press, cache=VarlenCache(config=model.config), compact=True)
    lengths = [layer.seg_lens for layer in ctx.cache.layers]
    assert all(int(x.sum()) == 4 * 24 for x in lengths)
    assert any(len(set(x.flatten().tolist())) > 1 for x in lengths)  # heads really differ


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="press must be a ScorerPress .*, got CriticalAdaKVPress"):
        CriticalKVPress(CriticalAdaKVPress(KnormPress(0.5)))
    with pytest.raises(ValueError, match=r"first_stage_ratio must be a number in \[0, 1\], got 2"):
        CriticalKVPress(KnormPress(0.5), first_stage_ratio=2)
