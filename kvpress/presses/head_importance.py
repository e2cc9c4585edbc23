"""Head-importance files: per-(layer, head) scores that :class:`~kvpress.presses.headkv_press.HeadKVPress` turns into
budgets, as written by ``python -m kvpress.head_scores``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FORMAT = "kvpress-head-scores"


def importance_table(scores: str | Path | dict) -> torch.Tensor:
    """Mean score of every head, ``(layers, heads)`` float64, from a file path or an already loaded mapping.

    Accepted contents: the file ``python -m kvpress.head_scores`` writes (``{"format": "kvpress-head-scores",
    "scores": {...}, ...}``) or a bare ``{"layer-head": [score, ...]}`` mapping (one score per probe test; the format
    HeadKV's published files use). A head with an empty list scores 0. Every ``(layer, head)`` of the table must be
    present.
    """
    source = "scores"
    if isinstance(scores, (str, Path)):
        source = str(scores)
        path = Path(scores)
        if not path.is_file():
            raise ValueError(
                f"scores file {source!r} does not exist; write one with "
                "`python -m kvpress.head_scores --model ... --output scores.json`"
            )
        try:
            scores = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"scores file {source!r} is not valid JSON: {error}") from None
    if not isinstance(scores, dict):
        raise ValueError(f"{source} must be a mapping of 'layer-head' keys to score lists, got {type(scores).__name__}")
    if scores.get("format") == FORMAT:
        scores = scores.get("scores")
        if not isinstance(scores, dict):
            raise ValueError(f"{source}: the 'scores' entry must be a mapping of 'layer-head' keys to score lists")
    means: dict[tuple[int, int], float] = {}
    for key, values in scores.items():
        parts = str(key).split("-")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"{source}: key {key!r} is not 'layer-head' (two non-negative ints, e.g. '3-7')")
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
            raise ValueError(f"{source}: scores[{key!r}] must be a list of numbers")
        means[int(parts[0]), int(parts[1])] = sum(values) / len(values) if values else 0.0
    if not means:
        raise ValueError(f"{source} holds no head scores")
    n_layers = max(layer for layer, _ in means) + 1
    n_heads = max(head for _, head in means) + 1
    missing = [f"{layer}-{head}" for layer in range(n_layers) for head in range(n_heads) if (layer, head) not in means]
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} of its {n_layers}x{n_heads} heads, e.g. {missing[:3]}")
    table = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    for (layer, head), value in means.items():
        table[layer, head] = value
    if bool((table < 0).any()):
        raise ValueError(f"{source} has negative head scores; accepted: scores >= 0")
    return table


def write_head_scores(path: str | Path, scores: dict[str, list[float]], **metadata) -> None:
    """Write ``{"layer-head": [score per test]}`` and ``metadata`` (model, settings, ...) as a head-scores file."""
    Path(path).write_text(json.dumps({"format": FORMAT, "version": 1, **metadata, "scores": scores}, indent=1))
