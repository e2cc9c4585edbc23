"""`PyramidKVPress`: SnapKV selection under budgets that shrink linearly from the first layer to the last."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.utils import full_attention_layer_indices


def pyramid_budgets(average: int, cap: int, n_layers: int, beta: int) -> list[int]:
    """Per-layer token budgets (layer 0 first) that decrease linearly and sum to exactly ``average * n_layers``.

    The real-valued schedule runs linearly from ``top`` down to ``bottom = average / beta`` with
    ``top = 2 * average - bottom`` (so its mean is ``average``). When ``top`` would exceed ``cap`` (the tokens
    available), ``top = cap`` and ``bottom = 2 * average - cap``: a flatter pyramid with the same mean. The values are
    then rounded by largest remainders (ties to the earlier layer): each budget is within one token of the
    real-valued schedule, the total is exact, budgets never increase with depth, and none exceeds ``cap``.

    Args:
        average: requested mean budget, in ``[0, cap]``.
        cap: most tokens a layer can keep.
        n_layers: number of layers sharing the budget.
        beta: ratio ``average / bottom`` (``1`` gives uniform budgets).
    """
    if not 0 <= average <= cap:
        raise ValueError(f"average must be in [0, cap={cap}] tokens, got {average}")
    if n_layers == 1:
        return [average]
    bottom = Fraction(average, beta)
    top = 2 * average - bottom
    if top > cap:
        top = Fraction(cap)
        bottom = 2 * average - top
    step = (top - bottom) / (n_layers - 1)
    exact = [top - layer * step for layer in range(n_layers)]
    budgets = [math.floor(x) for x in exact]
    missing = average * n_layers - sum(budgets)  # in [0, n_layers): the exact values sum to average * n_layers
    by_remainder = sorted(range(n_layers), key=lambda layer: (budgets[layer] - exact[layer], layer))
    for layer in by_remainder[:missing]:
        budgets[layer] += 1
    return budgets


@dataclass
class PyramidKVPress(SnapKVPress):
    """SnapKV scores with pyramidal per-layer budgets: lower layers keep more tokens, upper layers fewer.

    Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
    arXiv 2406.02069. With ``A = round(n * (1 - compression_ratio))`` (or ``min(n, target_size)``) tokens per layer
    requested on average, every compressed layer keeps its observation window of ``window_size`` tokens plus a share
    of the ``A - window_size`` remaining slots given by :func:`pyramid_budgets` (linear decrease from layer 0, the
    smallest share ``(A - window_size) / beta``, no share above the ``n - window_size`` tokens available). The mean of
    the per-layer kept counts over the compressed layers is exactly ``A`` (unlike the paper's floored schedule, which
    over-spends slightly). Sliding-window layers are not compressed and take no share. When no pyramid is possible
    (a single compressed layer, or ``A <= window_size``), every layer keeps ``A`` tokens as in SnapKV.

    Args:
        beta: ratio between the average and the smallest per-layer share of the ranked (non-window) tokens; ``>= 1``.
    """

    beta: int = 20

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, int) or self.beta < 1:
            raise ValueError(f"beta must be an int >= 1 (average / smallest layer share), got {self.beta!r}")

    def n_kept(self, n_tokens: int, module=None) -> int:
        average = super().n_kept(n_tokens, module)
        window = self.window_size
        if module is None or average >= n_tokens or average <= window:
            return average
        layers = full_attention_layer_indices(module.config)
        if module.layer_idx not in layers:
            return average
        shares = pyramid_budgets(average - window, n_tokens - window, len(layers), self.beta)
        return window + shares[layers.index(module.layer_idx)]
