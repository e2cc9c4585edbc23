"""Test helpers: random head-variable layouts built through the kernels, and an independent float64 attention."""

from dataclasses import dataclass

import torch

from kvpress_kernels import append_tail, compact_segments

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (atol, rtol) of a kernel output against float64 math on the same (dtype-rounded) inputs. fp32 accumulates in fp32;
# half types also round P to the value dtype before P @ V and round the output.
TOL_VS_F64 = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def randn(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype).to(DEVICE)


@dataclass
class Layout:
    """A ragged cache (built with compact_segments/append_tail) next to the dense data it came from."""

    q: torch.Tensor  # (B, Hq, Q, D)
    seg_k: torch.Tensor
    seg_v: torch.Tensor
    cu_seqlens: torch.Tensor
    tail_k: torch.Tensor
    tail_v: torch.Tensor
    tail_lens: torch.Tensor
    q_lens: torch.Tensor | None
    scale: float
    dense_k: torch.Tensor  # (B, Hkv, S, D) before pruning
    dense_v: torch.Tensor
    keep: torch.Tensor  # (B, Hkv, S) bool: kept positions
    new_k: torch.Tensor  # (B, Hkv, T, D) every token appended to the tail, in order
    new_v: torch.Tensor

    def args(self):
        return (self.q, self.seg_k, self.seg_v, self.cu_seqlens, self.tail_k, self.tail_v, self.tail_lens, self.scale,
                self.q_lens)  # fmt: skip


def build_layout(seed, B, Hkv, G, D, dtype, S, seg_lens, prior_tail, Q, q_lens=None, slack=3, scale_mult=1.0):
    """Prune a dense cache to `seg_lens` (B*Hkv,) random positions per head (in random order), append `prior_tail[b]`
    tokens then the Q question tokens (q_lens[b] valid) to a NaN-filled tail, and draw queries."""
    gen = torch.Generator().manual_seed(seed)
    dense_k, dense_v = randn(B, Hkv, S, D, dtype=dtype, gen=gen), randn(B, Hkv, S, D, dtype=dtype, gen=gen)
    lengths = torch.tensor(seg_lens, dtype=torch.int64).view(B, Hkv)
    # Garbage past each length: the kernels must ignore it.
    indices = torch.full((B, Hkv, S), 10 * S + 3, dtype=torch.int64)
    keep = torch.zeros(B, Hkv, S, dtype=torch.bool)
    for b in range(B):
        for h in range(Hkv):
            n = int(lengths[b, h])
            chosen = torch.randperm(S, generator=gen)[:n]
            indices[b, h, :n] = chosen
            keep[b, h, chosen] = True
    indices, keep = indices.to(DEVICE), keep.to(DEVICE)
    seg_k, cu = compact_segments(dense_k, indices, lengths)
    seg_v, cu_v = compact_segments(dense_v, indices, lengths)
    assert torch.equal(cu, cu_v)

    n_q = list(q_lens) if q_lens is not None else [Q] * B
    totals = [p + n for p, n in zip(prior_tail, n_q)]
    cap = max(totals) + slack
    tail_k = torch.full((B, Hkv, cap, D), float("nan"), dtype=dtype, device=DEVICE)
    tail_v = torch.full((B, Hkv, cap, D), float("nan"), dtype=dtype, device=DEVICE)
    tail_lens = torch.zeros(B, dtype=torch.int32, device=DEVICE)
    new_k = torch.zeros(B, Hkv, cap, D, dtype=dtype, device=DEVICE)
    new_v = torch.zeros_like(new_k)
    p_max = max(prior_tail)
    if p_max:
        k, v = randn(B, Hkv, p_max, D, dtype=dtype, gen=gen), randn(B, Hkv, p_max, D, dtype=dtype, gen=gen)
        tail_lens = append_tail(tail_k, tail_v, tail_lens, k, v, torch.tensor(prior_tail, device=DEVICE))
        for b, p in enumerate(prior_tail):
            new_k[b, :, :p], new_v[b, :, :p] = k[b, :, :p], v[b, :, :p]
    if Q:
        k, v = randn(B, Hkv, Q, D, dtype=dtype, gen=gen), randn(B, Hkv, Q, D, dtype=dtype, gen=gen)
        q_lens_t = torch.tensor(n_q, device=DEVICE, dtype=torch.int32) if q_lens is not None else None
        tail_lens = append_tail(tail_k, tail_v, tail_lens, k, v, q_lens_t)
        for b, (p, n) in enumerate(zip(prior_tail, n_q)):
            new_k[b, :, p : p + n], new_v[b, :, p : p + n] = k[b, :, :n], v[b, :, :n]
    assert tail_lens.tolist() == totals
    q = randn(B, Hkv * G, Q, D, dtype=dtype, gen=gen)
    q_lens_t = torch.tensor(q_lens, device=DEVICE, dtype=torch.int32) if q_lens is not None else None
    return Layout(q, seg_k, seg_v, cu, tail_k, tail_v, tail_lens, q_lens_t, scale_mult * D**-0.5,
                  dense_k, dense_v, keep, new_k, new_v)  # fmt: skip


def dense_attention_f64(lay: Layout) -> torch.Tensor:
    """Independent float64 attention on the dense (unpruned) cache, pruned positions masked out.

    Query i < Qb of sequence b (head hq, kv head hq // G) sees the kept positions of its head and appended tokens
    0 .. T_b - Qb + i; padding queries give 0.
    """
    B, Hq, Q, D = lay.q.shape
    Hkv = lay.dense_k.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, Q, D, dtype=torch.float64, device=lay.q.device)
    for b in range(B):
        T = int(lay.tail_lens[b])
        Qb = int(lay.q_lens[b]) if lay.q_lens is not None else Q
        if Qb == 0:
            continue
        for h in range(Hkv):
            keys = torch.cat([lay.dense_k[b, h], lay.new_k[b, h, :T]]).double()  # (S + T, D)
            vals = torch.cat([lay.dense_v[b, h], lay.new_v[b, h, :T]]).double()
            i = torch.arange(Qb, device=keys.device)[:, None]
            causal = torch.arange(T, device=keys.device)[None, :] <= T - Qb + i  # (Qb, T)
            visible = torch.cat([lay.keep[b, h][None, :].expand(Qb, -1), causal], dim=1)
            qs = lay.q[b, h * G : (h + 1) * G, :Qb].double()  # (G, Qb, D)
            scores = (qs @ keys.T) * lay.scale
            scores = scores.masked_fill(~visible, float("-inf"))
            out[b, h * G : (h + 1) * G, :Qb] = torch.softmax(scores, dim=-1) @ vals
    return out


def assert_close(actual, expected, dtype, what=""):
    atol, rtol = TOL_VS_F64[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
