"""`KVzipPress`: score each cached pair by the attention it receives while the model reconstructs the context."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.cache.forward_keyword import cache_kwargs, find_cache
from kvpress.cache.layer_access import read_layer, restore_cache, snapshot_cache
from kvpress.presses.budget import check_int
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.cross_layer_press import CrossLayerPress, global_top_counts
from kvpress.presses.received_attention import received_attention
from kvpress.utils import group_reduce, query_states

_SCORING = "kvzip_scoring"


@dataclass
class KVzipPress(CrossLayerPress):
    """Query-agnostic scores from context reconstruction (Kim et al., 2025, "KVzip: Query-Agnostic KV Cache
    Compression with Context Reconstruction", arXiv 2505.23416).

    After the prefill forward, the press feeds the model the context again, ``chunk_size`` tokens at a time, each
    chunk preceded by ``repeat_prompt_ids`` (the tokens of an instruction such as "Repeat the previous context:")
    and placed after the context (positions ``n, n + 1, ...``), over the full cache. A cached pair's score is the
    largest softmax weight it receives from any reconstruction query of its kv head's group. The first ``n_sink``
    tokens are always kept. With ``layerwise=False`` (the paper's default) the budget is shared by every head of
    every layer (a different count per layer and head, stored exactly in a ``VarlenCache``); with ``layerwise=True``
    by the heads of each layer. The reconstruction's own keys are dropped after each chunk.

    Prefill cost: a second forward over the context (plus the prompt once per chunk), whose attention reads the
    whole cache, so about twice the prefill compute; the cache stays uncompressed until the scores are complete
    (peak memory of an uncompressed prefill plus one chunk's activations).

    Args:
        layerwise: share the budget inside each layer only, instead of across the whole model.
        n_sink: first tokens kept whole.
        chunk_size: context tokens per reconstruction forward (bounds its activations).
        repeat_prompt_ids: token ids fed before each chunk; empty: the chunk alone (the tokens repeated without an
            instruction). ``KVzipPress.with_prompt(tokenizer, ...)`` tokenizes the paper's instruction.
    """

    layerwise: bool = False
    n_sink: int = 4
    chunk_size: int = 2048
    repeat_prompt_ids: tuple[int, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.layerwise, bool):
            raise ValueError(f"layerwise must be True or False, got {self.layerwise!r}")
        check_int(self.n_sink, "n_sink", 0)
        check_int(self.chunk_size, "chunk_size", 1)
        ids = self.repeat_prompt_ids
        if not isinstance(ids, (tuple, list)) or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError(f"repeat_prompt_ids must be a sequence of token ids (ints >= 0), got {ids!r}")
        self.repeat_prompt_ids = tuple(ids)

    @classmethod
    def with_prompt(cls, tokenizer, compression_ratio: float = 0.0, **kwargs) -> "KVzipPress":
        """A press whose reconstruction chunks follow the instruction "Repeat the previous context:" tokenized by
        ``tokenizer`` (no special tokens)."""
        ids = tokenizer("\n\nRepeat the previous context:\n", add_special_tokens=False).input_ids
        return cls(compression_ratio, repeat_prompt_ids=tuple(ids), **kwargs)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(head_variable=True)

    def layer_scores(self, module, hidden_states, keys, values, attentions, kwargs):
        return None  # scored by the reconstruction forwards

    def forward_hook(self, module, args, kwargs, output, report):
        scoring = report.state.get(_SCORING)
        if scoring is None:
            return super().forward_hook(module, args, kwargs, output, report)
        n, scores = scoring
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cache = find_cache(kwargs)
        keys, _ = read_layer(cache, module.layer_idx)  # the context, then this chunk's tokens
        if keys is None:
            raise ValueError(
                "KVzipPress scores with forwards over the full-precision context, which a "
                f"{type(cache.layers[module.layer_idx]).__name__} layer does not return; accepted caches: "
                "DynamicCache, VarlenCache (the pipeline's default for this press)"
            )
        q = query_states(module, hidden, kwargs["position_embeddings"])
        weights = group_reduce(received_attention(q, keys, module.scaling, "max"), keys.shape[1], "max")[..., :n]
        previous = scores.get(module.layer_idx)
        scores[module.layer_idx] = weights if previous is None else torch.maximum(previous, weights)
        return output

    def complete_scores(self, decoder, args, kwargs, cache, pending, report):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise ValueError("KVzipPress reconstructs the context from its token ids: prefill with input_ids, not "
                             "inputs_embeds")  # fmt: skip
        b, n = ids.shape
        prompt = torch.tensor(self.repeat_prompt_ids, dtype=ids.dtype, device=ids.device).expand(b, -1)
        scores: dict[int, torch.Tensor] = {}
        context = snapshot_cache(cache)
        report.state[_SCORING] = (n, scores)  # read by the layer hooks of the reconstruction forwards
        try:
            with torch.no_grad():
                for start in range(0, n, self.chunk_size):
                    chunk = torch.cat([prompt, ids[:, start : start + self.chunk_size]], dim=1)
                    positions = torch.arange(n, n + chunk.shape[1], device=ids.device).expand(b, -1)
                    try:
                        decoder(input_ids=chunk, position_ids=positions, use_cache=True,
                                **cache_kwargs(decoder, cache))  # fmt: skip
                    finally:
                        restore_cache(cache, context)  # drop the chunk's keys (sliding windows included)
        finally:
            report.state.pop(_SCORING, None)
        for s in scores.values():
            s[..., : self.n_sink] = float("inf")
        return {i: scores[i] for i in pending}

    def allocate(self, scores, k):
        if not self.layerwise or k >= next(iter(scores.values())).shape[-1]:
            return super().allocate(scores, k)
        return {i: global_top_counts({i: s}, k)[i] for i, s in scores.items()}
