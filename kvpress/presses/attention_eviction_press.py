"""`AttentionEvictionPress`: the shared mechanics of presses that evict while generating, by the attention the cached
tokens receive from the new queries (H2O, Scissorhands, CAM)."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from kvpress.cache.compressed_kv import CompressedKV
from kvpress.cache.forward_keyword import find_cache
from kvpress.cache.layer_access import read_layer, read_ragged_layer, write_layer
from kvpress.cache.varlen_layer import VarlenLayer
from kvpress.presses.base_press import BasePress, is_prefill, layer_input
from kvpress.presses.budget import check_int
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.decoding_press import check_decode_layer
from kvpress.presses.report import CompressionReport
from kvpress.presses.scorer_press import gather_tokens
from kvpress.utils import is_sliding_layer, query_states


def new_query_attention(
    module: nn.Module,
    hidden_states: torch.Tensor,
    keys: torch.Tensor,
    kwargs: dict,
    lengths: torch.Tensor | None = None,
):
    """Softmax attention ``(batch, kv_heads, q, n)`` float32 of the forward's ``q`` new tokens over a layer's cached
    keys ``(batch, kv_heads, n, head_dim)``, averaged over each kv head's query heads.

    Each head holds ``lengths`` ``(batch, kv_heads)`` tokens from position 0 (default: all ``n``), the new ones last
    and causal among themselves; a head's padding beyond its length gets zero attention."""
    b, h_kv, n, _ = keys.shape
    q = query_states(module, hidden_states, kwargs["position_embeddings"]).to(keys.dtype)  # (b, h, q, d)
    n_q = q.shape[2]
    groups = q.shape[1] // h_kv
    logits = torch.matmul(q.reshape(b, h_kv, groups * n_q, -1), keys.transpose(-1, -2)).float() * module.scaling
    logits = logits.view(b, h_kv, groups, n_q, n)
    hidden = torch.arange(n, device=keys.device) >= visible_tokens(keys, n_q, lengths)[..., None]  # (b, h, q, n)
    logits.masked_fill_(hidden[:, :, None], float("-inf"))
    return logits.softmax(-1).mean(dim=2)


