"""merged_attention (MiniCache storage) against its torch reference and a float64 dense attention written out here."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_kernels import merged_attention, reference_merged_attention

from .layouts import DEVICE, DTYPES, TOL_VS_F64

TOL_VS_REF = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def random_merged(seed, B, Hkv, G, D, dtype, N, tail_lens, Q, capacity_slack=2):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    direction = torch.randn(B, Hkv, N, D, generator=g)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    dir_v = torch.randn(B, Hkv, N, D, generator=g)
    dir_v = dir_v / dir_v.norm(dim=-1, keepdim=True)
    cap = max(tail_lens) + capacity_slack
    tail_k = torch.full((B, Hkv, cap, D), float("nan")).to(dtype).to(DEVICE)  # slots past the length are ignored
    tail_v = tail_k.clone()
    for b, t in enumerate(tail_lens):
        tail_k[b, :, :t], tail_v[b, :, :t] = rand(Hkv, t, D), rand(Hkv, t, D)
    return dict(
        q=rand(B, Hkv * G, Q, D),
        dir_k=direction.to(dtype).to(DEVICE),
        dir_v=dir_v.to(dtype).to(DEVICE),
        mag_k=(torch.rand(B, Hkv, N, generator=g) * 3 + 0.1).to(dtype).to(DEVICE),
        mag_v=(torch.rand(B, Hkv, N, generator=g) * 3 + 0.1).to(dtype).to(DEVICE),
        tail_k=tail_k,
        tail_v=tail_v,
        tail_lens=torch.tensor(tail_lens, dtype=torch.int32, device=DEVICE),
        scale=D**-0.5,
    )


def dense_f64(case) -> torch.Tensor:
    """Token by token in float64: query i of sequence b sits at tail position T_b - Q + i."""
    q = case["q"].double().cpu()
    B, Hq, Q, D = q.shape
    Hkv = case["dir_k"].shape[1]
    keys = case["dir_k"].double().cpu() * case["mag_k"].double().cpu()[..., None]
    values = case["dir_v"].double().cpu() * case["mag_v"].double().cpu()[..., None]
    out = torch.zeros(B, Hq, Q, D, dtype=torch.float64)
    for b in range(B):
        T = int(case["tail_lens"][b])
        for hq in range(Hq):
            h = hq // (Hq // Hkv)
            for i in range(Q):
                visible_tail = T - Q + i + 1
                k = torch.cat([keys[b, h], case["tail_k"][b, h, :visible_tail].double().cpu()])
                v = torch.cat([values[b, h], case["tail_v"][b, h, :visible_tail].double().cpu()])
                p = torch.softmax(k @ q[b, hq, i] * case["scale"], dim=0)
                out[b, hq, i] = p @ v
    return out


@st.composite
def cases(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 3, 4]))
    D = draw(st.sampled_from([16, 64]))
    dtype = draw(st.sampled_from(DTYPES))
    N = draw(st.sampled_from([0, 1, 37, 300, 700]))
    Q = draw(st.integers(1, 4))
    tails = draw(st.lists(st.integers(Q, Q + 40), min_size=B, max_size=B))
    seed = draw(st.integers(0, 2**31 - 1))
    return random_merged(seed, B, Hkv, G, D, dtype, N, tails, Q)


@settings(max_examples=20, deadline=None)
@given(cases())
def test_kernel_matches_reference_and_dense_float64(case):
    dtype = case["q"].dtype
    out = merged_attention(**case)
    ref = reference_merged_attention(**case)
    dense = dense_f64(case)
    assert out.shape == case["q"].shape and out.dtype == dtype and torch.isfinite(out).all()
    atol, rtol = TOL_VS_REF[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    atol, rtol = TOL_VS_F64[dtype]
    torch.testing.assert_close(out.double().cpu(), dense, atol=atol * 4, rtol=rtol * 4)
    torch.testing.assert_close(ref.double().cpu(), dense, atol=atol * 4, rtol=rtol * 4)


def test_long_questions_span_several_row_blocks():
    # 4 heads x 20 queries = 80 rows per kv head: two blocks of 64 rows.
    case = random_merged(7, 1, 2, 4, 16, torch.float32, 300, [26], 20)
    torch.testing.assert_close(merged_attention(**case).double().cpu(), dense_f64(case), atol=1e-4, rtol=1e-4)


def test_float64_inputs_run_the_reference_exactly():
    case = random_merged(3, 2, 2, 2, 16, torch.float64, 50, [5, 9], 2)
    torch.testing.assert_close(merged_attention(**case), dense_f64(case).to(DEVICE), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(mag_k=c["mag_k"][..., :-1]), "mag_k must have shape"),
        (lambda c: c.update(dir_v=c["dir_v"][:, :1]), "dir_v must have shape"),
        (lambda c: c.update(tail_lens=c["tail_lens"] * 0), "tail_lens must be in \\[Q=2"),
        (lambda c: c.update(scale=0.0), "scale must be a positive number"),
        (lambda c: c.update(q=c["q"][:, :3]), "q has 3 heads, which must be a multiple of dir_k's 2 kv heads"),
    ],
)
def test_bad_arguments_are_named(change, message):
    case = random_merged(0, 1, 2, 2, 16, torch.float32, 10, [4], 2)
    change(case)
    with pytest.raises(ValueError, match=message):
        merged_attention(**case)
