"""DecomposedSegments: encoding against KIVI's own quantizer, float64 error bounds of each correction, appending."""

import pytest
import torch

from kvpress_kernels import (
    RotaryTable,
    append_decomposed_groups,
    decompose_segments,
    dequantize_decomposed,
    calibrate_levels,
    dequantize_segments,
    fit_levels,
    quantize_segments,
)
from kvpress_kernels.decomposed_segments import rotate

from .layouts import DEVICE


def data(seed, lens, D, dtype, outliers=0.0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lens)
    k = torch.randn(n, D, generator=gen)
    v = torch.randn(n, D, generator=gen)
    if outliers:  # a few large entries, as real keys have in some channels
        hit = torch.rand(n, D, generator=gen) < outliers
        k = torch.where(hit, k * 30, k)
        v = torch.where(hit, v * 30, v)
    return k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE), torch.tensor(lens, device=DEVICE)


def rope_table(D, base=10000.0, scale=1.0):
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    return RotaryTable(inv_freq.to(DEVICE), scale)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uniform_without_corrections_is_kivi(bits, dtype):
    """No corrections: codes, scales and zeros are bit-identical to quantize_segments (same layout, same rounding)."""
    k, v, lens = data(0, [70, 0, 1, 33], 64, dtype)
    ds = decompose_segments(k, v, lens, bits, 32)
    kivi = quantize_segments(k, v, lens, bits, 32)
    for name in ("k_packed", "k_scale", "k_zero", "v_packed", "v_scale", "v_zero", "cu_groups", "ctx_len"):
        assert torch.equal(getattr(ds.segs, name), getattr(kivi, name)), name
    got = dequantize_decomposed(ds)
    want = dequantize_segments(kivi, reference=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ds.nbytes() == kivi.nbytes()


@pytest.mark.parametrize("D, G", [(64, 32), (32, 16), (128, 64)])
def test_three_bit_codes_pack_ten_to_a_word(D, G):
    """3-bit codes: 10 to an int32 word (a key row's channels, a value group's tokens), the last word partial; every
    element within half a step of its group's range, as at the other widths."""
    k, v, lens = data(5, [3 * G + 5, G], D, torch.float32)
    ds = decompose_segments(k, v, lens, 3, G)
    assert ds.segs.k_packed.shape[1] == -(-D // 10) and ds.segs.words_per_group == -(-G // 10)
    rk, rv, _ = dequantize_decomposed(ds)
    step_k = ds.segs.k_scale.float().repeat_interleave(G, 0)
    from kvpress_kernels.quantized_segments import valid_slots

    valid, _ = valid_slots(ds.segs)
    assert bool(((rk - k).abs() <= step_k[valid] / 2 + 1e-5).all())
    step_v = ds.segs.v_scale.float().repeat_interleave(G, 1)[valid]
    assert bool(((rv - v).abs() <= step_v / 2 + 1e-5).all())
    with pytest.raises(ValueError, match="3-bit codes are stored by decompose_segments"):
        quantize_segments(k, v, lens, 3, G)


def _errors(ds, k, v, rope=None):
    rk, rv, _ = dequantize_decomposed(ds, rope)
    return (rk.double() - k.double()).abs(), (rv.double() - v.double()).abs()


@pytest.mark.parametrize("seed", range(3))
def test_outliers_are_exact_and_shrink_the_range(seed):
    """The chosen outliers reconstruct to within one rounding of the model dtype; the others stay within half a step
    of a range that no longer includes the outliers, so the total error drops."""
    k, v, lens = data(seed, [96, 40], 64, torch.float32, outliers=0.01)
    plain = decompose_segments(k, v, lens, 4, 32)
    dense_sparse = decompose_segments(k, v, lens, 4, 32, outlier_ratio=0.02)
    ek0, ev0 = _errors(plain, k, v)
    ek1, ev1 = _errors(dense_sparse, k, v)
    assert ek1.max() < 0.2 * ek0.max() and ev1.max() < 0.2 * ev0.max()
    n_out = dense_sparse.k_outliers.pos.numel()
    assert n_out == round(0.02 * k.numel())
    # The largest-magnitude entry of every key channel-group became an outlier: its error is float32 rounding.
    assert float(ek1.max()) < float(k.abs().max()) * 1e-2


def test_exact_rows_are_kept_whole():
    k, v, lens = data(1, [64, 64], 32, torch.bfloat16)
    exact = torch.zeros(128, dtype=torch.bool, device=DEVICE)
    exact[[0, 64]] = True  # each segment's first token: an attention sink
    ds = decompose_segments(k, v, lens, 2, 32, exact_rows=exact)
    ek, ev = _errors(ds, k, v)
    for row in (0, 64):  # one bf16 rounding of the remainder, relative to the sink's magnitude
        assert float(ek[row].max()) <= float(k[row].abs().max()) * 2**-7
        assert float(ev[row].max()) <= float(v[row].abs().max()) * 2**-7
    assert ds.k_outliers.pos.numel() == 2 * 32 and ds.v_outliers.pos.numel() == 2 * 32


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_low_rank_only_lowers_the_error(rank):
    """GEAR: a + b approximates the quantization residual; with a low-rank signal in the residual it removes most
    of it, and it never adds error (one power-iteration step is an orthogonal projection per block)."""
    gen = torch.Generator().manual_seed(rank)
    n, D = 128, 64
    low = torch.randn(n, rank, generator=gen) @ torch.randn(rank, D, generator=gen) * 0.05
    k = (torch.randn(n, D, generator=gen) + low).to(DEVICE)
    v = (torch.randn(n, D, generator=gen) + low).to(DEVICE)
    lens = torch.tensor([n], device=DEVICE)
    plain = decompose_segments(k, v, lens, 2, 32)
    gear = decompose_segments(k, v, lens, 2, 32, rank=rank)
    for e0, e1 in zip(_errors(plain, k, v), _errors(gear, k, v)):
        assert e1.pow(2).sum() <= e0.pow(2).sum() * (1 + 1e-6)
    assert gear.k_lowrank.a.shape == (128, rank) and gear.k_lowrank.b.shape == (1, rank, D)


def test_fit_levels_beats_uniform_on_gaussian_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=gen)
    t = (x - x.min()) / (x.max() - x.min()) * 15  # normalized to [0, 2**4 - 1] like a group's codes
    levels = fit_levels(t, 4)
    uniform = torch.arange(16, dtype=torch.float32)

    def mse(lv):
        mid = (lv[1:] + lv[:-1]) / 2
        return float((lv[torch.bucketize(t, mid, right=True)] - t).pow(2).mean())

    assert levels.shape == (16,) and bool((levels[1:] >= levels[:-1]).all())
    assert mse(levels) < 0.6 * mse(uniform)


def test_non_uniform_levels_reconstruct_with_those_levels():
    k, v, lens = data(2, [64], 32, torch.float32)
    levels = torch.tensor([0.0, 0.4, 1.3, 3.0])
    ds = decompose_segments(k, v, lens, 2, 32, k_levels=levels, v_levels=levels)
    rk, rv, _ = dequantize_decomposed(ds)
    # Every key of a channel-group is zero + level * scale for one of the four levels.
    scale = ds.segs.k_scale.float().repeat_interleave(32, 0)
    t = (rk.float() - ds.segs.k_zero.float().repeat_interleave(32, 0)) / scale
    assert (t[..., None] - levels.to(DEVICE)).abs().min(-1).values.max() < 1e-4


@pytest.mark.parametrize("bits, gain", [(2, 0.9), (4, 1.0)])
def test_levels_calibrated_on_the_tokens_lower_their_error(bits, gain):
    """KVQuant's datatype fitted on the prompt itself: the same tokens then reconstruct with less squared error than
    with uniform codes (k-means starts from the uniform levels and lowers the error in each group's normalized units;
    at 4 bits the absolute gain is small)."""
    k, v, lens = data(4, [256, 192], 64, torch.float32)
    k, v = k**3, v * v.abs()  # heavy-tailed, as real keys and values are within a group
    k_levels, v_levels = calibrate_levels(k, v, lens, bits, 32)
    plain = decompose_segments(k, v, lens, bits, 32)
    fitted = decompose_segments(k, v, lens, bits, 32, k_levels=k_levels, v_levels=v_levels)
    for e0, e1 in zip(_errors(plain, k, v), _errors(fitted, k, v)):
        assert e1.pow(2).sum() < gain * e0.pow(2).sum()
    # Fitting while encoding ("fit") stores the same tables in every segment and the same codes, in one pass.
    once = decompose_segments(k, v, lens, bits, 32, k_levels="fit", v_levels="fit")
    for got, want in ((once.k_levels, k_levels), (once.v_levels, v_levels)):
        assert got.shape == (2, 1 << bits) and torch.equal(got, want.to(DEVICE).expand(2, -1))
    assert torch.equal(once.segs.k_packed, fitted.segs.k_packed) and torch.equal(
        once.segs.v_packed, fitted.segs.v_packed
    )
    with pytest.raises(ValueError, match="k_levels must be a tensor of levels, None \\(uniform\\) or 'fit'"):
        decompose_segments(k, v, lens, bits, 32, k_levels="kmeans")


def test_pre_rope_keys_round_trip():
    """Keys stored un-rotated come back rotated to their own positions; values are untouched."""
    D = 64
    rope = rope_table(D, scale=1.3)
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(100, D, generator=gen).to(DEVICE)
    positions = torch.randperm(4000, generator=gen)[:100].to(DEVICE)
    post = rotate(pre, positions, rope)
    torch.testing.assert_close(rotate(post, positions, rope, inverse=True), pre, atol=1e-4, rtol=1e-4)
    v = torch.randn(100, D, generator=gen).to(DEVICE)
    lens = torch.tensor([60, 40], device=DEVICE)
    ds = decompose_segments(post, v, lens, 8, 32, positions=positions, rope=rope)
    assert torch.equal(ds.positions[:60], positions[:60].int())
    rk, rv, _ = dequantize_decomposed(ds, rope)
    # 8-bit codes of the pre-RoPE keys: within half a step of each channel's range, times the rotation's scale.
    step = (pre.amax(0) - pre.amin(0)).max() / 255
    assert float((rk - post).abs().max()) < float(step) * 1.3 * 1.5
    with pytest.raises(ValueError, match="rope"):
        dequantize_decomposed(ds)


@pytest.mark.parametrize("features", [{}, {"outlier_ratio": 0.01}, {"rank": 2}, {"outlier_ratio": 0.02, "rank": 4}])
def test_append_equals_encoding_the_chunk_alone(features):
    """Appended groups are encoded as a fresh decomposition of the chunk (their own block) and land after each
    segment's groups; the old groups are untouched."""
    k, v, lens = data(3, [40, 64, 0], 32, torch.bfloat16, outliers=0.01)
    ds = decompose_segments(k, v, lens, 4, 32, **features)
    gen = torch.Generator().manual_seed(9)
    new_k = torch.randn(3, 64, 32, generator=gen).to(torch.bfloat16).to(DEVICE)
    new_v = torch.randn(3, 64, 32, generator=gen).to(torch.bfloat16).to(DEVICE)
    grown = append_decomposed_groups(ds, new_k, new_v, outlier_ratio=features.get("outlier_ratio", 0.0))
    alone = decompose_segments(new_k.reshape(-1, 32), new_v.reshape(-1, 32), torch.tensor([64] * 3, device=DEVICE),
                               4, 32, **features)  # fmt: skip
    gk, gv, glens = dequantize_decomposed(grown)
    ok, ov, _ = dequantize_decomposed(ds)
    ak, av, _ = dequantize_decomposed(alone)
    assert glens.tolist() == [104, 128, 64]
    want_k, want_v, o = [], [], 0
    for s, n in enumerate([40, 64, 0]):
        want_k += [ok[o : o + n], ak[64 * s : 64 * (s + 1)]]
        want_v += [ov[o : o + n], av[64 * s : 64 * (s + 1)]]
        o += n
    torch.testing.assert_close(gk, torch.cat(want_k), rtol=0, atol=0)
    torch.testing.assert_close(gv, torch.cat(want_v), rtol=0, atol=0)
    assert grown.nbytes() > ds.nbytes()


def test_bad_arguments_name_the_parameter():
    k, v, lens = data(0, [32], 32, torch.float32)
    with pytest.raises(ValueError, match="outlier_ratio"):
        decompose_segments(k, v, lens, 4, 32, outlier_ratio=1.5)
    with pytest.raises(ValueError, match="rank"):
        decompose_segments(k, v, lens, 4, 32, rank=-1)
    with pytest.raises(ValueError, match="rope"):
        decompose_segments(k, v, lens, 4, 32, positions=torch.arange(32, device=DEVICE))
    with pytest.raises(ValueError, match="k_levels"):
        decompose_segments(k, v, lens, 4, 32, k_levels=torch.arange(4, dtype=torch.float32))
    with pytest.raises(ValueError, match="bits"):
        decompose_segments(k, v, lens, 5, 32)
