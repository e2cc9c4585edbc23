"""A VarlenCache layer whose heads hold chosen numbers of random tokens, for the presses that rewrite head-variable
layers while decoding."""

import torch

from kvpress.cache.varlen_cache import VarlenCache


def ragged_layer(model, lengths: list[list[int]], tail: int, seed: int):
    """Layer 1 of a VarlenCache holding ``lengths[b][h]`` random context tokens per head, then ``tail`` appended
    ones; returns the cache and each head's tokens ``[(keys, values)]`` in order."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    d = cfg.head_dim
    b, h = len(lengths), len(lengths[0])
    cache = VarlenCache(config=cfg)
    layer = cache.layers[1]
    seg_lens = torch.tensor(lengths)
    seg_k, seg_v = (
        torch.randn(int(seg_lens.sum()), d, generator=gen),
        torch.randn(int(seg_lens.sum()), d, generator=gen),
    )
    layer.adopt(seg_k, seg_v, seg_lens, d)
    tail_k, tail_v = torch.randn(b, h, tail, d, generator=gen), torch.randn(b, h, tail, d, generator=gen)
    layer.update(tail_k, tail_v)
    heads, start = [], 0
    for bi in range(b):
        for hi in range(h):
            n = lengths[bi][hi]
            heads.append((torch.cat([seg_k[start : start + n], tail_k[bi, hi]]),
                          torch.cat([seg_v[start : start + n], tail_v[bi, hi]])))  # fmt: skip
            start += n
    return cache, heads
