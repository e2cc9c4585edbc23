"""Property tests of `VarlenLayer`: random operation sequences against a plain dense model tracked by the test.

The test keeps, per sequence, the kept context of every kv head and the tail tokens appended since compression,
and after every operation compares the layer's lengths, memory and attention output with that model (attention
recomputed densely in float64). ``head_budgets`` (AdaKV's per-head allocation) is checked against a one-token-at-a-time
greedy allocation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress.cache.compressed_kv import CompressedKV
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.cache.varlen_layer import VarlenView
from kvpress.presses.adakv_press import head_budgets

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (atol, rtol) of the layer's output against float64 attention over the same stored values: float32 rounds the
# softmax and the output once; half types round the output to 8 (bfloat16) or 11 (float16) mantissa bits.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-2, 2e-2)}
MIN_TAIL = 16  # first tail allocation of a compressed layer, in tokens per sequence


@dataclass
class Expected:
    """What the layer must hold, kept by the test: per-(sequence, head) context rows and per-sequence tails.

    ``ctx_k[b][h]``: ``(kept, head_dim)``; ``tail_k[b]``: ``(kv_heads, tail tokens of b, head_dim)``;
    ``tail_len``: tokens appended per forward counted for the whole batch (padding included), i.e. the layer's
    host-side tail length; ``capacity``: tail slots per (sequence, head) allocated.
    """

    ctx_k: list[list[torch.Tensor]]
    ctx_v: list[list[torch.Tensor]]
    tail_k: list[torch.Tensor]
    tail_v: list[torch.Tensor]
    tail_len: int
    capacity: int

    @property
    def batch(self) -> int:
        return len(self.ctx_k)

    def seg_lens(self) -> torch.Tensor:
        return torch.tensor([[len(k) for k in heads] for heads in self.ctx_k], dtype=torch.long)

    def tail_lens(self) -> torch.Tensor:
        return torch.tensor([t.shape[1] for t in self.tail_k], dtype=torch.long)


def _expected_memory(exp: Expected, kv_heads: int, head_dim: int, element_size: int) -> int:
    """Ragged rows + tail capacity (keys and values) + int32 ``cu_seqlens`` (segments + 1) and ``tail_lens``."""
    rows = int(exp.seg_lens().sum())
    tail_slots = exp.batch * kv_heads * exp.capacity
    return 2 * (rows + tail_slots) * head_dim * element_size + 4 * (exp.batch * kv_heads + 1) + 4 * exp.batch


def _dense_attention(exp: Expected, query: torch.Tensor, scale: float, q_lens: list[int]) -> torch.Tensor:
    """Float64 attention ``(batch, q_len, heads, head_dim)``: query ``i < q_lens[b]`` of sequence ``b`` is tail
    token ``t_b - q_lens[b] + i``; it sees the head's kept context and the tail up to itself. Padding rows are 0."""
    b_size, hq, q, d = query.shape
    kv_heads = exp.tail_k[0].shape[0] if exp.batch else 1
    g = hq // kv_heads
    out = torch.zeros(b_size, q, hq, d, dtype=torch.float64)
    for b in range(b_size):
        nq, t = q_lens[b], exp.tail_k[b].shape[1]
        if nq == 0:
            continue
        for h in range(kv_heads):
            keys = torch.cat([exp.ctx_k[b][h], exp.tail_k[b][h]]).double()  # (L + t, d)
            values = torch.cat([exp.ctx_v[b][h], exp.tail_v[b][h]]).double()
            n_keys = keys.shape[0]
            logits = query[b, h * g : (h + 1) * g, :nq].double() @ keys.T * scale  # (g, nq, L + t)
            last_visible = n_keys - nq + torch.arange(nq)  # inclusive: the query's own tail token
            visible = torch.arange(n_keys)[None, :] <= last_visible[:, None]
            probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
            out[b, :nq, h * g : (h + 1) * g] = (probs @ values).transpose(0, 1)
    return out


def _check_state(cache: VarlenCache, exp: Expected, kv_heads: int, head_dim: int, element_size: int) -> None:
    layer = cache.layers[0]
    seg, tail = exp.seg_lens(), exp.tail_lens()
    assert layer.batch_size == exp.batch
    assert layer.tail_len == exp.tail_len
    assert layer.tail_k.shape[2] == exp.capacity
    assert layer.tail_lens.dtype == torch.int32
    assert torch.equal(layer.tail_lens.long(), tail)
    assert torch.equal(cache.head_lengths(0), seg + tail[:, None])
    assert layer.get_seq_length() == cache.get_seq_length(0) == int(seg.max()) + exp.tail_len
    expected_bytes = _expected_memory(exp, kv_heads, head_dim, element_size)
    assert layer.memory_bytes() == cache.memory_bytes() == expected_bytes


