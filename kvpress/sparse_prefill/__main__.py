"""``python -m kvpress.sparse_prefill --out patterns.json``: search each head's sparse prefill pattern offline.

On the offline SmolLM2 model (or a local model directory with ``--model``), over a generated prompt of ``--tokens``
tokens (filler text with a passkey needle, nothing downloaded), writes the :class:`SparsePrefillConfig` that
:func:`kvpress.sparse_prefill.sparse_prefill` reads, and prints how many heads took each pattern and how much of
their attention it covers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kvpress.needle import PASSKEY_NEEDLE, build_needle_context
from kvpress.sparse_prefill.search import KINDS, search_patterns


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvpress.sparse_prefill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="pattern file to write (JSON)")
    parser.add_argument("--model", type=Path, default=None, help="a local model directory (default: SmolLM2)")
    parser.add_argument("--tokens", type=int, default=4096, help="prompt length of the search")
    parser.add_argument("--budget-blocks", type=int, default=8, help="key blocks read per query block")
    parser.add_argument("--block-size", type=int, choices=[16, 32, 64, 128], default=64)
    parser.add_argument("--min-tokens", type=int, default=1024, help="shorter prefills run dense attention")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.model is None:
        from kvpress.offline_model import load_smollm2

        model, tokenizer = load_smollm2()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not args.model.is_dir():
            raise SystemExit(f"--model: {str(args.model)!r} is not a local model directory")
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    text = build_needle_context(tokenizer, args.tokens, PASSKEY_NEEDLE, seed=args.seed)
    ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
    config, coverage = search_patterns(model, ids, args.budget_blocks, args.block_size, min_tokens=args.min_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config.save(args.out)
    counts = {kind: 0 for kind in KINDS}
    best = []
    for cov in coverage.values():
        for k in cov.argmax(0).tolist():
            counts[KINDS[k]] += 1
        best.append(cov.max(0).values.mean().item())
    print(f"{ids.shape[1]} tokens, {len(coverage)} layers, {args.budget_blocks} blocks of {args.block_size} per query "
          f"block: " + ", ".join(f"{kind} {n} heads" for kind, n in counts.items()))  # fmt: skip
    print(f"attention covered by each head's pattern: {100 * sum(best) / len(best):.1f}% on average")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
