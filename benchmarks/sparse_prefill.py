"""Sparse prefill (MInference) against sdpa at a long context (GPU): one layer's attention, then a whole prefill.

    python benchmarks/sparse_prefill.py --context 131072 --out benchmarks/results/sparse_prefill_128k_h100.json

Attention alone: one layer of the Llama-3.1-8B shape (32 query heads, 8 kv heads, head dim 128, bf16, random
queries and keys), causal sdpa against ``block_sparse_attention`` with each pattern at ``--budget-blocks`` key
blocks of 64 per query block, the time of building the block lists (from the layer's own queries and keys)
included and apart. Whole prefill (``--model``): the Llama-3.1-8B-shaped model with random weights prefilling
``--context`` tokens under ``SnapKVPress(0.5)``, with the model's sdpa and inside ``sparse_prefill`` with every head
on ``--model-pattern``. Times are medians of CUDA-event timings after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import cuda_timed as timed  # noqa: E402
from speed_memory import llama31_8b_model, run_metadata  # noqa: E402

from kvpress.generation import prefill  # noqa: E402
from kvpress.presses.snapkv_press import SnapKVPress  # noqa: E402
from kvpress.sparse_prefill import HeadPattern, SparsePrefillConfig, sparse_prefill  # noqa: E402
from kvpress.sparse_prefill.attention import head_block_mask  # noqa: E402
from kvpress_kernels import block_sparse_attention, mask_to_blocks  # noqa: E402


def attention_alone(n: int, budget: int, repeats: int) -> dict:
    gen = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    scale = 128**-0.5
    out = {"sdpa_ms": timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), repeats)}
    config = SparsePrefillConfig(layers={}, block_size=64)
    for kind in ("a_shape", "vertical_slash", "block_sparse"):
        pattern = HeadPattern.with_budget(kind, budget, 64)
        blocks = lambda: mask_to_blocks(head_block_mask([pattern] * 32, q, k, scale, config))  # noqa: E731
        index, count = blocks()
        kernel = timed(lambda: block_sparse_attention(q, k, v, index, count, scale, 64), repeats)
        build = timed(blocks, repeats)
        n_qb = count.shape[-1]
        total = kernel + build
        out[kind] = {"pattern": pattern.model_dump(), "kernel_ms": kernel, "blocks_ms": build,
                     "total_ms": round(total, 3), "speedup_over_sdpa": round(out["sdpa_ms"] / total, 2),
                     "density": round(int(count.sum()) / (32 * n_qb * (n_qb + 1) // 2), 4)}  # fmt: skip
        print(kind, json.dumps(out[kind]), flush=True)
    print("sdpa_ms", out["sdpa_ms"], flush=True)
    return out


def whole_prefill(n: int, budget: int, kind: str) -> dict:
    from transformers import DynamicCache

    model = llama31_8b_model()
    ids = torch.randint(
        0, model.config.vocab_size, (1, n), device="cuda", generator=torch.Generator("cuda").manual_seed(0)
    )
    config = SparsePrefillConfig.uniform(32, 32, HeadPattern.with_budget(kind, budget, 64), block_size=64)
    out = {}
    for name in ("sdpa", "sparse"):
        cache = DynamicCache(config=model.config)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if name == "sparse":
            with sparse_prefill(model, config) as report:
                prefill(model, ids, cache, SnapKVPress(0.5))
            out["density"] = round(report.density, 4)
        else:
            prefill(model, ids, cache, SnapKVPress(0.5))
        end.record()
        torch.cuda.synchronize()
        out[f"{name}_prefill_s"] = round(start.elapsed_time(end) / 1000, 2)
        del cache
        torch.cuda.empty_cache()
        print(name, out, flush=True)
    out["speedup"] = round(out["sdpa_prefill_s"] / out["sparse_prefill_s"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--budget-blocks", type=int, default=32, help="key blocks of 64 read per query block")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", action="store_true", help="also time a whole prefill of the 8B-shaped model")
    parser.add_argument("--model-pattern", default="a_shape", choices=["a_shape", "vertical_slash", "block_sparse"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = {**run_metadata(), "command": " ".join(sys.argv), "context": args.context,
              "attention_one_layer": attention_alone(args.context, args.budget_blocks, args.repeats)}  # fmt: skip
    if args.model:
        result["prefill_snapkv_0.5"] = whole_prefill(args.context, args.budget_blocks, args.model_pattern)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
