"""Decode (Q = 1) time of `merged_attention` (a MiniCache layer: shared directions scaled by the layer's norms) against
`varlen_attention` over the same layer stored densely, after checking both against their torch references.

Shapes: batch 1, 8 kv heads, G = 4 (32 query heads), head_dim 128, bfloat16; 32k and 128k merged tokens per kv head;
a 64-token exact tail. CUDA events around one call, median of --iters, the L2 flushed between calls. Bytes are those
the kernel must read: merged directions (shared by the pair, so half of them per layer) + norms + tail for the merged
layer, K + V + tail for the dense one.

    python benchmarks/kernels/merged_decode.py --out benchmarks/kernels/results/merged_decode_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "kernels"))

from kvpress_kernels import (  # noqa: E402
    merged_attention,
    reference_merged_attention,
    reference_varlen_attention,
    varlen_attention,
)


def timed(fn, iters: int) -> float:
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out")
    args = parser.parse_args()
    B, Hkv, G, D, T, dtype = 1, 8, 4, 128, 64, torch.bfloat16
    rows = []
    for n in (32768, 131072):
        g = torch.Generator(device="cuda").manual_seed(n)

        def rand(*shape):
            return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)

        dir_k = torch.nn.functional.normalize(rand(B, Hkv, n, D).float(), dim=-1).to(dtype)
        dir_v = torch.nn.functional.normalize(rand(B, Hkv, n, D).float(), dim=-1).to(dtype)
        mag_k, mag_v = rand(B, Hkv, n).abs() + 0.5, rand(B, Hkv, n).abs() + 0.5
        tail_k, tail_v = rand(B, Hkv, T, D), rand(B, Hkv, T, D)
        lens = torch.full((B,), T, dtype=torch.int32, device="cuda")
        q = rand(B, Hkv * G, 1, D)
        scale = D**-0.5
        merged = (q, dir_k, dir_v, mag_k, mag_v, tail_k, tail_v, lens, scale)
        err_m = (merged_attention(*merged).float() - reference_merged_attention(*merged).float()).abs().max().item()
        # The same layer stored densely: its keys and values rebuilt, one segment per kv head.
        seg_k = (dir_k * mag_k[..., None]).reshape(-1, D)
        seg_v = (dir_v * mag_v[..., None]).reshape(-1, D)
        cu = torch.arange(0, B * Hkv + 1, device="cuda", dtype=torch.int32) * n
        dense = (q, seg_k, seg_v, cu, tail_k, tail_v, lens, scale)
        err_d = (varlen_attention(*dense).float() - reference_varlen_attention(*dense).float()).abs().max().item()
        agree = (merged_attention(*merged).float() - varlen_attention(*dense).float()).abs().max().item()
        t_merged = timed(lambda: merged_attention(*merged, check=False), args.iters)
        t_dense = timed(lambda: varlen_attention(*dense, check=False), args.iters)
        item = torch.finfo(dtype).bits // 8
        bytes_merged = (B * Hkv * n * D * 2 * item) / 2 + B * Hkv * n * 2 * item + 2 * B * Hkv * T * D * item
        bytes_dense = B * Hkv * n * D * 2 * item + 2 * B * Hkv * T * D * item
        row = {
            "tokens_per_head": n, "merged_ms": round(t_merged, 4), "dense_varlen_ms": round(t_dense, 4),
            "merged_bytes_per_layer": int(bytes_merged), "dense_bytes_per_layer": int(bytes_dense),
            "max_abs_err_merged_vs_reference": err_m, "max_abs_err_dense_vs_reference": err_d,
            "max_abs_diff_merged_vs_dense": agree,
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16", "kv_heads": Hkv,
                "group": G, "head_dim": D, "tail": T}  # fmt: skip
        Path(args.out).write_text(json.dumps({"setup": meta, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
