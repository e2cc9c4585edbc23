"""Cache side of kvpress: cache layer access and the ``"kvpress"`` attention function."""

from kvpress.cache.compressed_kv import CompressedKV
from kvpress.cache.attention import ATTENTION_NAME, compressed_attention, kvpress_attention, register_attention
from kvpress.cache.layer_access import layer_memory_bytes, read_layer, restore_cache, snapshot_cache, write_layer

__all__ = [
    "CompressedKV",
    "ATTENTION_NAME",
    "compressed_attention",
    "kvpress_attention",
    "register_attention",
    "layer_memory_bytes",
    "read_layer",
    "restore_cache",
    "snapshot_cache",
    "write_layer",
]
