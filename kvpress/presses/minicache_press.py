"""`MiniCachePress`: adjacent layers from the middle of the model on share one key and one value direction per token."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kvpress.cache.layer_access import read_layer, write_merged_pair
from kvpress.cache.merged_layer import MergedKV
from kvpress.presses.base_press import BasePress
from kvpress.presses.capabilities import Capabilities
from kvpress.utils import attention_layers, full_attention_layer_indices


def slerp_merge(x_a: torch.Tensor, x_b: torch.Tensor, t: float) -> tuple[torch.Tensor, ...]:
    """Shared direction of two layers' vectors ``(..., d)``: SLERP between their unit vectors at ``t`` (0: ``x_a``'s
    direction, 1: ``x_b``'s), renormalised; LERP where the angle is near 0 or pi.

    Returns ``(direction (..., d), norm_a (...), norm_b (...), distance (...))`` in float32 (float64 inputs stay
    float64); ``distance`` is the angle between the two vectors divided by pi, in ``[0, 1]``.
    """
    work = torch.float64 if x_a.dtype == torch.float64 else torch.float32
    x_a, x_b = x_a.to(work), x_b.to(work)
    norm_a, norm_b = x_a.norm(dim=-1), x_b.norm(dim=-1)
    tiny = torch.finfo(work).tiny
    u_a, u_b = x_a / norm_a.clamp_min(tiny)[..., None], x_b / norm_b.clamp_min(tiny)[..., None]
    theta = (u_a * u_b).sum(-1).clamp(-1.0, 1.0).acos()
    sin = theta.sin()
    linear = sin < 1e-6
    safe = torch.where(linear, torch.ones_like(sin), sin)
    w_a = torch.where(linear, torch.full_like(sin, 1 - t), ((1 - t) * theta).sin() / safe)
    w_b = torch.where(linear, torch.full_like(sin, t), (t * theta).sin() / safe)
    direction = w_a[..., None] * u_a + w_b[..., None] * u_b
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(tiny)
    return direction, norm_a, norm_b, theta / math.pi


def merge_layers(keys_a, values_a, keys_b, values_b, t: float, retention_ratio: float) -> tuple[MergedKV, torch.Tensor]:
    """Merge two layers' ``(batch, kv_heads, n, head_dim)`` keys and values.

    The ``ceil(retention_ratio * n)`` tokens per (sequence, kv-head) whose key directions differ most between the two
    layers are kept exactly in both; the others share the SLERP directions (keys and values separately). Returns the
    :class:`MergedKV` (in the keys' dtype) and the ``(batch, kv_heads, n_retained)`` retained positions.
    """
    b, h, n, d = keys_a.shape
    dir_k, mag_k_a, mag_k_b, distance = slerp_merge(keys_a, keys_b, t)
    dir_v, mag_v_a, mag_v_b, _ = slerp_merge(values_a, values_b, t)
    retained_count = min(n, math.ceil(retention_ratio * n))
    order = distance.argsort(dim=-1, descending=True, stable=True)
    retained = order[..., :retained_count].sort(-1).values
    merged = order[..., retained_count:].sort(-1).values
    dtype = keys_a.dtype

    def take(x, idx):
        return x.gather(2, idx[..., None].expand(*idx.shape, x.shape[-1]))

    out = MergedKV(
        dir_k=take(dir_k, merged).to(dtype), dir_v=take(dir_v, merged).to(dtype),
        mag_k_a=mag_k_a.gather(2, merged).to(dtype), mag_k_b=mag_k_b.gather(2, merged).to(dtype),
        mag_v_a=mag_v_a.gather(2, merged).to(dtype), mag_v_b=mag_v_b.gather(2, merged).to(dtype),
        keys_a=take(keys_a, retained), values_a=take(values_a, retained),
        keys_b=take(keys_b, retained), values_b=take(values_b, retained),
    )  # fmt: skip
    return out, retained


@dataclass
class MiniCachePress(BasePress):
    """Cross-layer merging (Liu et al., 2024, "MiniCache: KV Cache Compression in Depth Dimension for Large Language
    Models", arXiv 2405.14366).

    From ``start_layer`` on, consecutive full-attention layers form pairs ``(l, l + 1)``. In a pair, every token's key
    (and, separately, value) is split into a norm per layer and one direction shared by both layers: the SLERP of the
    two unit vectors at ``interpolation``. The ``retention_ratio`` share of tokens whose key directions disagree most
    (largest angle) stay exact in both layers. The cache then stores one direction instead of two vectors for the
    merged tokens of a pair, nearly halving those layers (:class:`~kvpress.cache.merged_layer.MergedLayer`); attention
    scales the shared directions by each layer's norms on the fly.

    Nothing is pruned: every token stays, in some form, in every layer. Questions and decoded tokens are stored
    exactly. The pipeline stores the context in a ``DynamicCache`` (one context at a time; merged layers are not
    stacked in batches, nor quantized).

    Args:
        start_layer: first layer merged; ``None`` is the paper's middle of the model (``n_layers // 2``).
        interpolation: SLERP parameter ``t`` in [0, 1]; the paper's default is 0.6.
        retention_ratio: share of the tokens kept exact in each pair, in [0, 1]; the paper's default is 0.05.
    """

    start_layer: int | None = None
    interpolation: float = 0.6
    retention_ratio: float = 0.05

    def __post_init__(self):
        if self.start_layer is not None and (
            isinstance(self.start_layer, bool) or not isinstance(self.start_layer, int) or self.start_layer < 0
        ):
            raise ValueError(
                f"start_layer must be a non-negative int or None (the middle layer), got {self.start_layer!r}"
            )
        for name in ("interpolation", "retention_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(merges_layers=True, chunked_prefill=True)

    @property
    def compression_ratio(self) -> float:
        """0: MiniCache removes no token (its saving is in bytes: see the pipeline's ``CompressionSummary``)."""
        return 0.0

    def pairs(self, config) -> list[tuple[int, int]]:
        """The merged layer pairs ``(a, b)`` of a model config."""
        layers = full_attention_layer_indices(config)
        n_layers = len(config.layer_types) if getattr(config, "layer_types", None) else config.num_hidden_layers
        start = n_layers // 2 if self.start_layer is None else self.start_layer
        eligible = [i for i in layers if i >= start]
        return [(a, b) for a, b in zip(eligible[::2], eligible[1::2]) if b == a + 1]

    def validate(self, model: nn.Module) -> None:
        super().validate(model)
        n_layers = len(attention_layers(model))
        if self.start_layer is not None and self.start_layer >= n_layers:
            raise ValueError(
                f"start_layer={self.start_layer} is beyond the model's {n_layers} layers; accepted: < {n_layers}"
            )
        if not self.pairs(attention_layers(model)[0].config):
            raise ValueError(
                f"no two adjacent full-attention layers from start_layer={self.start_layer} on: nothing to merge "
                "(lower start_layer)"
            )

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        raise NotImplementedError("MiniCachePress merges layer pairs in compress_prefill, never one layer alone")

    def compress_prefill_chunk(self, module, cache, hidden_states, kwargs, report) -> None:
        """Chunked prefill: the pairs are merged once, from the whole context, after its last chunk (every token is
        kept, so earlier chunks leave the layers whole)."""
        start, end, n = report.prefill_chunk
        keys, values = read_layer(cache, module.layer_idx)
        if end == n:
            self.compress_prefill(module, cache, hidden_states, keys, values, None, kwargs, report)
        else:
            report.record(module.layer_idx, n_tokens=end, lengths=torch.full(keys.shape[:2], end, dtype=torch.long))

    def compress_prefill(self, module, cache, hidden_states, keys, values, attentions, kwargs, report) -> None:
        layer_idx, n = module.layer_idx, keys.shape[-2]
        partner = {b: a for a, b in self.pairs(module.config)}.get(layer_idx)
        if partner is None:
            return  # an unmerged layer, or the first of a pair (merged when its partner has run)
        keys_a, values_a = read_layer(cache, partner)
        if keys_a is None or keys_a.shape != keys.shape:
            raise ValueError(f"layers {partner} and {layer_idx} must both hold this prefill's {n} tokens to be merged")
        merged, _ = merge_layers(keys_a, values_a, keys, values, self.interpolation, self.retention_ratio)
        write_merged_pair(cache, partner, layer_idx, merged)
        every = torch.full(keys.shape[:2], n, dtype=torch.long)
        for idx in (partner, layer_idx):
            report.record(idx, n_tokens=n, lengths=every)
