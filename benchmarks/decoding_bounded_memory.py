"""Bounded memory while generating: DecodingPress against the uncompressed cache over a long output, on a
Llama-3.1-8B-shaped model with random weights (GPU).

    python benchmarks/decoding_bounded_memory.py --variant decoding --new-tokens 10240 \
        --out benchmarks/results/decoding_bounded_memory_h100_decoding.json
    python benchmarks/decoding_bounded_memory.py --variant none --new-tokens 10240 \
        --out benchmarks/results/decoding_bounded_memory_h100_none.json

From a ``--prompt``-token random prompt, greedy decoding (eager, one forward per token, under the press) records
after every step the KV bytes the cache holds, checked against the bound ``(target_size + compression_interval)``
tokens per layer and kv head; every ``--window`` steps the mean ms/token of the window; and the peak memory over
the weights of the whole run. Each variant is one process (one call of the device's time limit).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_memory import GIB, llama31_8b_model, run_metadata  # noqa: E402

from kvpress.cache.forward_keyword import cache_kwargs  # noqa: E402
from kvpress.cache.layer_access import layer_memory_bytes  # noqa: E402
from kvpress.presses.decoding_press import DecodingPress  # noqa: E402
from kvpress.presses.snapkv_press import SnapKVPress  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["decoding", "none"], required=True)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=10240)
    parser.add_argument("--target-size", type=int, default=4096)
    parser.add_argument("--interval", type=int, default=512)
    parser.add_argument("--window", type=int, default=512, help="steps per timing window")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model = llama31_8b_model()
    cfg = model.config
    weights = torch.cuda.memory_allocated()
    row = 2 * cfg.num_key_value_heads * cfg.head_dim * 2 * cfg.num_hidden_layers  # K+V bytes per token, bf16
    press = DecodingPress(SnapKVPress(), compression_interval=args.interval, target_size=args.target_size)
    bound = (args.target_size + args.interval) * row
    gen = torch.Generator("cuda").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=gen, device="cuda")
    cache = DynamicCache(config=model.config)
    torch.cuda.reset_peak_memory_stats()
    kv_bytes, windows = [], []
    result = {**run_metadata(), "command": " ".join(sys.argv), "variant": args.variant,
              "press": repr(press) if args.variant == "decoding" else None, "prompt_tokens": args.prompt,
              "new_tokens": args.new_tokens, "kv_bytes_bound": bound if args.variant == "decoding" else None,
              "windows": windows}  # fmt: skip
    with torch.no_grad(), press(model) if args.variant == "decoding" else contextlib.nullcontext():
        logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for step in range(args.new_tokens):
            position = torch.full((1, 1), args.prompt + step, device="cuda")
            logits = model(input_ids=token, **cache_kwargs(model, cache), position_ids=position, use_cache=True,
                           logits_to_keep=1).logits  # fmt: skip
            token = logits[:, -1:].argmax(-1)
            kv_bytes.append(layer_memory_bytes(cache))  # from tensor shapes: no sync
            if (step + 1) % args.window == 0:
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                windows.append({"tokens_generated": step + 1, "context": args.prompt + step + 1,
                                "ms_per_token": round((t1 - t0) * 1000 / args.window, 2),
                                "kv_bytes": kv_bytes[-1]})  # fmt: skip
                print(json.dumps(windows[-1]), flush=True)
                save(args.out, result)  # a run stopped by a time limit keeps its windows
                t0 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated() - weights
    result.update({
        "kv_bytes_max": max(kv_bytes),
        "kv_bytes_final": kv_bytes[-1],
        "within_bound_every_step": all(b <= bound for b in kv_bytes) if args.variant == "decoding" else None,
        "peak_over_weights_gib": round(peak / GIB, 3),
    })  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "windows"}, indent=1))
    save(args.out, result)


def save(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
