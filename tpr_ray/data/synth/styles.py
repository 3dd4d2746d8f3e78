"""The synthetic styles: one record each, holding everything that makes a domain.

A style is the shape of a real dataset (its format, split shares, images per identity,
captions per image, file naming) and its look and voice (palette, background, lighting,
vocabulary, caption grammar). File and field names come from the format's description in
:mod:`tpr_ray.data.formats`, so the readers and the writer cannot disagree. A new style is
one more :class:`StyleSpec` in ``SPECS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tpr_ray.data.synth import grammar, render
from tpr_ray.errors import ConfigError

if TYPE_CHECKING:
    from tpr_ray.data.synth.people import Person

# What an identity can look like; every style draws, paints and words these.
COLOURS = ("black", "white", "grey", "red", "blue", "green", "yellow", "orange", "purple", "pink", "brown")
HAIR_COLOURS = ("black", "brown", "blonde", "grey")
UPPER_TYPES = ("t-shirt", "jacket", "coat", "shirt", "sweater", "dress")
LOWER_TYPES = ("trousers", "jeans", "shorts", "skirt")
BAG_TYPES = (None, "backpack", "handbag", "shoulder bag")


@dataclass(frozen=True)
class StyleSpec:
    name: str
    format: str  # a key of tpr_ray.data.formats.FORMATS: annotation file and path field
    stream: int  # the style's random-stream number; never reuse one, or two styles draw alike
    entry_keys: tuple[str, ...]  # the real file's keys in order; "path" stands for the format's path field
    first_id: int
    split_fractions: dict  # split -> share of identities
    images_per_id: tuple[int, int]  # inclusive range
    captions_per_image: int
    image_name: Callable[[Person, int, object], str]  # (person, k, rng) -> path under imgs/
    # Look: the same colour name is a different shade in each domain.
    palette: dict
    background: Callable  # rng -> HxWx3 uint8
    brightness: tuple[float, float]
    tint: tuple[float, float, float]
    noise: float
    occlusion: float  # probability per image
    downscale: int  # >1: rendered at 1/downscale and upscaled, like far-away CCTV crops
    # Voice.
    vocabulary: dict
    caption: Callable[[grammar.Phrases, object], str]
    pair_of_shoes: float  # how often shoes are "a pair of ..." (CUHK-PEDES annotators wrote that)


# --------------------------------------------------------------------------- file naming

# The real CUHK-PEDES release mixes PNG crops (CUHK01, CUHK03) with JPEG ones (the rest).
CUHK_SOURCES = ("CUHK01", "CUHK03", "Market", "test_query", "train_query")


def _cuhk_name(person: Person, k: int, rng) -> str:
    pid = person.person_id
    source = CUHK_SOURCES[(pid - 1) % len(CUHK_SOURCES)]
    return f"{source}/{pid:04d}{k + 1:03d}.{'png' if source.startswith('CUHK') else 'jpg'}"


def _icfg_name(person: Person, k: int, rng) -> str:
    pid = person.person_id
    camera, frame = int(rng.integers(1, 16)), 30 * k + int(rng.integers(30))
    folder = "train" if person.split == "train" else "test"
    month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    when = f"{month:02d}{day:02d}{('morning', 'noon', 'afternoon')[int(rng.integers(3))]}"
    return f"{folder}/{pid:04d}/{pid:04d}_{k:03d}_{camera:02d}_{when}_{frame:04d}_{k}.jpg"


def _rstp_name(person: Person, k: int, rng) -> str:
    camera, frame = int(rng.integers(1, 16)), 30 * k + int(rng.integers(30))
    return f"{person.person_id:04d}_c{camera}_{frame:04d}.jpg"


# --------------------------------------------------------------------------- the styles

JSON_ENTRY = ("split", "captions", "path", "processed_tokens", "id")  # CUHK-PEDES and ICFG-PEDES

SPECS = {
    "cuhk": StyleSpec(
        name="cuhk", format="cuhk", stream=0, entry_keys=JSON_ENTRY, first_id=1,
        split_fractions={"train": 0.846, "val": 0.077, "test": 0.077}, images_per_id=(3, 4), captions_per_image=2,
        image_name=_cuhk_name,
        palette={"black": (25, 25, 28), "white": (235, 235, 230), "grey": (128, 128, 128), "red": (200, 30, 35),
                 "blue": (35, 70, 190), "green": (40, 150, 60), "yellow": (230, 210, 40), "orange": (240, 130, 30),
                 "purple": (120, 50, 160), "pink": (240, 150, 190), "brown": (120, 75, 40)},
        background=render.plain_wall, brightness=(0.88, 1.12), tint=(1.0, 1.0, 1.0), noise=10.0, occlusion=0.10,
        downscale=1,
        vocabulary={
            "man": ("man", "male", "guy"), "woman": ("woman", "lady", "female", "girl"),
            "colours": {c: (c,) for c in COLOURS} | {"grey": ("grey", "gray")},
            "hair": {"black": ("black",), "brown": ("brown",), "blonde": ("blonde", "blond"),
                     "grey": ("grey", "gray")},
            "short": ("short",), "long": ("long",),
            "t-shirt": ("t-shirt", "short sleeved shirt"), "jacket": ("jacket",), "coat": ("coat", "long coat"),
            "shirt": ("shirt", "long sleeved shirt"), "sweater": ("sweater",), "dress": ("dress",),
            "trousers": ("pants", "trousers"), "jeans": ("jeans",), "shorts": ("shorts",), "skirt": ("skirt",),
            "shoes": ("shoes", "sneakers"), "backpack": ("backpack",), "handbag": ("handbag", "purse"),
            "shoulder bag": ("shoulder bag", "bag over the shoulder"),
        },
        caption=grammar.plain_sentences, pair_of_shoes=0.5,
    ),
    "icfg": StyleSpec(
        name="icfg", format="icfg", stream=1, entry_keys=JSON_ENTRY, first_id=0,
        split_fractions={"train": 0.756, "test": 0.244}, images_per_id=(6, 10), captions_per_image=1,
        image_name=_icfg_name,
        palette={"black": (40, 36, 40), "white": (245, 240, 228), "grey": (150, 150, 155), "red": (165, 25, 45),
                 "blue": (30, 45, 120), "green": (70, 110, 60), "yellow": (215, 180, 60), "orange": (210, 105, 45),
                 "purple": (95, 55, 120), "pink": (225, 130, 160), "brown": (140, 95, 60)},
        background=render.indoor, brightness=(0.85, 1.05), tint=(1.05, 1.0, 0.9), noise=4.0, occlusion=0.15,
        downscale=1,
        vocabulary={
            "man": ("gentleman", "young man"), "woman": ("lady", "young woman"),
            "colours": {"black": ("jet-black", "ebony"), "white": ("ivory", "off-white"),
                        "grey": ("heather-grey", "ash-grey"), "red": ("crimson", "scarlet"),
                        "blue": ("navy", "cobalt"), "green": ("olive", "forest-green"),
                        "yellow": ("mustard", "golden"), "orange": ("burnt-orange", "rust"),
                        "purple": ("plum", "violet"), "pink": ("rose", "blush-pink"), "brown": ("camel", "tan")},
            "hair": {"black": ("jet-black", "raven"), "brown": ("chestnut", "auburn"),
                     "blonde": ("golden-blonde", "honey"), "grey": ("silver", "salt-and-pepper")},
            "short": ("cropped", "neatly trimmed"), "long": ("flowing", "shoulder-length"),
            "t-shirt": ("crew-neck tee", "short-sleeved tee"), "jacket": ("bomber jacket", "zip-up jacket"),
            "coat": ("overcoat", "trench coat"), "shirt": ("button-down shirt", "collared shirt"),
            "sweater": ("knit pullover", "cable-knit sweater"), "dress": ("midi dress", "knee-length dress"),
            "trousers": ("tailored slacks", "chinos"), "jeans": ("denim jeans", "straight-leg denims"),
            "shorts": ("bermuda shorts", "knee-length shorts"), "skirt": ("pleated skirt", "a-line skirt"),
            "shoes": ("leather loafers", "low-top sneakers"), "backpack": ("rucksack", "daypack"),
            "handbag": ("tote", "clutch"), "shoulder bag": ("crossbody bag", "satchel"),
        },
        caption=grammar.fashion_magazine, pair_of_shoes=0.0,
    ),
    "rstp": StyleSpec(
        name="rstp", format="rstp", stream=2, entry_keys=("id", "path", "captions", "split"), first_id=0,
        split_fractions={"train": 0.90, "val": 0.05, "test": 0.05}, images_per_id=(5, 5), captions_per_image=2,
        image_name=_rstp_name,
        palette={"black": (50, 50, 55), "white": (225, 228, 235), "grey": (110, 115, 120), "red": (215, 55, 50),
                 "blue": (60, 110, 200), "green": (60, 170, 90), "yellow": (240, 225, 80), "orange": (250, 150, 60),
                 "purple": (150, 80, 180), "pink": (250, 170, 200), "brown": (105, 70, 45)},
        background=render.outdoor, brightness=(0.95, 1.15), tint=(0.95, 1.0, 1.06), noise=7.0, occlusion=0.20,
        downscale=2,
        vocabulary={
            "man": ("boy", "male pedestrian"), "woman": ("girl", "female pedestrian"),
            "colours": {"black": ("black", "dark"), "white": ("white", "snow-white"),
                        "grey": ("gray", "silver-gray"), "red": ("red", "bright red"),
                        "blue": ("sky-blue", "light blue"), "green": ("green", "grass-green"),
                        "yellow": ("yellow", "lemon"), "orange": ("orange", "tangerine"),
                        "purple": ("violet", "lilac"), "pink": ("pink", "light pink"), "brown": ("coffee", "brown")},
            "hair": {"black": ("black", "dark"), "brown": ("brown", "dark brown"), "blonde": ("yellow", "blond"),
                     "grey": ("gray", "white")},
            "short": ("short",), "long": ("long",),
            "t-shirt": ("tee", "short-sleeve top"), "jacket": ("windbreaker", "jacket"),
            "coat": ("long coat", "parka"), "shirt": ("shirt", "long-sleeve top"), "sweater": ("jumper", "knit top"),
            "dress": ("dress", "frock"), "trousers": ("pants", "long pants"), "jeans": ("jeans", "denim pants"),
            "shorts": ("shorts", "short pants"), "skirt": ("skirt", "knee skirt"), "shoes": ("trainers", "flats"),
            "backpack": ("schoolbag", "backpack"), "handbag": ("hand bag", "small bag"),
            "shoulder bag": ("side bag", "sling bag"),
        },
        caption=grammar.clipped, pair_of_shoes=0.0,
    ),
}
STYLES = tuple(SPECS)


def get_spec(style: str) -> StyleSpec:
    if style not in SPECS:
        raise ConfigError(f"unknown synthetic style {style!r}; choose one of {', '.join(STYLES)}")
    return SPECS[style]
