"""`CAMPress`: H2O's eviction, with the values of evicted tokens merged into the kept ones (CaM)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.cache.compressed_kv import CompressedKV
from kvpress.presses.h2o_press import H2OPress
from kvpress.presses.scorer_press import gather_tokens


@dataclass
class CAMPress(H2OPress):
    """Evict as :class:`H2OPress` does, but merge the evicted values into the kept ones instead of dropping them
    (Zhang et al., 2024, "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML).

    With ``p`` the attention of the current token over the layer (averaged over a kv head's query heads) and ``E`` /
    ``K`` the evicted / kept tokens, every kept value becomes ``(1 - w) v_j + w v_E`` where
    ``v_E = sum_E p_e v_e / p(E)`` and ``w = p(E) / (p(E) + p(K))``: the current token's attention output is then the
    same after eviction as before (the softmax renormalizes over the kept tokens), and the evicted values' share of
    it moves into the kept ones in proportion to the attention they received.
    """

    def evict(self, keys, values, kept, attention):
        p = attention.mean(dim=2)  # (batch, kv_heads, n): the forward's queries averaged
        evicted = torch.ones_like(p, dtype=torch.bool).scatter_(-1, kept, False)
        p_out = torch.where(evicted, p, 0.0)
        mass_out = p_out.sum(-1, keepdim=True)  # (b, h, 1)
        mass_in = p.gather(-1, kept).sum(-1, keepdim=True)
        merged = torch.einsum("bhn,bhnd->bhd", p_out, values.float()) / mass_out.clamp_min(1e-30)
        w = (mass_out / (mass_out + mass_in).clamp_min(1e-30))[..., None]  # (b, h, 1, 1)
        kept_values = gather_tokens(values, kept).float()
        new_values = ((1 - w) * kept_values + w * merged[:, :, None, :]).to(values.dtype)
        return CompressedKV(gather_tokens(keys, kept), new_values, indices=kept)
