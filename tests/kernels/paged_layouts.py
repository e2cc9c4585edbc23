"""Test helper: a random :class:`PagedKV` with a different length per sequence, next to its dense tokens."""

import torch

from kvpress_kernels import PagedKV

from .layouts import randn


def build_paged(seed, B, Hkv, G, D, dtype, lengths, page_size, slack_pages=1, scale_mult=1.0):
    """Sequence b holds ``lengths[b]`` random tokens (filled by ``from_dense`` then single-token and multi-token
    appends, so both paths build the bounds); returns ``(paged, dense_k, dense_v, q, scale)`` with ``dense_*``
    ``(B, Hkv, max_len, D)`` (rows past a sequence's length are unused) and ``q`` ``(B, Hkv * G, D)``."""
    gen = torch.Generator().manual_seed(seed)
    n_max = max(lengths)
    dense_k, dense_v = randn(B, Hkv, n_max, D, dtype=dtype, gen=gen), randn(B, Hkv, n_max, D, dtype=dtype, gen=gen)
    capacity = (-(-n_max // page_size) + slack_pages) * page_size
    parts = []
    for b, n in enumerate(lengths):
        head = n // 2
        one = PagedKV.from_dense(dense_k[b : b + 1, :, :head], dense_v[b : b + 1, :, :head], page_size, capacity)
        t = head
        while t < n:  # appends of 1, 2, 3, ... tokens
            q = min(n - t, 1 + (t - head) % 3)
            one.append(dense_k[b : b + 1, :, t : t + q], dense_v[b : b + 1, :, t : t + q])
            t += q
        parts.append(one)
    paged = PagedKV(*(torch.cat([getattr(p, f) for p in parts]) for f in
                      ("keys", "values", "page_min", "page_max", "lengths")), page_size)  # fmt: skip
    q = randn(B, Hkv * G, D, dtype=dtype, gen=gen)
    return paged, dense_k, dense_v, q, scale_mult * D**-0.5
