"""Token counting and the search for the haystack size that fills a token budget."""

from __future__ import annotations

from collections.abc import Callable


def token_counter(tokenizer) -> Callable[[str], int]:
    """``str -> number of tokens`` for a Hugging Face tokenizer (no special tokens) or a callable ``str -> list``."""
    if hasattr(tokenizer, "encode"):
        return lambda text: len(tokenizer.encode(text, add_special_tokens=False))
    if callable(tokenizer):
        return lambda text: len(tokenizer(text))
    raise ValueError(
        f"tokenizer must have an encode method or be a callable str -> list, got {type(tokenizer).__name__}"
    )


def largest_fitting(tokens_of: Callable[[int], int], target: int, low: int = 0, high: int | None = None) -> int | None:
    """The largest ``n`` in ``[low, high]`` with ``tokens_of(n) <= target``, or None when ``low`` already exceeds it.

    ``tokens_of`` must be non-decreasing in ``n`` (up to tokenizer merges at the seams); the search grows the bracket
    geometrically from ``low`` and then bisects, so it costs about ``2 * log2(n)`` evaluations.
    """
    if tokens_of(low) > target:
        return None
    fits, step = low, 1
    while True:
        probe = low + step
        if high is not None and probe > high:
            probe = high + 1
            break
        if tokens_of(probe) > target:
            break
        fits, step = probe, 2 * step
    over = probe  # tokens_of(over) > target, or over is past ``high``
    while over - fits > 1:
        mid = (fits + over) // 2
        if tokens_of(mid) <= target:
            fits = mid
        else:
            over = mid
    return fits
