"""`LeverageScorePress`: keep the keys of highest statistical leverage (the outliers of the key matrix)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvpress.presses.budget import check_int
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.scorer_press import ScorerPress
from kvpress.presses.zscore import zscore
from kvpress.utils import unrotated_keys


def sketch_matrix(head_dim: int, sketch_dimension: int, seed: int, device) -> torch.Tensor | None:
    """Gaussian sketch ``(head_dim, sketch_dimension)`` scaled by ``1 / sqrt(sketch_dimension)``, drawn on the CPU
    from ``seed`` (the same on every device); ``None`` when the sketch would not reduce ``head_dim``."""
    if sketch_dimension >= head_dim:
        return None
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(head_dim, sketch_dimension, generator=gen) / math.sqrt(sketch_dimension)).to(device)


def leverage_scores(x: torch.Tensor, sketch: torch.Tensor | None) -> torch.Tensor:
    """Leverage ``x_i (XᵀX)⁻¹ x_iᵀ`` of every row of ``x`` ``(batch, kv_heads, n, d)``, after the columns are
    sketched by ``sketch`` ``(d, s)``: ``(batch, kv_heads, n)`` float32, summing to the rank per head. Computed
    through the Cholesky factor ``L`` of the Gram matrix (``‖L⁻¹ x_iᵀ‖²``), with a ridge of 1e-6 of its mean
    diagonal for rank-deficient heads.

    The factorisation runs in float64: real keys have outlier channels orders of magnitude above the rest, and the
    ridged Gram's condition number (up to ``s · 1e6``) is beyond float32's precision."""
    x = x.double() if sketch is None else x.double() @ sketch.double()
    gram = x.transpose(-1, -2) @ x  # (b, h, s, s)
    s = gram.shape[-1]
    ridge = 1e-6 * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)[..., None, None]
    chol = torch.linalg.cholesky(gram + ridge * torch.eye(s, device=x.device, dtype=x.dtype))
    solved = torch.linalg.solve_triangular(chol, x.transpose(-1, -2), upper=False)  # (b, h, s, n)
    return solved.pow(2).sum(dim=-2).float()


@dataclass
class LeverageScorePress(ScorerPress):
    """Score = the approximate statistical leverage of each pre-RoPE key within its (sequence, kv head), z-scored:
    keys far outside the span the others share are kept (Chari and Van Durme, 2025, "Compactor: Calibrated
    Query-Agnostic KV Cache Compression with Approximate Leverage Scores", arXiv 2507.08143).

    Leverage ``k_i (KᵀK)⁻¹ k_iᵀ`` is taken on the keys before the rotary embedding (un-rotated with the prefill's
    positions), their channels first reduced by a Gaussian sketch of ``sketch_dimension`` columns. Query-free. It
    reads the positions of every key, so it compresses one-forward prefills only (no chunked prefill, no
    re-compression while decoding).

    Args:
        sketch_dimension: columns of the Gaussian sketch (``>= head_dim``: exact leverage).
        seed: seed of the sketch (fixed, so that a run is reproducible).
    """

    sketch_dimension: int = 48
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_int(self.sketch_dimension, "sketch_dimension", 1)
        check_int(self.seed, "seed", 0)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()  # scores need the positions of every key: one-forward prefills only

    def chunk_refusal(self) -> str:
        return f"{type(self).__name__} un-rotates every key with the position of the forward that wrote it"

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        pre = unrotated_keys(keys, kwargs["position_embeddings"], type(self).__name__)
        sketch = sketch_matrix(keys.shape[-1], self.sketch_dimension, self.seed, keys.device)
        return zscore(leverage_scores(pre, sketch))
