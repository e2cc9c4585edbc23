"""`CriticalKVPress`: rescore an inner press's ranking by the output perturbation each token's value can cause."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvpress.presses.capabilities import Capabilities
from kvpress.presses.chunk_budget import CHUNK_BUDGET
from kvpress.presses.scorer_press import ScorerPress, rank_key
from kvpress.utils import num_heads


def projected_value_norms(module, values: torch.Tensor) -> torch.Tensor:
    """``‖W_o^(j) v_i‖₁``, the L1 norm of each value ``(batch, kv_heads, n, head_dim)`` after the output projection
    of a query head ``j`` reading it, averaged over the kv head's query heads: ``(batch, kv_heads, n)`` float32."""
    weight = module.o_proj.weight  # (hidden, heads * head_dim)
    n_q, n_kv = num_heads(module)
    d, groups = values.shape[-1], n_q // n_kv
    out = values.new_zeros(values.shape[:3], dtype=torch.float32)
    for j in range(n_q):  # one query head at a time: (batch, n, hidden) at most
        projected = values[:, j // groups] @ weight[:, j * d : (j + 1) * d].T.to(values.dtype)
        out[:, j // groups] += projected.float().abs().sum(-1) / groups
    return out


@dataclass
class CriticalKVPress(ScorerPress):
    """Two-stage selection that bounds the attention output's perturbation (Feng et al., 2025, "Identify Critical KV
    Cache in LLM Inference from an Output Perturbation Perspective" (CriticalKV), arXiv 2502.03805).

    Of the ``k`` tokens a head keeps, the first ``round(first_stage_ratio * k)`` are the inner press's best; the
    others are the best of the rest by ``a_i · ‖W_o v_i‖₁``: the inner score (read as an attention weight, shifted to
    be non-negative per head) times the L1 norm of the token's value through the layer's output projection, the
    bound of what dropping it can change in the output. Tokens the inner press keeps whole (``+inf``) stay first.

    Its scores rank the first stage above the second, so wrappers that compare heads reuse it as is:
    :class:`CriticalAdaKVPress` is ``AdaKVPress(CriticalKVPress(press))``.

    Args:
        press: the scorer of the first stage (SnapKV as published); its budget is this press's budget.
        first_stage_ratio: share of each head's budget chosen by the inner scores alone, in ``[0, 1]``.
    """

    press: ScorerPress
    first_stage_ratio: float = 0.5
    # The inner press's budget, not arguments of this one: ``press`` comes first.
    compression_ratio: float = field(default=0.0, init=False)
    target_size: int | None = field(default=None, init=False)

    def __post_init__(self):
        if not isinstance(self.press, ScorerPress):
            kind = type(self.press).__name__
            raise ValueError(f"press must be a ScorerPress (KnormPress, SnapKVPress, ...), got {kind}")
        r = self.first_stage_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise ValueError(f"first_stage_ratio must be a number in [0, 1], got {r!r}")
        self.compression_ratio, self.target_size = self.press.compression_ratio, self.press.target_size
        super().__post_init__()

    @property
    def capabilities(self) -> Capabilities:
        return self.press.capabilities

    def n_kept(self, n_tokens: int, module=None) -> int:
        return self.press.n_kept(n_tokens, module)

    def validate(self, model) -> None:
        super().validate(model)
        self.press.validate(model)

    def check_length(self, n_tokens: int) -> None:
        self.press.check_length(n_tokens)

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        inner = self.press.score(module, hidden_states, keys, values, attentions, kwargs).float()
        chunk = kwargs.get(CHUNK_BUDGET)
        k = self.n_kept(keys.shape[2] if chunk is None else chunk.seen, module)
        first = min(round(self.first_stage_ratio * k), keys.shape[2])
        finite = inner.isfinite()
        floor = torch.where(finite, inner, float("inf")).amin(-1, keepdim=True)
        weight = torch.where(finite, inner - floor.clamp(max=0), 0.0)  # non-negative per head
        second = weight * projected_value_norms(module, values)
        # First stage above every second-stage score, in the inner order; kept-whole tokens above both.
        chosen = torch.zeros_like(finite)
        if first:
            chosen.scatter_(-1, rank_key(inner).topk(first, dim=-1).indices, True)
        top = second.amax(-1, keepdim=True) + 1
        scores = torch.where(chosen & finite, top + weight, second)
        return torch.where(inner.isposinf(), float("inf"), scores)