def _check_attention(view: VarlenView, exp: Expected, q_len: int, q_lens: list[int], g, groups, dtype, scaling):
    b_size, kv_heads, _, d = view.shape
    assert view.shape == (exp.batch, kv_heads, int(exp.seg_lens().max()) + exp.tail_len, d)
    query = torch.randn(b_size, kv_heads * groups, q_len, d, generator=g).to(dtype)
    out = view.attend(query, scaling)
    assert out.shape == (b_size, q_len, kv_heads * groups, d) and out.dtype == dtype
    ref = _dense_attention(exp, query, scaling if scaling is not None else d**-0.5, q_lens)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    for b, n in enumerate(q_lens):
        assert (out[b, n:] == 0).all()  # padding queries see nothing and produce exact zeros


@st.composite
def layer_setups(draw):
    batch = draw(st.integers(1, 4))
    kv_heads = draw(st.integers(1, 3))
    n = draw(st.integers(1, 24))
    lengths = draw(
        st.lists(st.one_of(st.just(0), st.just(1), st.just(n), st.integers(0, n)), min_size=batch * kv_heads,
                 max_size=batch * kv_heads)
    )  # fmt: skip
    return dict(
        batch=batch,
        kv_heads=kv_heads,
        groups=draw(st.sampled_from([1, 2, 4, 8])),
        head_dim=draw(st.sampled_from([64, 128])),
        dtype=draw(st.sampled_from(DTYPES)),
        n=n,
        lengths=torch.tensor(lengths, dtype=torch.long).view(batch, kv_heads),
        pad_rows=draw(st.integers(0, 2)),
        scaling=draw(st.sampled_from([None, 0.05])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# Crops and restores weigh double: a snapshot, then a crop below it, an append and a restore is the sequence that
# tells a snapshot holding its own tail tokens from one sharing the live, overwritten buffer.
OPS = ["append", "append", "long_append", "padded_append", "crop", "crop", "snapshot", "restore", "restore", "select"]


@settings(max_examples=25, deadline=None)
@given(setup=layer_setups(), data=st.data())
def test_operation_sequences_match_dense_model(setup, data):
    b_size, kv_heads, groups, d = setup["batch"], setup["kv_heads"], setup["groups"], setup["head_dim"]
    dtype, n, lengths, scaling = setup["dtype"], setup["n"], setup["lengths"], setup["scaling"]
    g = torch.Generator().manual_seed(setup["seed"])
    es = torch.empty(0, dtype=dtype).element_size()

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    # Dense prefill: the layer behaves as a plain dynamic layer until it is compressed.
    cache = VarlenCache()
    keys, values = rand(b_size, kv_heads, n, d), rand(b_size, kv_heads, n, d)
    cache.update(keys, values, 0)
    layer = cache.layers[0]
    assert not layer.ragged and layer.get_seq_length() == n
    assert torch.equal(layer.dense_keys_values()[0], keys) and torch.equal(layer.dense_keys_values()[1], values)

    # Compression: random kept positions per (sequence, head), in random order, gathered here; rows past each
    # head's length are NaN, which the layer must never read.
    k_max = int(lengths.max()) + setup["pad_rows"]
    kept_k = torch.full((b_size, kv_heads, k_max, d), float("nan"), dtype=dtype)
    kept_v = torch.full_like(kept_k, float("nan"))
    ctx_k = [[None] * kv_heads for _ in range(b_size)]
    ctx_v = [[None] * kv_heads for _ in range(b_size)]
    for b in range(b_size):
        for h in range(kv_heads):
            idx = torch.randperm(n, generator=g)[: int(lengths[b, h])]
            kept_k[b, h, : len(idx)], kept_v[b, h, : len(idx)] = keys[b, h, idx], values[b, h, idx]
            ctx_k[b][h], ctx_v[b][h] = keys[b, h, idx].clone(), values[b, h, idx].clone()
    layer.replace(CompressedKV(kept_k, kept_v, head_lengths=lengths.clone()))
    assert layer.ragged and layer.dense_keys_values() == (None, None)
    empty = keys.new_zeros(kv_heads, 0, d)
    exp = Expected(ctx_k, ctx_v, [empty] * b_size, [empty] * b_size, tail_len=0, capacity=0)
    _check_state(cache, exp, kv_heads, d, es)

    saved = None
    for _ in range(data.draw(st.integers(4, 16), label="n_ops")):
        op = data.draw(st.sampled_from(OPS), label="op")
        view, q_len, q_lens = None, None, None
        if op in ("append", "long_append", "padded_append"):
            q_len = data.draw(st.integers(7, 24) if op == "long_append" else st.integers(1, 6), label="q_len")
            q_lens = [q_len] * exp.batch
            if op == "padded_append":
                q_lens = data.draw(st.lists(st.integers(0, q_len), min_size=exp.batch, max_size=exp.batch))
            new_k, new_v = rand(exp.batch, kv_heads, q_len, d), rand(exp.batch, kv_heads, q_len, d)
            if op == "padded_append" and data.draw(st.booleans(), label="through the cache"):
                cache.new_token_lengths = torch.tensor(q_lens, dtype=torch.int32)
                view, view_v = cache.update(new_k, new_v, 0)
                cache.new_token_lengths = None
            elif op == "padded_append":
                view, view_v = layer.update(new_k, new_v, new_token_lengths=torch.tensor(q_lens, dtype=torch.int32))
            else:
                view, view_v = layer.update(new_k, new_v)
            assert view is view_v
            if exp.tail_len + q_len > exp.capacity:
                exp.capacity = max(exp.tail_len + q_len, 2 * exp.capacity, MIN_TAIL)
            exp.tail_len += q_len
            for b in range(exp.batch):
                exp.tail_k[b] = torch.cat([exp.tail_k[b], new_k[b, :, : q_lens[b]]], dim=1)
                exp.tail_v[b] = torch.cat([exp.tail_v[b], new_v[b, :, : q_lens[b]]], dim=1)
        elif op == "crop":
            m = data.draw(st.integers(0, exp.tail_len), label="crop")
            with pytest.raises(ValueError, match="crop takes a negative count"):
                layer.crop(-(exp.tail_len + 1))
            layer.crop(-m)
            exp.tail_len -= m
            # Each sequence loses its last m tail tokens (all of them when it holds fewer).
            exp.tail_k = [t[:, : max(t.shape[1] - m, 0)] for t in exp.tail_k]
            exp.tail_v = [t[:, : max(t.shape[1] - m, 0)] for t in exp.tail_v]
        elif op == "snapshot":
            saved = (layer.snapshot(), copy.deepcopy(exp))
        elif op == "restore" and saved is not None:
            layer.restore(saved[0])
            exp = copy.deepcopy(saved[1])
        elif op == "select":
            indices = data.draw(st.lists(st.integers(0, exp.batch - 1), min_size=1, max_size=4), label="indices")
            layer.batch_select_indices(torch.tensor(indices))
            exp = Expected(
                [exp.ctx_k[i] for i in indices], [exp.ctx_v[i] for i in indices],
                [exp.tail_k[i] for i in indices], [exp.tail_v[i] for i in indices],
                exp.tail_len, exp.capacity,
            )  # fmt: skip
        _check_state(cache, exp, kv_heads, d, es)
        if view is None:
            # No forward in this step: re-read the newest tail tokens of every sequence through a fresh view.
            tails = exp.tail_lens()
            q_len = max(1, min(3, int(tails.max())))
            q_lens = tails.clamp(max=q_len).tolist()
            view = VarlenView(layer, torch.tensor(q_lens, dtype=torch.int32))
        _check_attention(view, exp, q_len, q_lens, g, groups, dtype, scaling)


def test_long_decode_regrows_tail_and_keeps_context():
    """60 single-token appends: the tail capacity doubles 16 -> 32 -> 64 and every step still matches."""
    g = torch.Generator().manual_seed(3)
    b_size, kv_heads, groups, d, n = 2, 2, 4, 64, 10
    cache = VarlenCache()
    keys, values = torch.randn(b_size, kv_heads, n, d, generator=g), torch.randn(b_size, kv_heads, n, d, generator=g)
    cache.update(keys, values, 0)
    layer = cache.layers[0]
    lengths = torch.tensor([[0, 10], [1, 7]])
    layer.replace(CompressedKV(keys, values, head_lengths=lengths))
    ctx_k = [[keys[b, h, : lengths[b, h]] for h in range(kv_heads)] for b in range(b_size)]
    ctx_v = [[values[b, h, : lengths[b, h]] for h in range(kv_heads)] for b in range(b_size)]
    empty = keys.new_zeros(kv_heads, 0, d)
    exp = Expected(ctx_k, ctx_v, [empty] * b_size, [empty] * b_size, tail_len=0, capacity=0)
    capacities = []
    for _ in range(60):
        new_k, new_v = torch.randn(b_size, kv_heads, 1, d, generator=g), torch.randn(b_size, kv_heads, 1, d, generator=g)
        view, _ = layer.update(new_k, new_v)
        exp.tail_len += 1
        exp.capacity = layer.tail_k.shape[2]
        exp.tail_k = [torch.cat([exp.tail_k[b], new_k[b]], dim=1) for b in range(b_size)]
        exp.tail_v = [torch.cat([exp.tail_v[b], new_v[b]], dim=1) for b in range(b_size)]
        capacities.append(exp.capacity)
        _check_state(cache, exp, kv_heads, d, 4)
        _check_attention(view, exp, 1, [1] * b_size, g, groups, torch.float32, None)
    assert sorted(set(capacities)) == [16, 32, 64]
    assert capacities.index(32) == 16 and capacities.index(64) == 32  # regrowth exactly when full


def test_restore_after_crop_and_append_gives_back_the_snapshot_tokens():
    """A crop below the snapshot, then appends that reuse those tail slots in place: restoring (twice) still returns
    the snapshot's own tokens."""
    g = torch.Generator().manual_seed(4)
    d = 64
    cache = VarlenCache()
    keys = torch.randn(2, 1, 6, d, generator=g)
    cache.update(keys, keys, 0)
    layer = cache.layers[0]
    layer.replace(CompressedKV(keys, keys, head_lengths=torch.tensor([[3], [5]])))
    tail = torch.randn(2, 1, 4, d, generator=g)
    layer.update(tail, -tail)
    state = layer.snapshot()
    for _ in range(2):
        layer.crop(-3)
        layer.update(torch.randn(2, 1, 5, d, generator=g), torch.randn(2, 1, 5, d, generator=g))
        layer.restore(state)
        assert layer.tail_len == 4 and layer.tail_lens.tolist() == [4, 4]
        assert torch.equal(layer.tail_k[:, :, :4], tail) and torch.equal(layer.tail_v[:, :, :4], -tail)


# ---- AdaKV head budgets ------------------------------------------------------------------------------------------
def _greedy_budgets(scores: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """One token at a time: every head first takes its kept-whole (+inf) tokens and floor(alpha * (k - those)) best
    others, then the best remaining score of any head wins the next slot, until each sequence holds heads*k tokens."""
    b_size, heads, n = scores.shape
    counts = torch.zeros(b_size, heads, dtype=torch.long)
    for b in range(b_size):
        ranked = [sorted(scores[b, h].tolist(), reverse=True) for h in range(heads)]
        whole = [min(k, sum(x == float("inf") for x in ranked[h])) for h in range(heads)]
        taken = [w + math.floor(alpha * (k - w)) for w in whole]
        for _ in range(heads * k - sum(taken)):
            best = max((h for h in range(heads) if taken[h] < n), key=lambda h: ranked[h][taken[h]])
            taken[best] += 1
        counts[b] = torch.tensor(taken)
    return counts


@settings(max_examples=25, deadline=None)
@given(
    b_size=st.integers(1, 4),
    heads=st.integers(1, 8),
    n=st.integers(1, 40),
    k_frac=st.floats(0, 1),
    alpha=st.one_of(st.just(0.0), st.just(1.0), st.floats(0, 1)),
    window=st.integers(0, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_head_budgets_equal_greedy_allocation(b_size, heads, n, k_frac, alpha, window, seed):
    k = max(1, round(k_frac * n))
    g = torch.Generator().manual_seed(seed)
    # Tie-free scores: a random permutation of distinct values (signs mixed), so the greedy order is unique.
    scores = (torch.randperm(b_size * heads * n, generator=g).float() - b_size * heads * n / 3).view(b_size, heads, n)
    window = min(window, k)  # an always-kept window (+inf scores) never exceeds the budget, so no ties are cut
    if window:
        scores[..., n - window :] = float("inf")
    counts = head_budgets(scores, k, alpha)
    assert counts.shape == (b_size, heads) and counts.dtype == torch.long
    assert torch.equal(counts.sum(-1), torch.full((b_size,), heads * k))
    assert (counts >= int(alpha * k)).all() and (counts <= n).all()
    assert (counts >= window).all()
    assert torch.equal(counts, _greedy_budgets(scores, k, alpha))
