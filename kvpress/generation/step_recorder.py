"""`StepRecorder`: the attention inputs of the last decode steps, kept in fixed device buffers a CUDA graph can write.

A decode-time press (:class:`~kvpress.presses.decoding_press.DecodingPress`) scores the cache with the queries of the
last generated tokens, which it rebuilds from each attention layer's input hidden states and rotary ``(cos, sin)``.
Its hooks collect them in Python, which a replayed graph never runs. The recorder's hooks only copy them into ring
buffers at a device-side slot, so a captured step records them on every replay, with no host sync.
"""

from __future__ import annotations

import torch
from torch import nn

from kvpress.presses.base_press import layer_input
from kvpress.utils import attention_layers, is_sliding_layer


class StepRecorder:
    """Ring buffers of the last ``size`` one-token steps' attention inputs of every full-attention layer.

    ``with StepRecorder(model, size) as recorder:`` hooks the model; every forward of one token per sequence writes
    layer ``i``'s hidden states ``(batch, 1, hidden)`` and ``(cos, sin)`` ``(batch, 1, rot_dim)`` at the current
    slot, which advances once per forward (a decoder pre-hook). Buffers are allocated at the first forward, so run one
    eagerly before capturing a graph (warm-up does). :meth:`last` reads them back in generation order.
    """

    def __init__(self, model: nn.Module, size: int):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        self.model, self.size = model, size
        self.slot: torch.Tensor | None = None  # () long: where the newest step sits
        self.rings: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._handles = []

    def __enter__(self) -> "StepRecorder":
        decoder = getattr(self.model, "base_model", self.model)
        self._handles.append(decoder.register_forward_pre_hook(self._advance))
        for module in attention_layers(self.model):
            if not is_sliding_layer(module):
                self._handles.append(module.register_forward_hook(self._record, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _advance(self, module: nn.Module, args: tuple) -> None:
        if self.slot is None:
            device = next(module.parameters()).device
            self.slot = torch.full((), self.size - 1, dtype=torch.long, device=device)
        self.slot.add_(1).remainder_(self.size)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        hidden = layer_input(args, kwargs)
        if hidden.shape[1] != 1:
            raise ValueError(f"StepRecorder records one-token decode steps; a forward of {hidden.shape[1]} tokens ran")
        cos, sin = kwargs["position_embeddings"]
        ring = self.rings.get(module.layer_idx)
        if ring is None:
            ring = tuple(x.new_zeros(x.shape[0], self.size, x.shape[-1]) for x in (hidden, cos, sin))
            self.rings[module.layer_idx] = ring
        for buffer, x in zip(ring, (hidden, cos, sin)):
            buffer.index_copy_(1, self.slot.reshape(1), x.detach().to(buffer.dtype))

    def last(self, layer_idx: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``layer_idx``'s last ``min(n, size)`` steps, oldest first: hidden ``(batch, m, hidden)``, cos and
        sin ``(batch, m, rot_dim)``."""
        m = min(n, self.size)
        if layer_idx not in self.rings or m < 1:
            raise ValueError(f"no steps recorded for layer {layer_idx} (n={n})")
        order = (self.slot + 1 + torch.arange(self.size, device=self.slot.device)) % self.size
        order = order[self.size - m :]
        return tuple(buffer.index_select(1, order) for buffer in self.rings[layer_idx])
