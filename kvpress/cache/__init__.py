"""Cache side of kvpress: cache layers that store what presses keep, and the ``"kvpress"`` attention function."""

from kvpress.cache.attention import ATTENTION_NAME, compressed_attention, kvpress_attention, register_attention
from kvpress.cache.channel_pruned_layer import ChannelPrunedLayer
from kvpress.cache.compressed_kv import CompressedKV
from kvpress.cache.forward_keyword import cache_keyword, cache_kwargs, find_cache
from kvpress.cache.layer_access import (
    decode_bytes_read,
    layer_memory_bytes,
    read_layer,
    restore_cache,
    snapshot_cache,
    write_layer,
)
from kvpress.cache.quantization_config import QuantizationConfig
from kvpress.cache.quantized_cache import QuantizedCache
from kvpress.cache.quantized_layer import QuantizedVarlenLayer
from kvpress.cache.rotary import rotary_table
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.cache.varlen_layer import VarlenLayer

__all__ = [
    "ATTENTION_NAME",
    "ChannelPrunedLayer",
    "CompressedKV",
    "QuantizationConfig",
    "QuantizedCache",
    "QuantizedVarlenLayer",
    "VarlenCache",
    "VarlenLayer",
    "cache_keyword",
    "cache_kwargs",
    "compressed_attention",
    "decode_bytes_read",
    "find_cache",
    "kvpress_attention",
    "layer_memory_bytes",
    "read_layer",
    "register_attention",
    "restore_cache",
    "rotary_table",
    "snapshot_cache",
    "write_layer",
]
