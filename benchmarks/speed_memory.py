"""Speed and memory of compressed caches on a Llama-3.1-8B-shaped model with random weights (GPU).

For each (context, batch, press): prefill seconds, KV bytes after prefill, peak memory over the weights during the
prefill, and decode milliseconds per token (median over the timed steps). All variants run in one process on the
same model, so their decode figures are comparable.

    python benchmarks/speed_memory.py --contexts 32768 131072 --out benchmarks/results/speed_memory_h100.json

With ``--cuda-graph`` the VarlenCache variants also decode through a captured CUDA graph (GraphDecoder):
``decode_ms_graph_median`` times one replay plus a synchronize, and ``graph_tokens_match`` records that the graph's
greedy tokens equal the eager loop's from the same cache state (cache snapshot, eager steps, restore, graph steps).

Variants:
    none/dynamic      no press, transformers' DynamicCache and the model's sdpa attention (the usual baseline)
    none/varlen       no press, every token moved to kvpress's VarlenCache (kvpress decode kernels)
    snapkv/varlen     SnapKVPress, uniform budget per head
    adakv(snapkv)     AdaKVPress over SnapKVPress: head-variable budgets, stored exactly in VarlenCache
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
import triton
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from kvpress.cache.attention import compressed_attention
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.layer_access import layer_memory_bytes, restore_cache, snapshot_cache
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.generation.graph_decoder import GraphDecoder
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.snapkv_press import SnapKVPress

GIB = 1024**3


def llama31_8b_config() -> LlamaConfig:
    """The shape of Llama-3.1-8B (weights are random: speed and memory do not depend on their values)."""
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=1,
        eos_token_id=2,
    )


def llama31_8b_model():
    """A Llama-3.1-8B-shaped model with random bf16 weights on the GPU, sdpa attention; exits without a CUDA GPU."""
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(llama31_8b_config(), dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def run_metadata() -> dict:
    """Device, library versions and model of a speed/memory run (the caller adds its command and settings)."""
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "transformers": transformers.__version__,
        "triton": triton.__version__,
        "model": "Llama-3.1-8B shape, random bf16 weights, sdpa prefill",
    }


def variants(ratios: list[float]):
    """``(name, press factory, uses VarlenCache)`` for every benchmarked configuration."""
    yield "none/dynamic", None, False
    yield "none/varlen", lambda: KnormPress(0.0), True
    for r in ratios:
        yield f"snapkv {r}", lambda r=r: SnapKVPress(r), True
        yield f"adakv(snapkv) {r}", lambda r=r: AdaKVPress(SnapKVPress(r)), True


GRAPH_CHECK_STEPS = 16  # greedy tokens compared between the eager loop and the graph


def run_one(
    model, n_ctx: int, batch: int, name: str, make_press, varlen: bool, steps: int, warmup: int,
    cuda_graph: bool = False, make_cache=None,
) -> dict:  # fmt: skip
    """Prefill ``n_ctx`` random tokens under the press, then time decode steps. ``make_cache(config)`` overrides the
    cache (default: VarlenCache when ``varlen``, else DynamicCache); ``varlen`` selects the kvpress decode path."""
    device = model.device
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (batch, n_ctx), generator=g).to(device)
    if make_cache is None:
        make_cache = VarlenCache if varlen else DynamicCache
    cache = make_cache(config=model.config)
    press = make_press() if make_press else None
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        if press is None:
            model.model(input_ids=ids, **cache_kwargs(model.model, cache), use_cache=True)
        else:
            with press(model):
                model.model(input_ids=ids, **cache_kwargs(model.model, cache), use_cache=True)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - start
    del ids
    kv_bytes = layer_memory_bytes(cache)
    held_after_prefill = torch.cuda.memory_allocated() - weights  # whatever the cache holds, in any layout
    peak_prefill = torch.cuda.max_memory_allocated() - weights
    full_bytes = 2 * batch * n_ctx * model.config.num_hidden_layers * model.config.num_key_value_heads * 128 * 2
    if varlen:
        # All tail room up front: the graph check must see the eager loop's buffers (same capacity, same kernel
        # launch shapes), and the graph needs them fixed anyway.
        cache.reserve(warmup + steps + 1 + (GRAPH_CHECK_STEPS + warmup + steps if cuda_graph else 0))
    token = torch.full((batch, 1), 11, device=device)
    times = []
    with torch.no_grad(), (compressed_attention(model) if varlen else _nullcontext()):
        for step in range(warmup + steps):
            position = torch.full((batch, 1), n_ctx + step, device=device)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(input_ids=token, **cache_kwargs(model, cache), position_ids=position, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            if step >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    graph = graph_decode(model, cache, token, n_ctx + warmup + steps, steps, warmup) if varlen and cuda_graph else {}
    peak_total = torch.cuda.max_memory_allocated() - weights
    result = {
        "context": n_ctx,
        "batch": batch,
        "variant": name,
        "prefill_s": round(prefill_s, 3),
        "kv_bytes": kv_bytes,
        "kv_gib": round(kv_bytes / GIB, 3),
        "kv_fraction_of_full": round(kv_bytes / full_bytes, 4),
        "allocated_after_prefill_gib": round(held_after_prefill / GIB, 3),
        "peak_over_weights_prefill_gib": round(peak_prefill / GIB, 2),
        "peak_over_weights_total_gib": round(peak_total / GIB, 2),
        "decode_ms_median": round(statistics.median(times), 2),
        "decode_ms_p10": round(sorted(times)[len(times) // 10], 2),
        "decode_steps": len(times),
    }
    if cuda_graph:
        result.update(
            {
                "decode_ms_graph_median": graph.get("median"),
                "decode_ms_graph_p10": graph.get("p10"),
                "decode_graph_steps": graph.get("steps"),
                "graph_tokens_match": graph.get("match"),
            }
        )
    del cache, out
    torch.cuda.empty_cache()
    return result


def graph_decode(model, cache, token: torch.Tensor, position: int, steps: int, warmup: int) -> dict:
    """Greedy decoding through a captured CUDA graph, continuing from ``token`` at ``position``.

    First checks the graph against the eager loop: from one cache state, ``GRAPH_CHECK_STEPS`` eager steps, restore,
    the same number of graph steps. Then times ``warmup + steps`` replays (each: replay + synchronize).
    """
    device = token.device
    batch = token.shape[0]
    state = snapshot_cache(cache)
    eager_tokens = []
    with torch.no_grad(), compressed_attention(model):
        t = token
        for i in range(GRAPH_CHECK_STEPS):
            pos = torch.full((batch, 1), position + i, device=device)
            out = model(input_ids=t, **cache_kwargs(model, cache), position_ids=pos, use_cache=True, logits_to_keep=1)
            t = out.logits[:, -1:].argmax(-1)
            eager_tokens.append(t)
    restore_cache(cache, state)
    del state, out
    decoder = GraphDecoder(model, cache, max_new_tokens=GRAPH_CHECK_STEPS + warmup + steps)
    graph_tokens = decoder.decode(token, position, GRAPH_CHECK_STEPS)
    match = bool(torch.equal(graph_tokens, torch.cat(eager_tokens, dim=1)))
    times = []
    for step in range(warmup + steps):  # continues from the check's last token
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        decoder.replay()
        torch.cuda.synchronize()
        if step >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    del decoder
    return {
        "median": round(statistics.median(times), 2),
        "p10": round(sorted(times)[len(times) // 10], 2),
        "steps": len(times),
        "match": match,
    }


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batch4-context", type=int, default=32768, help="context length of the batch-4 runs (0: skip)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed_memory_h100.json"))
    parser.add_argument(
        "--cuda-graph", action="store_true", help="also decode the VarlenCache variants through a captured CUDA graph"
    )
    args = parser.parse_args()
    model = llama31_8b_model()
    runs = [(n, 1) for n in args.contexts]
    if args.batch4_context:
        runs.append((args.batch4_context, 4))
    meta = {
        **run_metadata(),
        "command": "python benchmarks/speed_memory.py --contexts " + " ".join(map(str, args.contexts))
        + (" --cuda-graph" if args.cuda_graph else ""),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for n_ctx, batch in runs:
        for name, make_press, varlen in variants(args.ratios):
            if name.startswith("snapkv 0.75"):
                continue  # the issue compares uniform SnapKV at 0.5 only; AdaKV at both ratios
            res = run_one(model, n_ctx, batch, name, make_press, varlen, args.steps, args.warmup, args.cuda_graph)
            print(json.dumps(res), flush=True)
            results.append(res)
            # Rewritten after every variant: a run cut short still leaves what it measured.
            args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    head = f"{'context':>8} {'batch':>5} {'variant':<20} {'prefill s':>9} {'KV GiB':>7} {'peak GiB':>8} {'ms/token':>8}"
    print("\n" + head + (f" {'graph ms':>8} {'match':>5}" if args.cuda_graph else ""))
    for r in results:
        graph_cols = ""
        if args.cuda_graph:
            graph_cols = f" {str(r['decode_ms_graph_median']):>8} {str(r['graph_tokens_match']):>5}"
        print(
            f"{r['context']:>8} {r['batch']:>5} {r['variant']:<20} {r['prefill_s']:>9} {r['kv_gib']:>7} "
            f"{r['peak_over_weights_prefill_gib']:>8} {r['decode_ms_median']:>8}" + graph_cols
        )


if __name__ == "__main__":
    main()
