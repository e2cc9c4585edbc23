"""``python -m kvpress.qfilters``: calibrate Q-Filters on the user's own model, from generated text.

Each attention layer's queries (after the rotary embedding, as the cached keys are) are recorded over a few
generated haystacks (:mod:`kvpress.needle`); each head's filter is its first right singular vector, signed so the
queries project positively on it (:func:`kvpress.presses.qfilter_press.query_filters`). The written file feeds
:class:`~kvpress.presses.qfilter_press.QFilterPress` (``QFilterPress(0.5, filters="filters.json")``).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from kvpress.offline_model import load_model
from kvpress.presses.qfilter_press import query_filters, write_filters
from kvpress.query_recording import calibration_parser, calibration_texts, check_calibration_args, record_queries
from kvpress.utils import attention_layers, num_heads


def record_filters(model: nn.Module, texts_ids: list[torch.Tensor], max_queries: int = 4096) -> dict[int, torch.Tensor]:
    """Filters ``{layer: (kv_heads, head_dim)}`` of every full-attention layer from the queries of the prompts
    ``texts_ids`` (each ``(1, n)``), at most ``max_queries`` per head (evenly strided over each prompt)."""
    queries = record_queries(model, texts_ids, max_queries, rotated=True)
    layers = {m.layer_idx: m for m in attention_layers(model)}
    return {i: query_filters(q, num_heads(layers[i])[1]) for i, q in queries.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = calibration_parser(
        "python -m kvpress.qfilters",
        "Calibrate the Q-Filters of a model (the dominant direction of each head's queries) on generated text and "
        "write the file QFilterPress(filters=...) reads. Runs offline.",
        "path of the JSON file to write",
        max_queries=4096,
    )
    args = parser.parse_args(argv)
    check_calibration_args(parser, args)
    return args


def main(argv: list[str] | None = None) -> dict[int, torch.Tensor]:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, device)
    ids = calibration_texts(tokenizer, args.texts, args.length, args.seed)
    filters = record_filters(model, ids, args.max_queries)
    settings = {k: getattr(args, k) for k in ("texts", "length", "max_queries", "seed")}
    write_filters(args.output, filters, model=args.model, settings=settings)
    print(f"wrote the filters of {len(filters)} layers to {args.output}")
    return filters


if __name__ == "__main__":
    main()
