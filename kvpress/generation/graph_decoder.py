"""`GraphDecoder`: greedy decoding over a compressed :class:`VarlenCache` by replaying one CUDA-graph-captured step.

An eager decode step is a Python loop over the model's layers with several kernel launches each; at batch 1 the
host, not the GPU, sets the pace. Captured once, a step replays as a single graph launch. The step reads its token
and position from static device buffers and writes the next ones back into them, so replays chain on the device
with no host sync; tokens are read back at the end (or every ``check_every`` steps to look for end-of-sequence).
"""

from __future__ import annotations

import torch
from torch import nn

from kvpress.cache.attention import compressed_attention
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.layer_access import restore_cache, snapshot_cache
from kvpress.cache.quest_layer import QuestLayer
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.cache.varlen_layer import VarlenLayer


def greedy_step(model: nn.Module, cache: VarlenCache, ids: torch.Tensor, positions: torch.Tensor) -> None:
    """One greedy decode step, in place: ``ids`` ``(batch, 1)`` becomes the argmax next token, ``positions`` += 1.

    This is the work :class:`GraphDecoder` captures; run it under :func:`compressed_attention` and without autograd.
    """
    out = model(input_ids=ids, **cache_kwargs(model, cache), position_ids=positions, use_cache=True, logits_to_keep=1)
    ids.copy_(out.logits[:, -1:].argmax(-1))
    positions.add_(1)


def advance_host_tails(cache: VarlenCache, n_tokens: int) -> None:
    """Advance the host mirror of every compressed layer of ``cache`` by ``n_tokens`` (see
    :meth:`VarlenLayer.advance_host_tail`; a :class:`QuestLayer`'s ``length``); all layers are checked before any is
    changed."""
    layers = [layer for layer in cache.layers if isinstance(layer, VarlenLayer) and layer.ragged]
    for layer in layers:
        if not 0 <= layer.tail_len + n_tokens <= layer.tail_k.shape[2]:
            layer.advance_host_tail(n_tokens)  # raises, naming the bounds
    paged = [layer for layer in cache.layers if isinstance(layer, QuestLayer)]
    for layer in paged:
        if not 0 <= layer.length + n_tokens <= layer.paged.capacity:
            raise ValueError(
                f"advancing a QuestLayer by {n_tokens} tokens leaves [0, {layer.paged.capacity}] (its capacity) from "
                f"{layer.length}"
            )
    for layer in layers:
        layer.advance_host_tail(n_tokens)
    for layer in paged:
        layer.length += n_tokens


def check_graph_cache(cache) -> None:
    """Raise ``ValueError`` unless every layer of ``cache`` is a compressed :class:`VarlenLayer` or a
    :class:`QuestLayer`.

    A captured step must append and attend through fixed buffers; dense layers (uncompressed, or Gemma3's
    sliding-window layers) grow by concatenation, which a graph cannot replay.
    """
    if not isinstance(cache, VarlenCache):
        raise ValueError(f"cache must be a compressed kvpress VarlenCache, got {type(cache).__name__}")
    if not cache.layers:
        raise ValueError("cache is empty: prefill it under a press before graph decoding")
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, QuestLayer):
            continue  # appends in place into its paged buffer; reads pages whatever the length
        if not isinstance(layer, VarlenLayer):
            raise ValueError(
                f"cache layer {i} is a {type(layer).__name__} (sliding-window layers stay dense); graph decoding "
                "needs every layer compressed into a VarlenLayer or paged in a QuestLayer (accepted: models without "
                "sliding-window layers)"
            )
        if not layer.ragged:
            raise ValueError(
                f"cache layer {i} is not compressed: run the prefill under a press (KnormPress(0.0) moves every "
                "token) before graph decoding"
            )
    if getattr(cache, "offloading", False):
        raise ValueError("cache offloading moves tensors between devices each forward; graph decoding needs it off")
    if cache.new_token_lengths is not None:
        raise ValueError("cache.new_token_lengths must be None while decoding (every new token is valid)")


