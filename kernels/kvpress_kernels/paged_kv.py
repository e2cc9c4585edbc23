"""`PagedKV`: a dense KV buffer with per-page key bounds (element-wise min and max of each page's keys).

The bounds let a decode query bound ``q . k`` over a whole page without reading its keys (Quest's page selection,
``page_selection.py``); the keys are all kept, and only the selected pages are read (``page_attention.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import check_tensor

__all__ = ["PagedKV"]


@dataclass
class PagedKV:
    """Every token of one layer, in a buffer with room to grow, plus page bounds.

    Attributes:
        keys, values: ``(B, Hkv, capacity, D)``; token ``t`` of sequence ``b`` at slot ``t`` (``t < lengths[b]``).
        page_min, page_max: ``(B, Hkv, capacity // page_size, D)`` element-wise bounds of each page's valid keys;
            ``+inf`` / ``-inf`` where a page holds no token yet.
        lengths: ``(B,)`` int32 valid tokens per sequence (on the device: appends never sync with the host).
        page_size: tokens per page; ``capacity`` is a multiple of it.
    """

    keys: torch.Tensor
    values: torch.Tensor
    page_min: torch.Tensor
    page_max: torch.Tensor
    lengths: torch.Tensor
    page_size: int

    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor, page_size: int, capacity: int | None = None):
        """Take ``keys, values`` ``(B, Hkv, n, D)`` (every sequence holds ``n`` tokens) into a buffer of at least
        ``capacity`` slots (default ``n``), rounded up to whole pages."""
        check_tensor(keys, "keys", 4)
        check_tensor(values, "values", 4, device=keys.device)
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
        if page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two (a kernel tile holds whole pages), got {page_size}")
        B, H, n, D = keys.shape
        if values.shape[:3] != keys.shape[:3]:
            raise ValueError(f"values must have shape ({B}, {H}, {n}, *), got {tuple(values.shape)}")
        capacity = _round_up(max(n, capacity or 0, 1), page_size)
        buf_k = keys.new_zeros(B, H, capacity, D)
        buf_v = values.new_zeros(B, H, capacity, values.shape[-1])
        buf_k[:, :, :n], buf_v[:, :, :n] = keys, values
        n_pages = capacity // page_size
        page_min = keys.new_full((B, H, n_pages, D), float("inf"))
        page_max = keys.new_full((B, H, n_pages, D), float("-inf"))
        full, rest = divmod(n, page_size)
        if full:
            pages = keys[:, :, : full * page_size].unflatten(2, (full, page_size))
            page_min[:, :, :full], page_max[:, :, :full] = pages.amin(3), pages.amax(3)
        if rest:
            last = keys[:, :, full * page_size :]
            page_min[:, :, full], page_max[:, :, full] = last.amin(2), last.amax(2)
        lengths = torch.full((B,), n, dtype=torch.int32, device=keys.device)
        return cls(buf_k, buf_v, page_min, page_max, lengths, page_size)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``keys, values`` ``(B, Hkv, q, D)`` after each sequence's tokens and widen their pages' bounds.

        In place and from device-side lengths only (no host sync; capturable in a CUDA graph); the caller keeps the
        capacity sufficient (:meth:`grow`).
        """
        B, H, q, D = keys.shape
        slots = (self.lengths.long()[:, None] + torch.arange(q, device=keys.device))[:, None, :, None]
        self.keys.scatter_(2, slots.expand(B, H, q, D), keys)
        self.values.scatter_(2, slots.expand(B, H, q, values.shape[-1]), values)
        pages = (slots // self.page_size).expand(B, H, q, D)
        self.page_min.scatter_reduce_(2, pages, keys, "amin")
        self.page_max.scatter_reduce_(2, pages, keys, "amax")
        self.lengths += q

    def grow(self, capacity: int) -> None:
        """Reallocate to at least ``capacity`` slots (whole pages), keeping every token and bound."""
        capacity = _round_up(capacity, self.page_size)
        if capacity <= self.capacity:
            return
        extra = capacity - self.capacity
        pages = extra // self.page_size
        self.keys = torch.cat([self.keys, self.keys.new_zeros(*self.keys.shape[:2], extra, self.keys.shape[-1])], 2)
        self.values = torch.cat(
            [self.values, self.values.new_zeros(*self.values.shape[:2], extra, self.values.shape[-1])], 2
        )
        shape = (*self.page_min.shape[:2], pages, self.page_min.shape[-1])
        self.page_min = torch.cat([self.page_min, self.page_min.new_full(shape, float("inf"))], 2)
        self.page_max = torch.cat([self.page_max, self.page_max.new_full(shape, float("-inf"))], 2)

    def memory_bytes(self) -> int:
        """Bytes allocated: buffers at full capacity, bounds and lengths."""
        tensors = (self.keys, self.values, self.page_min, self.page_max, self.lengths)
        return sum(t.numel() * t.element_size() for t in tensors)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
