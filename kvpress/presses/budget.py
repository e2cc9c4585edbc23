"""Token budgets: a compression ratio or an absolute number of kept tokens."""

from __future__ import annotations

import math


def check_ratio(value: float, name: str = "compression_ratio") -> None:
    """Raise ``ValueError`` unless ``value`` is a number in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1) (fraction of tokens removed), got {value!r}")


def check_budget(compression_ratio: float, target_size: int | None) -> None:
    """Validate a budget given as a ratio or as an absolute number of kept tokens (not both)."""
    check_ratio(compression_ratio)
    if target_size is not None:
        if isinstance(target_size, bool) or not isinstance(target_size, int) or target_size < 1:
            raise ValueError(
                f"target_size must be a positive int (tokens kept per layer and head), got {target_size!r}"
            )
        if compression_ratio != 0:
            raise ValueError(
                "give either compression_ratio or target_size, not both "
                f"(got compression_ratio={compression_ratio}, target_size={target_size})"
            )


def n_kept(n_tokens: int, compression_ratio: float, target_size: int | None = None) -> int:
    """Tokens kept out of ``n_tokens``: ``min(n, target_size)`` or ``round(n * (1 - compression_ratio))``."""
    if target_size is not None:
        return min(n_tokens, target_size)
    return min(n_tokens, max(0, round(n_tokens * (1.0 - compression_ratio))))


def check_int(value: int, name: str, minimum: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_n_sink(n_sink: int) -> None:
    """Raise ``ValueError`` unless ``n_sink`` (leading tokens always kept) is a non-negative int."""
    if isinstance(n_sink, bool) or not isinstance(n_sink, int) or n_sink < 0:
        raise ValueError(f"n_sink must be a non-negative int (leading tokens always kept), got {n_sink!r}")


def check_sink_budget(n_sink: int, n_tokens: int, kept: int) -> None:
    """Raise ``ValueError`` when a prefill of ``n_tokens`` compressed to ``kept`` tokens cannot hold ``n_sink`` sinks.

    Keeping only part of the sinks would silently change the method, so the budget must cover them whenever the
    layer is compressed at all (``kept < n_tokens``).
    """
    if kept < n_tokens and kept < n_sink:
        raise ValueError(
            f"n_sink={n_sink} exceeds the {kept} tokens kept out of {n_tokens}; accepted: n_sink <= {kept} for this "
            "context (lower n_sink, lower compression_ratio or raise target_size)"
        )


def check_fits_context(name: str, size: int, n_tokens: int) -> None:
    """Raise ``ValueError`` when ``size`` final prompt tokens (an observation window, proxy tokens) exceed a prefill
    of ``n_tokens`` tokens; ``name`` is the parameter that set it."""
    if size > n_tokens:
        raise ValueError(
            f"{name}={size} is larger than the context ({n_tokens} tokens); accepted: {name} <= {n_tokens}"
        )
