"""QuantizedVarlenLayer against float64 references: over the dequantized tokens (equal up to float rounding) and over
the full-precision tokens (within the bound the quantization guarantees), across flushes, snapshots and batch edits."""

from __future__ import annotations

import math

import pytest
import torch

from kvpress.cache.compressed_kv import CompressedKV
from kvpress.cache.layer_access import restore_cache, snapshot_cache
from kvpress.cache.quantized_layer import QuantizedVarlenLayer
from kvpress.cache.varlen_layer import VarlenLayer
from kvpress_kernels import dequantize_segments

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# Relative rounding of the storage dtype: dequantized values are rounded to it.
UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


class Harness:
    """A quantized layer plus everything a reference needs: the kept context and every token appended since."""

    def __init__(self, b, h, n, d, bits, group_size, residual, dtype, lengths=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        # Keys with per-channel magnitudes (as real post-RoPE keys), so per-channel groups matter.
        channel = torch.rand(d, generator=g) * 3 + 0.2
        self.keys = (torch.randn(b, h, n, d, generator=g) * channel).to(dtype)
        self.values = torch.randn(b, h, n, d, generator=g).to(dtype)
        if lengths is None:
            lengths = torch.randint(0, n + 1, (b, h), generator=g)
        self.lengths = lengths
        self.b, self.h, self.d, self.dtype, self.gen = b, h, d, dtype, g
        self.bits, self.group_size = bits, group_size
        self.layer = QuantizedVarlenLayer(bits, group_size, residual)
        self.layer.update(self.keys, self.values)  # prefill: dense
        self.layer.replace(CompressedKV(self.keys, self.values, head_lengths=lengths))
        self.appended_k = [[] for _ in range(b)]  # per sequence: (h, d) tokens in order
        self.appended_v = [[] for _ in range(b)]

    def step(self, q_len, hq, q_lens=None):
        """Append ``q_len`` tokens (``q_lens`` valid per sequence) and attend with ``hq`` query heads."""
        b, h, d, g = self.b, self.h, self.d, self.gen
        new_k = torch.randn(b, h, q_len, d, generator=g).to(self.dtype)
        new_v = torch.randn(b, h, q_len, d, generator=g).to(self.dtype)
        lens = [q_len] * b if q_lens is None else q_lens.tolist()
        for i in range(b):
            self.appended_k[i] += list(new_k[i, :, : lens[i]].unbind(1))
            self.appended_v[i] += list(new_v[i, :, : lens[i]].unbind(1))
        kwargs = {} if q_lens is None else {"new_token_lengths": q_lens.to(torch.int32)}
        view, _ = self.layer.update(new_k, new_v, **kwargs)
        query = torch.randn(b, hq, q_len, d, generator=g).to(self.dtype)
        out = view.attend(query, scaling=d**-0.5).transpose(1, 2)  # (b, hq, q_len, d)
        return query, out, lens

    # ---- references ------------------------------------------------------------------------------------------
    def dequantized_tokens(self):
        """Per (b, h): float64 (keys, values) the layer holds, dequantized context then full-precision tail."""
        layer = self.layer
        seg_k, seg_v, seg_lens = dequantize_segments(layer.segs)
        starts = torch.cat([seg_lens.new_zeros(1), seg_lens.cumsum(0)])
        out = {}
        for i in range(self.b):
            t = int(layer.tail_lens[i])
            for j in range(self.h):
                s = i * self.h + j
                rows = slice(int(starts[s]), int(starts[s + 1]))
                out[i, j] = (
                    torch.cat([seg_k[rows], layer.tail_k[i, j, :t]]).double(),
                    torch.cat([seg_v[rows], layer.tail_v[i, j, :t]]).double(),
                )
        return out

    def full_precision_tokens(self):
        """Per (b, h): float64 (keys, values) of the kept context then every appended token, unquantized."""
        out = {}
        for i in range(self.b):
            for j in range(self.h):
                n = int(self.lengths[i, j])
                ks = [self.keys[i, j, :n]] + [t[j][None] for t in self.appended_k[i]]
                vs = [self.values[i, j, :n]] + [t[j][None] for t in self.appended_v[i]]
                out[i, j] = torch.cat(ks).double(), torch.cat(vs).double()
        return out

    def error_bounds(self):
        """Per (b, h): per-element bounds of the key and value quantization error, (n_tokens, d) float64.

        A group stores scale = range / (2**bits - 1) (rounded up) and zero = its minimum, so every element is within
        scale / 2 of its dequantized value, plus the storage dtype's rounding of that value. Context groups are
        G consecutive kept tokens of a channel; tokens appended later form groups of G in the order they arrived
        (flushes move whole groups); tokens still in the tail are exact.
        """
        levels = 2**self.bits - 1
        g = self.group_size
        out = {}
        for (i, j), (k, v) in self.full_precision_tokens().items():
            n_ctx = int(self.lengths[i, j])
            n_flushed = int(self.layer.seg_lens[i, j]) - n_ctx
            err_k = torch.zeros_like(k)
            for lo, hi in [(a, min(a + g, n_ctx)) for a in range(0, n_ctx, g)] + [
                (n_ctx + a, n_ctx + a + g) for a in range(0, n_flushed, g)
            ]:
                rng = k[lo:hi].amax(0) - k[lo:hi].amin(0)
                err_k[lo:hi] = rng / levels / 2 * 1.01
            quantized = n_ctx + n_flushed
            vg = v[:quantized].view(quantized, self.d // g, g)
            err_v = torch.zeros_like(v)
            err_v[:quantized] = ((vg.amax(-1) - vg.amin(-1)) / levels / 2 * 1.01).repeat_interleave(g, -1)
            unit = UNIT[self.dtype]
            err_k[:quantized] += unit * k[:quantized].abs()
            err_v[:quantized] += unit * v[:quantized].abs()
            out[i, j] = err_k, err_v
        return out


def reference_attention(query, tokens, lens, scale):
    """float64 attention: query i < lens[b] of sequence b is the (lens[b] - i)-th last token and sees those before it.

    ``tokens[b, h]``: (keys, values) float64 of every token held, the queries' own last. Returns
    ``(b, hq, q_len, d)`` float64 with zeros in padding rows, and the per-row keys used (for error bounds).
    """
    b, hq, q_len, d = query.shape
    h = max(j for _, j in tokens) + 1
    group = hq // h
    out = torch.zeros(b, hq, q_len, d, dtype=torch.float64)
    for i in range(b):
        for qh in range(hq):
            k, v = tokens[i, qh // group]
            n = k.shape[0]
            for t in range(lens[i]):
                visible = n - lens[i] + t + 1
                w = torch.softmax((query[i, qh, t].double() @ k[:visible].T) * scale, -1)
                out[i, qh, t] = w @ v[:visible]
    return out


def bound_of_attention(query, tokens, bounds, lens, scale):
    """Elementwise bound of |attention(quantized) - attention(full precision)|, from the per-element error bounds.

    Logit j moves by |delta_j| <= eps_j = scale * sum_d |q_d| err_k[j, d], so with the exact weights p and
    Z = sum_k p_k exp(delta_k) in [sum p exp(-eps), sum p exp(eps)], each weight's ratio p'_j / p_j = exp(delta_j) / Z
    is within r_j of 1. As the weights' changes sum to 0, out' - out = sum_j p'_j (v'_j - v_j) +
    sum_j (p'_j - p_j) (v_j - out), bounded by sum_j p_j (1 + r_j) err_v_j + sum_j p_j r_j |v_j - out|.
    """
    b, hq, q_len, d = query.shape
    h = max(j for _, j in tokens) + 1
    group = hq // h
    out = torch.zeros(b, hq, q_len, d, dtype=torch.float64)
    for i in range(b):
        for qh in range(hq):
            k, v = tokens[i, qh // group]
            err_k, err_v = bounds[i, qh // group]
            n = k.shape[0]
            for t in range(lens[i]):
                visible = n - lens[i] + t + 1
                q = query[i, qh, t].double()
                p = torch.softmax((q @ k[:visible].T) * scale, -1)
                eps = scale * (q.abs() @ err_k[:visible].T)
                z_hi, z_lo = (p * eps.exp()).sum(), (p * (-eps).exp()).sum()
                r = torch.maximum(eps.exp() / z_lo - 1, 1 - (-eps).exp() / z_hi)
                exact = p @ v[:visible]
                out[i, qh, t] = (p * (1 + r)) @ err_v[:visible] + (p * r) @ (v[:visible] - exact).abs()
    return out


def check_step(harness, query, out, lens):
    scale = harness.d**-0.5
    valid = torch.zeros(out.shape[0], 1, out.shape[2], 1, dtype=torch.bool)
    for i, n in enumerate(lens):
        valid[i, :, :n] = True
    deq = reference_attention(query, harness.dequantized_tokens(), lens, scale)
    got = torch.where(valid, out.double(), 0)
    torch.testing.assert_close(got, deq, atol=ATOL[harness.dtype], rtol=ATOL[harness.dtype])
    full = harness.full_precision_tokens()
    exact = reference_attention(query, full, lens, scale)
    bound = bound_of_attention(query, full, harness.error_bounds(), lens, scale)
    excess = (got - exact).abs() - bound - ATOL[harness.dtype]
    assert excess.max() <= 0, f"output off the full-precision reference by {excess.max():.3g} beyond the bound"


def packed_bytes(seg_groups, b, h, d, bits, group_size, dtype, tail_capacity):
    """Bytes a quantized layer must hold, computed from the layout: codes in whole int32 words per group, a scale
    and zero per group, int32 metadata, the full-precision tail's capacity and its int32 lengths."""
    esize = torch.empty(0, dtype=dtype).element_size()
    words = math.ceil(group_size * bits / 32)
    per_group = (
        words * d * 4  # key codes: one column of words per channel
        + 2 * d * esize  # key scale and zero, one per channel
        + group_size * (d // group_size) * words * 4  # value codes: each token's channel groups
        + 2 * group_size * (d // group_size) * esize  # value scale and zero per token and channel group
    )
    s = b * h
    metadata = (s + 1) * 4 + 2 * s * 4  # cu_groups, ctx_len, ctx_groups
    tail = 2 * b * h * tail_capacity * d * esize + b * 4
    return seg_groups * per_group + metadata + tail


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "group_size", "d", "dtype", "b", "h", "gqa"),
    [
        (2, 32, 32, torch.float32, 1, 2, 2),
        (4, 32, 64, torch.float32, 2, 1, 4),
        (8, 64, 64, torch.float32, 3, 2, 1),
        (4, 32, 32, torch.float16, 2, 2, 2),
        (8, 32, 32, torch.bfloat16, 1, 3, 1),
        (2, 64, 128, torch.float32, 2, 1, 2),
    ],
)
def test_attention_matches_dequantized_and_full_precision_references(bits, group_size, d, dtype, b, h, gqa):
    hr = Harness(b, h, 75, d, bits, group_size, 2 * group_size, dtype, seed=bits + d)
    for q_len in (4, 1, 1):
        query, out, lens = hr.step(q_len, h * gqa)
        check_step(hr, query, out, lens)
    assert hr.layer.get_seq_length() == int(hr.lengths.max()) + 6


@pytest.mark.parametrize("lengths", [[[0, 1], [31, 32]], [[33, 64], [65, 0]]])
def test_edge_lengths_around_a_group(lengths):
    hr = Harness(2, 2, 70, 32, 4, 32, 32, torch.float32, lengths=torch.tensor(lengths))
    query, out, lens = hr.step(3, 4)
    check_step(hr, query, out, lens)
    assert hr.layer.seg_lens.tolist() == lengths


def test_flush_moves_whole_groups_and_bounds_memory():
    g, residual = 32, 64
    hr = Harness(2, 2, 50, 32, 4, g, residual, torch.float32, seed=3)
    full_precision = VarlenLayer()
    full_precision.update(hr.keys, hr.values)
    full_precision.replace(CompressedKV(hr.keys, hr.values, head_lengths=hr.lengths))
    added = 0
    for step in range(90):
        q_len = 5 if step == 0 else 3  # the tail is not a whole number of groups when it flushes
        before = hr.layer.tail_len
        query, out, lens = hr.step(q_len, 4)
        full_precision.update(*(torch.zeros(2, 2, q_len, 32),) * 2)
        added += q_len
        # The flush runs before the new tokens are appended: the tail's oldest complete groups, once it holds
        # residual_length tokens.
        flushed = before // g * g if before >= residual else 0
        assert hr.layer.tail_len == before - flushed + q_len
        assert torch.equal(hr.layer.seg_lens, hr.lengths + (added - hr.layer.tail_len))
        if step % 20 == 0 or flushed:
            check_step(hr, query, out, lens)
    assert hr.layer.tail_len < residual + g
    layer = hr.layer
    groups = int(sum(math.ceil(int(n) / g) for n in hr.lengths.flatten())) + 4 * (added - layer.tail_len) // g
    expected = packed_bytes(groups, 2, 2, 32, 4, g, torch.float32, layer.tail_k.shape[2])
    assert layer.memory_bytes() == expected
    # The full-precision tail stopped growing: the same tokens in a VarlenLayer take far more.
    assert layer.tail_k.shape[2] <= 2 * residual
    assert layer.memory_bytes() < 0.5 * full_precision.memory_bytes()


def test_padded_tokens_flush_what_every_sequence_holds():
    g, residual = 32, 32
    hr = Harness(2, 1, 40, 32, 8, g, residual, torch.float32, seed=5)
    query, out, lens = hr.step(20, 2, q_lens=torch.tensor([20, 7]))
    check_step(hr, query, out, lens)
    assert hr.layer.tail_spread == 13
    for _ in range(25):  # the shorter tail reaches residual_length: one group of each sequence is due
        query, out, lens = hr.step(1, 2)
    assert hr.layer.tail_lens.tolist() == [45, 32] and torch.equal(hr.layer.seg_lens, hr.lengths)
    query, out, lens = hr.step(1, 2)
    assert hr.layer.tail_lens.tolist() == [46 - g, 33 - g] and hr.layer.tail_spread == 13
    assert torch.equal(hr.layer.seg_lens, hr.lengths + g)
    check_step(hr, query, out, lens)


def test_snapshot_restore_across_a_flush():
    hr = Harness(2, 2, 40, 32, 2, 32, 32, torch.float32, seed=7)
    hr.step(30, 2)
    layer = hr.layer
    state = snapshot_cache(_Holder(layer))
    memory, segs, lengths = layer.memory_bytes(), layer.segs, layer.seg_lens.clone()
    gen_state = hr.gen.get_state()
    first = [hr.step(q, 2)[1] for q in (3, 1, 1)]  # the second step flushes 32 tokens
    assert int(layer.seg_lens[0, 0]) == int(lengths[0, 0]) + 32
    holder = _Holder(layer)
    restore_cache(holder, state)
    assert layer.segs is segs and torch.equal(layer.seg_lens, lengths) and layer.memory_bytes() == memory
    hr.gen.set_state(gen_state)
    for i in range(hr.b):
        del hr.appended_k[i][30:], hr.appended_v[i][30:]
    again = [hr.step(q, 2)[1] for q in (3, 1, 1)]
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


class _Holder:
    """The minimal cache shape snapshot_cache / restore_cache work on."""

    def __init__(self, layer):
        self.layers = [layer]


def test_crop_within_the_tail_only():
    hr = Harness(1, 2, 40, 32, 4, 32, 32, torch.float32, seed=2)
    hr.step(40, 2)
    hr.step(1, 2)  # flushes 32: 9 tail tokens remain
    layer = hr.layer
    assert layer.tail_len == 9
    with pytest.raises(ValueError, match="full-precision tail only"):
        layer.crop(-10)
    assert layer.tail_len == 9
    layer.crop(-4)
    for i in range(hr.b):
        del hr.appended_k[i][-4:], hr.appended_v[i][-4:]
    assert layer.tail_len == 5 and layer.tail_lens.tolist() == [5]
    query, out, lens = hr.step(2, 2)
    check_step(hr, query, out, lens)


def test_batch_select_equals_those_sequences_alone():
    hr = Harness(3, 2, 50, 32, 4, 32, 64, torch.float32, seed=11)
    hr.step(4, 4)
    hr.layer.batch_select_indices(torch.tensor([2, 0]))
    for store in (hr.appended_k, hr.appended_v):
        store[:] = [store[2], store[0]]
    hr.lengths, hr.keys, hr.values = hr.lengths[[2, 0]], hr.keys[[2, 0]], hr.values[[2, 0]]
    hr.b = 2
    query, out, lens = hr.step(2, 4)
    check_step(hr, query, out, lens)
    with pytest.raises(ValueError, match="batch indices must be in"):
        hr.layer.batch_select_indices(torch.tensor([2]))


def test_a_forward_after_an_uncompressed_prefill_quantizes_the_context():
    layer = QuantizedVarlenLayer(8, 32, 64)
    keys, values = torch.randn(2, 2, 45, 32), torch.randn(2, 2, 45, 32)
    layer.update(keys, values)
    assert not layer.ragged
    view, _ = layer.update(torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32))
    assert layer.ragged and layer.seg_lens.tolist() == [[45, 45]] * 2 and layer.tail_len == 1
    seg_k, seg_v, seg_lens = dequantize_segments(layer.segs)
    assert seg_lens.tolist() == [45] * 4
    # Ranges over all 45 tokens (keys, per channel) and over a token's 32 channels (values, one group) bound the
    # range of every group.
    bound_k = (keys.amax(2, keepdim=True) - keys.amin(2, keepdim=True)) / 255
    bound_v = (values.amax(3, keepdim=True) - values.amin(3, keepdim=True)) / 255
    assert ((seg_k.view(2, 2, 45, 32) - keys).abs() <= bound_k / 2 * 1.01 + 1e-6).all()
    assert ((seg_v.view(2, 2, 45, 32) - values).abs() <= bound_v / 2 * 1.01 + 1e-6).all()
    assert view.shape == (2, 2, 46, 32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 5}, "bits must be one of 2, 3, 4, 8"),
        ({"group_size": 48}, "group_size must be one of 32, 64, 128"),
        ({"group_size": 32, "residual_length": 48}, "residual_length must be a positive multiple of group_size"),
    ],
)
def test_bad_parameters_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizedVarlenLayer(**kwargs)


def test_bad_input_leaves_the_layer_dense_and_usable():
    layer = QuantizedVarlenLayer(4, 64, 128)
    keys = torch.randn(1, 2, 10, 32)
    layer.update(keys, keys)
    with pytest.raises(ValueError, match=r"group_size=64 must divide the head dimension 32; accepted: \[32\]"):
        layer.replace(CompressedKV(keys, keys))
    channels = torch.arange(16).expand(1, 2, 16)
    with pytest.raises(ValueError, match="channel-pruned keys"):
        layer.replace(CompressedKV(keys[..., :16], keys, key_channels=channels))
    assert not layer.ragged and torch.equal(layer.keys, keys)
    ok = QuantizedVarlenLayer(4, 32, 64)
    ok.update(keys, keys)
    with pytest.raises(ValueError, match="lengths must have shape"):
        ok.replace(CompressedKV(keys, keys, head_lengths=torch.tensor([[11, 1]])))
    ok.replace(CompressedKV(keys, keys, head_lengths=torch.tensor([[10, 1]])))
    assert ok.seg_lens.tolist() == [[10, 1]]
