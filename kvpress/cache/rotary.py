"""`rotary_table`: the rotary embedding of a model's full-attention layers, for caches that store keys before RoPE."""

from __future__ import annotations

from torch import nn

from kvpress_kernels import RotaryTable

# Rotary variants whose frequencies change with the sequence length: keys stored before RoPE would be rotated back
# with frequencies other than the ones the model used.
_LENGTH_DEPENDENT = ("dynamic", "longrope")


def rotary_table(model: nn.Module) -> RotaryTable:
    """The ``inv_freq`` ``(head_dim / 2,)`` and ``attention_scaling`` of ``model``'s rotary embedding module.

    Raises:
        ValueError: no rotary embedding with ``inv_freq`` is found, it rotates only part of the head, or its
            frequencies depend on the sequence length (dynamic NTK, LongRoPE).
    """
    for name, module in model.named_modules():
        inv_freq = getattr(module, "inv_freq", None)
        if name.endswith("rotary_emb") and inv_freq is not None:
            rope_type = getattr(module, "rope_type", "default")
            if isinstance(rope_type, str) and any(kind in rope_type for kind in _LENGTH_DEPENDENT):
                raise ValueError(
                    f"the model's RoPE ({rope_type!r}) changes its frequencies with the sequence length, so keys "
                    "cannot be stored before RoPE; use pre_rope=False"
                )
            head_dim = getattr(model.config.get_text_config(), "head_dim", None)
            if head_dim is not None and 2 * inv_freq.numel() != head_dim:
                raise ValueError(
                    f"the model rotates {2 * inv_freq.numel()} of its {head_dim} head channels (partial RoPE); keys "
                    "stored before RoPE need a full rotation: use pre_rope=False"
                )
            return RotaryTable(
                inv_freq.detach().float().cpu().clone(), float(getattr(module, "attention_scaling", 1.0))
            )
    raise ValueError(
        f"{type(model).__name__} has no rotary embedding module (a `rotary_emb` with `inv_freq`): keys cannot be "
        "stored before RoPE; use pre_rope=False"
    )
