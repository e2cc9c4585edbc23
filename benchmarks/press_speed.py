"""End-to-end time and KV memory of presses on the offline SmolLM2 model: prefill + question + short answer per prompt.

Runs the pipeline over ``--prompts`` needle contexts of ``--tokens`` tokens (query-aware, one prompt at a time, as
``kvpress-eval`` does with batch size 1), once untimed to warm up, then timed. With ``--profile`` it also prints the
top operations of a few prompts per press under ``torch.profiler``, to see where a press spends its time.

    python benchmarks/press_speed.py --device cuda --output benchmarks/results/press_speed_smollm2_h100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from transformers import pipeline

from kvpress.needle import PASSKEY_NEEDLE, PASSKEY_QUESTION, build_needle_context
from kvpress.offline_model import load_smollm2
from kvpress.pipeline import TASK
from kvpress.presses import AdaKVPress, KnormPress, NACLPress, PyramidKVPress, SnapKVPress

PRESSES = {
    "snapkv": lambda r: SnapKVPress(r),
    "pyramidkv": lambda r: PyramidKVPress(r),
    "adakv-snapkv": lambda r: AdaKVPress(SnapKVPress(r)),
    "nacl": lambda r: NACLPress(r),
    "knorm": lambda r: KnormPress(r),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(pipe, contexts, press, device: str) -> tuple[float, float]:
    """Seconds for every context, and the mean share of the uncompressed KV bytes held."""
    sync(device)
    start = time.perf_counter()
    held = []
    for context in contexts:
        out = pipe(context, question=PASSKEY_QUESTION, press=press, max_new_tokens=8, query_aware=True,
                   return_report=True)  # fmt: skip
        held.append(out["report"].memory_ratio)
    sync(device)
    return time.perf_counter() - start, sum(held) / len(held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--presses", nargs="+", default=list(PRESSES))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--output")
    args = parser.parse_args()
    model, tokenizer = load_smollm2(dtype=torch.bfloat16 if args.device.startswith("cuda") else torch.float32,
                                    device=args.device)  # fmt: skip
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    contexts = [build_needle_context(tokenizer, args.tokens, PASSKEY_NEEDLE, depth=(i % 10) / 10, seed=i)
                for i in range(args.prompts)]  # fmt: skip
    results = {}
    for name in ["none", *args.presses]:
        press = None if name == "none" else PRESSES[name](args.ratio)
        run(pipe, contexts[:3], press, args.device)  # warm-up: kernels compiled, allocator primed
        seconds, held = run(pipe, contexts, press, args.device)
        results[name] = {"seconds": round(seconds, 3), "kv_memory": round(held, 4)}
        print(f"{name:>14}: {seconds:7.2f} s for {len(contexts)} prompts, KV held {held:.1%}", flush=True)
        if args.profile and press is not None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if args.device.startswith("cuda"):
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                run(pipe, contexts[:3], press, args.device)
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15), flush=True)
    if args.output:
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
        meta = {"device": device, "torch": torch.__version__, "prompts": args.prompts, "tokens": args.tokens,
                "ratio": args.ratio, "dtype": str(model.dtype)}  # fmt: skip
        with open(args.output, "w") as f:
            json.dump({"setup": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
