"""`SimLayerKVPress`: layers whose last queries look only at the first and the most recent tokens keep only those."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.presses.base_press import BasePress
from kvpress.presses.budget import check_int
from kvpress.presses.scorer_press import keep_tokens
from kvpress.utils import window_attention


@dataclass
class SimLayerKVPress(BasePress):
    """Layer-level reduction (Zhang et al., 2024, "SimLayerKV: A Simple Framework for Layer-Level KV Cache
    Reduction", arXiv 2410.13846): a "lazy" layer, whose last ``n_last`` prompt queries put at least
    ``lazy_threshold`` of their attention (averaged over the queries and the layer's query heads) on the first
    ``n_initial`` and the last ``n_recent`` tokens, keeps only those tokens; the other layers keep everything.

    The compression follows from the prompt: the report's ``compression_ratio`` says how much was removed (there is
    no ratio to ask for). A batch's layer is lazy when every sequence is. Layers then differ in length, which the
    cache stores as is. The threshold depends on the model: measure a few prompts before relying on the default.

    Args:
        lazy_threshold: attention share on the initial and recent tokens above which a layer is lazy, in ``[0, 1]``.
        n_last: last prompt queries whose attention decides.
        n_recent: recent tokens a lazy layer keeps.
        n_initial: initial tokens a lazy layer keeps.
    """

    lazy_threshold: float = 0.9
    n_last: int = 1
    n_recent: int = 1024
    n_initial: int = 4

    def __post_init__(self):
        t = self.lazy_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
            raise ValueError(f"lazy_threshold must be a number in [0, 1], got {t!r}")
        check_int(self.n_last, "n_last", 1)
        check_int(self.n_recent, "n_recent", 1)
        check_int(self.n_initial, "n_initial", 0)

    def attention_share(self, module, hidden_states, keys, kwargs) -> torch.Tensor:
        """``(batch,)`` share of the last ``n_last`` queries' attention on the initial and recent tokens."""
        n = keys.shape[2]
        last = min(self.n_last, hidden_states.shape[1], n)
        weights = window_attention(module, hidden_states, keys, kwargs["position_embeddings"], last)
        position = torch.arange(n, device=keys.device)
        kept = (position < self.n_initial) | (position >= n - self.n_recent)
        return weights[..., kept].sum(-1).mean(dim=(1, 2))

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        b, h, n, _ = keys.shape
        if n <= self.n_initial + self.n_recent:
            return keys, values
        if bool((self.attention_share(module, hidden_states, keys, kwargs) < self.lazy_threshold).any()):
            return keys, values  # not lazy: every token stays
        position = torch.arange(n, device=keys.device)
        kept = position[(position < self.n_initial) | (position >= n - self.n_recent)]
        return keep_tokens(keys, values, kept.expand(b, h, -1))
