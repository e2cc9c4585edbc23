"""KVComposePress: per-head mean received attention against a float64 softmax, composite tokens ranked across
layers against a plain-Python allocation, dense layers of per-layer lengths holding each head's best tokens."""

from types import SimpleNamespace

import pytest
import torch

from kvpress.presses import KVComposePress
from tests.conftest import random_ids, tiny_model
from tests.presses.press_harness import full_layers, kept_positions, prefill, queries_f64


def record_layer_scores(press) -> dict:
    seen, score = {}, press.layer_scores

    def recording(module, hidden_states, keys, values, attentions, kwargs):
        out = score(module, hidden_states, keys, values, attentions, kwargs)
        cos, sin = kwargs["position_embeddings"]
        seen[module.layer_idx] = SimpleNamespace(keys=keys.clone(), scores=out.clone(), hidden=hidden_states.clone(),
                                                 cos=cos.clone(), sin=sin.clone(), module=module)  # fmt: skip
        return out

    press.layer_scores = recording
    return seen


def mean_received_f64(rec, head_reduction: str) -> torch.Tensor:
    q = queries_f64(rec.module, rec.hidden, rec.cos, rec.sin)
    k = rec.keys.double()
    b, n_q, n, _ = q.shape
    k = k.repeat_interleave(n_q // k.shape[1], dim=1)
    logits = q @ k.transpose(-1, -2) * rec.module.scaling
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    mean = logits.softmax(-1).sum(-2) / torch.arange(n, 0, -1, dtype=torch.float64)
    grouped = mean.view(b, rec.keys.shape[1], -1, n)
    return grouped.amax(2) if head_reduction == "max" else grouped.mean(2)


def counts_reference(scores: dict, k: int, composite_reduction: str) -> dict:
    """Plain loops: composite token j of a layer scores the reduction over heads of their j-th best, batch-averaged;
    the top layers*k composite entries of the model decide each layer's count."""
    entries = []
    for layer, s in scores.items():
        ranked = s.sort(-1, descending=True).values
        for j in range(s.shape[-1]):
            col = ranked[..., j]
            value = col.mean(1) if composite_reduction == "mean" else col.amax(1)
            entries.append((float(value.mean()), layer))
    entries.sort(key=lambda e: -e[0])
    counts = dict.fromkeys(scores, 0)
    for _, layer in entries[: len(scores) * k]:
        counts[layer] += 1
    return counts


@pytest.mark.parametrize(("batch", "n", "ratio", "head_reduction", "composite_reduction"),
                         [(1, 37, 0.5, "max", "mean"), (2, 50, 0.7, "mean", "max"), (3, 23, 0.3, "max", "max")])  # fmt: skip
def test_scores_and_allocation_match_the_float64_reference(arch, batch, n, ratio, head_reduction, composite_reduction):
    model = tiny_model(arch, kv_heads=1) if arch == "mistral" else tiny_model(arch)
    press = KVComposePress(ratio, head_reduction=head_reduction, composite_reduction=composite_reduction)
    seen = record_layer_scores(press)
    cache = prefill(model, press, random_ids(n, batch, seed=n))
    layers = full_layers(model)
    assert sorted(seen) == layers
    want = {i: mean_received_f64(seen[i], head_reduction) for i in layers}
    for i in layers:
        torch.testing.assert_close(seen[i].scores.double(), want[i], rtol=1e-4, atol=1e-6)
    k = round(n * (1 - ratio))
    counts = counts_reference({i: seen[i].scores.double() for i in layers}, k, composite_reduction)
    assert sum(counts.values()) == len(layers) * k
    for i in layers:
        held = cache.layers[i].keys
        assert held.shape[2] == counts[i], (i, held.shape, counts[i])
        got = kept_positions(held, seen[i].keys)
        top = seen[i].scores.topk(counts[i], dim=-1).indices.sort(-1).values
        assert torch.equal(got, top)


def test_layers_receive_different_budgets_when_their_attention_differs():
    """A layer whose heads concentrate on few tokens needs fewer composite slots than one spreading attention."""
    press = KVComposePress(0.5)
    scores = {0: torch.tensor([[[0.9, 0.05, 0.03, 0.02]]]), 1: torch.tensor([[[0.3, 0.25, 0.25, 0.2]]])}
    counts = press.allocate(scores, 2)
    assert counts[0].item() == 1 and counts[1].item() == 3


def test_bad_reductions_are_refused_naming_the_accepted_values():
    with pytest.raises(ValueError, match=r"head_reduction must be one of \('mean', 'max'\)"):
        KVComposePress(0.5, head_reduction="sum")
    with pytest.raises(ValueError, match="composite_reduction"):
        KVComposePress(0.5, composite_reduction="median")
