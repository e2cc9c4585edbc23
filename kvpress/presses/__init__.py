"""Presses: one compression method per file."""

from kvpress.presses.base_press import BasePress
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.report import CompressionReport
from kvpress.presses.scorer_press import ScorerPress
from kvpress.presses.snapkv_press import SnapKVPress

__all__ = ["BasePress", "Capabilities", "CompressionReport", "KnormPress", "ScorerPress", "SnapKVPress"]
