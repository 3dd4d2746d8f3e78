"""Synthetic identities and their captions.

Each identity is a set of visible attributes (gender, hair, garments and their colours,
shoes, bag); images draw them and captions name them, so the text truly describes the
image. Every random choice comes from a stream derived from (seed, style, purpose,
indices), so a seed gives the same people, pictures and words.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tpr_ray.data.synth.grammar import Phrases, with_article
from tpr_ray.data.synth.render import SKIN_RGB
from tpr_ray.data.synth.styles import BAG_TYPES, COLOURS, HAIR_COLOURS, LOWER_TYPES, UPPER_TYPES, StyleSpec, get_spec
from tpr_ray.errors import ConfigError


@dataclass(frozen=True)
class Person:
    person_id: int
    split: str
    gender: str  # man / woman
    hair_length: str  # short / long
    hair_colour: str
    upper: str
    upper_colour: str
    lower: str | None  # None with a dress
    lower_colour: str | None
    shoes_colour: str
    bag: str | None
    bag_colour: str | None
    skin: int

    def looks(self) -> tuple:
        """Everything a caption can say; two identities should not share it."""
        return (self.gender, self.hair_length, self.hair_colour, self.upper, self.upper_colour,
                self.lower, self.lower_colour, self.shoes_colour, self.bag, self.bag_colour)


def split_sizes(style: str, n_ids: int) -> dict:
    """Identities per split, in the real dataset's proportions but at least 2 per split."""
    fractions = get_spec(style).split_fractions
    sizes = {split: max(2, round(share * n_ids)) for split, share in fractions.items() if split != "train"}
    sizes = {"train": n_ids - sum(sizes.values()), **sizes}
    if sizes["train"] < 2:
        minimum = 2 + 2 * (len(fractions) - 1)
        raise ConfigError(f"{style} needs at least {minimum} identities (2 per split), got {n_ids}")
    return sizes


def make_identities(style: str, n_ids: int, seed: int) -> list[Person]:
    """The dataset's identities in id order (train, then val, then test), all distinct."""
    spec = get_spec(style)
    splits = [split for split, n in split_sizes(style, n_ids).items() for _ in range(n)]
    rng = stream(seed, spec, "identities")
    people, seen = [], set()
    for index, split in enumerate(splits):
        for _ in range(100):
            person = _sample_person(rng, spec.first_id + index, split)
            if person.looks() not in seen:
                break
        seen.add(person.looks())
        people.append(person)
    return people


def _sample_person(rng, person_id: int, split: str) -> Person:
    woman = rng.random() < 0.5
    hair_length = "long" if rng.random() < (0.8 if woman else 0.1) else "short"
    upper = pick(rng, UPPER_TYPES if woman else UPPER_TYPES[:-1])
    upper_colour = pick(rng, COLOURS)
    lower = None if upper == "dress" else pick(rng, LOWER_TYPES if woman else LOWER_TYPES[:-1])
    # A lower garment of the torso's colour would blur the two attributes together.
    lower_colour = None if lower is None else pick(rng, [c for c in COLOURS if c != upper_colour])
    bag = pick(rng, BAG_TYPES)
    return Person(
        person_id=person_id, split=split, gender="woman" if woman else "man", hair_length=hair_length,
        hair_colour=HAIR_COLOURS[rng.choice(4, p=[0.5, 0.25, 0.15, 0.1])], upper=upper,
        upper_colour=upper_colour, lower=lower, lower_colour=lower_colour, shoes_colour=pick(rng, COLOURS),
        bag=bag, bag_colour=None if bag is None else pick(rng, COLOURS), skin=int(rng.integers(len(SKIN_RGB))),
    )


PURPOSES = ("identities", "counts", "images")


def stream(seed: int, spec: StyleSpec, purpose: str, *indices: int):
    """An independent random stream per (seed, style, purpose, indices).

    The purpose tag matters: SeedSequence treats [1, 2] and [1, 2, 0] alike, so streams
    told apart only by an extra trailing index could coincide.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng([seed, spec.stream, PURPOSES.index(purpose), *indices])


def pick(rng, options):
    return options[int(rng.integers(len(options)))]


def describe(person: Person, style: str, rng) -> str:
    """One caption: most attributes (0-2 of hair, lower, shoes, bag left out), in the style's voice."""
    spec = get_spec(style)
    words = spec.vocabulary
    optional = ["hair", "shoes"] + (["lower"] if person.lower else []) + (["bag"] if person.bag else [])
    n_drop = min(len(optional), int(rng.choice(3, p=[0.4, 0.4, 0.2])))
    dropped = {optional[i] for i in rng.choice(len(optional), n_drop, replace=False)}

    def garment(colour_name, kind):
        return with_article(f"{pick(rng, words['colours'][colour_name])} {pick(rng, words[kind])}")

    def shoes():
        phrase = garment(person.shoes_colour, "shoes")
        return f"a pair of {phrase}" if spec.pair_of_shoes and rng.random() < spec.pair_of_shoes else phrase

    man = person.gender == "man"
    hair = f"{pick(rng, words[person.hair_length])} {pick(rng, words['hair'][person.hair_colour])} hair"
    phrases = Phrases(
        noun=pick(rng, words[person.gender]), pron="he" if man else "she", poss="his" if man else "her",
        hair=None if "hair" in dropped else hair,
        upper=garment(person.upper_colour, person.upper),
        lower=None if "lower" in dropped or not person.lower else garment(person.lower_colour, person.lower),
        shoes=None if "shoes" in dropped else shoes(),
        bag=None if "bag" in dropped or not person.bag else garment(person.bag_colour, person.bag),
    )
    return spec.caption(phrases, rng)


def colour_words(style: str, colour: str) -> tuple[str, ...]:
    """The words `style` may use for a clothing colour (for tests and inspection)."""
    return get_spec(style).vocabulary["colours"][colour]
