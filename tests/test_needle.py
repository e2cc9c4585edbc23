"""Needle-in-a-haystack contexts: length, needle placement, determinism, filler variety, bad input."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpress.needle import PASSKEY_ANSWER, PASSKEY_NEEDLE, build_needle_context
from tests.fixtures_pipeline import smollm2_tokenizer


def n_tokens(text: str) -> int:
    return len(smollm2_tokenizer()(text, add_special_tokens=False).input_ids)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    target=st.integers(min_value=150, max_value=3000),
    depth=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_length_and_needle_depth(target, depth, seed):
    text = build_needle_context(smollm2_tokenizer(), target, PASSKEY_NEEDLE, depth, seed)
    total = n_tokens(text)
    assert abs(total - target) <= 0.02 * target
    assert text.count(PASSKEY_NEEDLE) == 1
    start = text.index(PASSKEY_NEEDLE)
    # Depth = share of the filler (everything but the needle) that comes before the needle, measured in tokens.
    before = n_tokens(text[:start]) if start else 0
    filler = total - n_tokens(PASSKEY_NEEDLE)
    # The needle snaps to a sentence boundary: off by less than one filler sentence (plus seam and rounding slack).
    longest = max(n_tokens(" " + s) for s in re.split(r"(?<=\.) ", text.replace(PASSKEY_NEEDLE, "")) if s)
    assert abs(before - depth * filler) <= longest + 3
    if 0 < depth < 1:
        assert start == 0 or text[:start].endswith(". ")


@pytest.mark.parametrize("target", [100, 500, 2000])
def test_edges_put_the_needle_first_or_last(target):
    tok = smollm2_tokenizer()
    first = build_needle_context(tok, target, PASSKEY_NEEDLE, depth=0.0, seed=3)
    last = build_needle_context(tok, target, PASSKEY_NEEDLE, depth=1.0, seed=3)
    assert first.startswith(PASSKEY_NEEDLE) and last.endswith(PASSKEY_NEEDLE)
    for text in (first, last):
        assert abs(n_tokens(text) - target) <= 0.02 * target


def test_deterministic_and_seeded():
    tok = smollm2_tokenizer()
    a = build_needle_context(tok, 1200, PASSKEY_NEEDLE, 0.3, seed=7)
    assert a == build_needle_context(tok, 1200, PASSKEY_NEEDLE, 0.3, seed=7)
    b = build_needle_context(tok, 1200, PASSKEY_NEEDLE, 0.3, seed=8)
    assert a != b
    # The needle's position does not depend on the seed beyond one sentence.
    assert abs(a.index(PASSKEY_NEEDLE) - b.index(PASSKEY_NEEDLE)) < 0.05 * len(a)


def test_filler_is_varied_and_the_answer_unique():
    text = build_needle_context(smollm2_tokenizer(), 2000, PASSKEY_NEEDLE, 0.5, seed=0)
    sentences = [s for s in re.split(r"(?<=\.) ", text) if s.endswith(".")]
    assert len(sentences) > 60
    assert len(set(sentences)) > 0.9 * len(sentences)
    assert len(set(text.split())) > 150
    # The filler has no digits: the passkey appears once, inside the needle only.
    assert text.count(PASSKEY_ANSWER) == 1
    assert not re.search(r"\d", text.replace(PASSKEY_NEEDLE, ""))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(n_tokens=0), "n_tokens"),
        (dict(n_tokens=10.5), "n_tokens"),
        (dict(n_tokens=5), "n_tokens"),  # shorter than the needle itself
        (dict(needle="  "), "needle"),
        (dict(depth=1.5), "depth"),
        (dict(depth=float("nan")), "depth"),
        (dict(seed="0"), "seed"),
    ],
)
def test_bad_input_names_the_parameter(kwargs, name):
    args = dict(n_tokens=300, needle=PASSKEY_NEEDLE, depth=0.5, seed=0) | kwargs
    with pytest.raises(ValueError, match=name):
        build_needle_context(smollm2_tokenizer(), **args)
