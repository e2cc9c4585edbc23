"""``python -m kvpress.head_scores``: measure which attention heads retrieve and reason, on the user's own model.

HeadKV (Fu et al., 2025, arXiv 2410.19258) gives heads budgets in proportion to static importance scores found by a
needle probe. Each probe test hides a two-person passage in generated filler ("Ada is 34 years old and loves
rowing. Ben is 51 years old and loves chess.") and asks for the favourite activity of the older or the younger
person, which takes one reasoning step. The model answers greedily; for every answer token, each head's top-``k``
attended positions (``k`` = the length of the answer's sentence in tokens) are compared with that sentence, and each
position inside it adds ``1 / k``; a test's score is the mean over the answer tokens (answers of small models run
longer than the activity word, so a sum would favour verbose answers). A head's score list holds one entry per test
the model answered right (the asked activity named, the other not).

The written file feeds :class:`~kvpress.presses.headkv_press.HeadKVPress` (``HeadKVPress(scores="scores.json")``).
Nothing is downloaded: the filler comes from :mod:`kvpress.needle` and the passages from the word lists below.
"""

from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.needle import build_needle_context
from kvpress.offline_model import load_model
from kvpress.presses.head_importance import write_head_scores
from kvpress.utils import attention_layers, attn_implementation, num_heads
from kvpress.visualization.spans import token_spans

