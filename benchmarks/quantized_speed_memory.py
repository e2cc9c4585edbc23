"""Quantized KV storage on a Llama-3.1-8B-shaped model with random weights (GPU): bytes, peak memory, decode speed.

For each context: the bf16 VarlenCache and kvpress's QuantizedCache at 2/4/8 bits, each alone (every token kept)
and under SnapKV 0.5 and AdaKV(SnapKV) 0.5; optionally transformers' own QuantizedCache (quanto backend, 4-bit)
when ``optimum-quanto`` is installed. All variants run in one process on the same model, so decode figures compare.

    python benchmarks/quantized_speed_memory.py --contexts 32768 131072 \\
        --out benchmarks/results/quantized_speed_memory_h100.json

``kv_bytes`` is what the cache's layers report (packed codes, scales, zeros, full-precision tail capacity, int32
metadata); ``allocated_after_prefill_gib`` is the allocator's view of everything held after prefill beyond the
weights, the same measure for caches that do not report their bytes (transformers' quantized cache).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from speed_memory import llama31_8b_model, run_metadata, run_one

from kvpress.cache.quantization_config import QuantizationConfig
from kvpress.cache.quantized_cache import QuantizedCache
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.snapkv_press import SnapKVPress


def presses(ratio: float):
    """``(name, press factory)``: every token kept (ratio 0 moves the context into kvpress storage), SnapKV, AdaKV."""
    yield "all", lambda: KnormPress(0.0)
    yield f"snapkv {ratio}", lambda: SnapKVPress(ratio)
    yield f"adakv(snapkv) {ratio}", lambda: AdaKVPress(SnapKVPress(ratio))


def quantized(bits: int, group_size: int, residual: int):
    quantization = QuantizationConfig(bits=bits, group_size=group_size, residual_length=residual)
    return lambda config: QuantizedCache(config=config, quantization=quantization)


def transformers_quanto(config):
    from transformers.cache_utils import QuantizedCache as HFQuantizedCache

    return HFQuantizedCache(backend="quanto", config=config, nbits=4, q_group_size=64, residual_length=128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--residual", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--cuda-graph", action="store_true", help="also time decoding through a captured CUDA graph")
    parser.add_argument("--quanto", action="store_true", help="add transformers' QuantizedCache (quanto, 4-bit)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quantized_speed_memory_h100.json"))
    args = parser.parse_args()
    model = llama31_8b_model()
    meta = {
        **run_metadata(),
        "group_size": args.group_size,
        "residual_length": args.residual,
        "command": "python benchmarks/quantized_speed_memory.py --contexts " + " ".join(map(str, args.contexts))
        + (" --cuda-graph" if args.cuda_graph else "") + (" --quanto" if args.quanto else ""),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = []

    def record(res: dict) -> None:
        print(json.dumps(res), flush=True)
        results.append(res)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))  # partial runs keep results

    for n_ctx in args.contexts:
        for press_name, make_press in presses(args.ratio):
            caches = [("bf16", VarlenCache)] + [
                (f"kv{b}", quantized(b, args.group_size, args.residual)) for b in args.bits
            ]
            for cache_name, make_cache in caches:
                name = f"{press_name} / {cache_name}"
                res = run_one(
                    model, n_ctx, 1, name, make_press, True, args.steps, args.warmup, args.cuda_graph, make_cache
                )
                record(res)
        if args.quanto:
            try:
                res = run_one(model, n_ctx, 1, "all / transformers quanto kv4", None, False, args.steps, args.warmup,
                              False, transformers_quanto)  # fmt: skip
            except Exception as exc:  # a backend that cannot run here is reported, not fatal
                res = {"context": n_ctx, "variant": "all / transformers quanto kv4", "error": repr(exc)[:300]}
            record(res)

    print(f"\n{'context':>8} {'variant':<28} {'KV GiB':>7} {'held GiB':>8} {'peak GiB':>8} {'ms/token':>8} {'graph':>6}")
    for r in results:
        if "error" in r:
            print(f"{r['context']:>8} {r['variant']:<28} error: {r['error']}")
            continue
        print(
            f"{r['context']:>8} {r['variant']:<28} {r['kv_gib']:>7} {r['allocated_after_prefill_gib']:>8} "
            f"{r['peak_over_weights_prefill_gib']:>8} {r['decode_ms_median']:>8} {str(r.get('decode_ms_graph_median')):>6}"
        )


if __name__ == "__main__":
    main()
