"""Needle retrieval with compression while decoding (SmolLM2-135M-Instruct, CPU).

The context is prefilled whole; the decode-time press then acts from the question's forward on (the question is the
first thing it sees, so query-window scorers read it) and keeps every layer at ``--budgets`` tokens per head while the
answer is generated. For comparison: SnapKV compressing the prompt with the question inside it (query-aware prefill)
at the same number of tokens. Passkey contexts as benchmarks/snapkv_window_needle.py; an answer counts when it
contains the passkey.

    python benchmarks/decoding_needle.py --lengths 2000 --n-per-length 6 --budgets 256 512
    python benchmarks/decoding_needle.py --budgets 1024 --only Quest --output benchmarks/results/decoding_needle_quest_1024_smollm2_cpu.json

Results: ``benchmarks/results/decoding_needle_smollm2_cpu.json`` (every answer) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from snapkv_window_needle import NEEDLE, QUESTION, contexts  # noqa: E402

from kvpress.offline_model import load_smollm2  # noqa: E402
from kvpress.pipeline import TASK  # noqa: E402
from kvpress.presses import (  # noqa: E402
    CAMPress,
    DecodingPress,
    H2OPress,
    KnormPress,
    QuestPress,
    ScissorhandsPress,
    SnapKVPress,
    StreamingLLMPress,
)

OUT = Path(__file__).parent / "results" / "decoding_needle_smollm2_cpu.json"


def variants(budget: int) -> dict:
    """``{label: (press, query_aware)}`` keeping ``budget`` tokens per head."""
    return {
        "SnapKV while decoding (window 16, every 16 tokens)": (DecodingPress(
            SnapKVPress(window_size=16), compression_interval=16, target_size=budget, hidden_states_buffer=16), False),
        "Knorm while decoding (every 16 tokens)": (DecodingPress(KnormPress(), 16, budget, hidden_states_buffer=1),
                                                   False),
        "H2O (every token)": (H2OPress(target_size=budget), False),
        "Scissorhands (every 16 tokens, window 64)": (ScissorhandsPress(target_size=budget), False),
        "CAM (every token)": (CAMPress(target_size=budget), False),
        "StreamingLLM (4 sinks, rolling window, cache positions)": (DecodingPress(
            StreamingLLMPress(n_sink=4), 1, budget, hidden_states_buffer=1, rerotate=True), False),
        "Quest (pages of 16, the best pages read at every token; every token kept)": (QuestPress(
            page_size=16, token_budget=budget), False),
        "SnapKV at prefill, question in the prompt (window 16)": (SnapKVPress(target_size=budget, window_size=16),
                                                                  True),
    }  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2000], help="context lengths in tokens")
    parser.add_argument("--n-per-length", type=int, default=6, help="contexts per length (each its own passkey)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512], help="tokens per head kept")
    parser.add_argument("--seed", type=int, default=300, help="seed of the first context (then +1 per context)")
    parser.add_argument("--output", type=Path, default=OUT, help=f"JSON results (default: {OUT})")
    parser.add_argument("--only", default=None, help="run only the presses whose label starts with this text")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_smollm2()
    pipe = pipeline(TASK, model=model, tokenizer=tok)
    runs, started = [], time.time()
    cases = {n: contexts(tok, n, args.n_per_length, args.seed + 100 * i) for i, n in enumerate(args.lengths)}
    for n, items in cases.items():
        for case in tqdm(items, desc=f"{n} tokens, no compression"):
            answer = pipe(case["text"], question=QUESTION, max_new_tokens=32)["answer"]
            runs.append({"length": n, "budget": None, "press": "none", "seed": case["seed"], "answer": answer,
                         "found": case["passkey"] in answer})  # fmt: skip
        for budget in args.budgets:
            chosen = {k: v for k, v in variants(budget).items() if args.only is None or k.startswith(args.only)}
            for label, (press, query_aware) in tqdm(chosen.items(), desc=f"{n} tokens, budget {budget}"):
                for case in items:
                    answer = pipe(case["text"], question=QUESTION, press=press, query_aware=query_aware,
                                  max_new_tokens=32)["answer"]  # fmt: skip
                    runs.append({"length": n, "budget": budget, "press": label, "seed": case["seed"],
                                 "answer": answer, "found": case["passkey"] in answer})  # fmt: skip
    columns = [(n, b) for n in args.lengths for b in args.budgets]
    table = [
        "| press | " + " | ".join(f"{n} tokens, {b} kept" for n, b in columns) + " |",
        "|---" * (1 + len(columns)) + "|",
    ]
    for label in ["none", *(k for k in variants(args.budgets[0]) if args.only is None or k.startswith(args.only))]:
        cells = []
        for n, b in columns:
            found = [r["found"] for r in runs if r["press"] == label and r["length"] == n and r["budget"] in (b, None)]
            cells.append(f"{sum(found)}/{len(found)}")
        table.append(f"| {label} | " + " | ".join(cells) + " |")
    print("\n".join(table))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "command": " ".join(["python benchmarks/decoding_needle.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)", "needle": NEEDLE, "question": QUESTION,
        "max_new_tokens": 32, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "transformers": transformers.__version__, "minutes": round((time.time() - started) / 60, 1),
        "table": table, "runs": runs,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
