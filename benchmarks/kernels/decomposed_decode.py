"""Decode (Q = 1) time and bytes of `decomposed_attention` (KVQuant and GEAR storage) against KIVI's
`quantized_varlen_attention` and `varlen_attention` on the bf16 cache of the same tokens, in one run.

Shapes as decode_bandwidth.py (Llama-3.1-8B: batch 1, 8 kv heads, 32 query heads, head_dim 128, bf16), uniform
contexts of 32k and 128k tokens per kv head, a 64-token bf16 tail, group size 64. Each case is first checked against
its torch reference, then timed with CUDA events (L2 flushed, median of --iters) and as a CUDA-graph replay.

    python benchmarks/kernels/decomposed_decode.py --out benchmarks/kernels/results/decomposed_decode_h100.json
    python benchmarks/kernels/decomposed_decode.py --smoke      # tiny sizes, CPU (Triton interpreter)
"""

import argparse
import json
import os
import platform
import sys
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("KVPRESS_FORCE_TRITON", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_bandwidth import HKV, D, kk  # noqa: E402
from quantized_decode_bandwidth import make_context, max_err, timer  # noqa: E402

METHODS = {
    "kivi": {},
    "kvquant": {"outlier_ratio": 0.01, "levels": True, "pre_rope": True, "sinks": 1},
    "kvquant-dense": {"levels": True, "pre_rope": True, "sinks": 1},  # no sparse outliers (sinks kept)
    "gear": {"outlier_ratio": 0.02, "rank": 4},
    "gear-l": {"rank": 4},  # GEAR's low-rank-only variant
}


def storage(method, seg_k, seg_v, lens, bits, group_size, rope):
    opts = dict(METHODS[method])
    n = seg_k.shape[0]
    positions = torch.cat([torch.arange(int(x)) for x in lens.tolist()]).to(seg_k.device)
    if method == "kivi":
        return kk.quantize_segments(seg_k, seg_v, lens, bits, group_size)
    kw = {"outlier_ratio": opts.get("outlier_ratio", 0.0), "rank": opts.get("rank", 0)}
    if opts.get("pre_rope"):
        kw.update(positions=positions, rope=rope)
    if opts.get("sinks"):
        kw["exact_rows"] = positions < opts["sinks"]
    if opts.get("levels"):  # fitted on the first 64k tokens: plenty of samples for a 16-level k-means
        m, pre = min(n, 1 << 16), opts.get("pre_rope")
        k_lv, v_lv = kk.calibrate_levels(seg_k[:m], seg_v[:m], torch.tensor([m], device=seg_k.device), bits,
                                         group_size, positions=positions[:m] if pre else None,
                                         rope=rope if pre else None)  # fmt: skip
        kw.update(k_levels=k_lv, v_levels=v_lv)
    return kk.decompose_segments(seg_k, seg_v, lens, bits, group_size, **kw)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    contexts = [64, 200] if args.smoke else args.contexts
    # On the GPU a 256 MiB buffer is zeroed before each timed call, evicting L2 so K/V stream from HBM.
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if device.type == "cuda" else None
    run = timer(device, 2 if args.smoke else args.iters, 0 if args.smoke else 5, flush)
    gen = torch.Generator(device=device).manual_seed(0)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    rope = kk.RotaryTable(inv_freq.to(device), 1.0)
    rows = []
    for context in contexts:
        (q, seg_k, seg_v, cu, tail_k, tail_v, tail_lens, scale), lens = make_context(context, "uniform", device, gen)
        ref = kk.reference_varlen_attention(q, seg_k, seg_v, cu, tail_k, tail_v, tail_lens, scale)
        us, graph_us = run(lambda: kk.varlen_attention(q, seg_k, seg_v, cu, tail_k, tail_v, tail_lens, scale,
                                                       check=False))  # fmt: skip
        bf16_bytes = 2 * seg_k.numel() * seg_k.element_size()
        rows.append({"context_per_head": context, "method": "bf16", "bits": 16, "bytes": bf16_bytes,
                     "kernel_us": us, "graph_us": graph_us})  # fmt: skip
        print(f"{context:>7} bf16      {us:9.1f} us (graph {graph_us})  {bf16_bytes / 2**20:8.1f} MiB", flush=True)
        seg_lens = torch.tensor(lens, device=device)
        for bits in args.bits:
            for method in METHODS:
                store = storage(method, seg_k, seg_v, seg_lens, bits, args.group_size, rope)
                if method == "kivi":
                    fn = lambda s=store: kk.quantized_varlen_attention(q, s, tail_k, tail_v, tail_lens, scale,  # noqa: E731
                                                                       check=False)  # fmt: skip
                    want = kk.reference_quantized_varlen_attention(q, store, tail_k, tail_v, tail_lens, scale)
                else:
                    r = rope if store.positions is not None else None
                    fn = lambda s=store, r=r: kk.decomposed_attention(q, s, tail_k, tail_v, tail_lens, scale,  # noqa: E731
                                                                      rope=r, check=False)  # fmt: skip
                    want = kk.reference_decomposed_attention(q, store, tail_k, tail_v, tail_lens, scale, rope=r)
                err, err_bf16 = max_err(fn(), want), max_err(want, ref)
                del want
                us_m, graph_m = run(fn)
                row = {"context_per_head": context, "method": method, "bits": bits, "bytes": store.nbytes(),
                       "kernel_us": us_m, "graph_us": graph_m, "vs_bf16": us_m / us,
                       "max_abs_err_vs_reference": err, "error_vs_bf16_attention": err_bf16}  # fmt: skip
                rows.append(row)
                print(f"{context:>7} {method:<14}{bits}b {us_m:9.1f} us ({us_m / us:.2f}x bf16, graph {graph_m})  "
                      f"{store.nbytes() / 2**20:8.1f} MiB  err vs ref {err:.2e}", flush=True)  # fmt: skip
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "kv_heads": HKV, "head_dim": D, "group_size": args.group_size,
            "methods": METHODS}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
