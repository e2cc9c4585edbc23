"""H2OPress and CAMPress against the float64 reference (tests/presses/eviction_reference.py): same tokens, same
cache, for several budgets, recent shares and intervals."""

import pytest
import torch
from torch.nn.functional import pad

from kvpress.generation import CompressedContext, greedy_decode
from kvpress.presses.cam_press import CAMPress
from kvpress.presses.h2o_press import H2OPress
from kvpress.utils import attention_layers
from tests.conftest import random_ids, tiny_model
from tests.presses.eviction_reference import attention_f64, keep_rule, run_reference


def h2o_rule(target, recent_ratio, interval, merge=False):
    scores, steps = {}, {}

    def rule(layer, keys, values, attn):
        n = keys.shape[2]
        prev = scores.get(layer)
        s = torch.zeros(keys.shape[:3], dtype=torch.float64) if prev is None else pad(prev, (0, n - prev.shape[-1]))
        s = s + attn.sum(2)
        steps[layer] = steps.get(layer, 0) + attn.shape[2]
        if steps[layer] >= interval and n > target:
            steps[layer] = 0
            kept = keep_rule(s, target, round(recent_ratio * target))
            idx = kept[..., None].expand(-1, -1, -1, keys.shape[-1])
            new_values = values.gather(2, idx)
            if merge:
                p = attn.mean(2)
                out = torch.ones_like(p, dtype=torch.bool).scatter(-1, kept, False)
                p_out = torch.where(out, p, 0.0)
                v_e = (p_out[..., None] * values.double()).sum(2) / p_out.sum(-1, keepdim=True)
                w = p_out.sum(-1) / p.sum(-1)
                new_values = (1 - w[..., None, None]) * new_values.double() + w[..., None, None] * v_e[:, :, None]
                new_values = new_values.to(values.dtype)
            keys, values, s = keys.gather(2, idx), new_values, s.gather(-1, kept)
        scores[layer] = s
        return keys, values

    return rule


@pytest.mark.parametrize("press_cls", [H2OPress, CAMPress], ids=["h2o", "cam"])
@pytest.mark.parametrize("target, recent_ratio, interval", [(12, 0.5, 1), (16, 0.25, 3), (10, 1.0, 1)])
def test_matches_the_float64_reference(press_cls, target, recent_ratio, interval):
    model = tiny_model("llama")
    context, tail = random_ids(24, seed=10), random_ids(3, seed=11)
    rule = h2o_rule(target, recent_ratio, interval, merge=press_cls is CAMPress)
    want, ref_cache = run_reference(model, context, tail, 15, rule)
    press = press_cls(target_size=target, recent_ratio=recent_ratio, compression_interval=interval)
    ctx = CompressedContext.prefill(model, context, press)
    assert ctx.generate([tail], 15, eos_ids=[])[0] == want
    # generate() restores the context; decode again inside the press to compare the caches themselves.
    with torch.no_grad(), press(model) as report:
        greedy_decode(model, ctx.cache, [tail], ctx.positions, 15, eos_ids=[])
    assert set(report.decode_compressions) == set(range(len(ref_cache.layers)))
    for mine, ref in zip(ctx.cache.layers, ref_cache.layers):
        torch.testing.assert_close(mine.keys, ref.keys)
        torch.testing.assert_close(mine.values, ref.values, atol=1e-5, rtol=1e-5)


def test_cam_preserves_the_current_attention_output():
    """The merge keeps the current query's attention output exactly (values averaged over a group's queries)."""
    torch.manual_seed(0)
    b, h, n, d, k = 2, 3, 20, 8, 12
    values = torch.randn(b, h, n, d)
    attn = torch.rand(b, h, 1, n).softmax(-1)
    kept = torch.randperm(n)[:k].sort().values.expand(b, h, k).contiguous()
    kv = CAMPress(target_size=k).evict(torch.randn(b, h, n, d), values, kept, attn)
    p = attn[:, :, 0]
    before = (p[..., None] * values).sum(2)
    p_kept = p.gather(-1, kept)
    after = (p_kept[..., None] * kv.values).sum(2) / p_kept.sum(-1, keepdim=True)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="target_size must be an int >= 1, got 0"):
        H2OPress(target_size=0)
    with pytest.raises(ValueError, match="compression_interval must be an int >= 1"):
        CAMPress(compression_interval=0)
    with pytest.raises(ValueError, match=r"recent_ratio must be a number in \[0, 1\], got 1.5"):
        H2OPress(recent_ratio=1.5)
    assert H2OPress().capabilities.phase == "decode"


@pytest.mark.parametrize("n_queries", [1, 4])
def test_one_shot_compress_keeps_what_the_queries_attend_to(n_queries):
    """``compress`` outside generation: one observation of the forward's queries, then H2O's rule (float64)."""
    model = tiny_model("llama")
    module = attention_layers(model)[1]
    gen = torch.Generator().manual_seed(12)
    b, n, target = 2, 30, 12
    keys = torch.randn(b, model.config.num_key_value_heads, n, model.config.head_dim, generator=gen)
    values = torch.randn(keys.shape, generator=gen)
    hidden = torch.randn(b, n_queries, model.config.hidden_size, generator=gen)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(n - n_queries, n)[None].expand(b, -1))
    press = H2OPress(target_size=target, recent_ratio=0.25)
    with torch.no_grad():
        kv = press.compress(module, hidden, keys, values, None, {"position_embeddings": position_embeddings})
        score = attention_f64(module, hidden, keys, position_embeddings).sum(2)
    kept = keep_rule(score, target, round(0.25 * target))
    torch.testing.assert_close(kv.keys, keys.gather(2, kept[..., None].expand(-1, -1, -1, keys.shape[-1])))
    short = press.compress(module, hidden, keys[:, :, :target], values[:, :, :target], None,
                           {"position_embeddings": position_embeddings})  # fmt: skip
    assert torch.equal(short.keys, keys[:, :, :target])
