"""Chunked prefill at scale on a Llama-3.1-8B-shaped model with random weights (GPU): peak memory and prefill time
of a compressing prefill in one forward against chunk by chunk, and a prompt far longer than one forward could hold.

    python benchmarks/chunked_prefill.py --context 131072 --variants oneshot chunked \
        --out benchmarks/results/chunked_prefill_128k_h100.json
    python benchmarks/chunked_prefill.py --context 1048576 --variants chunked --target-size 8192 \
        --out benchmarks/results/chunked_prefill_1m_h100.json

Each variant prefills ``--context`` random tokens under SnapKV (``--ratio``, or ``--target-size`` tokens per head)
into a fresh cache through :func:`kvpress.generation.prefill` (``chunk_size=None`` or ``--chunk-size``), then
answers: a 16-token question and ``--new-tokens`` greedy tokens (:func:`kvpress.generation.greedy_decode`). It
records the prefill seconds, the peak GPU memory over the weights during the prefill and during the whole run, and
the KV bytes the cache holds. Results are saved after every variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_memory import GIB, llama31_8b_model, run_metadata  # noqa: E402

from kvpress.cache.layer_access import layer_memory_bytes  # noqa: E402
from kvpress.generation import greedy_decode, prefill  # noqa: E402
from kvpress.presses.snapkv_press import SnapKVPress  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--variants", nargs="+", choices=["oneshot", "chunked"], default=["oneshot", "chunked"])
    parser.add_argument("--chunk-size", type=int, default=8192)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--target-size", type=int, default=None, help="tokens kept per head instead of --ratio")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model = llama31_8b_model()
    weights = torch.cuda.memory_allocated()
    press = SnapKVPress(target_size=args.target_size) if args.target_size else SnapKVPress(args.ratio)
    gen = torch.Generator("cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), generator=gen, device="cuda")
    question = torch.randint(0, model.config.vocab_size, (1, 16), generator=gen, device="cuda")
    row = 2 * model.config.num_key_value_heads * model.config.head_dim * 2 * model.config.num_hidden_layers
    result = {**run_metadata(), "command": " ".join(sys.argv), "context": args.context, "press": repr(press),
              "kv_bytes_uncompressed": args.context * row, "variants": {}}  # fmt: skip
    for variant in args.variants:
        chunk = args.chunk_size if variant == "chunked" else None
        cache = DynamicCache(config=model.config)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        position, report = prefill(model, ids, cache, press, chunk_size=chunk)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak_prefill = torch.cuda.max_memory_allocated() - weights
        kv_bytes = layer_memory_bytes(cache)
        answer = greedy_decode(model, cache, [question], [position], args.new_tokens, eos_ids=[])[0]
        peak = torch.cuda.max_memory_allocated() - weights
        result["variants"][variant] = {
            "chunk_size": chunk,
            "prefill_s": round(seconds, 2),
            "peak_over_weights_prefill_gib": round(peak_prefill / GIB, 3),
            "peak_over_weights_gib": round(peak / GIB, 3),
            "kv_bytes_after_prefill": kv_bytes,
            "compression_ratio": round(report.compression_ratio, 4),
            "answer_tokens": len(answer),
        }
        print(variant, json.dumps(result["variants"][variant]), flush=True)
        del cache, report
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
