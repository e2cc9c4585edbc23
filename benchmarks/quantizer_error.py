"""Attention-output error of the quantized storages (KIVI, KVQuant, GEAR) on keys and values recorded from SmolLM2.

A needle context of ``--tokens`` tokens runs through the offline model once. For every layer, the keys and values of
all but the last ``--queries`` tokens become the stored context, and the last tokens' queries attend to it plus
themselves (causal, full precision), as a question does. Keys, values and queries are bfloat16, as on the GPU. Each
storage is compared against the same attention over the bfloat16 keys and values: the relative error
``|o - o_bf16| / |o_bf16|`` averaged over layers, and its stored bytes per token and kv head against bfloat16 (every
scale, level table, outlier, low-rank factor and position counted).

    python benchmarks/quantizer_error.py --tokens 2048 --output benchmarks/results/quantizer_error_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvpress.cache.quantization_config import QuantizationConfig
from kvpress.cache.quantized_storage import make_storage
from kvpress.needle import PASSKEY_NEEDLE, build_needle_context
from kvpress.offline_model import load_smollm2
from kvpress_kernels import RotaryTable, reference_varlen_attention

# name -> QuantizationConfig options (each method's defaults: KVQuant levels fitted on the context, pre-RoPE keys,
# one sink, 1% outliers; GEAR rank 4, 2% outliers)
METHODS = {
    "kivi": {"method": "kivi"},
    "kvquant": {"method": "kvquant"},
    "kvquant-no-outliers": {"method": "kvquant", "outlier_ratio": 0.0},
    "gear": {"method": "gear"},
    "gear-l": {"method": "gear", "outlier_ratio": 0.0},
}


def record(model, tokenizer, n_tokens: int):
    """Per layer: post-RoPE keys and values (Hkv, T, D) and queries (Hq, T, D) of one context."""
    text = build_needle_context(tokenizer, n_tokens, PASSKEY_NEEDLE)
    ids = tokenizer(text, return_tensors="pt").input_ids
    hidden = {}
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: hidden.__setitem__(i, kw["hidden_states"]), with_kwargs=True
        )  # fmt: skip
        for i, layer in enumerate(model.model.layers)
    ]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, use_cache=True, **{_cache_keyword(model): cache})
        positions = torch.arange(ids.shape[1])[None]
        cos, sin = model.model.rotary_emb(hidden[0], positions)
        layers = []
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            q = attn.q_proj(hidden[i]).view(1, ids.shape[1], -1, attn.head_dim).transpose(1, 2)
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
            # Stored as a GPU run would: bfloat16 keys and values (the reference the errors are measured against).
            layers.append(
                tuple(t.to(torch.bfloat16) for t in (q[0], cache.layers[i].keys[0], cache.layers[i].values[0]))
            )
    for h in hooks:
        h.remove()
    return layers


def _cache_keyword(model):
    from kvpress.cache.forward_keyword import cache_keyword

    return cache_keyword(model)


def attention_error(q, k, v, n_ctx, bits, group_size, method, rope):
    """Relative output error of one layer's last queries over a stored context, and the storage's bytes."""
    Hkv, T, D = k.shape
    lens = torch.full((Hkv,), n_ctx)
    ctx_k, ctx_v = k[:, :n_ctx].reshape(-1, D), v[:, :n_ctx].reshape(-1, D)
    tail_k, tail_v = k[None, :, n_ctx:], v[None, :, n_ctx:]
    tail_lens = torch.tensor([T - n_ctx], dtype=torch.int32)
    qs = q[None, :, n_ctx:]
    cu = torch.arange(Hkv + 1, dtype=torch.int32) * n_ctx
    exact = reference_varlen_attention(qs, ctx_k, ctx_v, cu, tail_k, tail_v, tail_lens, D**-0.5)
    # The cache's own storage for this method (what QuantizedCache would hold for this layer's context).
    storage = make_storage(QuantizationConfig(bits=bits, group_size=group_size, **METHODS[method]), 0, rope)
    store = storage.encode(ctx_k, ctx_v, lens, positions=torch.arange(n_ctx).repeat(Hkv))
    out = storage.attend(qs, store, tail_k, tail_v, tail_lens, D**-0.5, None)  # the torch reference on CPU
    error = float((out.float() - exact.float()).norm() / exact.float().norm())
    bytes_per_token = store.nbytes() / (Hkv * n_ctx)
    return error, bytes_per_token / (2 * D * 2)  # against 16-bit keys and values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="storages to measure (default: all)")  # fmt: skip
    parser.add_argument("--output")
    args = parser.parse_args()
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    layers = record(model, tokenizer, args.tokens)
    rotary = model.model.rotary_emb
    rope = RotaryTable(rotary.inv_freq.float().clone(), float(rotary.attention_scaling))
    results = []
    for bits in args.bits:
        for method in args.methods:
            errors, sizes = [], []
            for q, k, v in layers:
                n_ctx = k.shape[1] - args.queries
                e, s = attention_error(q, k, v, n_ctx, bits, args.group_size, method, rope)
                errors.append(e)
                sizes.append(s)
            row = {"bits": bits, "method": method, "mean_relative_error": sum(errors) / len(errors),
                   "max_relative_error": max(errors), "bytes_vs_16bit": sum(sizes) / len(sizes)}  # fmt: skip
            results.append(row)
            mean, top, size = row["mean_relative_error"], row["max_relative_error"], row["bytes_vs_16bit"]
            print(f"{bits}-bit {method:<20} error {mean:.4f} (max {top:.4f})  bytes {size:.3f} of bf16", flush=True)
    if args.output:
        meta = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)", "tokens": args.tokens, "queries": args.queries,
                "group_size": args.group_size, "methods": {m: METHODS[m] for m in args.methods},
                "machine": platform.machine(), "torch": torch.__version__,
                "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
        with open(args.output, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
