"""`VarlenCache`: a transformers cache that stores exactly the tokens each (sequence, kv-head) keeps."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from kvpress.cache.compressed_kv import CompressedKV
from kvpress.cache.layer_access import layer_memory_bytes
from kvpress.cache.varlen_layer import VarlenLayer

FORMAT_VERSION = 1


class VarlenCache(DynamicCache):
    """A ``DynamicCache`` whose full-attention layers are :class:`VarlenLayer`\\ s (sliding-window layers stay dense).

    Prefill runs with the model's own attention. Once a press has compressed a layer, its tokens live in ragged
    storage and later forwards must run under the ``"kvpress"`` attention function (the pipeline does this).

    ``new_token_lengths``: set to a ``(batch,)`` int tensor before a forward whose new tokens are right-padded
    (questions of different lengths in a batch); ``None`` means every new token is valid.
    """

    def __init__(self, config=None, **kwargs):
        super().__init__(config=config, **kwargs)
        if self.layers:
            self.layers = [VarlenLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
        else:
            self.layer_class_to_replicate = VarlenLayer
        self.new_token_lengths: torch.Tensor | None = None
        # Position of each sequence's next token (set by the pipeline after prefill; saved with the cache).
        self.next_positions: list[int] | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.new_token_lengths is not None:
            kwargs["new_token_lengths"] = self.new_token_lengths
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def memory_bytes(self) -> int:
        """Bytes of key/value storage allocated over all layers (ragged context, tails, int32 metadata)."""
        return layer_memory_bytes(self)

    def reserve(self, n_tokens: int) -> None:
        """Reserve room for ``n_tokens`` more tokens per sequence in every layer that appends in place (compressed
        layers' tails, paged ``QuestLayer`` buffers)."""
        for layer in self.layers:
            if hasattr(layer, "reserve"):
                layer.reserve(n_tokens)

    def head_lengths(self, layer_idx: int) -> torch.Tensor:
        """``(batch, kv_heads)`` tokens held per (sequence, kv-head) in ``layer_idx`` (context plus tail)."""
        layer = self.layers[layer_idx]
        if isinstance(layer, VarlenLayer) and layer.ragged:
            return layer.seg_lens + layer.tail_lens.to("cpu", torch.long)[:, None]
        b, h, n, _ = layer.keys.shape
        return torch.full((b, h), n, dtype=torch.long)

    def compact(self) -> None:
        """Move every dense full-attention layer into ragged storage, keeping all its tokens."""
        for layer in self.layers:
            if isinstance(layer, VarlenLayer) and not layer.ragged and layer.is_initialized and layer.keys is not None:
                layer.replace(CompressedKV(layer.keys, layer.values))

    @classmethod
    def concatenate(cls, caches: list[VarlenCache]) -> VarlenCache:
        """Stack single- or multi-sequence caches along the batch (every layer ragged, tails empty).

        Each sequence keeps exactly its own tokens: no padding enters the result.
        """
        if not caches:
            raise ValueError("caches must be a non-empty list of VarlenCache")
        n_layers = len(caches[0].layers)
        for c in caches:
            if not isinstance(c, VarlenCache) or len(c.layers) != n_layers:
                raise ValueError("caches must all be VarlenCache objects with the same number of layers")
            c.compact()
        out = cls()
        out.layer_class_to_replicate = None
        for i in range(n_layers):
            parts = [c.layers[i] for c in caches]
            if not all(isinstance(p, VarlenLayer) and p.ragged and p.tail_len == 0 for p in parts):
                raise ValueError(
                    f"layer {i}: only compressed layers with no tokens added after compression can be stacked"
                )
            seg_lens = torch.cat([p.seg_lens for p in parts])
            head_dim = parts[0].head_dim
            keys = torch.cat([p.seg_k for p in parts])
            values = torch.cat([p.seg_v for p in parts])
            layer = VarlenLayer()
            layer.adopt(keys, values, seg_lens, head_dim)
            out.layers.append(layer)
        positions = [c.next_positions for c in caches]
        out.next_positions = [x for p in positions for x in p] if all(p is not None for p in positions) else None
        return out

    # ---- persistence -----------------------------------------------------------------------------------------
    _FORMAT = "kvpress.VarlenCache"

    def save(self, path: str | Path) -> None:
        """Write the cache to ``path`` (a safetensors file: storage, lengths, and the layout in its metadata)."""
        tensors, layout = {}, []
        for i, layer in enumerate(self.layers):
            entry, layer_tensors = self._save_layer(layer)
            tensors.update({f"{i}.{name}": t for name, t in layer_tensors.items()})
            layout.append(entry)
        meta = {
            "format": self._FORMAT,
            "version": str(FORMAT_VERSION),
            "layout": json.dumps(layout),
            "next_positions": json.dumps(self.next_positions),
            **self._save_metadata(),
        }
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=meta)

    def _save_metadata(self) -> dict[str, str]:
        """Extra file metadata of subclasses (read back by :meth:`_empty_for_load`)."""
        return {}

    def _save_layer(self, layer) -> tuple[dict, dict[str, torch.Tensor]]:
        """``(layout entry, tensors by name)`` of one layer."""
        if isinstance(layer, VarlenLayer) and layer.ragged:
            n = layer.tail_len
            tensors = {
                "seg_k": layer.seg_k,
                "seg_v": layer.seg_v,
                "seg_lens": layer.seg_lens,
                "tail_k": layer.tail_k[:, :, :n].contiguous(),
                "tail_v": layer.tail_v[:, :, :n].contiguous(),
                "tail_lens": layer.tail_lens,
            }
            return {"kind": "ragged", "tail_len": n, "head_dim": layer.head_dim}, tensors
        window = getattr(layer, "sliding_window", None)
        if layer.is_initialized and layer.keys is not None and layer.keys.numel():
            tensors = {"keys": layer.keys.contiguous(), "values": layer.values.contiguous()}
            return {"kind": "dense", "sliding_window": window}, tensors
        return {"kind": "empty", "sliding_window": window}, {}

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> VarlenCache:
        """Read a cache written by :meth:`save`, placing its tensors on ``device``.

        A missing file raises ``FileNotFoundError``; a file that is not a readable kvpress cache of this class
        (truncated, another format, a mismatched layout) raises ``ValueError`` naming the file and the problem.
        Nothing but the returned cache is created or changed.
        """
        from safetensors import SafetensorError, safe_open

        name = cls.__name__
        if not Path(path).is_file():
            raise FileNotFoundError(f"{name}.load: no file {str(path)!r}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{name}.load: {str(path)!r} is not a readable safetensors file ({err})") from None
        if meta.get("format") != cls._FORMAT:
            raise ValueError(f"{path} is not a kvpress {name} file (metadata format={meta.get('format')!r})")
        if meta.get("version") != str(FORMAT_VERSION):
            raise ValueError(f"unsupported {name} file version {meta.get('version')!r}; accepted: {FORMAT_VERSION}")
        try:
            data = load_file(str(path), device=str(device))
            cache = cls._empty_for_load(meta)
            cache.layer_class_to_replicate = None
            for i, entry in enumerate(json.loads(meta["layout"])):
                prefix = f"{i}."
                tensors = {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}
                cache.layers.append(cache._load_layer(i, entry, tensors))
            cache.next_positions = json.loads(meta.get("next_positions", "null"))
        except (SafetensorError, OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
            detail = f"missing {err}" if isinstance(err, KeyError) else str(err)
            problem = f"{type(err).__name__}: {detail}"
            raise ValueError(f"{name}.load: {str(path)!r} holds no valid {name} ({problem})") from None
        return cache

    @classmethod
    def _empty_for_load(cls, meta: dict[str, str]) -> VarlenCache:
        """An empty cache of this class for :meth:`load` (``meta``: the file's metadata)."""
        return cls()

    def _dense_layer(self, layer_idx: int):
        """A fresh layer for the full-attention layer ``layer_idx`` (dense until compressed)."""
        return VarlenLayer()

    def _load_layer(self, layer_idx: int, entry: dict, data: dict[str, torch.Tensor]):
        """One layer rebuilt from its layout ``entry`` and its tensors ``data`` (names without the layer prefix)."""
        if entry["kind"] == "ragged":
            layer = VarlenLayer()
            layer.adopt(data["seg_k"], data["seg_v"], data["seg_lens"].to("cpu", torch.long), entry["head_dim"])
            self._load_tail(layer, entry, data)
            return layer
        window = entry.get("sliding_window")
        layer = DynamicSlidingWindowLayer(sliding_window=window) if window else self._dense_layer(layer_idx)
        if entry["kind"] == "dense":
            layer.update(data["keys"], data["values"])
        return layer

    @staticmethod
    def _load_tail(layer: VarlenLayer, entry: dict, data: dict[str, torch.Tensor]) -> None:
        tail_k, tail_v = data["tail_k"], data["tail_v"]
        layer.reserve(tail_k.shape[2])
        layer.tail_k[:, :, : tail_k.shape[2]] = tail_k
        layer.tail_v[:, :, : tail_v.shape[2]] = tail_v
        layer.tail_lens.copy_(data["tail_lens"])
        layer.tail_len = entry["tail_len"]
