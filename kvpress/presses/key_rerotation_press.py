"""`KeyRerotationPress`: keep an inner scorer's tokens and move their keys to contiguous positions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from kvpress.presses.capabilities import Capabilities
from kvpress.presses.scorer_press import keep_tokens
from kvpress.presses.scorer_wrapper_press import ScorerWrapperPress
from kvpress.utils import apply_rope, full_attention_layer_indices


def rerotate_keys(keys: torch.Tensor, positions: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Rotate post-RoPE ``keys`` from their original ``positions`` to positions ``0..k-1``.

    Args:
        keys: ``(batch, kv_heads, k, head_dim)`` keys rotated at ``positions``.
        positions: ``(batch, kv_heads, k)`` int64 original positions (indices into ``position_embeddings``).
        position_embeddings: the layer's ``(cos, sin)``, each ``(batch or 1, n, rot_dim)``; row ``i`` is position
            ``i``.
    Returns:
        ``(batch, kv_heads, k, head_dim)`` keys, in ``keys.dtype``, as the model would have rotated them at ``0..k-1``.
    """
    b, h, k, d = keys.shape
    cos, sin = (t.float().expand(b, -1, -1) for t in position_embeddings)
    rot = cos.shape[-1]

    def at_positions(t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # (b, n, rot) -> (b * h, k, rot)
        t = t[:, None].expand(b, h, -1, rot)
        return t.gather(2, pos[..., None].expand(b, h, k, rot)).reshape(b * h, k, rot)

    new_positions = torch.arange(k, device=keys.device).expand(b, h, k)
    cos_old, sin_old = at_positions(cos, positions), at_positions(sin, positions)
    cos_new, sin_new = at_positions(cos, new_positions), at_positions(sin, new_positions)
    # One head per "batch" row so that every head gets its own old angles.
    x = keys.float().reshape(b * h, 1, k, d)
    x = apply_rope(apply_rope(x, cos_old, sin_old, inverse=True), cos_new, sin_new)
    # cos and sin both carry the model's attention scaling s, so undoing and redoing left an extra factor s**2.
    scale_sq = (cos_old.square() + sin_old.square()).unsqueeze(1)
    x = torch.cat((x[..., :rot] / scale_sq, x[..., rot:]), dim=-1)
    return x.reshape(b, h, k, d).to(keys.dtype)


@dataclass
class KeyRerotationPress(ScorerWrapperPress):
    """Keep the inner press's top tokens in their original order and re-rotate their keys to positions ``0..k-1``.

    The kept cache then looks like a contiguous context of ``k`` tokens, so new tokens continue at position ``k``
    (the pipeline reads ``capabilities.rerotates_positions``). Relative distances between kept tokens shrink to the
    number of kept tokens between them. The old rotation is undone and the new one applied with the layer's own
    ``position_embeddings`` (which cover positions ``0..n-1`` in a prefill), in float32, so any RoPE type and scaling
    works, including partial rotary embeddings. Models with sliding-window layers are refused: those layers are not
    compressed and keep their keys at the original positions, which decoding from position ``k`` would contradict.

    Args:
        press: the scorer choosing the tokens; its budget gives ``k``.
    """

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(self.press.capabilities, rerotates_positions=True, chunked_prefill=False)

    def validate(self, model: nn.Module) -> None:
        super().validate(model)
        config = model.config
        n_sliding = config.num_hidden_layers - len(full_attention_layer_indices(config))
        if n_sliding:
            raise ValueError(
                f"KeyRerotationPress cannot run on {type(model).__name__}: its {n_sliding} sliding-window layers keep "
                "their keys at the original positions while decoding would continue from the compressed length; "
                "accepted: models whose layers all attend over the full context"
            )

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        n = keys.shape[-2]
        k = self.press.n_kept(n, module)
        if k >= n:
            return keys, values  # already at positions 0..n-1
        kv = keep_tokens(keys, values, *self.top_indices(module, hidden_states, keys, values, attentions, kwargs, k))
        kv.keys = rerotate_keys(kv.keys, kv.indices, kwargs["position_embeddings"])
        return kv