def visible_tokens(keys: torch.Tensor, n_q: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``(batch, kv_heads, n_q)`` long: tokens the forward's ``i``-th new query sees in each head holding ``lengths``
    ``(batch, kv_heads)`` tokens (default: ``keys.shape[2]``), the ``n_q`` new ones last."""
    if lengths is None:
        lengths = torch.full(keys.shape[:2], keys.shape[2], dtype=torch.long, device=keys.device)
    return lengths[..., None] - n_q + 1 + torch.arange(n_q, device=keys.device)


@dataclass
class AttentionEvictionPress(BasePress):
    """Keep every layer at ``target_size`` tokens per (sequence, kv head) while generating, evicting by statistics of
    the attention the cached tokens receive from each new token (:meth:`observe`, :meth:`keep`).

    The statistics live in the call's report: tensors whose last axis follows each head's tokens (new tokens enter
    with zeros, evicted ones leave with them) and plain Python values. Every ``compression_interval`` new tokens, a
    layer holding more than ``target_size`` tokens in some head keeps the :meth:`keep` ones there. The prompt is left
    whole (wrap both phases with :class:`~kvpress.presses.prefill_decoding_press.PrefillDecodingPress`).

    Layers of a transformers ``DynamicCache`` and of a kvpress ``VarlenCache``. There heads may hold different
    counts (after a head-variable prefill press such as AdaKV): each head is observed over its own tokens, a head
    over ``target_size`` is brought down to it and a shorter one keeps everything, and the memory is freed.

    Args:
        target_size: tokens per (sequence, kv head) each layer holds after an eviction.
        compression_interval: new tokens between evictions (1: at every step, as H2O and CAM are published).
    """

    target_size: int = 2048
    compression_interval: int = 1

    def __post_init__(self):
        for name in ("target_size", "compression_interval"):
            check_int(getattr(self, name), name, 1)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(phase="decode", decodes_head_variable=True)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        """One eviction from fresh statistics: the forward's ``hidden_states.shape[1]`` queries (the last tokens of
        ``keys``) are observed once, and the layer keeps :meth:`keep`'s ``target_size`` tokens (all, if it holds no
        more). While generating, the forward hook does the same with statistics carried over the steps."""
        n = keys.shape[-2]
        if n <= self.target_size:
            return CompressedKV(keys, values, indices=torch.arange(n, device=keys.device).expand(*keys.shape[:2], n))
        lengths = torch.full(keys.shape[:2], n, dtype=torch.long, device=keys.device)
        stats = self.initial_stats(keys)
        attention = new_query_attention(module, hidden_states, keys, kwargs)
        self.observe(stats, attention, visible_tokens(keys, hidden_states.shape[1]))
        return self.evict(keys, values, self.keep(stats, lengths), attention)

    # ---- what subclasses define -------------------------------------------------------------------------------
    @abstractmethod
    def observe(self, stats: dict[str, torch.Tensor], attention: torch.Tensor, visible: torch.Tensor) -> None:
        """Update ``stats`` in place with the attention ``(batch, kv_heads, q, n)`` of the forward's new tokens, the
        ``i``-th of which sees the first ``visible[b, h, i]`` tokens of head ``(b, h)``."""

    @abstractmethod
    def keep(self, stats: dict[str, torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        """Increasing positions ``(batch, kv_heads, target_size)`` to keep of each head's ``lengths`` ``(batch,
        kv_heads)`` tokens: all of a head's tokens if it holds at most ``target_size`` (the first ``length``
        entries, padding positions after them)."""

    def evict(self, keys, values, kept: torch.Tensor, attention: torch.Tensor) -> CompressedKV:
        """The layer after eviction: the kept tokens (presses that merge the evicted ones override this)."""
        return CompressedKV(gather_tokens(keys, kept), gather_tokens(values, kept), indices=kept)

    def initial_stats(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """Statistics of a layer's tokens before any observation: zeros ``(batch, kv_heads, n)`` under ``"score"``."""
        return {"score": keys.new_zeros(keys.shape[:3], dtype=torch.float32)}

    # ---- mechanics --------------------------------------------------------------------------------------------
    def forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output, report: CompressionReport):
        cache = find_cache(kwargs)
        if cache is None or is_sliding_layer(module):
            return output
        hidden_states = layer_input(args, kwargs)
        layer_idx, n_new = module.layer_idx, hidden_states.shape[1]
        if is_prefill(cache, module, hidden_states):
            return output  # not this press's phase
        check_decode_layer(self, cache, layer_idx, (VarlenLayer,), "evicts while decoding layers that store whole "
                           "tokens (a transformers DynamicCache or a kvpress VarlenCache)")  # fmt: skip
        ragged = read_ragged_layer(cache, layer_idx)
        if ragged is not None:
            keys, values, lengths = ragged
        else:
            keys, values = read_layer(cache, layer_idx)
            lengths = torch.full(keys.shape[:2], keys.shape[2], dtype=torch.long, device=keys.device)
        n = keys.shape[-2]
        state = report.state.setdefault(("eviction", layer_idx), {"stats": None, "steps": 0})
        stats = state["stats"] or self.initial_stats(keys[..., : n - n_new, :])
        stats = {name: _pad_tokens(t, n) if isinstance(t, torch.Tensor) else t for name, t in stats.items()}
        attention = new_query_attention(module, hidden_states, keys, kwargs, lengths)
        self.observe(stats, attention, visible_tokens(keys, n_new, lengths))
        state["steps"] += n_new
        if state["steps"] >= self.compression_interval and n > self.target_size:
            state["steps"] = 0
            kept = self.keep(stats, lengths)
            kv = self.evict(keys, values, kept, attention)
            if ragged is not None:
                kv.head_lengths = lengths.clamp(max=self.target_size)
            write_layer(cache, layer_idx, kv)
            stats = {name: _gather_tokens(t, kept) if isinstance(t, torch.Tensor) else t for name, t in stats.items()}
            report.decode_compressions[layer_idx] = report.decode_compressions.get(layer_idx, 0) + 1
        state["stats"] = stats
        return output


def _pad_tokens(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` ``(..., m)`` with zeros appended up to ``(..., n)`` (tokens added since the last observation)."""
    return t if t.shape[-1] == n else torch.nn.functional.pad(t, (0, n - t.shape[-1]))


def _gather_tokens(t: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``t`` ``(..., batch, kv_heads, n)`` restricted to ``kept`` ``(batch, kv_heads, k)`` along its last axis."""
    return t.gather(-1, kept.expand(*t.shape[:-3], *kept.shape))


def recent_and_top(score: torch.Tensor, lengths: torch.Tensor, n_keep: int, n_recent: int, n_sink: int = 0):
    """Increasing positions ``(batch, kv_heads, n_keep)`` among each head's ``lengths`` ``(batch, kv_heads)`` tokens:
    the first ``n_sink`` and last ``n_recent``, then the highest ``score`` ``(batch, kv_heads, n)`` among the others
    (ties to the later token). A head of at most ``n_keep`` tokens keeps them all, first, then padding positions."""
    n = score.shape[-1]
    position = torch.arange(n, device=score.device)
    length = lengths[..., None]
    protected = (position < n_sink) | (position >= length - n_recent) | (length <= n_keep)
    ranked = torch.where(protected, float("inf"), score.double())
    ranked = torch.where(position < length, ranked, float("-inf"))
    # A stable ascending sort puts the later of equal scores last: the last n_keep are the kept ones.
    return ranked.argsort(dim=-1, stable=True)[..., n - n_keep :].sort(dim=-1).values
