"""Read and replace one layer of a transformers cache (the only place that knows cache layer internals)."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvpress.cache.channel_pruned_layer import ChannelPrunedLayer
from kvpress.cache.compressed_kv import CompressedKV
from kvpress.cache.merged_layer import MergedKV
from kvpress.cache.quantized_layer import QuantizedVarlenLayer
from kvpress.cache.varlen_layer import VarlenLayer
from kvpress.utils import kv_geometry, layer_types


def _layer(cache: Cache, layer_idx: int):
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    return layers[layer_idx]


def read_layer(cache: Cache, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Dense ``(batch, kv_heads, seq, head_dim)`` keys and values of a layer, or ``(None, None)`` if it is empty."""
    layer = _layer(cache, layer_idx)
    if layer is None:
        return None, None
    if hasattr(layer, "dense_keys_values"):
        return layer.dense_keys_values()
    if isinstance(layer, DynamicLayer) and layer.is_initialized and layer.keys is not None and layer.keys.numel():
        return layer.keys, layer.values
    return None, None


def read_ragged_layer(cache: Cache, layer_idx: int):
    """``(keys, values, lengths)`` of a compressed head-variable layer (:meth:`VarlenLayer.padded_keys_values`: each
    head's tokens from position 0, zero padded), or ``None`` for a layer stored densely (:func:`read_layer` reads it).
    Quantized layers raise ``ValueError`` (their tokens are not stored whole)."""
    layer = _layer(cache, layer_idx)
    if isinstance(layer, QuantizedVarlenLayer):
        raise ValueError(
            "re-compressing while decoding reads whole tokens; a QuantizedCache layer stores them quantized"
        )
    if isinstance(layer, VarlenLayer) and layer.ragged:
        return layer.padded_keys_values()
    return None


def holds_kvpress_layers(cache: Cache) -> bool:
    """Whether some layer of ``cache`` stores its tokens in a kvpress layout (ragged, quantized, channel-pruned,
    merged), which only the ``"kvpress"`` attention function reads."""
    return any(hasattr(layer, "dense_keys_values") for layer in getattr(cache, "layers", ()))


def write_layer(cache: Cache, layer_idx: int, kv: CompressedKV) -> None:
    """Replace a layer's keys and values by the compressed ones in ``kv``."""
    layer = _layer(cache, layer_idx)
    if hasattr(layer, "replace"):
        layer.replace(kv)
    elif kv.key_channels is not None:
        if not isinstance(layer, DynamicLayer) or getattr(layer, "is_sliding", False):
            raise ValueError(
                "channel-pruned keys replace a full-attention DynamicCache layer (by a ChannelPrunedLayer); "
                f"got {type(layer).__name__}"
            )
        cache.layers[layer_idx] = ChannelPrunedLayer.from_compressed(kv)
        # A snapshot may still hold the replaced layer object: drop its dense prefill tensors now. Not through
        # `reset()`, which zeroes them in place before transformers 5.25 (and so would corrupt the snapshot).
        layer.keys = layer.values = None
        layer.is_initialized = False
    elif kv.head_lengths is not None:
        raise ValueError(
            "the press keeps a different number of tokens per head, which a dense cache layer cannot store; "
            "use a kvpress VarlenCache: the pipeline picks one automatically; with model.generate pass "
            "cache=kvpress.VarlenCache(config=model.config) (past_key_values= before transformers 5.24)"
        )
    elif isinstance(layer, DynamicLayer):
        # Contiguous copies so the full-size prefill tensors are freed as soon as the caller drops them.
        layer.keys, layer.values = kv.keys.contiguous(), kv.values.contiguous()
    else:
        raise ValueError(
            f"cannot compress cache layer of type {type(layer).__name__}; accepted: DynamicCache layers or kvpress "
            "caches"
        )


