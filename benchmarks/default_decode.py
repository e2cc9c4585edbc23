"""Decode speed of every cache kind through the library's default path, against the eager loop (GPU).

    python benchmarks/default_decode.py --contexts 32768 131072 --out benchmarks/results/default_decode_h100.json

One process, the Llama-3.1-8B-shaped model with random weights. For each context length and variant, the context is
prefilled once with ``CompressedContext.prefill`` (its defaults: the cache kind the press needs, compacted where a
CUDA graph applies), then answered twice per decode mode from the same compressed state: ``cuda_graph=None`` (the
default: a captured graph wherever one applies, else the eager loop) and ``cuda_graph=False`` (the eager loop).

Decode ms/token is ``(t(n_long) - t(n_short)) / (n_long - n_short)`` over two answers of ``n_short`` and ``n_long``
new tokens, so prefill-independent costs of an answer (the question's forward, graph capture) cancel out. The floor
is ``(weights + KV bytes) / copy bandwidth`` (bytes read + written by a large copy, measured in the same run);
``tokens_match`` records that the default path's tokens equal the eager loop's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import copy_bandwidth  # noqa: E402
from speed_memory import GIB, llama31_8b_model, run_metadata  # noqa: E402

from kvpress.cache.layer_access import layer_memory_bytes  # noqa: E402
from kvpress.generation import CompressedContext, graph_decoding_blocker  # noqa: E402
from kvpress.presses import (  # noqa: E402
    AdaKVPress,
    DecodingPress,
    H2OPress,
    PrefillDecodingPress,
    QuestPress,
    SnapKVPress,
    StreamingLLMPress,
)


def variants(context: int) -> dict:
    """name -> (press, quantization) of every cache kind the default path builds."""
    half = context // 2
    return {
        "none": (None, None),
        "snapkv 0.5": (SnapKVPress(0.5), None),
        "streaming_llm 0.75": (StreamingLLMPress(0.75), None),
        "adakv(snapkv) 0.5": (AdaKVPress(SnapKVPress(0.5)), None),
        "quantized 4-bit": (None, {"bits": 4}),
        "snapkv 0.5 + 4-bit": (SnapKVPress(0.5), {"bits": 4}),
        "snapkv 0.5 + decoding(snapkv)": (
            PrefillDecodingPress(SnapKVPress(0.5), DecodingPress(SnapKVPress(), 512, target_size=half)),
            None,
        ),
        "quest 4096": (QuestPress(token_budget=4096), None),
        "h2o (eager only)": (H2OPress(target_size=half), None),
    }


def answer_seconds(context: CompressedContext, tail: torch.Tensor, n_new: int, cuda_graph) -> tuple[float, list]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eager fallback's warning is recorded apart (graph_blocker)
        ids = context.generate([tail], n_new, eos_ids=(), cuda_graph=cuda_graph)
    torch.cuda.synchronize()
    return time.perf_counter() - start, ids[0]


def decode_ms(context, tail, n_short: int, n_long: int, cuda_graph) -> tuple[float, list]:
    """Median ms per token over two (short, long) answer pairs, and the long answer's ids."""
    answer_seconds(context, tail, n_short, cuda_graph)  # warm-up: kernels compiled, graph pools allocated
    per_token = []
    for _ in range(2):
        short, _ = answer_seconds(context, tail, n_short, cuda_graph)
        long, ids = answer_seconds(context, tail, n_long, cuda_graph)
        per_token.append((long - short) / (n_long - n_short) * 1000)
    return round(sorted(per_token)[0], 2), ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--only", nargs="+", default=None, help="variant names to run (default: all)")
    parser.add_argument("--short", type=int, default=8, help="new tokens of the short answer")
    parser.add_argument("--long", type=int, default=72, help="new tokens of the long answer")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model = llama31_8b_model()
    weights = torch.cuda.memory_allocated()
    bandwidth = copy_bandwidth()
    gen = torch.Generator("cuda").manual_seed(0)
    result = {"meta": {**run_metadata(" ".join(sys.argv)), "weights_bytes": weights,
                       "copy_bandwidth_gb_s": round(bandwidth / 1e9)}, "results": []}  # fmt: skip
    for n in args.contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda", generator=gen)
        tail = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda", generator=gen)
        for name, (press, quantization) in variants(n).items():
            if args.only and name not in args.only:
                continue
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            start = time.perf_counter()
            context = CompressedContext.prefill(model, ids, press, quantization=quantization)
            torch.cuda.synchronize()
            row = {"context": n, "variant": name, "prefill_s": round(time.perf_counter() - start, 2),
                   "cache": type(context.cache).__name__, "kv_bytes": layer_memory_bytes(context.cache),
                   "peak_over_weights_prefill_gib": round((torch.cuda.max_memory_allocated() - weights) / GIB, 2)}  # fmt: skip
            blocker = graph_decoding_blocker(model, press, context.cache)
            row["graph_blocker"] = blocker
            row["default_ms"], default_ids = decode_ms(context, tail, args.short, args.long, None)
            row["eager_ms"], eager_ids = decode_ms(context, tail, args.short, args.long, False)
            row["tokens_match"] = default_ids == eager_ids
            row["floor_ms"] = round((weights + row["kv_bytes"]) / bandwidth * 1000, 2)
            row["default_over_floor"] = round(row["default_ms"] / row["floor_ms"], 2)
            row["kv_gib"] = round(row["kv_bytes"] / GIB, 2)
            print(json.dumps(row), flush=True)
            result["results"].append(row)
            del context
            if args.out is not None:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=2) + "\n")
        del ids


if __name__ == "__main__":
    main()
