"""A random order of repeated words that stays put as words or repeats are added.

Reshuffling the whole list for every haystack size would change the token count non-monotonically (neighbouring
words merge differently), which misleads the size search. Here occurrence ``j`` of word ``i`` gets a fixed random
key, and the text is the occurrences sorted by key: growing the list only inserts new words between old ones.
"""

from __future__ import annotations

import random


class StableOrder:
    """Random sort keys per ``(word index, occurrence)``, drawn once and kept."""

    def __init__(self, seed: int):
        self.seed = seed
        self.keys: dict[int, list[float]] = {}
        self.streams: dict[int, random.Random] = {}

    def arrange(self, words: list[str], counts: list[int]) -> list[str]:
        """``words[i]`` repeated ``counts[i]`` times, in this object's fixed random order."""
        occurrences = []
        for i, (word, count) in enumerate(zip(words, counts)):
            keys = self.keys.setdefault(i, [])
            if len(keys) < count:
                stream = self.streams.setdefault(i, random.Random(f"{self.seed}|{i}"))
                keys.extend(stream.random() for _ in range(count - len(keys)))
            occurrences.extend((key, word) for key in keys[:count])
        occurrences.sort(key=lambda pair: pair[0])
        return [word for _, word in occurrences]
