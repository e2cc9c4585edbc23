"""kvpress: compress the KV cache of Hugging Face transformers models.

Importing the package registers the ``"kv-press-text-generation"`` pipeline and changes nothing else in transformers.
"""

from kvpress.cache import QuantizationConfig, QuantizedCache, VarlenCache, layer_memory_bytes
from kvpress.offline_model import load_smollm2
from kvpress.pipeline import KVPressTextGenerationPipeline, register_pipeline
from kvpress.presses import *  # re-exported: every press
from kvpress.presses import __all__ as _presses

register_pipeline()

__version__ = "0.1.0"
__all__ = [  # noqa: PLE0604  (the presses' names are listed in kvpress.presses)
    *_presses,
    "KVPressTextGenerationPipeline",
    "QuantizationConfig",
    "QuantizedCache",
    "VarlenCache",
    "layer_memory_bytes",
    "load_smollm2",
]
