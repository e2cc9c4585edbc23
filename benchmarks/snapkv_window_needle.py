"""Which SnapKV settings find the needle on SmolLM2-135M-Instruct (CPU): observation window, pooling, AdaKV.

Fresh passkey contexts (``kvpress.needle``, a random 7-digit passkey per context, depths spread over the context)
are answered with the question inside the compressed prompt (``query_aware=True``) at compression ratio 0.5, by
SnapKV with several observation windows and pooling widths, and by AdaKV(SnapKV) with the two windows compared. An
answer counts when it contains the passkey. ``notebooks/what_a_press_keeps.ipynb`` explains the results.

    nice python benchmarks/snapkv_window_needle.py                           # 4000 and 1000 tokens, ~15 min on 2 idle cores
    nice python benchmarks/snapkv_window_needle.py --lengths 2000 --n-per-length 4

Results: ``benchmarks/results/snapkv_window_needle_smollm2_cpu.json`` (every answer) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import pipeline

from kvpress.needle import build_needle_context
from kvpress.offline_model import load_smollm2
from kvpress.pipeline import TASK
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.snapkv_press import SnapKVPress

NEEDLE = "The secret passkey for the blue vault is {passkey}."
QUESTION = "What is the secret passkey for the blue vault?"
DEPTHS = (0.05, 0.25, 0.45, 0.65, 0.85, 0.95)
OUT = Path(__file__).parent / "results" / "snapkv_window_needle_smollm2_cpu.json"


def variants(ratio: float) -> dict:
    """``{label: press or None}``; windows and kernels are explicit, so the results do not depend on the defaults."""
    return {
        "none": None,
        "snapkv w=32 k=7": SnapKVPress(ratio, window_size=32, kernel_size=7),
        "snapkv w=16 k=7": SnapKVPress(ratio, window_size=16, kernel_size=7),
        "snapkv w=8 k=7": SnapKVPress(ratio, window_size=8, kernel_size=7),
        "snapkv w=32 k=31": SnapKVPress(ratio, window_size=32, kernel_size=31),
        "adakv(snapkv w=32 k=7)": AdaKVPress(SnapKVPress(ratio, window_size=32, kernel_size=7)),
        "adakv(snapkv w=8 k=7)": AdaKVPress(SnapKVPress(ratio, window_size=8, kernel_size=7)),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4000, 1000], help="context lengths in tokens")
    parser.add_argument("--n-per-length", type=int, default=8, help="contexts per length (each its own passkey)")
    parser.add_argument("--seed", type=int, default=200, help="seed of the first context (then +1 per context)")
    parser.add_argument("--ratio", type=float, default=0.5, help="compression ratio of every press")
    parser.add_argument("--output", type=Path, default=OUT, help=f"JSON results (default: {OUT})")
    return parser.parse_args(argv)


def contexts(tok, length: int, n: int, seed: int) -> list[dict]:
    """``n`` needle contexts of ``length`` tokens: seed, depth, passkey and text of each."""
    out = []
    for s in range(seed, seed + n):
        passkey = str(random.Random(s).randrange(10**6, 10**7))
        depth = DEPTHS[s % len(DEPTHS)]
        text = build_needle_context(tok, length, NEEDLE.format(passkey=passkey), depth=depth, seed=s)
        out.append({"seed": s, "depth": depth, "passkey": passkey, "text": text})
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_smollm2()
    pipe = pipeline(TASK, model=model, tokenizer=tok)
    presses = variants(args.ratio)
    runs, started = [], time.time()
    for i, length in enumerate(args.lengths):
        cases = contexts(tok, length, args.n_per_length, args.seed + 100 * i)
        for label, press in tqdm(presses.items(), desc=f"{length} tokens"):
            for case in cases:
                answer = pipe(case["text"], question=QUESTION, press=press, query_aware=press is not None,
                              max_new_tokens=32)["answer"]  # fmt: skip
                runs.append({"length": length, "press": label, **{k: case[k] for k in ("seed", "depth", "passkey")},
                             "answer": answer, "found": case["passkey"] in answer})  # fmt: skip
    table = ["| press | " + " | ".join(f"{n} tokens" for n in args.lengths) + " |"]
    table.append("|---" * (len(args.lengths) + 1) + "|")
    for label in presses:
        cells = []
        for length in args.lengths:
            found = [r["found"] for r in runs if r["press"] == label and r["length"] == length]
            cells.append(f"{sum(found)}/{len(found)}")
        table.append(f"| {label} | " + " | ".join(cells) + " |")
    print("\n".join(table))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "command": " ".join(["python benchmarks/snapkv_window_needle.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)", "needle": NEEDLE, "question": QUESTION,
        "compression_ratio": args.ratio, "query_aware": True, "max_new_tokens": 32,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "transformers": transformers.__version__, "minutes": round((time.time() - started) / 60, 1),
        "table": table, "runs": runs,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
