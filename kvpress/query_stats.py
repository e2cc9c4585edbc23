"""``python -m kvpress.query_stats``: calibrate Expected Attention's query statistics on the user's own model.

Each full-attention layer's pre-RoPE queries are recorded over a few generated texts (without each text's first
``--n-sink`` tokens, whose queries are outliers); each query head's mean and covariance are written to the file that
``ExpectedAttentionPress(0.5, stats="stats.pt")`` reads instead of the prompt's own statistics. Runs offline.
"""

from __future__ import annotations

import argparse

import torch

from kvpress.offline_model import load_model
from kvpress.presses.expected_attention_press import query_moments, write_query_stats
from kvpress.query_recording import calibration_parser, calibration_texts, check_calibration_args, record_queries


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = calibration_parser(
        "python -m kvpress.query_stats",
        "Record the mean and covariance of each attention head's pre-RoPE queries on generated text and write the "
        "file ExpectedAttentionPress(stats=...) reads. Runs offline.",
        "path of the file to write (torch.save format)",
        max_queries=8192,
    )
    parser.add_argument("--n-sink", type=int, default=4, help="first tokens of each text left out (default: 4)")
    args = parser.parse_args(argv)
    check_calibration_args(parser, args)
    if not 0 <= args.n_sink < args.length:
        parser.error(f"--n-sink must be in [0, --length), got {args.n_sink}")
    return args


def main(argv: list[str] | None = None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, device)
    ids = calibration_texts(tokenizer, args.texts, args.length, args.seed)
    queries = record_queries(model, ids, args.max_queries, rotated=False, skip=args.n_sink)
    stats = {i: query_moments(q) for i, q in queries.items()}
    settings = {k: getattr(args, k) for k in ("texts", "length", "max_queries", "n_sink", "seed")}
    write_query_stats(args.output, stats, model=args.model, settings=settings)
    print(f"wrote the query statistics of {len(stats)} layers to {args.output}")
    return stats


if __name__ == "__main__":
    main()
