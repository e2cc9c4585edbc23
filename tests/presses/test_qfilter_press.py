"""QFilterPress and its calibration: filters are the signed first singular directions of the queries (float64 SVD
reference, a planted direction found), scores are the keys' projections (float64), files round-trip and bad ones are
named, and the command writes filters for the real model."""

import json

import pytest
import torch

from kvpress.presses.qfilter_press import QFilterPress, query_filters, read_filters, write_filters
from kvpress.qfilters import main, record_filters
from kvpress.utils import attention_layers, kv_geometry
from tests.conftest import random_ids, tiny_model
from tests.presses.press_harness import assert_keeps_top, full_layers, prefill, record_scores


def test_a_planted_query_direction_is_found_with_its_sign():
    gen = torch.Generator().manual_seed(0)
    heads, n, d, kv = 4, 500, 16, 2
    direction = torch.nn.functional.normalize(torch.randn(kv, d, generator=gen), dim=-1)
    # Queries: 3 units along their kv head's direction, plus unit noise; the two query heads of a kv head share it.
    q = 3 * direction.repeat_interleave(heads // kv, 0)[:, None] + torch.randn(heads, n, d, generator=gen)
    f = query_filters(q, kv)
    assert bool(((f * direction).sum(-1) > 0.98).all())
    # Against a float64 SVD per head, signed and averaged by hand.
    for h in range(kv):
        tops = []
        for j in range(h * 2, h * 2 + 2):
            v = torch.linalg.svd(q[j].double())[2][0]
            tops.append(v if float((q[j].double() @ v).mean()) > 0 else -v)
        want = torch.stack(tops).mean(0)
        torch.testing.assert_close(f[h].double(), want / want.norm(), rtol=1e-5, atol=1e-6)


def random_filters(model, seed: int) -> dict:
    head_dim, kv_heads = kv_geometry(model.config)
    gen = torch.Generator().manual_seed(seed)
    return {m.layer_idx: torch.randn(kv_heads, head_dim, generator=gen) for m in attention_layers(model)}


@pytest.mark.parametrize(("batch", "n", "ratio"), [(1, 30, 0.5), (2, 41, 0.25)])
def test_scores_are_the_projection_on_each_heads_filter(arch, tmp_path, batch, n, ratio):
    model = tiny_model(arch)
    filters = random_filters(model, n)
    path = tmp_path / "filters.json"
    write_filters(path, filters, model="tiny")
    press = QFilterPress(ratio, filters=str(path))
    seen = record_scores(press)
    cache = prefill(model, press, random_ids(n, batch, seed=n))
    assert sorted(seen) == full_layers(model)
    for i, rec in seen.items():
        want = (rec.keys.double() * filters[i].double()[None, :, None]).sum(-1)
        torch.testing.assert_close(rec.scores.double(), want, rtol=1e-5, atol=1e-5)
        assert_keeps_top(cache.layers[i].keys, rec.keys, want, tol=1e-5)


def test_files_of_another_model_or_format_are_named(tmp_path):
    model = tiny_model("llama")
    bad = {i: f[:, :8] for i, f in random_filters(model, 0).items()}
    with pytest.raises(ValueError, match=r"filters: layer 0 needs a \(2, 16\) filter, the file has \(2, 8\)"):
        with QFilterPress(0.5, filters=bad)(model):
            pass
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="is not a Q-Filters file"):
        QFilterPress(0.5, filters=str(other))
    with pytest.raises(ValueError, match="filters: cannot read"):
        QFilterPress(0.5, filters=str(tmp_path / "missing.json"))
    with pytest.raises(TypeError, match="filters"):
        QFilterPress(0.5)
    with pytest.raises(ValueError, match="filters is required"):
        QFilterPress(0.5, filters=None)


def test_recorded_filters_follow_the_models_queries():
    model = tiny_model("qwen3")
    filters = record_filters(model, [random_ids(64, seed=s) for s in range(3)])
    head_dim, kv_heads = kv_geometry(model.config)
    assert sorted(filters) == full_layers(model)
    assert all(tuple(f.shape) == (kv_heads, head_dim) for f in filters.values())
    torch.testing.assert_close(filters[0].norm(dim=-1), torch.ones(kv_heads))


def test_the_command_writes_filters_for_the_real_model(tmp_path):
    out = tmp_path / "smollm2_filters.json"
    main(["--output", str(out), "--texts", "2", "--length", "256"])
    filters = read_filters(out)
    assert len(filters) == 30 and tuple(filters[0].shape) == (3, 64)
