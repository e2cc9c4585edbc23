"""`DecodingPress`: keep a layer's cache bounded while generating, by re-compressing it every few tokens."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from kvpress.cache.compressed_kv import CompressedKV
from kvpress.cache.forward_keyword import find_cache
from kvpress.cache.layer_access import read_layer, read_ragged_layer, write_layer
from kvpress.cache.varlen_layer import VarlenLayer
from kvpress.presses.base_press import BasePress, is_prefill, layer_input
from kvpress.presses.budget import check_int
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.key_rerotation_press import rerotate_keys
from kvpress.presses.report import CompressionReport
from kvpress.presses.scorer_press import ScorerPress, gather_tokens, score_ragged
from kvpress.utils import attention_layers, is_sliding_layer


@dataclass
class _Buffer:
    """The last generated tokens' attention inputs of one layer: hidden states ``(batch, m, hidden)`` and their
    rotary ``(cos, sin)`` ``(batch, m, rot_dim)`` (scorers rebuild the tokens' queries from them)."""

    hidden: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    steps: int = 0  # tokens appended since the last re-compression

    def push(self, hidden: torch.Tensor, position_embeddings, size: int, steps: int) -> None:
        """Keep the last ``size`` of the buffered and the new inputs; ``steps`` tokens were appended (at least the
        rows of ``hidden``: a decoder that recorded only the last ones says how many steps they close)."""
        cos, sin = position_embeddings
        parts = zip((self.hidden, self.cos, self.sin), (hidden, cos, sin))
        self.hidden, self.cos, self.sin = (x if old is None else torch.cat([old, x], 1)[:, -size:] for old, x in parts)
        self.steps += steps


@dataclass
class DecodingPress(BasePress):
    """Re-compress every layer to ``target_size`` tokens per (sequence, kv head) each ``compression_interval``
    generated tokens, with the scores of ``press``; the prompt is left whole (wrap both phases with
    :class:`PrefillDecodingPress`). The cache then holds at most ``target_size + compression_interval`` tokens per
    head, however long the output.

    Args:
        press: the scorer that picks the kept tokens (any :class:`ScorerPress` that reads no attention weights; its
            own budget is replaced by ``target_size``). Query-window scorers (SnapKV) see the last generated tokens.
        compression_interval: generated tokens between two re-compressions of a layer.
        target_size: tokens per (sequence, kv head) a layer keeps after each re-compression.
        hidden_states_buffer: generated tokens whose hidden states are kept for the scorer (at least its window).
        rerotate: positions inside the cache (StreamingLLM's): each re-compression re-rotates the kept keys to
            positions ``0..k-1`` and every new token is placed right after the cache, so positions never exceed
            ``target_size + compression_interval`` however long the output (generation past the model's context
            length). The prompt must be uncompressed or compressed with re-rotation too; not for models with
            sliding-window layers (they keep their original positions).

    StreamingLLM as published (attention sinks and a rolling window, evicting at every step, cache positions) is
    ``DecodingPress(StreamingLLMPress(n_sink=4), compression_interval=1, target_size=window + 4, rerotate=True)``.

    Each re-compression reads the layer whole and writes the kept tokens back, so its cost is amortized over the
    interval; between re-compressions a step costs what it costs uncompressed. Layers of a transformers
    ``DynamicCache`` and head-variable layers of a ``VarlenCache`` (after a head-variable prefill press): there a
    head over ``target_size`` keeps its best, scored over its own tokens (:meth:`recompress_ragged`), and the kept
    rows become the layer's ragged context.
    """

    press: ScorerPress = None
    compression_interval: int = 512
    target_size: int = 2048
    hidden_states_buffer: int = 256
    rerotate: bool = False
    _scorer: ScorerPress = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self):
        if not isinstance(self.press, ScorerPress):
            kind = type(self.press).__name__
            raise ValueError(f"press must be a ScorerPress (KnormPress, SnapKVPress, TOVAPress, ...), got {kind}")
        if self.press.capabilities.needs_attention_weights:
            raise ValueError(
                f"{type(self.press).__name__} reads the attention weights of its forward, which a decode step (one "
                "query) cannot provide for the tokens it scores; pass a scorer that reads keys or hidden states"
            )
        for name in ("compression_interval", "target_size", "hidden_states_buffer"):
            check_int(getattr(self, name), name, 1)
        if not isinstance(self.rerotate, bool):
            raise ValueError(f"rerotate must be True or False, got {self.rerotate!r}")
        window = getattr(self.press, "window_size", 0) or 0
        if window > self.hidden_states_buffer:
            raise ValueError(
                f"hidden_states_buffer={self.hidden_states_buffer} is smaller than the scorer's window_size={window}; "
                f"accepted: hidden_states_buffer >= {window}"
            )
        if window > self.target_size:
            raise ValueError(f"target_size={self.target_size} must keep the scorer's window ({window} tokens)")
        self._scorer = dataclasses.replace(self.press, compression_ratio=0.0, target_size=self.target_size)

    @property
    def capabilities(self) -> Capabilities:
        inner = self.press.capabilities
        return dataclasses.replace(
            inner, phase="decode", rerotates_positions=self.rerotate, decodes_head_variable=not self.rerotate
        )

    def validate(self, model: nn.Module) -> None:
        super().validate(model)
        self.press.validate(model)
        if self.rerotate and any(is_sliding_layer(m) for m in attention_layers(model)):
            raise ValueError(
                f"rerotate=True places tokens at positions inside the cache, which {type(model).__name__}'s "
                "sliding-window layers (kept whole, at their original positions) cannot follow; pass rerotate=False"
            )

    @contextlib.contextmanager
    def __call__(self, model: nn.Module, record_kept: bool = False) -> Iterator[CompressionReport]:
        with super().__call__(model, record_kept) as report:
            if not self.rerotate:
                yield report
                return
            decoder = getattr(model, "base_model", model)
            hook = functools.partial(_cache_positions, rotary=_rotary_module(model), report=report)
            handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
            try:
                yield report
            finally:
                handle.remove()

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        """One re-compression: the scorer, with the budget ``target_size``."""
        return self._scorer.compress(module, hidden_states, keys, values, attentions, kwargs)

    def forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output, report: CompressionReport):
        cache = find_cache(kwargs)
        if cache is None or is_sliding_layer(module):
            return output
        hidden_states = layer_input(args, kwargs)
        layer_idx = module.layer_idx
        if is_prefill(cache, module, hidden_states):
            return output  # not this press's phase
        check_decode_layer(self, cache, layer_idx, (VarlenLayer,), "re-compresses while decoding layers that store "
                           "whole tokens (a transformers DynamicCache or a kvpress VarlenCache)")  # fmt: skip
        self.observe(module, cache, hidden_states, kwargs["position_embeddings"], kwargs, report)
        return output

    def observe(self, module, cache, hidden_states, position_embeddings, kwargs: dict, report, n_steps=None) -> None:
        """Count ``n_steps`` tokens generated into ``module``'s layer of ``cache`` (default: the ``m`` rows of
        ``hidden_states`` ``(batch, m, hidden)``, the last inputs, with their rotary ``(cos, sin)``), and re-compress
        the layer once ``compression_interval`` have been.

        The hook calls it at every decode forward; a decoder that runs steps without hooks (a replayed CUDA graph)
        calls it after them with the last recorded inputs (``hidden_states_buffer`` of them suffice) and the count."""
        steps = hidden_states.shape[1] if n_steps is None else n_steps
        if steps < hidden_states.shape[1]:
            raise ValueError(f"n_steps={n_steps} is fewer than the {hidden_states.shape[1]} inputs given")
        buffer = report.state.setdefault(("decoding", module.layer_idx), _Buffer())
        buffer.push(hidden_states.detach(), position_embeddings, self.hidden_states_buffer, steps)
        if buffer.steps < self.compression_interval:
            return
        buffer.steps = 0
        self.recompress(module, cache, buffer, kwargs, report)

    def steps_to_recompression(self, report: CompressionReport) -> int:
        """Decode steps until the next re-compression of some layer (``compression_interval`` before the first)."""
        done = [v.steps for k, v in report.state.items() if isinstance(k, tuple) and k[0] == "decoding"]
        return self.compression_interval - max(done, default=0)

    def recompress(self, module, cache, buffer: _Buffer, kwargs: dict, report: CompressionReport) -> None:
        """Bring ``module``'s layer of ``cache`` back to ``target_size`` tokens per head."""
        layer_idx = module.layer_idx
        scorer_kwargs = {**kwargs, "position_embeddings": (buffer.cos, buffer.sin)}
        ragged = read_ragged_layer(cache, layer_idx)
        if ragged is not None:
            kv = self.recompress_ragged(module, buffer.hidden, *ragged, scorer_kwargs)
        else:
            keys, values = read_layer(cache, layer_idx)
            if keys.shape[-2] <= self.target_size:
                return
            kv = self.compress(module, buffer.hidden, keys, values, None, scorer_kwargs)
            kv = kv if isinstance(kv, CompressedKV) else CompressedKV(*kv)
        if kv is None:
            return
        if self.rerotate:  # cache positions: a token's position is its index in the cache
            kv.keys = rerotate_keys(kv.keys, kv.indices, report.state["rope"])
        write_layer(cache, layer_idx, kv)
        report.decode_compressions[layer_idx] = report.decode_compressions.get(layer_idx, 0) + 1

    def recompress_ragged(self, module, hidden, keys, values, lengths, kwargs) -> CompressedKV | None:
        """The kept tokens of a head-variable layer, given as ``keys, values`` ``(batch, kv_heads, L, head_dim)``
        holding ``lengths`` ``(batch, kv_heads)`` tokens per head from position 0: heads over ``target_size`` keep
        their ``target_size`` best, the others everything. A head is scored over its own tokens only: the scorer
        runs once per distinct length above the target, on the first ``n`` positions (exact for heads of length
        ``n``), so query windows, softmaxes and positions are those of the head alone. ``None`` if no head is over."""
        if self.rerotate:
            raise ValueError(
                "rerotate=True places new tokens right after the cache, which has no single length when heads hold "
                "different numbers of tokens (a head-variable cache); pass rerotate=False"
            )
        target = self.target_size
        if int(lengths.max()) <= target:
            return None
        # Heads within the target keep everything: +inf on their tokens, without scoring them.
        over = torch.where(lengths > target, lengths, 0)
        scores = score_ragged(self._scorer, module, hidden, keys, values, over, kwargs)
        position = torch.arange(keys.shape[2], device=keys.device)
        scores = torch.where((over == 0)[..., None] & (position < lengths[..., None]), float("inf"), scores)
        kept = scores.topk(min(target, keys.shape[2]), dim=-1).indices.sort(dim=-1).values  # valid ones first
        return CompressedKV(gather_tokens(keys, kept), gather_tokens(values, kept), indices=kept,
                            head_lengths=lengths.clamp(max=target))  # fmt: skip


