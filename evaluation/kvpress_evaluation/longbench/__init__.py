"""LongBench v1 and LongBench-E from the official JSONL files (or a hub dataset), with the official metrics."""

from .benchmark import LongBenchBenchmark, LongBenchOptions
from .data import load_rows
from .datasets import DATASETS, E_TASKS, TASKS, LongBenchDataset
from .truncation import fit_prompt, truncate_middle

__all__ = [
    "DATASETS",
    "E_TASKS",
    "TASKS",
    "LongBenchBenchmark",
    "LongBenchDataset",
    "LongBenchOptions",
    "fit_prompt",
    "load_rows",
    "truncate_middle",
]
