"""Bounded memory while generating: DecodingPress against the uncompressed cache over a long output, on a
Llama-3.1-8B-shaped model with random weights (GPU).

    python benchmarks/decoding_bounded_memory.py --variant decoding --new-tokens 32768 --cuda-graph \
        --out benchmarks/results/decoding_bounded_memory_graph_h100_decoding.json
    python benchmarks/decoding_bounded_memory.py --variant none --new-tokens 32768 --cuda-graph \
        --out benchmarks/results/decoding_bounded_memory_graph_h100_none.json

From a ``--prompt``-token random prompt, greedy decoding under ``DecodingPress(SnapKVPress(), interval, target)`` (or
no press) through :func:`kvpress.generation.decode_chunks`: eager (one forward per token, a transformers
``DynamicCache``) or ``--cuda-graph`` (a ``VarlenCache``; captured steps replayed between re-compressions, which run
eagerly). Every ``--window`` tokens it records the mean ms/token of the window, the KV bytes the cache allocates and
the most tokens one (layer, kv head) holds, read just before a re-compression (their largest point); then the
peak GPU memory over the weights of the whole run. The bound is ``target_size + compression_interval`` tokens per
(layer, kv head). Each variant is one process (one call of the device's time limit); results are saved after every
window, so a run stopped by a time limit keeps what it measured.
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
from kvpress.cache.varlen_cache import VarlenCache  # noqa: E402
from kvpress.generation import decode_chunks, prefill  # noqa: E402
from kvpress.presses.decoding_press import DecodingPress  # noqa: E402
from kvpress.presses.snapkv_press import SnapKVPress  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["decoding", "none"], required=True)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32768)
    parser.add_argument("--target-size", type=int, default=4096)
    parser.add_argument("--interval", type=int, default=512)
    parser.add_argument("--window", type=int, default=512, help="tokens per timing window")
    parser.add_argument("--cuda-graph", action="store_true", help="replay captured steps (VarlenCache)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.window % args.interval and args.variant == "decoding":
        raise SystemExit("--window must be a multiple of --interval (windows then end just before re-compressions)")

    model = llama31_8b_model()
    cfg = model.config
    weights = torch.cuda.memory_allocated()
    row = 2 * cfg.num_key_value_heads * cfg.head_dim * 2 * cfg.num_hidden_layers  # K+V bytes per token, bf16
    press = None
    if args.variant == "decoding":
        press = DecodingPress(SnapKVPress(), compression_interval=args.interval, target_size=args.target_size)
    gen = torch.Generator("cuda").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=gen, device="cuda")
    cache = VarlenCache(config=cfg) if args.cuda_graph else DynamicCache(config=cfg)
    windows = []
    result = {**run_metadata(), "command": " ".join(sys.argv), "variant": args.variant,
              "decoding": "cuda graph, VarlenCache" if args.cuda_graph else "eager, DynamicCache",
              "press": repr(press), "prompt_tokens": args.prompt, "new_tokens": args.new_tokens,
              "kv_bytes_per_token": row, "bound_tokens_per_head": args.target_size + args.interval if press else None,
              "windows": windows}  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    # The prompt's last token is the tail decode_chunks feeds first.
    position, _ = prefill(model, ids[:, :-1], cache)
    if args.cuda_graph:
        cache.compact()  # the ragged layout replays read
    chunks = decode_chunks(model, cache, [ids[:, -1:]], [position], args.new_tokens, [], cuda_graph=args.cuda_graph,
                           press=press, chunk_size=args.window)  # fmt: skip
    torch.cuda.synchronize()
    t0, done, pending = time.perf_counter(), 0, 0
    start = time.perf_counter()
    for chunk in chunks:
        done += chunk.shape[1]
        pending += chunk.shape[1]
        print(f"{done} tokens, {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        if pending < args.window and done != args.new_tokens:
            continue
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        windows.append({"tokens_generated": done, "context": args.prompt + done,
                        "ms_per_token": round((t1 - t0) * 1000 / pending, 2),
                        "kv_bytes": layer_memory_bytes(cache), "max_tokens_per_head": max_tokens_per_head(cache)})  # fmt: skip
        print(json.dumps(windows[-1]), flush=True)
        save(args.out, result)
        t0, pending = time.perf_counter(), 0
    peak = torch.cuda.max_memory_allocated() - weights
    bound = result["bound_tokens_per_head"]
    result.update({
        "kv_bytes_max": max(w["kv_bytes"] for w in windows),
        "max_tokens_per_head": max(w["max_tokens_per_head"] for w in windows),
        "within_bound": None if bound is None else all(w["max_tokens_per_head"] <= bound for w in windows),
        "peak_over_weights_gib": round(peak / GIB, 3),
    })  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "windows"}, indent=1))
    save(args.out, result)


def max_tokens_per_head(cache) -> int:
    """The most tokens any (layer, sequence, kv head) of ``cache`` holds."""
    if isinstance(cache, VarlenCache):
        return max(int(cache.head_lengths(i).max()) for i in range(len(cache.layers)))
    return cache.get_seq_length()


def save(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
