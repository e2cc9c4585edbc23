"""`CURPress`: keep the tokens whose keys and values have the highest leverage (CUR row selection)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.presses.budget import check_int
from kvpress.presses.leverage_score_press import leverage_scores, sketch_matrix
from kvpress.presses.scorer_press import ScorerPress

LEVERAGE_TYPES = ("key", "value", "kv_product")


@dataclass
class CURPress(ScorerPress):
    """Value-guided selection by leverage scores, the row sampling of a CUR decomposition (Sengupta et al., 2025,
    "Value-Guided KV Compression for LLMs via Approximated CUR Decomposition", arXiv 2509.15038): the kept tokens are
    the rows that best span the keys and the values, and so the attention output ``softmax(QKᵀ)V``.

    Each token's leverage ``x_i (XᵀX)⁻¹ x_iᵀ`` is taken over the cached keys and values of its (sequence, kv head),
    their channels first reduced by a Gaussian sketch of ``sketch_dimension`` columns; the score is the keys'
    leverage times the values' (``"kv_product"``), or one of them. The first ``num_sinks`` tokens are kept first.
    Query-free, on the keys as cached, so it also compresses chunk by chunk and while decoding.

    Args:
        num_sinks: leading tokens always kept.
        leverage_type: ``"kv_product"``, ``"key"`` or ``"value"``.
        sketch_dimension: columns of the Gaussian sketch (``>= head_dim``: exact leverage).
        seed: seed of the sketch.
    """

    num_sinks: int = 4
    leverage_type: str = "kv_product"
    sketch_dimension: int = 48
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_int(self.num_sinks, "num_sinks", 0)
        check_int(self.sketch_dimension, "sketch_dimension", 1)
        check_int(self.seed, "seed", 0)
        if self.leverage_type not in LEVERAGE_TYPES:
            raise ValueError(f"leverage_type must be one of {', '.join(LEVERAGE_TYPES)}, got {self.leverage_type!r}")

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        scores = None
        for name, x in (("key", keys), ("value", values)):
            if self.leverage_type in (name, "kv_product"):
                lev = leverage_scores(x, sketch_matrix(x.shape[-1], self.sketch_dimension, self.seed, x.device))
                scores = lev if scores is None else scores * lev
        position = torch.arange(keys.shape[2], device=keys.device)
        return torch.where(position < self.num_sinks, scores.amax() + 1, scores)
