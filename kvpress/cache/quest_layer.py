"""`QuestLayer`: a layer that keeps every token and whose decode steps read only the pages most likely to matter."""

from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import DynamicLayer

from kvpress.cache.attention import suffix_attention
from kvpress_kernels import PagedKV, page_attention, page_scores, select_pages

_SAVED_PAGE = "_snapshot_open_page_bounds"  # snapshot key of the bounds of the page appends were filling
_SLACK = 256  # tokens of room beyond the prefill, and the least a full buffer grows by


class QuestLayer(DynamicLayer):
    """Every token of one full-attention layer in a :class:`~kvpress_kernels.PagedKV` (keys, values, and the
    element-wise min/max key of each page of ``page_size`` tokens).

    A single-token forward (a decode step) over more than ``token_budget`` tokens bounds ``q . k`` over each page
    from its min/max keys, keeps the ``token_budget // page_size`` best pages per (sequence, kv head) - the newest
    ``recent_pages`` always among them - and attends over those pages only (``"kvpress"`` attention function). So a
    step reads about ``token_budget`` tokens plus the bounds (``2 / page_size`` of the keys) per kv head, while the
    memory held is the whole cache plus the bounds. Multi-token forwards (questions) attend over every token.

    Appends write in place at device-side lengths. The buffer starts with room for ``_SLACK`` more tokens and grows
    by an eighth of its size when full (amortized O(1) per token, at most ~12% of the cache unused).
    """

    def __init__(self, paged: PagedKV, token_budget: int, recent_pages: int = 1):
        super().__init__()
        self.paged = paged
        self.length = int(paged.lengths.max()) if paged.lengths.numel() else 0  # host mirror: no sync per step
        self.token_budget, self.recent_pages = token_budget, recent_pages
        self.n_select = max(1, token_budget // paged.page_size)
        self.dtype, self.device = paged.keys.dtype, paged.keys.device
        self.keys = self.values = None
        self.is_initialized = True
        self.sparse_steps = 0  # decode steps that read only the selected pages

    @classmethod
    def from_dense(cls, keys, values, page_size: int, token_budget: int, recent_pages: int = 1) -> QuestLayer:
        """A layer holding ``keys, values`` ``(batch, kv_heads, n, head_dim)`` (copied into a paged buffer)."""
        capacity = keys.shape[2] + _SLACK
        return cls(PagedKV.from_dense(keys, values, page_size, capacity), token_budget, recent_pages)

    # ---- transformers layer API -------------------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if kwargs.get("new_token_lengths") is not None:
            raise ValueError("a QuestLayer takes unpadded new tokens (every sequence adds the same count)")
        q = key_states.shape[2]
        if self.length + q > self.paged.capacity:
            self.paged.grow(max(self.length + q, self.paged.capacity + max(_SLACK, self.paged.capacity // 8)))
        self.paged.append(key_states.to(self.dtype), value_states.to(self.dtype))
        self.length += q
        view = QuestView(self)
        return view, view

    def reserve(self, n_tokens: int) -> None:
        """Make room for ``n_tokens`` more tokens (one allocation instead of several doublings)."""
        self.paged.grow(self.length + n_tokens)

    def dense_keys_values(self):
        return self.paged.keys[:, :, : self.length], self.paged.values[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def memory_bytes(self) -> int:
        """Bytes allocated: the paged buffer at its capacity and the page bounds."""
        return self.paged.memory_bytes()

    def decode_bytes_read(self) -> int:
        """Bytes one decode step reads from this layer at its current length: the page bounds, then the selected
        pages' keys and values (every token when it holds no more than ``token_budget``)."""
        keys = self.paged.keys
        b, h, _, d = keys.shape
        row = d * keys.element_size()
        if self.length <= self.token_budget:
            return 2 * b * h * self.length * row
        n_pages = -(-self.length // self.paged.page_size)
        read = min(self.n_select * self.paged.page_size, self.length)
        return b * h * (2 * n_pages * row + 2 * read * row)

    # ---- snapshot / crop / batch ----------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        state = dict(vars(self))
        state["paged"] = dataclasses.replace(self.paged, lengths=self.paged.lengths.clone())
        # Appends only write slots past the length and the bounds of the page it ends in (and later pages).
        page = self.length // self.paged.page_size
        state[_SAVED_PAGE] = (page, self.paged.page_min[:, :, page : page + 1].clone(),
                              self.paged.page_max[:, :, page : page + 1].clone())  # fmt: skip
        return state

    def restore(self, state: dict) -> None:
        vars(self).clear()
        vars(self).update({name: value for name, value in state.items() if name != _SAVED_PAGE})
        self.paged = dataclasses.replace(state["paged"], lengths=state["paged"].lengths.clone())
        page, lo, hi = state[_SAVED_PAGE]
        self.paged.page_min[:, :, page : page + 1] = lo
        self.paged.page_max[:, :, page : page + 1] = hi
        self.paged.page_min[:, :, page + 1 :] = float("inf")
        self.paged.page_max[:, :, page + 1 :] = float("-inf")

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (negative), or keep the first ``tokens_to_remove``."""
        keep = self.length + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove, self.length)
        keep = max(keep, 0)
        page_size = self.paged.page_size
        page = keep // page_size
        self.paged.page_min[:, :, page:] = float("inf")
        self.paged.page_max[:, :, page:] = float("-inf")
        if keep % page_size:
            rows = self.paged.keys[:, :, page * page_size : keep]
            self.paged.page_min[:, :, page], self.paged.page_max[:, :, page] = rows.amin(2), rows.amax(2)
        self.paged.lengths.fill_(keep)
        self.length = keep

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def _map(self, fn) -> None:
        p = self.paged
        self.paged = PagedKV(fn(p.keys), fn(p.values), fn(p.page_min), fn(p.page_max), fn(p.lengths), p.page_size)


class QuestView:
    """What :meth:`QuestLayer.update` hands to the attention function."""

    def __init__(self, layer: QuestLayer):
        self.layer = layer

    @property
    def shape(self) -> tuple[int, int, int, int]:
        keys = self.layer.paged.keys
        return (keys.shape[0], keys.shape[1], self.layer.length, keys.shape[3])

    def attend(self, query: torch.Tensor, scaling: float | None = None, sliding_window: int | None = None):
        """``query`` ``(batch, heads, q_len, head_dim)`` -> ``(batch, q_len, heads, head_dim)``."""
        if sliding_window:
            raise ValueError("QuestLayer holds full-attention layers only; sliding-window layers stay dense")
        layer = self.layer
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        # A captured step must read pages whatever the length at capture: the replays' lengths grow past it.
        capturing = query.is_cuda and torch.cuda.is_current_stream_capturing()
        if query.shape[2] == 1 and (layer.length > layer.token_budget or capturing):
            q = query[:, :, 0]
            n_pages = min(layer.n_select, layer.paged.capacity // layer.paged.page_size)
            pages = select_pages(page_scores(q, layer.paged, layer.recent_pages), n_pages)
            layer.sparse_steps += layer.length > layer.token_budget
            return page_attention(q, layer.paged, pages, scale)[:, None]
        return suffix_attention(query, *layer.dense_keys_values(), scale)