NAMES = ("Ada", "Ben", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kenji", "Lucia")
ACTIVITIES = (
    "rowing", "chess", "pottery", "birdwatching", "fencing", "origami", "sailing", "juggling", "knitting", "archery",
    "gardening", "beekeeping",
)  # fmt: skip


@dataclass
class ProbeTest:
    """One probe prompt: ``ids`` ``(1, n)``, the answer sentence's token range ``[start, end)``, the expected activity
    and the other person's (a wrong answer)."""

    ids: torch.Tensor
    span: tuple[int, int]
    answer: str
    other: str


def reasoning_needle(rng: random.Random) -> tuple[str, str, str, str, str]:
    """``(passage, answer sentence, question, answer, wrong answer)`` of a two-person passage asking for one
    comparison."""
    names, ages, activities = rng.sample(NAMES, 2), rng.sample(range(20, 80), 2), rng.sample(ACTIVITIES, 2)
    sentences = [f"{n} is {a} years old and loves {act}." for n, a, act in zip(names, ages, activities)]
    which = rng.choice(("older", "younger"))
    target = (ages[0] > ages[1]) == (which == "older")
    target = 0 if target else 1
    question = f"Of {names[0]} and {names[1]}, which activity does the {which} one love? Answer with the activity."
    return " ".join(sentences), sentences[target], question, activities[target], activities[1 - target]


def build_probe(tokenizer, lengths: list[int], depths: int, needles: int, seed: int) -> list[ProbeTest]:
    """``len(lengths) * depths * needles`` probe prompts (depths spread evenly over ``[0, 1]``), reproducible for a
    given ``seed``; the tokenizer's chat template wraps the prompt when it has one."""
    rng = random.Random(seed)
    tests = []
    for n_tokens in lengths:
        for d in range(depths):
            depth = d / (depths - 1) if depths > 1 else 0.5
            for _ in range(needles):
                passage, sentence, question, answer, other = reasoning_needle(rng)
                context = build_needle_context(tokenizer, n_tokens, passage, depth, seed=rng.randrange(2**31))
                text = f"{context}\n\n{question}"
                if getattr(tokenizer, "chat_template", None):
                    text = tokenizer.apply_chat_template(
                        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
                    )
                ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
                span = token_spans(tokenizer, ids[0], {"answer sentence": sentence})["answer sentence"]
                tests.append(ProbeTest(ids=ids, span=span, answer=answer, other=other))
    return tests


def answered(prediction: str, test: ProbeTest) -> bool:
    """The answer names the asked person's activity and not the other person's."""
    words = set(re.findall(r"[a-z]+", prediction.lower()))
    return test.answer in words and test.other not in words


def _span_hits(attentions: tuple, span: tuple[int, int]) -> torch.Tensor:
    """``(layers, heads)``: share of each head's top-``k`` attended positions inside ``span`` (``k`` its length)."""
    start, end = span
    k = end - start
    rows = torch.stack([a[0, :, -1].float() for a in attentions])  # (layers, heads, n)
    top = rows.topk(min(k, rows.shape[-1]), dim=-1).indices
    return ((top >= start) & (top < end)).sum(-1).double() / k


@torch.no_grad()
def probe_head_scores(
    model: nn.Module,
    tokenizer,
    tests: list[ProbeTest],
    max_new_tokens: int = 16,
    keep_all: bool = False,
    progress: bool = True,
) -> tuple[dict[str, list[float]], list[str]]:
    """Run every probe test; returns ``({"layer-head": [score per answered test]}, answers)``.

    The context is prefilled with the model's own attention; up to ``max_new_tokens`` answer tokens (until an end of
    sequence) are decoded greedily with eager attention, which returns the attention rows the scores are made from.
    A test's score is the mean over its answer tokens. Only tests whose answer names the right activity and not the
    other one count, unless ``keep_all``.
    """
    eos = tokenizer.eos_token_id if isinstance(tokenizer.eos_token_id, list) else [tokenizer.eos_token_id]
    n_layers, n_heads = len(attention_layers(model)), num_heads(attention_layers(model)[0])[0]
    scores: dict[str, list[float]] = {f"{layer}-{head}": [] for layer in range(n_layers) for head in range(n_heads)}
    answers = []
    device = next(model.parameters()).device
    previous = attn_implementation(model)
    for test in tqdm(tests, desc="head-score probe", disable=not progress):
        ids = test.ids.to(device)
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :-1], **cache_kwargs(model, cache), use_cache=True)
        total = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        token, generated = ids[:, -1:], []
        model.set_attn_implementation("eager")
        try:
            for _ in range(max_new_tokens):
                out = model(input_ids=token, **cache_kwargs(model, cache), use_cache=True, output_attentions=True)
                total += _span_hits(out.attentions, test.span).cpu()
                token = out.logits[:, -1:].argmax(-1)
                generated.append(int(token))
                if int(token) in eos:
                    break
        finally:
            model.set_attn_implementation(previous)
        answer = tokenizer.decode(generated, skip_special_tokens=True)
        answers.append(answer)
        if keep_all or answered(answer, test):
            for layer in range(n_layers):
                for head in range(n_heads):
                    scores[f"{layer}-{head}"].append(float(total[layer, head]) / len(generated))
    return scores, answers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kvpress.head_scores",
        description="Score every attention head of a model with HeadKV's retrieval-and-reasoning needle probe and "
        "write the scores HeadKVPress(scores=...) reads. Runs offline on generated contexts.",
    )
    parser.add_argument("--model", default="smollm2", help="model directory, or 'smollm2' for the offline "
                        "SmolLM2-135M-Instruct (default: smollm2)")  # fmt: skip
    parser.add_argument("--output", required=True, help="path of the JSON file to write")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 3000, 4000],
                        help="context lengths in tokens (default: 1000 2000 3000 4000)")  # fmt: skip
    parser.add_argument(
        "--depths", type=int, default=5, help="needle depths per length, spread over [0, 1] (default: 5)"
    )
    parser.add_argument("--needles", type=int, default=2, help="passages per (length, depth) (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the passages and the filler (default: 0)")
    parser.add_argument("--all-tests", action="store_true",
                        help="score every test, answered right or not (small models answer few)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer tokens decoded per test (default: 16)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    if any(n < 64 for n in args.lengths):
        parser.error(f"--lengths must all be at least 64 tokens, got {args.lengths}")
    if args.depths < 1 or args.needles < 1:
        parser.error(f"--depths and --needles must be positive ints, got {args.depths} and {args.needles}")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be a positive int, got {args.max_new_tokens}")
    return args


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, device)
    tests = build_probe(tokenizer, args.lengths, args.depths, args.needles, args.seed)
    scores, answers = probe_head_scores(model, tokenizer, tests, args.max_new_tokens, keep_all=args.all_tests)
    scored = len(next(iter(scores.values())))
    right = sum(answered(a, t) for a, t in zip(answers, tests))
    if scored == 0:
        raise SystemExit(
            f"the model answered none of the {len(tests)} probe tests (first answers: {answers[:3]}), so there are "
            "no scores to write; use shorter --lengths, more --max-new-tokens, or --all-tests"
        )
    settings = {k: getattr(args, k) for k in ("lengths", "depths", "needles", "seed", "max_new_tokens", "all_tests")}
    write_head_scores(args.output, scores, model=args.model, settings=settings, tests=len(tests), answered=right,
                      scored=scored)  # fmt: skip
    means = {key: sum(v) / len(v) for key, v in scores.items()}
    best = sorted(means, key=means.get, reverse=True)[:5]
    print(f"{right}/{len(tests)} probe tests answered right, {scored} scored; wrote {args.output}")
    print("most important heads (layer-head: mean score): " + ", ".join(f"{k}: {means[k]:.3f}" for k in best))
    return scores


if __name__ == "__main__":
    main()
