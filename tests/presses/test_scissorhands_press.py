"""ScissorhandsPress against the float64 reference (tests/presses/eviction_reference.py): the unimportant counts over
an exact sliding window of queries, sinks and recent tokens protected, evictions every interval."""

import pytest
import torch
from torch.nn.functional import pad

from kvpress.generation import CompressedContext, greedy_decode
from kvpress.presses.scissorhands_press import ScissorhandsPress
from tests.conftest import random_ids, tiny_model
from tests.presses.eviction_reference import keep_rule, run_reference


def scissorhands_rule(target, window, recent, sinks, interval):
    history, steps = {}, {}  # per layer: list of (batch, kv_heads, n) "unimportant" rows, one per query

    def rule(layer, keys, values, attn):
        n, n_q = keys.shape[2], attn.shape[2]
        rows = [pad(r, (0, n - r.shape[-1])) for r in history.get(layer, [])]
        for i in range(n_q):
            visible = n - n_q + 1 + i
            low = attn[:, :, i] < 1.0 / visible
            low[..., visible:] = False
            rows = (rows + [low])[-window:]
        steps[layer] = steps.get(layer, 0) + n_q
        if steps[layer] >= interval and n > target:
            steps[layer] = 0
            counts = torch.stack(rows).sum(0).double()
            kept = keep_rule(-counts, target, recent, sinks)
            idx = kept[..., None].expand(-1, -1, -1, keys.shape[-1])
            keys, values = keys.gather(2, idx), values.gather(2, idx)
            rows = [r.gather(-1, kept) for r in rows]
        history[layer] = rows
        return keys, values

    return rule


@pytest.mark.parametrize("target, window, recent, sinks, interval", [(12, 5, 4, 2, 4), (14, 40, 2, 0, 1)])
def test_matches_the_float64_reference(target, window, recent, sinks, interval):
    model = tiny_model("llama")
    context, tail = random_ids(24, seed=12), random_ids(3, seed=13)
    want, ref_cache = run_reference(
        model, context, tail, 16, scissorhands_rule(target, window, recent, sinks, interval)
    )
    press = ScissorhandsPress(target_size=target, history_window=window, recent_size=recent, n_sink=sinks,
                              compression_interval=interval)  # fmt: skip
    ctx = CompressedContext.prefill(model, context, press)
    assert ctx.generate([tail], 16, eos_ids=[])[0] == want
    with torch.no_grad(), press(model):
        greedy_decode(model, ctx.cache, [tail], ctx.positions, 16, eos_ids=[])
    for mine, ref in zip(ctx.cache.layers, ref_cache.layers):
        assert torch.equal(mine.keys, ref.keys) and torch.equal(mine.values, ref.values)


def test_bad_arguments():
    with pytest.raises(ValueError, match="history_window must be an int >= 1, got 0"):
        ScissorhandsPress(history_window=0)
    with pytest.raises(ValueError, match="recent_size must be an int >= 0"):
        ScissorhandsPress(recent_size=-1)
    with pytest.raises(ValueError, match=r"recent_size \+ n_sink = 12 must fit in target_size=10"):
        ScissorhandsPress(target_size=10, recent_size=8, n_sink=4)
