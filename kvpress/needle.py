"""Needle-in-a-haystack contexts: deterministic, varied filler text with one sentence (the needle) hidden inside."""

from __future__ import annotations

import math
import random

# The needle of the demo, the quick-start notebook and their tests: a passkey the offline model retrieves from a
# 2000-token context at depth 0.5 (seed 0) without compression.
PASSKEY_NEEDLE = "The secret passkey for the blue vault is 7392."
PASSKEY_QUESTION = "What is the secret passkey for the blue vault?"
PASSKEY_ANSWER = "7392"

# Filler sentences are drawn from these templates and word lists. None of them contains a digit, so a needle that
# carries a number (a passkey, a date) is the only place in the context where that number appears.
_TEMPLATES = (
    "The {person} from {place} {verb} the {thing} {time}.",
    "{time_cap}, a {adjective} {thing} was found near the {landmark} of {place}.",
    "Nobody in {place} remembers why the {landmark} is painted {colour}.",
    "A {adjective} wind crossed the {landmark} while the {person} {verb} a {thing}.",
    "In {place}, people say that a {colour} {thing} brings luck to any {person}.",
    "The {person} wrote a long letter about the {adjective} {landmark} and never sent it.",
    "Every {season}, the {landmark} of {place} fills with {adjective} visitors.",
    "The {person} kept a {colour} {thing} on the shelf beside the window.",
    "Rain fell on {place} {time}, and the {landmark} looked {adjective} in the grey light.",
    "Some travellers walk to the {landmark} only to watch the {colour} sky at dusk.",
    "The {person} and a friend argued about the {thing} until the lamps were lit.",
    "Old maps of {place} show a {adjective} path that leads past the {landmark}.",
)
_WORDS = {
    "person": (
        "baker", "fisherman", "librarian", "gardener", "carpenter", "painter", "sailor", "teacher", "shepherd",
        "potter", "weaver", "miller", "clockmaker", "beekeeper", "cartographer",
    ),
    "place": (
        "the northern valley", "the harbour town", "the hill village", "the river delta", "the old quarter",
        "the mountain pass", "the island market", "the quiet suburb", "the salt marshes", "the forest edge",
    ),
    "verb": (
        "repaired", "painted", "carried", "sold", "polished", "measured", "wrapped", "borrowed", "examined",
        "described",
    ),
    "thing": (
        "lantern", "wooden boat", "copper kettle", "woollen scarf", "wicker basket", "brass compass", "clay jar",
        "silk ribbon", "garden gate", "paper kite", "glass bottle", "leather satchel",
    ),
    "time": ("every winter", "last spring", "at dawn", "after the harvest", "before the festival", "in the evening"),
    "time_cap": ("Long ago", "One autumn", "Early one morning", "During the storm", "Late at night", "Last summer"),
    "adjective": (
        "quiet", "curious", "battered", "bright", "weathered", "gentle", "crowded", "narrow", "restless", "forgotten",
    ),
    "landmark": (
        "lighthouse", "stone bridge", "clock tower", "fountain", "library", "windmill", "orchard", "chapel",
        "harbour wall", "market square",
    ),
    "colour": ("blue", "green", "golden", "crimson", "white", "violet", "silver", "grey"),
    "season": ("spring", "summer", "autumn", "winter"),
}


def _sentence(rng: random.Random) -> str:
    template = rng.choice(_TEMPLATES)
    return template.format(**{slot: rng.choice(words) for slot, words in _WORDS.items()})


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _filler(tokenizer, n_tokens: int, rng: random.Random) -> list[str]:
    """Whole sentences totalling at least ``n_tokens`` tokens (sentence costs measured as they appear, space-led)."""
    sentences, total = [], 0
    while total < n_tokens:
        sentences.append(_sentence(rng))
        total += _count(tokenizer, " " + sentences[-1])
    return sentences


def build_needle_context(tokenizer, n_tokens: int, needle: str, depth: float = 0.5, seed: int = 0) -> str:
    """A haystack of about ``n_tokens`` tokens with ``needle`` inserted at a sentence boundary at ``depth``.

    Args:
        tokenizer: the tokenizer that counts tokens (``tokenizer(text, add_special_tokens=False)``).
        n_tokens: target length of the whole text in tokens (needle included); the result is off by at most
            half a word's tokens.
        needle: the sentence to hide; it appears exactly once, whole, and is the only text with digits in it if it
            has any (the filler contains none).
        depth: fraction of the filler that precedes the needle, in ``[0, 1]`` (0: the needle opens the text, 1: it
            ends it); in between, the needle sits at a sentence boundary less than one sentence away from that
            fraction (the nearest one, unless it would leave too little room after the needle).
        seed: seeds the choice of filler sentences; equal arguments give the identical text.

    Returns:
        The context string: filler sentences before the needle, the needle, filler after it, joined by spaces.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    if not isinstance(needle, str) or not needle.strip():
        raise ValueError("needle must be a non-empty string (the sentence to hide in the context)")
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or math.isnan(depth) or not 0 <= depth <= 1:
        raise ValueError(f"depth must be a number in [0, 1] (fraction of the filler before the needle), got {depth!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    needle = needle.strip()
    needle_tokens = _count(tokenizer, needle)
    if needle_tokens >= n_tokens:
        raise ValueError(f"n_tokens={n_tokens} leaves no room for filler around a {needle_tokens}-token needle")

    rng = random.Random(seed)
    budget = n_tokens - needle_tokens
    # Before the needle: whole sentences whose length is closest to the requested share of the filler (never more
    # than the whole filler budget, so the part after the needle can still land on n_tokens).
    before: list[str] = []
    if 0 < depth < 1:
        goal, used = round(depth * budget), 0
        for sentence in _filler(tokenizer, goal, rng):
            cost = _count(tokenizer, " " + sentence)
            if used + cost - goal > goal - used or used + cost > budget:
                break
            before.append(sentence)
            used += cost
        budget -= used
    # The rest of the filler goes after the needle (before it when depth == 1: the needle then ends the text). Token
    # counts of joined text are not exactly additive (merges at the seams), so the number of words is found by
    # bisection on the measured length: the most words that fit, or one more when that lands closer to n_tokens.
    words = " ".join(_filler(tokenizer, budget, rng)).split()

    def text(m: int) -> str:
        if depth == 1:
            return " ".join([*words[len(words) - m :], needle])
        return " ".join([*before, needle, *words[:m]])

    def length(m: int) -> int:
        return _count(tokenizer, text(m))

    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if length(mid) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    if lo < len(words) and length(lo + 1) - n_tokens < n_tokens - length(lo):
        lo += 1
    return text(lo)
