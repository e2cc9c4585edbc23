"""The generation layer: prefill under a press, the greedy decode loop (eager or CUDA graph), and
:class:`CompressedContext`, which answers many questions from one compressed context.

It knows presses and caches and nothing above them; the pipeline calls it once per context, and so can users who do
not want the pipeline.
"""

from kvpress.generation.context import CompressedContext, make_cache, summarize
from kvpress.generation.decode import (
    decode_chunks,
    graph_decoding_blocker,
    graph_decoding_press,
    greedy_decode,
    resolve_cuda_graph,
)
from kvpress.generation.graph_decoder import GraphDecoder
from kvpress.generation.prefill import prefill
from kvpress.generation.step_recorder import StepRecorder

__all__ = [
    "CompressedContext",
    "GraphDecoder",
    "StepRecorder",
    "decode_chunks",
    "graph_decoding_blocker",
    "graph_decoding_press",
    "greedy_decode",
    "make_cache",
    "prefill",
    "resolve_cuda_graph",
    "summarize",
]
