"""Queries of a model's attention layers recorded over generated text: what calibrated artifacts are computed from
(Q-Filters' directions, Expected Attention's query statistics)."""

from __future__ import annotations

import argparse

import torch
from torch import nn
from tqdm.auto import tqdm

from kvpress.needle import build_needle_context
from kvpress.utils import attention_layers, is_sliding_layer, pre_rope_query_states, query_states


def calibration_texts(tokenizer, n_texts: int, length: int, seed: int) -> list[torch.Tensor]:
    """``n_texts`` generated texts of about ``length`` tokens, as ids ``(1, n)`` (:mod:`kvpress.needle`'s haystack,
    with one ordinary sentence as its needle): nothing is downloaded."""
    texts = [build_needle_context(tokenizer, length, "The evening was quiet in the old harbour.", depth=0.5,
                                  seed=seed + i) for i in range(n_texts)]  # fmt: skip
    return [tokenizer(t, return_tensors="pt").input_ids for t in texts]


@torch.no_grad()
def record_queries(
    model: nn.Module, texts_ids: list[torch.Tensor], max_queries: int, rotated: bool, skip: int = 0
) -> dict[int, torch.Tensor]:
    """``{layer: (heads, N, head_dim)}`` float32 queries (on the CPU) of every full-attention layer over the prompts
    ``texts_ids`` (each ``(1, n)``): after the rotary embedding (``rotated``, as the cached keys are) or before it,
    without each prompt's first ``skip`` tokens, at most ``max_queries`` per head (evenly strided over each prompt)."""
    recorded: dict[int, list[torch.Tensor]] = {}
    per_text = max(1, max_queries // len(texts_ids))

    def hook(module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if rotated:
            q = query_states(module, hidden, kwargs["position_embeddings"])
        else:
            q = pre_rope_query_states(module, hidden)
        q = q[0, :, skip:].float()  # (heads, n - skip, d)
        step = max(1, q.shape[1] // per_text)
        recorded.setdefault(module.layer_idx, []).append(q[:, ::step].cpu())

    layers = [m for m in attention_layers(model) if not is_sliding_layer(m)]
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in layers]
    try:
        for ids in tqdm(texts_ids, desc="recording queries", unit="text"):
            model(input_ids=ids.to(model.device), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return {m.layer_idx: torch.cat(recorded[m.layer_idx], dim=1) for m in layers}


def calibration_parser(prog: str, description: str, output_help: str, max_queries: int) -> argparse.ArgumentParser:
    """The options every calibration command shares: ``--model``, ``--output``, ``--texts``, ``--length``,
    ``--max-queries``, ``--seed``, ``--device`` (check them with :func:`check_calibration_args`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model", default="smollm2", help="model directory, or 'smollm2' for the offline "
                        "SmolLM2-135M-Instruct (default: smollm2)")  # fmt: skip
    parser.add_argument("--output", required=True, help=output_help)
    parser.add_argument("--texts", type=int, default=8, help="generated texts (default: 8)")
    parser.add_argument("--length", type=int, default=2048, help="tokens per text (default: 2048)")
    parser.add_argument("--max-queries", type=int, default=max_queries,
                        help=f"queries kept per head (default: {max_queries})")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated text (default: 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser


def check_calibration_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` naming the option unless ``--texts``, ``--length`` and ``--max-queries`` are positive."""
    for name in ("texts", "length", "max_queries"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int, got {getattr(args, name)}")
