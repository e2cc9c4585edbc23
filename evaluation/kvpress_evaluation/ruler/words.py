"""Word lists and needle values for the RULER tasks, written for this package (no external data).

Keys of the niah tasks are ``adjective-noun`` pairs; the common-words task draws from the same real words and, at
lengths that need more distinct words than they hold, from pronounceable pseudo-words built from syllables.
"""

from __future__ import annotations

import functools
import itertools
import random
import uuid


def _split(text: str) -> tuple[str, ...]:
    """The whitespace-separated words of ``text``."""
    return tuple(text.split())


ADJECTIVES = _split(
    """
    able absent acid agile amber ample ancient angry arctic ashen autumn awake bare bashful bitter blank bold
    bouncy brave breezy bright brisk broad bronze busy calm candid careful cheerful chilly civil clever cloudy
    coastal cosmic crisp curious damp dapper daring dark dusty eager early earnest elder electric empty endless
    faded faint famous fancy fearless fierce flat fluffy foggy fond frail fresh frosty gentle giant gifted glad
    gloomy golden graceful grand green grumpy hasty hidden hollow honest humble hungry icy idle jolly keen kind
    lanky lazy little lively lonely loud lucky marble mellow merry mighty misty modern modest muddy narrow neat
    nimble noble noisy odd orange painted pale patient plain polite proud purple quick quiet rapid rare restless
    rich rocky rosy rough round royal rustic rusty sandy scarlet secret shaggy sharp shiny silent silky simple
    sleepy slim smooth snowy soft solid sour spare spicy steady steep stormy strange sturdy sunny swift tall
    tame tender thin tidy tiny tired tough tranquil urban vast velvet vivid warm wary weary wild windy wise
    witty wooden woolly young zesty
    """
)

NOUNS = _split(
    """
    acorn anchor anvil apple apron arch arrow attic badge bakery balcony ballad banner barn barrel basket beacon
    beetle bell bench berry blanket boat bonnet bottle boulder bracelet branch bread brick bridge brook broom
    bucket buffalo button cabin cactus camel canal candle canoe canyon carpet carriage castle cellar chalk
    chapel cherry chimney circus cliff cloak clock clover comet compass copper cottage cradle crane crayon creek
    crown crystal cushion dagger daisy desert diamond dolphin donkey dragon drum eagle easel ember falcon
    feather fence ferry fiddle flag flute forest fountain fox garden garnet gate glacier glove goblet goose
    granite harbor harp hatchet hazel helmet heron hill hive horizon hummingbird island ivory jacket jar kettle
    kite ladder lagoon lantern lemon lighthouse lily lizard locket loom magnet mango maple marsh meadow mirror
    mitten moose mountain mushroom needle nest nutmeg oak oasis orchard otter owl paddle palace parcel parrot
    pebble pepper piano pillow pine planet plum pond pony puddle pumpkin quill quilt rabbit raft raven reef
    ribbon river robin rocket saddle sail salmon satchel scarf scroll shell shovel sparrow spoon squirrel stable
    statue stone teapot thimble thistle thunder tiger timber tower trolley trumpet tulip tunnel turnip umbrella
    valley vase violin wagon walnut walrus well whale whistle willow window wizard wolf yacht zebra
    """
)

VERBS = _split(
    """
    admire arrive bake balance borrow bounce build carry carve chase climb collect cook count cover dance
    deliver describe discover drift enjoy explain explore fetch fold follow gather giggle guard hammer hike
    hover hurry imagine invent juggle knit laugh launch listen march measure melt mend mix observe offer open
    organize paint pause plant polish pour practice question reach relax repair rescue roam sail scatter search
    shiver sketch slide sparkle spin splash stitch stretch study swim tumble twirl visit wander wave whisper
    wiggle wonder yawn
    """
)

_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "fl",
    "gr",
    "kl",
    "pl",
    "st",
    "tr",
)
_VOWELS = ("a", "e", "i", "o", "u")
# Half of the 2- and 3-syllable space, so that rejection sampling of fresh pseudo-words stays fast.
_MAX_WORDS = ((len(_ONSETS) * len(_VOWELS)) ** 2 + (len(_ONSETS) * len(_VOWELS)) ** 3) // 2


@functools.lru_cache(maxsize=1)
def word_keys() -> tuple[str, ...]:
    """All ``adjective-noun`` keys, sorted (the niah key space)."""
    return tuple(sorted(f"{a}-{n}" for a, n in itertools.product(ADJECTIVES, NOUNS)))


def real_words() -> tuple[str, ...]:
    """Distinct nouns, adjectives and verbs, sorted."""
    return tuple(sorted(set(ADJECTIVES) | set(NOUNS) | set(VERBS)))


def word_pool(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct lowercase words: the real words in random order, then random pseudo-words as needed.

    Pseudo-words (``brilo``, ``tamezu``...) have 2 or 3 syllables and never coincide with a real word; they let the
    common-words task reach long lengths that need more distinct words than the real lists hold.
    """
    words = list(real_words())
    rng.shuffle(words)
    if n <= len(words):
        return words[:n]
    if n > _MAX_WORDS:
        raise ValueError(f"n must be at most {_MAX_WORDS} (distinct words this package can build), got {n}")
    taken = set(words)
    while len(words) < n:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 3))))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def random_value(kind: str, rng: random.Random) -> str:
    """One needle key or value of ``kind``: ``"words"`` (adjective-noun), ``"numbers"`` (7 digits) or ``"uuids"``."""
    if kind == "words":
        return rng.choice(word_keys())
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"kind must be one of 'words', 'numbers', 'uuids', got {kind!r}")


def distinct_values(kind: str, n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[str]:
    """``n`` distinct values of ``kind`` none of which is in ``exclude``."""
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        value = random_value(kind, rng)
        if value not in seen:
            seen.add(value)
            out.append(value)
    return out
