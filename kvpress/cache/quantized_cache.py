"""`QuantizedCache`: a head-variable cache whose full-attention layers store their context in packed low-bit groups."""

from __future__ import annotations

import json

import torch

from kvpress.cache.compressed_kv import CompressedKV
from kvpress.cache.quantization_config import QuantizationConfig
from kvpress.cache.quantized_layer import QuantizedVarlenLayer
from kvpress.cache.quantized_storage import DecomposedStorage, make_storage, positions_of
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.cache.varlen_layer import VarlenLayer
from kvpress.utils import kv_geometry
from kvpress_kernels import DecomposedSegments, LowRankFactors, QuantizedSegments, RotaryTable, SparseOutliers

_SEGMENT_FIELDS = (
    "k_packed", "k_scale", "k_zero", "v_packed", "v_scale", "v_zero", "cu_groups", "ctx_len", "ctx_groups"
)  # fmt: skip


class QuantizedCache(VarlenCache):
    """A :class:`VarlenCache` of :class:`QuantizedVarlenLayer`\\ s: pruning and quantization stack.

    ``QuantizedCache(config=model.config, quantization=QuantizationConfig(bits=4, group_size=64))``: full-attention
    layer ``i`` stores ``quantization.bits_for(i)``-bit codes; sliding-window layers stay dense. Prefill runs with
    the model's own attention; a press compressing a layer (uniformly or per head) quantizes what it keeps, and
    :meth:`compact` quantizes layers no press touched. Tokens added later stay in full precision until
    ``residual_length`` of them have accumulated (see :class:`QuantizedVarlenLayer`).

    ``quantization`` may also be a dict of :class:`QuantizationConfig` fields; ``None`` takes its defaults. With
    ``method="kvquant"`` and ``pre_rope`` (its default), ``rope`` is the model's rotary table
    (:func:`kvpress.cache.rotary_table`; the pipeline passes it).
    """

    _FORMAT = "kvpress.QuantizedCache"

    def __init__(self, config=None, quantization: QuantizationConfig | dict | None = None,
                 rope: RotaryTable | None = None, **kwargs):  # fmt: skip
        quantization = QuantizationConfig() if quantization is None else quantization
        self.quantization = QuantizationConfig.coerce(quantization, "quantization")
        self.rope = rope
        make_storage(self.quantization, 0, rope)  # a missing rotary table fails here, not at the first compression
        if config is not None:
            self.quantization.check_head_dim(model_head_dim(config))
        super().__init__(config=config, **kwargs)
        if self.layers:
            self.layers = [
                self._dense_layer(i) if type(layer) is VarlenLayer else layer for i, layer in enumerate(self.layers)
            ]
        else:
            self.layer_class_to_replicate = self._next_layer

    def _dense_layer(self, layer_idx: int) -> QuantizedVarlenLayer:
        q = self.quantization
        storage = make_storage(q, layer_idx, self.rope)
        return QuantizedVarlenLayer(q.bits_for(layer_idx), q.group_size, q.residual_length, storage=storage)

    def _next_layer(self) -> QuantizedVarlenLayer:
        # transformers appends lazily created layers in order, so the next one's index is the current count.
        return self._dense_layer(len(self.layers))

    def compact(self) -> None:
        """Quantize every dense full-attention layer, keeping all its tokens."""
        super().compact()  # a QuantizedVarlenLayer's replace quantizes

    @property
    def needs_positions(self) -> bool:
        """Whether the storage quantizes with each token's position (pre-RoPE keys, sink tokens)."""
        return make_storage(self.quantization, 0, self.rope).needs_positions

    def quantize_from(self, source: VarlenCache, n_tokens: int, positions: dict | None = None) -> None:
        """Take over the layers of ``source``, a full-precision :class:`VarlenCache` holding one prefill of
        ``n_tokens`` tokens (compressed or not), quantizing the tokens each full-attention layer holds; this cache
        must be empty. Layer by layer, so the peak is one layer's codes over ``source``; ``source`` is left empty.

        ``positions``: ``{layer_idx: (batch, kv_heads, >= kept)}`` prompt position of every token a compressed
        layer holds, in storage order (the press's ``kept_indices``); needed when :attr:`needs_positions`.
        """
        if self.get_seq_length() > 0:
            raise ValueError("quantize_from fills an empty QuantizedCache; this one already holds tokens")
        layers = []
        for i, layer in enumerate(source.layers):
            if not isinstance(layer, VarlenLayer):  # sliding-window layers stay dense, as in this cache
                layers.append(layer)
                continue
            quantized = self._dense_layer(i)
            if layer.ragged:
                keys, values, lengths = layer.padded_keys_values()
                kv = CompressedKV(keys, values, head_lengths=lengths, indices=(positions or {}).get(i))
            elif layer.is_initialized and layer.keys is not None:
                kv = CompressedKV(layer.keys, layer.values)
            else:
                layers.append(quantized)
                continue
            with_positions = None
            if quantized.storage.needs_positions:
                with_positions = positions_of(kv.lengths.cpu(), kv.indices, n_tokens)
                if with_positions is None:
                    raise ValueError(
                        f"layer {i}: this quantized storage (pre-RoPE keys or sink tokens) needs the prompt position "
                        "of every kept token; pass positions= (a report's kept_indices)"
                    )
            seg_k, seg_v, seg_lens, d = quantized.pack_rows(kv)
            del kv
            source.layers[i] = VarlenLayer()  # frees the full-precision layer before the next one is packed
            quantized.adopt(seg_k, seg_v, seg_lens, d, positions=with_positions, tail_start=n_tokens)
            layers.append(quantized)
        self.layers = layers

    @classmethod
    def concatenate(cls, caches: list[QuantizedCache]) -> QuantizedCache:
        """Stack single- or multi-sequence caches along the batch (every layer quantized, tails empty).

        The caches must share their :class:`QuantizationConfig`; each sequence keeps exactly its own tokens.
        """
        if not caches:
            raise ValueError("caches must be a non-empty list of QuantizedCache")
        n_layers, quantization = len(caches[0].layers), getattr(caches[0], "quantization", None)
        for c in caches:
            if not isinstance(c, QuantizedCache) or len(c.layers) != n_layers or c.quantization != quantization:
                raise ValueError(
                    "caches must all be QuantizedCache objects with the same number of layers and the same quantization"
                )
            c.compact()
        out = cls(quantization=quantization, rope=caches[0].rope)
        out.layer_class_to_replicate = None
        for i in range(n_layers):
            parts = [c.layers[i] for c in caches]
            if not all(isinstance(p, QuantizedVarlenLayer) and p.ragged and p.tail_len == 0 for p in parts):
                raise ValueError(
                    f"layer {i}: only quantized layers with no tokens added after compression can be stacked"
                )
            layer = out._dense_layer(i)
            starts = [p.tail_start for p in parts]
            layer.adopt_quantized(
                layer.storage.concat([p.store for p in parts]), torch.cat([p.seg_lens for p in parts]),
                torch.cat(starts) if all(t is not None for t in starts) else None,
            )  # fmt: skip
            out.layers.append(layer)
        positions = [c.next_positions for c in caches]
        out.next_positions = [x for p in positions for x in p] if all(p is not None for p in positions) else None
        return out

    # ---- persistence (VarlenCache.save / load call these) ----------------------------------------------------
    def _save_metadata(self) -> dict[str, str]:
        meta = {"quantization": self.quantization.model_dump_json()}
        if self.rope is not None:  # pre-RoPE keys are rotated back with it: the file must carry it
            meta["rope"] = json.dumps({"inv_freq": self.rope.inv_freq.tolist(), "scale": self.rope.scale})
        return meta

    @classmethod
    def _empty_for_load(cls, meta: dict[str, str]) -> QuantizedCache:
        rope = None
        if "rope" in meta:
            table = json.loads(meta["rope"])
            rope = RotaryTable(torch.tensor(table["inv_freq"], dtype=torch.float32), float(table["scale"]))
        return cls(quantization=QuantizationConfig.model_validate_json(meta["quantization"]), rope=rope)

    def _save_layer(self, layer) -> tuple[dict, dict[str, torch.Tensor]]:
        if not (isinstance(layer, QuantizedVarlenLayer) and layer.ragged):
            return super()._save_layer(layer)
        n = layer.tail_len
        segs = layer.segs
        tensors = {f"segs.{name}": getattr(segs, name) for name in _SEGMENT_FIELDS}
        tensors.update(
            {
                "seg_lens": layer.seg_lens,
                "tail_k": layer.tail_k[:, :, :n].contiguous(),
                "tail_v": layer.tail_v[:, :, :n].contiguous(),
                "tail_lens": layer.tail_lens,
            }
        )
        entry = {
            "kind": "quantized",
            "tail_len": n,
            "tail_spread": layer.tail_spread,
            "head_dim": segs.head_dim,
            "bits": segs.bits,
            "group_size": segs.group_size,
            "dtype": str(segs.dtype).removeprefix("torch."),
        }
        if isinstance(layer.storage, DecomposedStorage):
            entry["kind"] = "decomposed"
            tensors.update(_correction_tensors(layer.store))
            if layer.tail_start is not None:
                tensors["tail_start"] = layer.tail_start
        return entry, tensors

    def _load_layer(self, layer_idx: int, entry: dict, data: dict[str, torch.Tensor]):
        if entry["kind"] not in ("quantized", "decomposed"):
            return super()._load_layer(layer_idx, entry, data)
        q = self.quantization
        storage = make_storage(q, layer_idx, self.rope)
        layer = QuantizedVarlenLayer(entry["bits"], entry["group_size"], q.residual_length, storage=storage)
        segs = QuantizedSegments(
            **{name: data[f"segs.{name}"] for name in _SEGMENT_FIELDS},
            bits=entry["bits"], group_size=entry["group_size"], head_dim=entry["head_dim"],
            dtype=getattr(torch, entry["dtype"]),
        )  # fmt: skip
        store = segs if entry["kind"] == "quantized" else _decomposed_from(segs, data)
        layer.adopt_quantized(store, data["seg_lens"].to("cpu", torch.long), data.get("tail_start"))
        self._load_tail(layer, entry, data)
        layer.tail_spread = entry["tail_spread"]
        return layer


