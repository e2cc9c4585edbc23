"""`NACLPress`: one-shot eviction at encoding time from proxy-token attention, mixed with head-wise random sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.presses.budget import check_fits_context
from kvpress.presses.scorer_press import ScorerPress, top_positions
from kvpress.utils import group_reduce, num_heads, window_attention


@dataclass
class NACLPress(ScorerPress):
    """Proxy-token scores plus a random share drawn from them (Chen et al., 2024, "NACL: A General and Effective KV
    Cache Eviction Framework for LLMs at Inference Time", arXiv 2408.03675).

    The last ``proxy_size`` prompt tokens are the proxy tokens (the question, with the pipeline's
    ``query_aware=True``): a token's score is the attention the proxy queries pay it, summed over them and averaged
    over each GQA group, with no pooling. Of the ``k`` tokens a head keeps, the proxy tokens come first (the latest of
    them when ``k`` is smaller), then ``1 - random_ratio`` of the rest are the best-scored tokens and ``random_ratio``
    are sampled without replacement from the remaining ones with probability ``softmax(score / temperature)``
    (uniformly for ``temperature <= 0``). Each head and layer draws its own sample ("random eviction"), from a
    generator seeded with ``seed + layer``, so a seed gives the same tokens for the same inputs.

    Args:
        proxy_size: number of final prompt tokens whose queries score the past (kept whole).
        random_ratio: share of the ranked budget (beyond the proxy tokens) that is sampled, in [0, 1]. 0 gives pure
            proxy-token eviction.
        temperature: softmax temperature of the sampling distribution; ``<= 0`` samples uniformly.
        seed: seed of the sampling.
    """

    proxy_size: int = 8
    random_ratio: float = 0.2
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.proxy_size, bool) or not isinstance(self.proxy_size, int) or self.proxy_size < 1:
            raise ValueError(
                f"proxy_size must be a positive int (final prompt tokens used as proxies), got {self.proxy_size!r}"
            )
        ratio = self.random_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise ValueError(f"random_ratio must be a number in [0, 1] (share of the budget sampled), got {ratio!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise ValueError(f"temperature must be a number (<= 0 samples uniformly), got {self.temperature!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def check_length(self, n_tokens: int) -> None:
        check_fits_context("proxy_size", self.proxy_size, n_tokens)

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        p = self.proxy_size
        attn = window_attention(module, hidden_states, keys, kwargs["position_embeddings"], p)
        scores = group_reduce(attn.sum(dim=2), num_heads(module)[1])  # (batch, kv_heads, n)
        scores[..., -p:] = float("inf")
        return scores

    def select(self, scores, k, module):
        proxies = min(self.proxy_size, k)
        sampled = round(self.random_ratio * (k - proxies))
        best = top_positions(scores, k - sampled)
        if not sampled:
            return best
        return torch.cat([best, self._sample(scores, best, sampled, module.layer_idx)], dim=-1).sort(-1).values

    def _sample(self, scores: torch.Tensor, taken: torch.Tensor, count: int, layer_idx: int) -> torch.Tensor:
        """``count`` positions per head ``(batch, kv_heads, count)`` drawn without replacement, outside ``taken``."""
        generator = torch.Generator(device=scores.device).manual_seed(self.seed + layer_idx)
        uniform = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=torch.float64)
        # Gumbel-top-k: the top `count` of log-probabilities plus Gumbel noise are a sample without replacement.
        gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
        logits = scores.double() / self.temperature if self.temperature > 0 else torch.zeros_like(gumbel)
        keys = (logits + gumbel).scatter(-1, taken, float("-inf"))
        return keys.topk(count, dim=-1).indices
