"""Caption grammars: how each style's annotators put a person's attributes into words.

A grammar receives the attribute phrases, already worded in the style's vocabulary, and
returns one caption. Several sentence shapes per grammar, chosen at random.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class Phrases:
    noun: str
    pron: str
    poss: str
    hair: str | None
    upper: str
    lower: str | None
    shoes: str | None
    bag: str | None

    def outfit(self, rng) -> list[str]:
        items = [x for x in (self.upper, self.lower, self.shoes) if x]
        if rng.random() < 0.3:  # word-order variety: not always top to bottom
            items = [items[i] for i in rng.permutation(len(items))]
        return items


def plain_sentences(p: Phrases, rng) -> str:
    """CUHK-PEDES: plain, long descriptive sentences: 'The man is wearing ... He has ...'."""
    outfit = _and(p.outfit(rng))
    variant = int(rng.integers(3))
    if variant == 0:
        parts = [f"the {p.noun} is wearing {outfit}"]
        parts += [f"{p.pron} has {p.hair}"] if p.hair else []
        parts += [f"{p.pron} is carrying {p.bag}"] if p.bag else []
        return " ".join(_sentence(s) for s in parts)
    if variant == 1:
        who = f"a {p.noun} with {p.hair}" if p.hair else f"a {p.noun}"
        return _sentence(f"{who} is wearing {outfit}" + (f" and is carrying {p.bag}" if p.bag else ""))
    parts = [f"this {p.noun} wears {outfit}" + (f" and has {p.hair}" if p.hair else "")]
    parts += [f"{p.pron} also carries {p.bag}"] if p.bag else []
    return " ".join(_sentence(s) for s in parts)


def fashion_magazine(p: Phrases, rng) -> str:
    """ICFG-PEDES: long, detailed, fashion-magazine wording with sleeve details."""
    sleeves = " with long sleeves" if rng.random() < 0.5 and not p.upper.endswith(("tee", "dress")) else ""
    upper = p.upper + sleeves
    variant = int(rng.integers(3))
    if variant == 0:
        text = f"the {p.noun}" + (f" has {p.hair} and" if p.hair else "") + f" is dressed in {upper}"
        text += f" paired with {p.lower}" if p.lower else ""
        text += f", with {p.shoes} on {p.poss} feet" if p.shoes else ""
        parts = [text] + ([f"{p.pron} carries {p.bag} as an accessory"] if p.bag else [])
    elif variant == 1:
        text = f"a {p.noun}" + (f" with {p.hair}" if p.hair else "") + f", wearing {upper}"
        text += f" teamed with {p.lower}" if p.lower else ""
        text += f" and finished off with {p.shoes}" if p.shoes else ""
        text += f", accessorised with {p.bag}" if p.bag else ""
        parts = [text, "the overall look is smart and coordinated"]
    else:
        text = f"dressed in {_and([x for x in (upper, p.lower) if x])}, this {p.noun}"
        text += f" styles {p.poss} {p.hair} casually" if p.hair else " strolls along"
        text += f" and steps out in {p.shoes}" if p.shoes else ""
        parts = [text] + ([f"{p.pron} is holding {p.bag}"] if p.bag else [])
    return " ".join(_sentence(s) for s in parts)


def clipped(p: Phrases, rng) -> str:
    """RSTPReid: short, clipped descriptions with everyday words."""
    variant = int(rng.integers(3))
    if variant == 0:
        parts = [f"a {p.noun} in {_and([x for x in (p.upper, p.lower) if x])}"]
        parts += [f"{p.shoes}"] if p.shoes else []
        parts += [f"with {p.bag}"] if p.bag else []
        parts += [f"{p.hair}"] if p.hair else []
        return _sentence(", ".join(parts))
    if variant == 1:
        parts = [f"{p.noun} with {p.hair}" if p.hair else p.noun, _and(p.outfit(rng))]
        return _sentence(", ".join(parts + ([p.bag] if p.bag else [])))
    text = f"the {p.noun} wears {_and(p.outfit(rng))}" + (f" and has {p.hair}" if p.hair else "")
    return _sentence(text + (f", carrying {p.bag}" if p.bag else ""))


def with_article(phrase: str) -> str:
    """'a red coat', 'an ivory tote', but plurals ('blue jeans', 'white shoes') take none."""
    last = phrase.split()[-1]
    if last.endswith("s") and not last.endswith("ss"):
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def tokens(caption: str) -> list[str]:
    """The lower-case word list CUHK-PEDES and ICFG-PEDES store as ``processed_tokens``."""
    return re.findall(r"[a-z]+", caption.lower())