def _correction_tensors(ds: DecomposedSegments) -> dict[str, torch.Tensor]:
    """The corrections of decomposed storage by file name (absent corrections are simply not written)."""
    out = {}
    for name in ("k_levels", "v_levels", "positions"):
        if getattr(ds, name) is not None:
            out[name] = getattr(ds, name)
    for side in ("k", "v"):
        o, lr = getattr(ds, f"{side}_outliers"), getattr(ds, f"{side}_lowrank")
        if o is not None:
            out.update({f"{side}_outliers.cu": o.cu, f"{side}_outliers.pos": o.pos, f"{side}_outliers.val": o.val})
        if lr is not None:
            # Keys and values of one compaction share their block ids: saved files take one tensor per name.
            out.update(
                {f"{side}_lowrank.a": lr.a, f"{side}_lowrank.b": lr.b, f"{side}_lowrank.block": lr.block.clone()}
            )
    return out


def _decomposed_from(segs: QuantizedSegments, data: dict[str, torch.Tensor]) -> DecomposedSegments:
    """Decomposed storage rebuilt from the tensors `_correction_tensors` wrote."""
    parts = {name: data.get(name) for name in ("k_levels", "v_levels", "positions")}
    for side in ("k", "v"):
        if f"{side}_outliers.cu" in data:
            parts[f"{side}_outliers"] = SparseOutliers(*(data[f"{side}_outliers.{f}"] for f in ("cu", "pos", "val")))
        if f"{side}_lowrank.a" in data:
            parts[f"{side}_lowrank"] = LowRankFactors(*(data[f"{side}_lowrank.{f}"] for f in ("a", "b", "block")))
    return DecomposedSegments(segs, **parts)


def model_head_dim(config) -> int:
    """Head dimension of a transformers model config (its text decoder's)."""
    return kv_geometry(config)[0]