class GraphDecoder:
    """Greedy decoding of ``model`` over a compressed ``cache``, one captured CUDA-graph step replayed per token.

    Construction reserves tail room for ``max_new_tokens`` tokens in every layer, warms the step up on a side
    stream (compiles the kernels; the cache is restored afterwards) and captures it. The cache holds the same tokens
    and lengths afterwards (only its tail capacity grew). Then :meth:`decode` (or :meth:`replay`) generates tokens.

    The graph holds the addresses of the cache's buffers: anything that reallocates them (growing past the reserved
    capacity, :func:`restore_cache`, ``batch_select_indices``) makes the decoder stale, and its calls raise
    ``ValueError``; build a new one then. Eager forwards in between are fine (``tail_lens`` is updated in place),
    unless one makes a quantized layer flush its full-precision tail into new segments: the next call then raises.
    """

    def __init__(self, model: nn.Module, cache: VarlenCache, max_new_tokens: int, warmup_steps: int = 3):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        check_graph_cache(cache)
        device = _lengths(cache.layers[0]).device
        if device.type != "cuda" or model.device.type != "cuda":
            raise ValueError(f"GraphDecoder captures CUDA graphs: model and cache must be on a CUDA device, got "
                             f"model on {model.device} and cache on {device}")  # fmt: skip
        self.model, self.cache = model, cache
        self.batch_size = _lengths(cache.layers[0]).shape[0]
        # Room for decoding and warm-up (both run for real; capture itself writes nothing).
        cache.reserve(max(max_new_tokens, warmup_steps))
        self._ids = torch.zeros(self.batch_size, 1, dtype=torch.long, device=device)
        self._positions = torch.full_like(self._ids, cache.get_seq_length())
        self._graph = torch.cuda.CUDAGraph()

        state = snapshot_cache(cache)
        with self._grad_mode(), compressed_attention(model):
            # Warm-up on a side stream (kernels compile, lazy state settles), then back to the state before it.
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            try:
                with torch.cuda.stream(stream):
                    for _ in range(warmup_steps):
                        greedy_step(model, cache, self._ids, self._positions)
            finally:
                torch.cuda.current_stream(device).wait_stream(stream)
                restore_cache(cache, state)
            del state
            host_lengths = [host_length(layer) for layer in cache.layers]
            try:
                with torch.cuda.graph(self._graph):
                    greedy_step(model, cache, self._ids, self._positions)
            finally:
                # The capture ran the step's Python (one token counted per layer) but executed nothing.
                for layer, n in zip(cache.layers, host_lengths):
                    set_host_length(layer, n)
        self._storage = self._storage_key()

    # ---- decoding --------------------------------------------------------------------------------------------
    def decode(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor | int | None,
        n_steps: int,
        eos_token_id: int | list[int] | None = None,
        check_every: int = 32,
    ) -> torch.Tensor:
        """Generate up to ``n_steps`` greedy tokens; returns them as ``(batch, steps done)`` long on the device.

        ``input_ids`` ``(batch, 1)``: the last token, not yet in the cache, at ``position_ids`` ``(batch, 1)`` (or
        one int for the whole batch). ``None`` for both continues from where the previous call stopped. With
        ``eos_token_id``, the tokens are read back every ``check_every`` steps and decoding stops once every
        sequence has produced one of them (later tokens of a finished sequence are returned too; trim them).
        """
        if not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be an int >= 0, got {n_steps!r}")
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
        self._check_ready(n_steps)
        self._set_inputs(input_ids, position_ids)
        tokens = torch.empty(self.batch_size, n_steps, dtype=torch.long, device=self._ids.device)
        eos = None if eos_token_id is None else torch.as_tensor(eos_token_id, device=tokens.device).reshape(-1)
        finished = torch.zeros(self.batch_size, dtype=torch.bool, device=tokens.device)
        done = 0
        try:
            while done < n_steps:
                self._graph.replay()
                tokens[:, done].copy_(self._ids[:, 0])
                done += 1
                if eos is not None and (done % check_every == 0 or done == n_steps):
                    start = (done - 1) // check_every * check_every
                    finished |= torch.isin(tokens[:, start:done], eos).any(1)
                    if bool(finished.all()):  # the only host sync, once per check_every steps
                        break
        finally:
            advance_host_tails(self.cache, done)
        return tokens[:, :done]

    def replay(self) -> torch.Tensor:
        """One decode step from the current static buffers, without host sync.

        Returns the static ``(batch, 1)`` buffer that holds the generated token (the next replay overwrites it).
        """
        self._check_ready(1)
        self._graph.replay()
        advance_host_tails(self.cache, 1)
        return self._ids

    # ---- internals -------------------------------------------------------------------------------------------
    def _set_inputs(self, input_ids, position_ids) -> None:
        if (input_ids is None) != (position_ids is None):
            raise ValueError("pass input_ids and position_ids together, or neither (continue the previous call)")
        if input_ids is None:
            return
        if tuple(input_ids.shape) != (self.batch_size, 1):
            raise ValueError(f"input_ids must have shape ({self.batch_size}, 1), got {tuple(input_ids.shape)}")
        if isinstance(position_ids, torch.Tensor) and tuple(position_ids.shape) != (self.batch_size, 1):
            raise ValueError(
                f"position_ids must be an int or have shape ({self.batch_size}, 1), got {tuple(position_ids.shape)}"
            )
        with torch.no_grad():
            self._ids.copy_(input_ids)
            if isinstance(position_ids, torch.Tensor):
                self._positions.copy_(position_ids)
            else:
                self._positions.fill_(int(position_ids))

    def _check_ready(self, n_steps: int) -> None:
        if self._storage_key() != self._storage:
            raise ValueError(
                "the cache's buffers changed since capture (restore_cache, batch_select_indices or tail growth); "
                "build a new GraphDecoder"
            )
        room = min(_room(layer) for layer in self.cache.layers)
        if n_steps > room:
            raise ValueError(
                f"n_steps={n_steps} exceeds the {room} tokens of tail capacity left in the captured buffers; "
                "build a new GraphDecoder with a larger max_new_tokens"
            )

    def _storage_key(self) -> tuple:
        """Identity of every buffer the captured graph reads or writes."""
        names = ("seg_k", "seg_v", "cu_seqlens", "tail_k", "tail_v", "tail_lens")
        paged = ("keys", "values", "page_min", "page_max", "lengths")
        return tuple(
            (id(layer), getattr(layer, "ragged", False))
            + tuple(t.data_ptr() if isinstance(t, torch.Tensor) else None for t in map(layer.__dict__.get, names))
            + (tuple(getattr(layer.paged, n).data_ptr() for n in paged) if isinstance(layer, QuestLayer) else ())
            # Quantized layers: a flush replaces the segments (the graph would read freed storage).
            + (_segments_address(layer.__dict__.get("segs")),)
            for layer in self.cache.layers
        )

    def _grad_mode(self):
        # In-place updates of inference tensors are only allowed in inference mode, and of ordinary ones outside it
        # they stay ordinary: follow how the cache was built.
        return torch.inference_mode() if _lengths(self.cache.layers[0]).is_inference() else torch.no_grad()


def _lengths(layer) -> torch.Tensor:
    """The ``(batch,)`` device lengths a layer appends at (a compressed layer's tail, a QuestLayer's buffer)."""
    return layer.paged.lengths if isinstance(layer, QuestLayer) else layer.tail_lens


def host_length(layer) -> int:
    """The host mirror of where a layer appends next (a compressed layer's tail length, a QuestLayer's length)."""
    return layer.length if isinstance(layer, QuestLayer) else layer.tail_len


def set_host_length(layer, n: int) -> None:
    """Set the host mirror :func:`host_length` reads."""
    if isinstance(layer, QuestLayer):
        layer.length = n
    else:
        layer.tail_len = n


def _room(layer) -> int:
    """Tokens a layer can still append without reallocating."""
    if isinstance(layer, QuestLayer):
        return layer.paged.capacity - layer.length
    return layer.tail_k.shape[2] - layer.tail_len


def _segments_address(segs) -> int | None:
    """Address of a quantized layer's packed keys (``None`` for layers without quantized segments)."""
    return segs.k_packed.data_ptr() if segs is not None else None
