"""Perplexity of a long text under compression while decoding, against the full cache (SmolLM2, CPU).

The StreamingLLM papers' protocol: the text is fed token by token (teacher forcing) with the cache kept bounded by a
decode-time press, and each token's negative log-likelihood is taken from the logits of the step before it. The full
cache reads the whole text in one forward (the same numbers as feeding it token by token). The text is the
needle-in-a-haystack filler of kvpress.needle (deterministic, shipped with the library), ``--tokens`` long: past
SmolLM2's 8192 positions the full cache leaves the positions it was trained on, while cache positions
(``rerotate=True``) never exceed the budget.

    python benchmarks/streaming_perplexity.py --tokens 8704 --budget 256 --methods 0 1 \
        --output benchmarks/results/streaming_perplexity_smollm2_cpu.json

Writes the JSON (perplexity per chunk of ``--chunk`` tokens and overall, KV bytes held at the end) and a plot beside
it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers import DynamicCache

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.layer_access import layer_memory_bytes
from kvpress.needle import PASSKEY_NEEDLE, build_needle_context
from kvpress.offline_model import load_smollm2
from kvpress.presses import DecodingPress, H2OPress, KnormPress, StreamingLLMPress


def methods(budget: int) -> dict:
    """name -> decode-time press keeping ``budget`` tokens per head (None: the full cache)."""
    return {
        "full cache": None,
        f"StreamingLLM (4 sinks + {budget - 4} recent, cache positions)": DecodingPress(
            StreamingLLMPress(n_sink=4), compression_interval=1, target_size=budget, hidden_states_buffer=1,
            rerotate=True),
        f"StreamingLLM ({budget} tokens), original positions": DecodingPress(
            StreamingLLMPress(n_sink=4), compression_interval=1, target_size=budget, hidden_states_buffer=1),
        f"H2O ({budget} tokens, half recent)": H2OPress(target_size=budget),
        f"Knorm every 64 tokens ({budget})": DecodingPress(KnormPress(), compression_interval=64, target_size=budget,
                                                          hidden_states_buffer=1),
    }  # fmt: skip


def nll_full(model, ids) -> torch.Tensor:
    """(n - 1,) negative log-likelihoods of tokens 1..n-1 with every token cached (one forward)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")


def nll_streaming(model, ids, press, start: int) -> tuple[torch.Tensor, int]:
    """(n - 1,) negative log-likelihoods with the first ``start`` tokens prefilled and the rest fed one by one under
    ``press``; and the KV bytes held at the end."""
    cache = DynamicCache(config=model.config)
    out = []
    with torch.no_grad(), press(model):
        logits = model(input_ids=ids[:, :start], **cache_kwargs(model, cache)).logits[0].float()
        out.append(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:start], reduction="none"))
        prev = logits[-1:]
        for t in tqdm(range(start, ids.shape[1]), desc=type(press).__name__, leave=False, disable=None):
            out.append(torch.nn.functional.cross_entropy(prev, ids[0, t : t + 1], reduction="none"))
            if t == ids.shape[1] - 1:
                break
            position = torch.tensor([[t]])
            prev = model(input_ids=ids[:, t : t + 1], **cache_kwargs(model, cache), position_ids=position,
                         logits_to_keep=1).logits[0].float()  # fmt: skip
    return torch.cat(out), layer_memory_bytes(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=9216)
    parser.add_argument("--budget", type=int, default=1024, help="tokens per head kept by every decode-time press")
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per perplexity chunk in the table and plot")
    parser.add_argument("--methods", type=int, nargs="*", help="indices of the methods to run (default: all)")
    parser.add_argument("--output")
    args = parser.parse_args()
    model, tok = load_smollm2()
    text = build_needle_context(tok, args.tokens, PASSKEY_NEEDLE)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[:, : args.tokens]
    n = ids.shape[1]
    table = list(methods(args.budget).items())
    chosen = args.methods if args.methods else range(len(table))
    rows = []
    for i in chosen:
        name, press = table[i]
        t0 = time.perf_counter()
        if press is None:
            nll, kv = nll_full(model, ids), None
        else:
            nll, kv = nll_streaming(model, ids, press, start=min(args.budget, 256))
        chunks = [math.exp(float(c.mean())) for c in nll.split(args.chunk)]
        rows.append({"method": name, "press": repr(press), "perplexity": math.exp(float(nll.mean())),
                     "perplexity_per_chunk": chunks, "kv_bytes_at_end": kv,
                     "seconds": time.perf_counter() - t0})  # fmt: skip
        print(f"{name:<55} ppl {rows[-1]['perplexity']:8.3f}  per {args.chunk}: "
              + " ".join(f"{c:.2f}" for c in chunks), flush=True)  # fmt: skip
        if args.output:  # after every method: a long run interrupted keeps what it measured
            meta = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)", "tokens": n, "budget": args.budget,
                    "chunk": args.chunk, "max_position_embeddings": model.config.max_position_embeddings,
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "cpu": platform.processor()}  # fmt: skip
            out = Path(args.output)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
            plot(rows, args.chunk, model.config.max_position_embeddings, out.with_suffix(".png"))


def plot(rows, chunk: int, max_positions: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for row in rows:
        ppl = row["perplexity_per_chunk"]
        ax.plot([(i + 1) * chunk for i in range(len(ppl))], ppl, marker="o", label=row["method"])
    ax.axvline(max_positions, color="gray", linestyle=":", label=f"max_position_embeddings = {max_positions}")
    ax.set_xlabel("position in the text (end of each chunk)")
    ax.set_ylabel(f"perplexity over {chunk} tokens")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("Teacher-forced perplexity under compression while decoding (SmolLM2, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
