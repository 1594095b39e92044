"""Synthetic children's stories for the induction study (the paper's Sec. 4.1 / App. J).

The paper trains small models on children's stories whose character names are replaced by
random names of two tokens, and measures accuracy on the second token of a name already
mentioned: a model can only get it right by finding the earlier mention and copying (an
induction head). That corpus is not available offline, so stories come from a seeded grammar:
two or three characters, places, objects, actions and dialogue, each character mentioned
several times. Names are an upper-case consonant and a lower-case letter (`Kq`, `Bx`): two
tokens under the byte tokenizer, and the second is unpredictable (1 of 26) except by looking
back. No grammar word starts with a name's first letter in upper case, and the characters of
one story have different first letters, so the first token says which name follows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST = "BCDFGHJKLMNPRSVWZ"  # no vowels, no T: the grammar's capitals are A, E, I, O, T
SECOND = "abcdefghijklmnopqrstuvwxyz"
PLACES = ["the park", "the forest", "the river", "the garden", "the beach", "the hill", "school"]
OBJECTS = ["a ball", "a kite", "a red box", "a small boat", "a book", "a shiny stone", "a cake"]
FEELINGS = ["happy", "sad", "tired", "brave", "curious", "hungry", "excited"]
ACTIONS = ["ran", "jumped", "danced", "sang", "walked", "played", "looked around"]

TEMPLATES = [
    "Once upon a time, {A} lived near {place}.",
    "{A} had a friend named {B}.",
    "One day, {A} and {B} went to {place}.",
    "{A} found {object} under a tree.",
    '"Oh, look at this!" said {A}. {B} came to see.',
    "{B} felt {feeling}, so {B} {action}.",
    'Then {B} said, "{A}, can I play with it too?"',
    "{A} smiled and gave it to {B}.",
    "At the end of the day, {A} and {B} {action} home.",
    "{A} was {feeling}. {B} was {feeling} too.",
    "After that, {B} told {A} a story about {place}.",
    "{C} saw them and {action} over.",
    '"Oh hello, {A}! And hello, {B}!" said {C}.',
    "{A} showed {C} {object}.",
    "In the evening, {C} and {A} {action} by {place}.",
]


def random_names(rng: random.Random, count: int) -> list[str]:
    firsts = rng.sample(FIRST, count)
    return [f + rng.choice(SECOND) for f in firsts]


def story(rng: random.Random, sentences: int = 10) -> tuple[str, list[str]]:
    """(text, the story's names A, B, C)."""
    names = random_names(rng, 3)
    cast = dict(zip("ABC", names))
    lines = [TEMPLATES[0], TEMPLATES[1]]
    lines += rng.choices(TEMPLATES[2:], k=max(0, sentences - 2))
    text = " ".join(
        line.format(
            **cast,
            place=rng.choice(PLACES),
            object=rng.choice(OBJECTS),
            feeling=rng.choice(FEELINGS),
            action=rng.choice(ACTIONS),
        )
        for line in lines
    )
    return text, names


def stories(seed: int, count: int, sentences: int = 10) -> list[str]:
    rng = random.Random(seed)
    return [story(rng, sentences)[0] for _ in range(count)]


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
