"""`CriticalAdaKVPress`: AdaKV's head-adaptive budgets over CriticalKV's two-stage scores."""

from __future__ import annotations

from dataclasses import dataclass

from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.criticalkv_press import CriticalKVPress


@dataclass
class CriticalAdaKVPress(AdaKVPress):
    """``AdaKVPress(CriticalKVPress(press, first_stage_ratio), alpha_safeguard)``: the heads of a layer share its
    budget (a different length per head, stored exactly in a ``VarlenCache``) by CriticalKV's scores (Feng et al.,
    2025, arXiv 2502.03805, with Ada-KV, arXiv 2407.11550).

    Args:
        press: the first-stage scorer.
        alpha_safeguard: as in :class:`AdaKVPress`.
        first_stage_ratio: as in :class:`CriticalKVPress`.
    """

    first_stage_ratio: float = 0.5

    def __post_init__(self):
        if not isinstance(self.press, CriticalKVPress):
            self.press = CriticalKVPress(self.press, self.first_stage_ratio)
        super().__post_init__()
