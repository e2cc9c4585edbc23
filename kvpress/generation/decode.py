"""Greedy decoding of one answer per sequence from a (compressed) cache: the eager loop and the CUDA-graph path."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from kvpress.cache.attention import compressed_attention
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.generation.graph_decoder import GraphDecoder


def greedy_decode(
    model: nn.Module,
    cache,
    tails: list[torch.Tensor],
    positions: list[int],
    max_new_tokens: int,
    eos_ids: Collection[int],
    pad_id: int = 0,
    cuda_graph: bool = False,
) -> list[list[int]]:
    """Greedy tokens of every sequence of ``cache`` after its prompt tail; each stops at any id of ``eos_ids``.

    Args:
        tails: one ``(1, L_b)`` prompt tail per sequence (the question, not yet in the cache), fed first.
        positions: the position of each tail's first token (where the sequence's context ends).
        cuda_graph: decode through a captured CUDA graph (:class:`GraphDecoder`; a compressed ``VarlenCache`` on
            CUDA) instead of one eager forward per token. Tokens equal the eager loop's.

    Tails of different lengths are right-padded (with ``pad_id``) and the cache told each sequence's real count, so
    padding never enters it. The cache keeps the tails and answers afterwards. Returns the generated ids (EOS
    excluded), one list per sequence.
    """
    if cuda_graph and not isinstance(cache, VarlenCache):
        raise ValueError(  # noqa: TRY004
            "cuda_graph=True decodes from a VarlenCache; pass cache=VarlenCache(config=model.config)"
        )
    eos = set(eos_ids)
    device = tails[0].device
    batch = len(tails)
    lengths = [t.shape[1] for t in tails]
    width = max(lengths)
    ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    for b, t in enumerate(tails):
        ids[b, : lengths[b]] = t[0]
    start = torch.tensor(positions, device=device)
    padded = min(lengths) != width
    generated: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch

    def take(b: int, tok: int) -> None:
        if finished[b]:
            return
        if tok in eos:
            finished[b] = True
        else:
            generated[b].append(tok)

    with torch.no_grad(), compressed_attention(model):
        if padded:
            cache.new_token_lengths = torch.tensor(lengths, dtype=torch.int32, device=device)
        try:
            out = model(
                input_ids=ids,
                **cache_kwargs(model, cache),
                position_ids=start[:, None] + torch.arange(width, device=device),
                use_cache=True,
                logits_to_keep=0 if padded else 1,
            )
        finally:
            if padded:
                cache.new_token_lengths = None
        last = torch.tensor(lengths, device=device) - 1 if padded else torch.full((batch,), -1, device=device)
        token = out.logits[torch.arange(batch, device=device), last].argmax(-1)
        position = start + torch.tensor(lengths, device=device)
        for step in range(max_new_tokens):
            for b, tok in enumerate(token.tolist()):
                take(b, tok)
            if all(finished) or step == max_new_tokens - 1:
                break
            if cuda_graph:
                decoder = GraphDecoder(model, cache, max_new_tokens)
                rest = decoder.decode(token[:, None], position[:, None], max_new_tokens - 1 - step, sorted(eos))
                for b, row in enumerate(rest.tolist()):
                    for tok in row:
                        take(b, tok)
                break
            out = model(
                input_ids=token[:, None],
                **cache_kwargs(model, cache),
                position_ids=position[:, None],
                use_cache=True,
                logits_to_keep=1,
            )
            position = position + 1
            token = out.logits[:, -1].argmax(-1)
    return generated
