"""Needle-in-a-haystack: a grid of context lengths x needle depths, scored by string match, drawn as a heatmap."""

from .benchmark import NeedleBenchmark, NeedleOptions, answer_found
from .heatmap import NeedleCells, needle_cells, plot_needle_heatmap

__all__ = ["NeedleBenchmark", "NeedleCells", "NeedleOptions", "answer_found", "needle_cells", "plot_needle_heatmap"]
