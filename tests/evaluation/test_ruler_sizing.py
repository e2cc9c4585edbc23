"""The budget search against brute force, and the token counter."""

import random

import pytest

from kvpress_evaluation.ruler.sizing import largest_fitting, token_counter


def test_largest_fitting_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        steps = [rng.randint(0, 9) for _ in range(rng.randint(1, 300))]
        cost = [rng.randint(0, 50)]
        for s in steps:
            cost.append(cost[-1] + s)  # non-decreasing, with flat stretches
        target = rng.randint(0, cost[-1] + 20)
        low = rng.randint(0, len(cost) - 1)
        high = rng.choice([None, rng.randint(low, len(cost) - 1)])
        limit = len(cost) - 1 if high is None else high
        calls = []

        def tokens_of(n, calls=calls, cost=cost):
            calls.append(n)
            return cost[n] if n < len(cost) else cost[-1] + 1000 + n

        fitting = [n for n in range(low, limit + 1) if cost[n] <= target]
        assert largest_fitting(tokens_of, target, low, high) == (max(fitting) if fitting else None)
        assert all(n >= low and (high is None or n <= high) for n in calls)


def test_token_counter_kinds():
    class Encoder:
        def encode(self, text, add_special_tokens=True):
            assert add_special_tokens is False
            return list(text)

    assert token_counter(Encoder())("abcd") == 4
    assert token_counter(str.split)("a b c") == 3
    with pytest.raises(ValueError, match="tokenizer must have an encode method"):
        token_counter(3)
