"""MiniCache on SmolLM2: the KV bytes it really holds against the full cache and against pruning the same bytes.

For each MiniCache setting, the pipeline answers needle questions (2000-token contexts, 7-digit passkeys at three
depths, six filler seeds) and reports the cache bytes after prefill. The same questions are then answered by presses
that prune tokens down to the same share of the full cache: SnapKV (question in the compressed prompt) and Knorm.
A hit is the passkey as the answer's first number. First it prints (and records) the median angle between every two
adjacent layers' keys, the quantity MiniCache's merge relies on: near 0 the layers share directions, near 0.5 (in
units of pi) they are unrelated. ``--angles-only --model DIR`` prints just those for another model.

    python benchmarks/minicache_bytes.py --output benchmarks/results/minicache_bytes_smollm2_cpu.json
    python benchmarks/minicache_bytes.py --angles-only --model path/to/model
"""

from __future__ import annotations

import argparse
import json
import random
import re

import torch
from transformers import DynamicCache, pipeline

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.needle import build_needle_context
from kvpress.offline_model import load_smollm2
from kvpress.pipeline import TASK
from kvpress.presses import KnormPress, MiniCachePress, SnapKVPress
from kvpress.presses.minicache_press import slerp_merge

QUESTION = "What is the passkey? Give only the number."


def needles(tokenizer, n_tokens: int, count: int) -> list[tuple[str, str]]:
    rng = random.Random(0)
    out = []
    for i in range(count):
        key = str(rng.randrange(10**6, 10**7))
        context = build_needle_context(
            tokenizer, n_tokens, f"The passkey is {key}.", (0.2, 0.5, 0.8)[i % 3], seed=100 + i
        )
        out.append((context, key))
    return out


def score(pipe, cases, press, query_aware: bool) -> tuple[int, float]:
    hits, ratios = 0, []
    for context, key in cases:
        out = pipe(context, question=QUESTION, press=press, query_aware=query_aware, max_new_tokens=16,
                   return_report=True)  # fmt: skip
        found = re.search(r"\d+", out["answer"])
        hits += found is not None and found.group() == key
        ratios.append(out["report"].memory_ratio)
    return hits, sum(ratios) / len(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--contexts", type=int, default=6)
    parser.add_argument("--output")
    parser.add_argument("--model", default="smollm2", help="'smollm2' (offline) or a model directory")
    parser.add_argument("--angles-only", action="store_true", help="print the adjacent-layer key angles and stop")
    args = parser.parse_args()
    if args.model == "smollm2":
        model, tokenizer = load_smollm2()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    cases = needles(tokenizer, args.tokens, args.contexts)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=tokenizer(cases[0][0], return_tensors="pt").input_ids, **cache_kwargs(model, cache))
    n_layers = len(cache.layers)
    angles = {
        f"{i}-{i + 1}": round(float(slerp_merge(cache.layers[i].keys, cache.layers[i + 1].keys, 0.6)[3].median()), 3)
        for i in range(n_layers - 1)
    }
    print("median angle / pi between adjacent layers' keys:", angles, flush=True)
    if args.angles_only:
        return
    hits, _ = score(pipe, cases, None, False)
    rows = [{"press": "none", "kv_memory": 1.0, "hits": hits}]
    print(f"{'none':>32}: KV held 100.0%, {hits}/{len(cases)} hits", flush=True)
    for start in (None, 20, 24):
        mini = MiniCachePress(start_layer=start)
        hits, held = score(pipe, cases, mini, False)
        label = f"minicache from layer {n_layers // 2 if start is None else start}"
        rows.append({"press": label, "kv_memory": round(held, 4), "hits": hits})
        print(f"{label:>32}: KV held {held:.1%}, {hits}/{len(cases)} hits", flush=True)
        for name, press, aware in (("snapkv", SnapKVPress(1 - held), True), ("knorm", KnormPress(1 - held), False)):
            hits, pruned = score(pipe, cases, press, aware)
            rows.append({"press": f"{name} at the same bytes", "kv_memory": round(pruned, 4), "hits": hits,
                         "compared_with": label})  # fmt: skip
            print(f"{name + ' at the same bytes':>32}: KV held {pruned:.1%}, {hits}/{len(cases)} hits", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"setup": {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "tokens": args.tokens,
                                 "contexts": args.contexts, "question": QUESTION},
                       "adjacent_key_angle_over_pi": angles, "results": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