def replace_dense_layer(cache: Cache, layer_idx: int, kind: type, build) -> bool:
    """Replace a dense full-attention layer (of a ``DynamicCache``, or a ``VarlenCache`` layer not compacted yet) by
    ``build(keys, values)``, a layer of type ``kind`` holding the same tokens in its own layout. Returns False
    (nothing done) when the layer is already a ``kind`` or holds no token yet; raises ``ValueError`` for any other
    layer type."""
    layer = _layer(cache, layer_idx)
    if isinstance(layer, kind):
        return False
    if not (type(layer) is DynamicLayer or (type(layer) is VarlenLayer and not layer.ragged)):
        state = " (compacted)" if type(layer) is VarlenLayer else ""
        raise ValueError(
            f"{kind.__name__} replaces dense full-attention layers of a transformers DynamicCache or a kvpress "
            f"VarlenCache; layer {layer_idx} is a {type(layer).__name__}{state} (accepted: a DynamicCache, the "
            "default of model.generate, or a VarlenCache before compaction)"
        )
    if not layer.is_initialized or layer.keys is None:
        return False
    cache.layers[layer_idx] = build(layer.keys, layer.values)
    layer.keys = layer.values = None  # a snapshot may still hold the old layer (see write_layer)
    layer.is_initialized = False
    return True


def write_merged_pair(cache: Cache, layer_a: int, layer_b: int, merged: MergedKV) -> None:
    """Replace two dense full-attention layers of a ``DynamicCache`` by the merged pair ``merged``."""
    for idx in (layer_a, layer_b):
        layer = _layer(cache, idx)
        if type(layer) is not DynamicLayer:
            raise ValueError(
                f"merging layers replaces dense full-attention DynamicCache layers; layer {idx} is a "
                f"{type(layer).__name__} (accepted: a transformers DynamicCache, which the pipeline uses for "
                "MiniCachePress)"
            )
    old = [cache.layers[layer_a], cache.layers[layer_b]]
    cache.layers[layer_a], cache.layers[layer_b] = merged.layers()
    for layer in old:  # a snapshot may still hold the old objects: drop their dense tensors (see write_layer)
        layer.keys = layer.values = None
        layer.is_initialized = False


def layer_memory_bytes(cache: Cache) -> int:
    """Bytes held by the key/value tensors of every layer of ``cache``."""
    return sum(_layer_bytes(layer) for layer in getattr(cache, "layers", []))


def _layer_bytes(layer) -> int:
    if hasattr(layer, "memory_bytes"):
        return layer.memory_bytes()
    tensors = (getattr(layer, "keys", None), getattr(layer, "values", None))
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def decode_bytes_read(cache: Cache) -> int:
    """Bytes of keys, values and metadata one decode step reads from ``cache`` at its current length: a layer that
    reads selectively (``decode_bytes_read()``, e.g. Quest's) says so itself, any other is read whole."""
    layers = getattr(cache, "layers", [])
    return sum(layer.decode_bytes_read() if hasattr(layer, "decode_bytes_read") else _layer_bytes(layer)
               for layer in layers)  # fmt: skip


def dense_cache_bytes(config, n_tokens: int, batch_size: int, dtype: torch.dtype) -> int:
    """Bytes a ``DynamicCache`` holds after prefilling ``n_tokens`` per sequence for ``batch_size`` sequences.

    Keys and values of every layer at ``dtype``; a sliding-window layer keeps at most ``sliding_window - 1`` past
    tokens (the window of the next query, which brings its own).
    """
    text = config.get_text_config(decoder=True)
    head_dim, kv_heads = kv_geometry(text)
    kept = min(n_tokens, (getattr(text, "sliding_window", None) or n_tokens + 1) - 1)
    tokens = sum(n_tokens if kind != "sliding_attention" else kept for kind in layer_types(text))
    return tokens * batch_size * kv_heads * head_dim * 2 * dtype.itemsize


def snapshot_cache(cache: Cache) -> list:
    """Capture the state of every layer so :func:`restore_cache` can return to it (tensors are shared, not copied).

    Dynamic layers grow by concatenation, never in place, so keeping references to their tensors is enough.
    Layers that manage their own storage provide ``snapshot()``/``restore()``. The layer objects are kept too,
    because compression may replace a layer by one of another type (:func:`write_layer`).
    """
    return [(layer, layer.snapshot() if hasattr(layer, "snapshot") else dict(vars(layer))) for layer in cache.layers]


def restore_cache(cache: Cache, state: list) -> None:
    """Return every layer of ``cache`` to a state captured by :func:`snapshot_cache`."""
    cache.layers[:] = [layer for layer, _ in state]  # also drops layers created lazily after the snapshot
    for layer, saved in state:
        if hasattr(layer, "restore"):
            layer.restore(saved)
        else:
            vars(layer).clear()
            vars(layer).update(saved)
