"""Quest at a long context on a Llama-3.1-8B-shaped model with random weights (GPU): decode ms/token reading a page
budget, against full attention over every token, in one process.

    python benchmarks/quest_decode.py --context 131072 --budget 4096 --out benchmarks/results/quest_decode_h100.json

Both caches hold ``--context`` random tokens per layer (keys and values; the timing does not depend on their values)
and decode greedily through one captured CUDA graph per variant (an eager step at batch 1 is host-bound, which
would hide the attention's cost); the graph's tokens are checked against eager steps from the same cache state.

Variants:
    full       every token in kvpress's VarlenCache, read by the varlen decode kernel (the fastest full attention)
    quest      QuestPress's layer (``dense_layers=0``: every layer selects pages), ``--budget`` tokens per kv head
    quest_topk the same, its pages chosen by ``torch.topk`` instead of the selection kernel (``select_pages``)

The floor is the time to read what a step must read (weights, plus the selected pages and the page bounds) at the
measured device copy bandwidth (bytes read + written by a large copy); the issue's target is quest <= 1.5 x the
floor of reading the weights and ``--budget`` tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import copy_bandwidth  # noqa: E402
from speed_memory import GIB, llama31_8b_model, run_metadata  # noqa: E402

import kvpress.cache.quest_layer as quest_layer_module  # noqa: E402
from kvpress.cache.attention import compressed_attention  # noqa: E402
from kvpress.cache.layer_access import decode_bytes_read, layer_memory_bytes, restore_cache, snapshot_cache  # noqa: E402
from kvpress.cache.quest_layer import QuestLayer  # noqa: E402
from kvpress.cache.varlen_cache import VarlenCache  # noqa: E402
from kvpress.generation.graph_decoder import greedy_step  # noqa: E402

VARIANTS = ("quest", "quest_topk", "full")


def random_kv(model, n: int, gen: torch.Generator):
    cfg = model.config
    shape = (1, cfg.num_key_value_heads, n, cfg.head_dim)
    return (torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))


def quest_cache(model, n: int, page_size: int, budget: int, room: int) -> DynamicCache:
    gen = torch.Generator("cuda").manual_seed(0)
    cache = DynamicCache(config=model.config)
    for i in range(model.config.num_hidden_layers):
        keys, values = random_kv(model, n, gen)
        layer = QuestLayer.from_dense(keys, values, page_size, budget)
        layer.reserve(room)
        cache.layers[i] = layer
        del keys, values
    return cache


def full_cache(model, n: int, room: int) -> VarlenCache:
    gen = torch.Generator("cuda").manual_seed(0)
    cache = VarlenCache(config=model.config)
    heads = model.config.num_key_value_heads
    for i in range(model.config.num_hidden_layers):
        keys, values = random_kv(model, n, gen)
        layer = cache.layers[i]
        layer.adopt(keys[0].reshape(-1, keys.shape[-1]), values[0].reshape(-1, values.shape[-1]),
                    torch.full((1, heads), n), keys.shape[-1])  # fmt: skip
        layer.reserve(room)
        del keys, values
    return cache


def _host_lengths(cache) -> list[int]:
    return [layer.length if isinstance(layer, QuestLayer) else layer.tail_len for layer in cache.layers]


def _set_host_lengths(cache, lengths: list[int]) -> None:
    for layer, n in zip(cache.layers, lengths):
        if isinstance(layer, QuestLayer):
            layer.length = n
        else:
            layer.tail_len = n


def time_decode(model, cache, position: int, steps: int, check: int) -> dict:
    """Eager ms/token, then a captured step: its tokens against the eager ones from the same state, and ms/token."""
    ids = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    pos = torch.full((1, 1), position, dtype=torch.long, device="cuda")
    state = snapshot_cache(cache)
    eager_ms, eager_tokens = [], []
    with torch.no_grad(), compressed_attention(model):
        for _ in range(check):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            greedy_step(model, cache, ids, pos)
            torch.cuda.synchronize()
            eager_ms.append((time.perf_counter() - t0) * 1000)
            eager_tokens.append(int(ids))
        restore_cache(cache, state)
        ids.zero_()
        pos.fill_(position)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                greedy_step(model, cache, ids, pos)
        torch.cuda.current_stream().wait_stream(stream)
        restore_cache(cache, state)
        ids.zero_()
        pos.fill_(position)
        host = _host_lengths(cache)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            greedy_step(model, cache, ids, pos)
        _set_host_lengths(cache, host)  # the capture ran the Python once but executed nothing
        graph_tokens, times = [], []
        for step in range(check + steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            if step < check:
                graph_tokens.append(int(ids))
            else:
                times.append((time.perf_counter() - t0) * 1000)
    del graph
    return {
        "eager_ms_median": round(statistics.median(eager_ms[2:]), 2),
        "graph_ms_median": round(statistics.median(times), 3),
        "graph_ms_p10": round(sorted(times)[len(times) // 10], 3),
        "graph_tokens_match_eager": graph_tokens == eager_tokens,
        "steps": len(times),
    }


def layer_attention_us(cache, layer_idx: int, heads: int, head_dim: int, repeats: int = 50) -> float:
    """Median microseconds of one layer's decode attention (the view's ``attend``) for a random query."""
    layer = cache.layers[layer_idx]
    query = torch.randn(1, heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    if isinstance(layer, QuestLayer):
        from kvpress.cache.quest_layer import QuestView

        view = QuestView(layer)
    else:
        from kvpress.cache.varlen_layer import VarlenView

        view = VarlenView(layer, None)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        view.attend(query, scaling=head_dim**-0.5)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return round(statistics.median(times[5:]), 1)


def profile_kernels(model, cache, position: int, steps: int, top: int = 25) -> list[dict]:
    """GPU microseconds per decode step of each kernel over ``steps`` eager steps (kernel time only: the gaps of the
    host-bound eager loop are not counted), the ``top`` largest."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    pos = torch.full((1, 1), position, dtype=torch.long, device="cuda")
    state = snapshot_cache(cache)
    with torch.no_grad(), compressed_attention(model):
        greedy_step(model, cache, ids, pos)  # compiles
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                greedy_step(model, cache, ids, pos)
            torch.cuda.synchronize()
    restore_cache(cache, state)
    rows = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    rows.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return [{"kernel": e.key[:90], "calls_per_step": round(e.count / steps, 1),
             "us_per_step": round(e.self_device_time_total / steps, 1)} for e in rows[:top]]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--budget", type=int, default=4096, help="tokens read per kv head and step")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200, help="timed graph replays")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile STEPS eager Quest steps: GPU time per step of each kernel")  # fmt: skip
    parser.add_argument("--only", choices=VARIANTS, nargs="+", default=None, help="run these variants")
    args = parser.parse_args()

    model = llama31_8b_model()
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth()
    check = 8
    room = check + args.steps + 16
    result = {**run_metadata(), "command": " ".join(sys.argv), "context": args.context, "budget": args.budget,
              "page_size": args.page_size, "weights_bytes": weights, "copy_bandwidth_gb_s": round(bandwidth / 1e9),
              "variants": {}}  # fmt: skip
    kv_row = 2 * cfg.num_key_value_heads * cfg.head_dim * 2 * cfg.num_hidden_layers  # K+V bytes per token, bf16
    budget_floor = (weights + args.budget * kv_row) / bandwidth * 1000
    result["floor_weights_and_budget_ms"] = round(budget_floor, 3)
    for name in VARIANTS if args.only is None else args.only:
        select = quest_layer_module.select_pages
        if name == "quest_topk":
            quest_layer_module.select_pages = lambda s, n: s.topk(n, dim=-1, sorted=False).indices.to(torch.int32)
        if name.startswith("quest"):
            cache = quest_cache(model, args.context, args.page_size, args.budget, room)
        else:
            cache = full_cache(model, args.context, room)
        read = decode_bytes_read(cache)
        timing = time_decode(model, cache, args.context, args.steps, check)
        layer_us = layer_attention_us(cache, 0, cfg.num_attention_heads, cfg.head_dim)
        if args.profile and name.startswith("quest"):
            result[f"{name}_profile"] = profile_kernels(model, cache, args.context, args.profile)
            print(json.dumps(result[f"{name}_profile"], indent=1), flush=True)
        quest_layer_module.select_pages = select
        floor = (weights + read) / bandwidth * 1000
        result["variants"][name] = {
            **timing,
            "kv_bytes_held": layer_memory_bytes(cache),
            "kv_bytes_read_per_token": read,
            "floor_ms": round(floor, 3),
            "graph_over_floor": round(timing["graph_ms_median"] / floor, 3),
            "layer_attention_us": layer_us,
        }
        print(name, json.dumps(result["variants"][name]), flush=True)
        del cache
        torch.cuda.empty_cache()
    if {"quest", "full"} <= set(result["variants"]):
        quest = result["variants"]["quest"]["graph_ms_median"]
        result["quest_over_budget_floor"] = round(quest / budget_floor, 3)
        result["quest_speedup_over_full"] = round(result["variants"]["full"]["graph_ms_median"] / quest, 3)
    print(json.dumps({k: v for k, v in result.items() if k != "variants"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
