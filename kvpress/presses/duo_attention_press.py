"""`DuoAttentionPress`: retrieval heads keep every token, streaming heads only the sinks and a recent window."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvpress.presses.budget import check_int
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.cross_layer_press import CrossLayerPress
from kvpress.utils import full_attention_layer_indices, group_reduce, kv_geometry, window_attention

PATTERN_FILE = "full_attention_heads.tsv"


def load_head_patterns(path: str | Path) -> torch.Tensor:
    """Per-head retrieval gates ``(layers, kv_heads)`` float32 from DuoAttention's published format: a tab-separated
    file (``full_attention_heads.tsv``, or a directory holding it) with one row per layer and one value per kv head,
    higher meaning more of a retrieval head."""
    path = Path(path)
    file = path / PATTERN_FILE if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"patterns: no DuoAttention pattern file at {str(file)!r} (a {PATTERN_FILE} or its directory)")
    with file.open(newline="") as handle:
        rows = [[cell for cell in row if cell.strip()] for row in csv.reader(handle, delimiter="\t")]
    rows = [row for row in rows if row]
    try:
        gates = torch.tensor([[float(cell) for cell in row] for row in rows], dtype=torch.float32)
    except ValueError as exc:  # ragged rows or text
        raise ValueError(f"patterns: {str(file)!r} is not a table of numbers (one row per layer): {exc}") from exc
    return gates


@dataclass
class DuoAttentionPress(CrossLayerPress):
    """Retrieval and streaming heads (Xiao et al., 2024, "DuoAttention: Efficient Long-Context LLM Inference with
    Retrieval and Streaming Heads", arXiv 2410.10819).

    A ``head_compression_ratio`` share of the model's kv heads become *streaming heads*, which keep the first
    ``sink_size`` and the last ``recent_size`` prompt tokens; the other (*retrieval*) heads keep every token. Heads
    then hold different lengths, which a ``VarlenCache`` stores exactly (memory is freed, not masked).

    Which heads stream:
    - with ``patterns`` (a path to DuoAttention's published ``full_attention_heads.tsv``, or its directory; read
      locally, never downloaded), the heads with the lowest trained gates, over the whole model;
    - without, classified on the fly from the prompt itself: a head's score is the attention mass that the last
      ``n_queries`` prompt queries (max over the kv head's query group, averaged over the queries) put outside the
      sinks and the recent window, i.e. what streaming would take from it; the lowest-scored heads over the whole
      model stream. This is a heuristic in place of the trained gates, which come from an optimisation this library
      does not reproduce.

    Args:
        head_compression_ratio: share of kv heads (over all full-attention layers) that stream, in ``[0, 1]``.
        patterns: path of a published pattern file (``None``: on-the-fly classification).
        sink_size: first tokens a streaming head keeps.
        recent_size: last tokens a streaming head keeps.
        n_queries: prompt queries the on-the-fly classification reads.
    """

    head_compression_ratio: float = 0.5
    patterns: str | None = None
    sink_size: int = 64
    recent_size: int = 256
    n_queries: int = 64
    # The budget follows from the heads' roles, not from a ratio of tokens.
    compression_ratio: float = field(default=0.0, init=False)
    target_size: int | None = field(default=None, init=False)

    def __post_init__(self):
        super().__post_init__()
        r = self.head_compression_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise ValueError(f"head_compression_ratio must be a number in [0, 1], got {r!r}")
        check_int(self.sink_size, "sink_size", 0)
        check_int(self.recent_size, "recent_size", 0)
        check_int(self.n_queries, "n_queries", 1)
        if self.patterns is not None and not isinstance(self.patterns, (str, Path)):
            raise ValueError(f"patterns must be a path (str) or None, got {type(self.patterns).__name__}")
        self._gates = None if self.patterns is None else load_head_patterns(self.patterns)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(head_variable=True)

    def validate(self, model) -> None:
        super().validate(model)
        if self._gates is None:
            return
        text = model.config.get_text_config(decoder=True)
        n_layers, kv_heads = len(full_attention_layer_indices(text)), kv_geometry(text)[1]
        if tuple(self._gates.shape) != (n_layers, kv_heads):
            raise ValueError(
                f"patterns: {self.patterns!r} holds {self._gates.shape[0]} layers x {self._gates.shape[1]} kv heads; "
                f"{type(model).__name__} has {n_layers} full-attention layers x {kv_heads} kv heads"
            )

    def layer_scores(self, module, hidden_states, keys, values, attentions, kwargs):
        """``(batch, kv_heads)`` how much each head needs the whole context (higher: retrieval)."""
        b, h, n, _ = keys.shape
        if self._gates is not None:
            row = full_attention_layer_indices(module.config).index(module.layer_idx)
            return self._gates[row].to(keys.device).expand(b, h)
        window = min(self.n_queries, n)
        weights = window_attention(module, hidden_states, keys, kwargs["position_embeddings"], window)
        outside = weights[..., self.sink_size : max(self.sink_size, n - self.recent_size)].sum(-1).mean(-1)
        return group_reduce(outside, h, "max")

    def complete_scores(self, decoder, args, kwargs, cache, pending, report):
        """Token scores ``(batch, kv_heads, n)``: ``+inf`` on what each head keeps, ``-inf`` elsewhere."""
        layers = sorted(pending)
        device = pending[layers[0]].device  # layers may sit on different devices (device_map)
        heads = torch.stack([pending[i].float().to(device) for i in layers], dim=1)  # (b, L, h)
        b, n_layers, h = heads.shape
        n = cache.get_seq_length(layers[0])
        n_stream = round(self.head_compression_ratio * n_layers * h)
        order = heads.flatten(1).argsort(dim=1, stable=True)[:, :n_stream]  # lowest first
        streaming = torch.zeros(b, n_layers * h, dtype=torch.bool, device=heads.device)
        streaming.scatter_(1, order, True)
        streaming = streaming.view(b, n_layers, h)
        position = torch.arange(n, device=heads.device)
        window = (position < self.sink_size) | (position >= n - self.recent_size)  # (n,)
        keep = ~streaming[..., None] | window  # (b, L, h, n)
        scores = torch.where(keep, float("inf"), float("-inf"))
        return {i: scores[:, j].to(pending[i].device) for j, i in enumerate(layers)}

    def allocate(self, scores, k):
        return {i: s.isposinf().sum(-1) for i, s in scores.items()}