def _rotary_module(model: nn.Module) -> nn.Module:
    for name, module in model.named_modules():
        if name.endswith("rotary_emb") and getattr(module, "inv_freq", None) is not None:
            return module
    raise ValueError(f"rerotate=True needs the model's rotary embedding; {type(model).__name__} has none")


def _cache_positions(decoder: nn.Module, args: tuple, kwargs: dict, rotary: nn.Module, report: CompressionReport):
    """Decoder pre-hook of re-rotating presses: forwards over a filled cache place their tokens right after it, and
    the rotary table of every cache position (``report.state["rope"]``) is kept up to date for re-rotation."""
    cache = find_cache(kwargs)
    if cache is None or cache.get_seq_length() == 0:
        return None  # the prefill keeps the prompt's own positions
    inputs = kwargs.get("input_ids")
    inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
    batch, n = inputs.shape[:2]
    start = cache.get_seq_length()
    positions = torch.arange(start, start + n, device=inputs.device)
    kwargs["position_ids"] = positions[None].expand(batch, n)
    if kwargs.get("cache_position") is not None:
        kwargs["cache_position"] = positions
    table = report.state.get("rope")
    if table is None or table[0].shape[1] < start + n:
        length = max(2 * (start + n), 64)  # grown geometrically: rebuilt O(log n) times
        dtype = next(decoder.parameters()).dtype  # the dtype the model's own rotation uses for its keys
        dummy = torch.zeros(1, dtype=dtype, device=inputs.device)
        report.state["rope"] = rotary(dummy, torch.arange(length, device=inputs.device)[None])
    return args, kwargs


def check_decode_layer(press: BasePress, cache, layer_idx: int, accepted: tuple[type, ...], needs: str) -> None:
    """``ValueError`` unless layer ``layer_idx`` of ``cache`` is a transformers layer or exactly one of the ``accepted``
    kvpress layer types: a decode-time press reads and rewrites whole tokens, which quantized, channel-pruned or merged
    layers (and ragged ones, for presses that do not accept them) do not hold. ``needs`` says what the press needs."""
    layer = cache.layers[layer_idx]
    if hasattr(layer, "dense_keys_values") and type(layer) not in accepted:
        raise ValueError(
            f"{type(press).__name__} {needs}; this {type(cache).__name__} holds {type(layer).__name__} layers"
        )
