"""Synthetic children's stories for the induction studies (the paper's Sec. 4.1 / App. J).

The paper trains small models on children's stories with their ordinary character names, then
measures induction on 100 held-out stories whose names are replaced by random names of two
tokens: accuracy on the second token of a name already mentioned, which only copying from the
earlier mention predicts (an induction head). That corpus is not available offline, so stories
come from a seeded grammar: two or three characters, one place and one object per story (met
again later in it, as in children's stories), feelings, actions and dialogue.

Casts. `common_names`: ordinary first names from `COMMON_NAMES`, a fixed list that recurs
across the corpus (the training data of the paper's protocol). `random_names`: an upper-case
consonant and a lower-case letter (`Kq`), two tokens under the byte tokenizer (one ASCII
character each); the App. J condition trains on these. `test_names`: random two-token names
whose two letters never follow each other anywhere in a common-names corpus (no common name
starts with them, and every other capitalised word starts with a vowel or T), so their second
token is never seen after their first in that training data. The characters of one story have
different first letters, so the first token of a mention says which character is named and
only an earlier mention tells the second.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST = "BCDFGHJKLMNPRSVWZ"  # no vowels, no T: the grammar's capitals are A, E, I, O, T
SECOND = "abcdefghijklmnopqrstuvwxyz"
COMMON_NAMES = [
    "Lily", "Lucy", "Leo", "Tom", "Tim", "Ted", "Sam", "Sue", "Sara", "Ben", "Bob", "Bella",
    "Max", "Mia", "Molly", "Anna", "Amy", "Jack", "Jane", "Jim", "Kate", "Kim", "Zoe", "Dan",
    "Daisy", "Emma", "Ella", "Nick", "Nora", "Paul", "Peter", "Rose", "Ruby", "Grace", "Fred",
]  # fmt: skip
"""Ordinary first names, recurring across a training corpus; many share a first letter (Lily,
Lucy, Leo), so which one follows a capital is told by an earlier mention, as in real stories."""
PLACES = ["the park", "the forest", "the river", "the garden", "the beach", "the hill", "school"]
OBJECTS = ["ball", "kite", "red box", "small boat", "book", "shiny stone", "cake"]
FEELINGS = ["happy", "sad", "tired", "brave", "curious", "hungry", "excited"]
ACTIONS = ["ran", "jumped", "danced", "sang", "walked", "played", "looked around"]

TEMPLATES = [
    "Once upon a time, {A} lived near {place}.",
    "{A} had a friend named {B}.",
    "One day, {A} and {B} went to {place}.",
    "{A} found a {object} under a tree.",
    '"Oh, look at this!" said {A}. {B} came to see.',
    "{B} felt {feeling}, so {B} {action}.",
    'Then {B} said, "{A}, can I play with the {object} too?"',
    "{A} smiled and gave the {object} to {B}.",
    "At the end of the day, {A} and {B} {action} home.",
    "{A} was {feeling}. {B} was {feeling} too.",
    "After that, {B} told {A} a story about {place}.",
    "{C} saw them and {action} over.",
    '"Oh hello, {A}! And hello, {B}!" said {C}.',
    "{A} showed {C} the {object}.",
    "In the evening, {C} and {A} {action} by {place}.",
]


def _pairs(words) -> set[str]:
    """Every upper-case letter followed by a lower-case one in these texts."""
    text = " ".join(words)
    return {text[i : i + 2] for i in range(len(text) - 1)
            if text[i].isupper() and text[i + 1].islower()}  # fmt: skip


TEST_NAMES = sorted(
    {f + s for f in FIRST for s in SECOND}
    - _pairs([*TEMPLATES, *COMMON_NAMES, *PLACES, *OBJECTS, *FEELINGS, *ACTIONS])
)
"""Two-token names absent from any common-names corpus: no text of the grammar or the name
list has these two letters next to each other."""


def random_names(rng: random.Random, count: int, pool: list[str] | None = None) -> list[str]:
    """`count` two-letter names with different first letters, from `pool` (default: every
    FIRST x SECOND pair)."""
    if pool is None:
        firsts = rng.sample(FIRST, count)
        return [f + rng.choice(SECOND) for f in firsts]
    by_first: dict[str, list[str]] = {}
    for name in pool:
        by_first.setdefault(name[0], []).append(name)
    return [rng.choice(by_first[f]) for f in rng.sample(sorted(by_first), count)]


def test_names(rng: random.Random, count: int) -> list[str]:
    return random_names(rng, count, TEST_NAMES)


def common_names(rng: random.Random, count: int) -> list[str]:
    """`count` names of COMMON_NAMES with different first letters."""
    names: list[str] = []
    for name in rng.sample(COMMON_NAMES, len(COMMON_NAMES)):
        if name[0] not in {n[0] for n in names}:
            names.append(name)
        if len(names) == count:
            return names
    raise ValueError(f"COMMON_NAMES has fewer than {count} first letters")


CASTS = {"random": random_names, "common": common_names, "test": test_names}


def story(rng: random.Random, sentences: int = 10, cast: str = "random") -> tuple[str, list[str]]:
    """(text, the story's names A, B, C); `cast` is a key of CASTS. One place and one object
    per story, met again in later sentences."""
    names = CASTS[cast](rng, 3)
    fill = dict(zip("ABC", names), place=rng.choice(PLACES), object=rng.choice(OBJECTS))
    lines = [TEMPLATES[0], TEMPLATES[1]]
    lines += rng.choices(TEMPLATES[2:], k=max(0, sentences - 2))
    text = " ".join(
        line.format(**fill, feeling=rng.choice(FEELINGS), action=rng.choice(ACTIONS))
        for line in lines
    )
    return text, names


def stories(seed: int, count: int, sentences: int = 10, cast: str = "random") -> list[str]:
    rng = random.Random(seed)
    return [story(rng, sentences, cast)[0] for _ in range(count)]


@dataclass(frozen=True)
class Mention:
    """A name's occurrence at byte `start` of its story; `repeat`: not its first mention."""

    start: int
    repeat: bool


def mentions(text: str, names: list[str]) -> list[Mention]:
    """Every occurrence of each name (they cannot overlap: the first letters differ)."""
    found = []
    for name in names:
        at, first = text.find(name), True
        while at >= 0:
            found.append(Mention(at, not first))
            first = False
            at = text.find(name, at + 1)
    return sorted(found, key=lambda m: m.start)


def story_names(text: str) -> list[str]:
    """The names in a generated story: two-letter words of the FIRST/SECOND alphabets."""
    words = {w.strip('.,!?"') for w in text.split()}
    return sorted(w for w in words if len(w) == 2 and w[0] in FIRST and w[1] in SECOND)
